"""Stage 2: K responses per instruction, rendered with the model's own chat template.

Records are appended per finished prompt (all K samples in one atomic append), so a killed run
resumes where it stopped without losing or duplicating a response.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from prefloop import distributed
from prefloop.artifacts import RunDir, Stage, Upstream, append_jsonl, read_jsonl, write_jsonl
from prefloop.chat import render_prompt
from prefloop.config import Recipe
from prefloop.errors import PrefloopError

if TYPE_CHECKING:  # the engine imports torch: a command that refuses its settings never needs it
    from prefloop.engine import Sampling
    from prefloop.engine.backend import Backend

CARRIED = ("constraints", "task")  # instruction fields a ranker or an evaluation needs later


def complete_groups(records: list[dict], k: int) -> dict[str, list[dict]]:
    """The ids whose k samples 0..k-1 are all present, each group sorted by sample. A greedy
    candidate (sample k, `add_greedy`) that a finished file holds is not one of the k."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r["sample"] < k:
            groups[r["id"]].append(r)
    return {i: sorted(g, key=lambda r: r["sample"]) for i, g in groups.items()
            if sorted(r["sample"] for r in g) == list(range(k))}


def completed_groups(path: Path, k: int) -> dict[str, list[dict]]:
    """Records of prompts that have all k samples; rewrites the file without partial groups."""
    if not path.exists():
        return {}
    records = read_jsonl(path, allow_partial_tail=True)
    done = complete_groups(records, k)
    kept = [r for r in records if r["id"] in done]
    if len(kept) != len(records):  # a kill cut a group short: drop it, it will be redone
        write_jsonl(path, kept)
    return done


def finished_groups(paths: list[Path], k: int) -> dict[str, list[dict]]:
    """Complete groups found in any of `paths`, read-only; the first file holding an id wins."""
    found: dict[str, list[dict]] = {}
    for path in paths:
        if Path(path).exists():
            for i, g in complete_groups(read_jsonl(path, allow_partial_tail=True), k).items():
                found.setdefault(i, g)
    return found


def merge_shard_files(out_path: Path, items: list[dict], k: int, *, require_all: bool) -> int:
    """Fold the per-process files into `out_path` in item order and delete them.

    `out_path`'s own groups come first, then the shard files by rank, so a group stored twice
    (a kill between the merge and the deletion) is kept once. Returns the number of items kept.
    """
    shards = distributed.shard_paths(out_path)
    groups = finished_groups([out_path, *shards], k)
    missing = [it["id"] for it in items if it["id"] not in groups]
    if require_all and missing:
        raise PrefloopError(f"{out_path}: {len(missing)} instruction(s) have no complete group "
                            f"of {k} responses after merging {len(shards)} process file(s) "
                            f"(first: '{missing[0]}'); run the same command again to resume")
    write_jsonl(out_path, [r for it in items if it["id"] in groups for r in groups[it["id"]]])
    for path in shards:
        path.unlink()
    return len(items) - len(missing)


def render_all(tokenizer, items: list[dict], system: str | None, max_new_tokens: int,
               ctx: int, where: str) -> list:
    rendered = []
    for item in items:
        rp = render_prompt(tokenizer, item["instruction"], system=system)
        if len(rp.ids) + max_new_tokens > ctx:
            raise PrefloopError(
                f"{where}: instruction '{item['id']}' has {len(rp.ids)} prompt tokens; with "
                f"max_new_tokens {max_new_tokens} that exceeds the model's context of {ctx}; "
                "lower max_new_tokens or set instructions.max_tokens"
            )
        rendered.append(rp)
    return rendered


def greedy_path(out_path: Path) -> Path:
    """Where `generate_responses(greedy_candidate=True)` keeps the greedy answers."""
    return out_path.with_name(f"{out_path.stem}.greedy{out_path.suffix}")


def add_greedy(records: list[dict], greedy: list[dict], k: int) -> list[dict]:
    """Each instruction's k sampled records, then its greedy answer as sample k, "greedy": true."""
    by_id = {g["id"]: g for g in greedy}
    out: list[dict] = []
    for r in records:  # grouped by item, each group sorted by sample
        out.append(r)
        if r["sample"] == k - 1:
            out.append({**by_id[r["id"]], "sample": k, "greedy": True})
    return out


def generate_responses(backend: Backend, items: list[dict], out_path: Path, *, k: int,
                       sampling: Sampling, system: str | None = None,
                       batch_size: int | None = None, where: str = "generate",
                       extra: dict | None = None, desc: str = "generate",
                       greedy_candidate: bool = False) -> list[dict]:
    """Generate k responses per item into `out_path` (JSONL), resuming from what it holds.

    Under `accelerate launch` every process generates its round-robin shard of `items` into its
    own file and the main process merges them into `out_path` in item order; every process
    returns all records, in item order. greedy_candidate: also one greedy answer per item (in
    `greedy_path(out_path)`, resumable the same way), returned after the item's k samples as
    sample k.
    """
    if greedy_candidate:
        sampled = generate_responses(backend, items, out_path, k=k, sampling=sampling,
                                     system=system, batch_size=batch_size, where=where,
                                     extra=extra, desc=desc)
        greedy = generate_responses(backend, items, greedy_path(out_path), k=1,
                                    sampling=replace(sampling, temperature=0.0),
                                    system=system, batch_size=batch_size, where=where,
                                    extra=extra, desc=f"{desc} (greedy)")
        return add_greedy(sampled, greedy, k)
    opts = {"k": k, "sampling": sampling, "system": system, "batch_size": batch_size,
            "where": where, "extra": extra}
    topo = distributed.topology()
    if topo.world_size > 1:
        return _generate_sharded(backend, items, out_path, topo, desc=desc, **opts)
    if distributed.shard_paths(out_path):  # left by an interrupted multi-process run: reuse
        merge_shard_files(out_path, items, k, require_all=False)
    done = completed_groups(out_path, k)
    todo = [i for i, it in enumerate(items) if it["id"] not in done]
    _generate_into(backend, [items[i] for i in todo], out_path, streams=todo, total=len(items),
                   desc=desc, **opts)
    by_id = completed_groups(out_path, k)
    return [r for it in items for r in by_id[it["id"]]]


def _generate_sharded(backend: Backend, items: list[dict], out_path: Path, topo, *, k: int,
                      desc: str, **opts) -> list[dict]:
    """One process's part of a multi-process run; see `generate_responses`."""
    own = distributed.shard_path(out_path, topo.rank)
    if topo.is_main:
        completed_groups(out_path, k)  # repair a cut tail before anyone reads it
    completed_groups(own, k)  # each process repairs only its own file
    distributed.barrier()
    # Groups done by any earlier run count, whichever process (or process count) wrote them.
    done = finished_groups([out_path, *distributed.shard_paths(out_path)], k)
    mine = distributed.shard(list(range(len(items))), topo.rank, topo.world_size)
    todo = [i for i in mine if items[i]["id"] not in done]
    _generate_into(backend, [items[i] for i in todo], own, k=k, streams=todo, total=len(mine),
                   show=topo.is_main,
                   desc=f"{desc} [process {topo.rank + 1}/{topo.world_size}]", **opts)
    distributed.barrier()
    if topo.is_main:
        merge_shard_files(out_path, items, k, require_all=True)
    distributed.barrier()
    by_id = finished_groups([out_path], k)
    return [r for it in items for r in by_id[it["id"]]]


def _generate_into(backend: Backend, todo: list[dict], path: Path, *, k: int, sampling: Sampling,
                   system: str | None, batch_size: int | None, where: str, extra: dict | None,
                   desc: str, total: int, streams: list[int], show: bool = True) -> None:
    """Generate k responses for each of `todo` and append them to `path`, one prompt at a time.

    `streams[i]`: todo[i]'s position in the stage's full item list, its random stream: sample s
    of an instruction draws the same numbers whether the run was uninterrupted, resumed or
    split over processes (an uninterrupted one-process run gives the engine's default 0..n-1)."""
    tokenizer = backend.tokenizer
    rendered = render_all(tokenizer, todo, system, sampling.max_new_tokens,
                          backend.context_length, where)
    bar = tqdm(total=total * k, initial=(total - len(todo)) * k, desc=desc, unit="resp",
               disable=not show)
    started, new_tokens = time.time(), 0

    def on_prompt_done(i: int, completions) -> None:
        nonlocal new_tokens
        item, rp = todo[i], rendered[i]
        recs = [_record(tokenizer, item, rp, j, c, extra, backend.name)
                for j, c in enumerate(completions)]
        append_jsonl(path, recs)
        new_tokens += sum(r["response_tokens"] for r in recs)
        bar.update(k)
        bar.set_postfix(tok_s=f"{new_tokens / max(time.time() - started, 1e-9):.1f}")

    try:
        if todo:
            backend.generate([rp.ids for rp in rendered], k, sampling, batch_size=batch_size,
                             on_prompt_done=on_prompt_done, stream_ids=streams)
    finally:
        bar.close()  # ends its line, so an error message starts on its own


def _record(tokenizer, item: dict, rp, sample: int, completion, extra: dict | None,
            backend: str = "local") -> dict:
    from prefloop.engine.backend import decode

    ids = completion.token_ids
    # named only when not the in-process engine, so local runs keep their exact bytes
    where = {} if backend == "local" else {"backend": backend}
    return {
        "id": item["id"],
        "sample": sample,
        "instruction": item["instruction"],
        "prompt_text": rp.text,
        "prompt_tokens": len(rp.ids),
        "response": decode(tokenizer, completion),
        "response_tokens": len(ids),
        "finish_reason": completion.finish_reason,
        **{key: item[key] for key in CARRIED if key in item},
        **(extra or {}),
        **where,
    }


def stage_config(recipe: Recipe, upstream) -> dict:
    """What the stage's manifest hash covers (prefloop.plan predicts it before a run)."""
    return {"generate": recipe.generate, "model": recipe.model,
            "upstream": upstream("instructions")}


def run(recipe: Recipe, run_dir: Path, *, force: bool = False) -> Path:
    from prefloop.engine import Sampling
    from prefloop.engine.backends import load_backend
    from prefloop.models import dtype_record

    cfg = recipe.generate
    run = RunDir(run_dir)
    distributed.topology()  # first: under a launcher it also picks this process's GPU
    up = Upstream(run)  # the stages read: their finish ids go in the manifest
    stage = Stage(run.stage("generate"), "generate", stage_config(recipe, up), inputs=up.folders)
    if stage.begin(force=force):
        return stage.folder
    items = read_jsonl(run.train_instructions)
    backend = load_backend(recipe.model)
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p,
                        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    records = generate_responses(backend, items, run.generations, k=cfg.k,
                                 sampling=sampling, system=recipe.model.system_prompt,
                                 batch_size=cfg.batch_size, where=str(run.stage("instructions")),
                                 extra={"model": recipe.model.name},
                                 greedy_candidate=cfg.greedy_candidate)
    if distributed.is_main():
        write_jsonl(run.generations, records)  # completion order -> instruction order
    return stage.finish({
        "instructions": len(items), "responses": len(records),
        "eos": sum(r["finish_reason"] == "eos" for r in records),
        "length": sum(r["finish_reason"] == "length" for r in records),
        "response_tokens": sum(r["response_tokens"] for r in records),
        **({"greedy": len(items)} if cfg.greedy_candidate else {})},
        extra={"processes": distributed.topology().world_size,
               **({} if backend.name == "local" else {"backend": backend.name}),
               **(dtype_record(recipe.model) if backend.name == "local" else {})})
