"""Stage 2: K responses per instruction, rendered with the model's own chat template.

Records are appended per finished prompt (all K samples in one atomic append), so a killed run
resumes where it stopped without losing or duplicating a response.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from prefloop import distributed
from prefloop.artifacts import (
    append_jsonl,
    begin_stage,
    config_hash,
    read_jsonl,
    upstream_hash,
    write_jsonl,
    write_manifest,
)
from prefloop.chat import render_prompt
from prefloop.config import Recipe
from prefloop.engine import Sampling, generate
from prefloop.errors import PrefloopError
from prefloop.models import context_length, load_model


def eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends a turn: the tokenizer's EOS plus the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model.generation_config, "eos_token_id", None)
    ids.update(gen if isinstance(gen, list) else [gen])
    return {i for i in ids if i is not None}


def complete_groups(records: list[dict], k: int) -> dict[str, list[dict]]:
    """The ids whose k samples 0..k-1 are all present, each group sorted by sample."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
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


def generate_responses(model, tokenizer, items: list[dict], out_path: Path, *, k: int,
                       sampling: Sampling, system: str | None = None,
                       batch_size: int | None = None, where: str = "generate",
                       extra: dict | None = None, desc: str = "generate") -> list[dict]:
    """Generate k responses per item into `out_path` (JSONL), resuming from what it holds.

    Under `accelerate launch` every process generates its round-robin shard of `items` into its
    own file and the main process merges them into `out_path` in item order; every process
    returns all records, in item order.
    """
    opts = {"k": k, "sampling": sampling, "system": system, "batch_size": batch_size,
            "where": where, "extra": extra}
    topo = distributed.topology()
    if topo.world_size > 1:
        return _generate_sharded(model, tokenizer, items, out_path, topo, desc=desc, **opts)
    if distributed.shard_paths(out_path):  # left by an interrupted multi-process run: reuse
        merge_shard_files(out_path, items, k, require_all=False)
    done = completed_groups(out_path, k)
    todo = [it for it in items if it["id"] not in done]
    _generate_into(model, tokenizer, todo, out_path, total=len(items), desc=desc, **opts)
    by_id = completed_groups(out_path, k)
    return [r for it in items for r in by_id[it["id"]]]


def _generate_sharded(model, tokenizer, items: list[dict], out_path: Path, topo, *, k: int,
                      desc: str, **opts) -> list[dict]:
    """One process's part of a multi-process run; see `generate_responses`."""
    own = distributed.shard_path(out_path, topo.rank)
    if topo.is_main:
        completed_groups(out_path, k)  # repair a cut tail before anyone reads it
    completed_groups(own, k)  # each process repairs only its own file
    distributed.barrier()
    # Groups done by any earlier run count, whichever process (or process count) wrote them.
    done = finished_groups([out_path, *distributed.shard_paths(out_path)], k)
    mine = distributed.shard(items, topo.rank, topo.world_size)
    todo = [it for it in mine if it["id"] not in done]
    _generate_into(model, tokenizer, todo, own, k=k, total=len(mine), show=topo.is_main,
                   desc=f"{desc} [process {topo.rank + 1}/{topo.world_size}]", **opts)
    distributed.barrier()
    if topo.is_main:
        merge_shard_files(out_path, items, k, require_all=True)
    distributed.barrier()
    by_id = finished_groups([out_path], k)
    return [r for it in items for r in by_id[it["id"]]]


def _generate_into(model, tokenizer, todo: list[dict], path: Path, *, k: int, sampling: Sampling,
                   system: str | None, batch_size: int | None, where: str, extra: dict | None,
                   desc: str, total: int, show: bool = True) -> None:
    """Generate k responses for each of `todo` and append them to `path`, one prompt at a time."""
    rendered = render_all(tokenizer, todo, system, sampling.max_new_tokens,
                          context_length(model), where)
    bar = tqdm(total=total * k, initial=(total - len(todo)) * k, desc=desc, unit="resp",
               disable=not show)
    started, new_tokens = time.time(), 0

    def on_prompt_done(i: int, completions) -> None:
        nonlocal new_tokens
        item, rp = todo[i], rendered[i]
        recs = [_record(tokenizer, item, rp, j, c, extra) for j, c in enumerate(completions)]
        append_jsonl(path, recs)
        new_tokens += sum(r["response_tokens"] for r in recs)
        bar.update(k)
        bar.set_postfix(tok_s=f"{new_tokens / max(time.time() - started, 1e-9):.1f}")

    if todo:
        generate(model, [rp.ids for rp in rendered], k, sampling,
                 eos_token_ids=eos_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                 batch_size=batch_size, on_prompt_done=on_prompt_done)
    bar.close()


def _record(tokenizer, item: dict, rp, sample: int, completion, extra: dict | None) -> dict:
    ids = completion.token_ids
    text_ids = ids[:-1] if completion.finish_reason == "eos" else ids
    return {
        "id": item["id"],
        "sample": sample,
        "instruction": item["instruction"],
        "prompt_text": rp.text,
        "prompt_tokens": len(rp.ids),
        "response": tokenizer.decode(text_ids, skip_special_tokens=True).strip(),
        "response_tokens": len(ids),
        "finish_reason": completion.finish_reason,
        **(extra or {}),
    }


def run(recipe: Recipe, run_dir: Path, *, force: bool = False) -> Path:
    cfg = recipe.generate
    run_dir = Path(run_dir)
    out = run_dir / "generate"
    h = config_hash({"generate": cfg, "model": recipe.model,
                     "upstream": upstream_hash(run_dir, "instructions")})
    topo = distributed.topology()  # first: under a launcher it also picks this process's GPU
    with distributed.main_first():  # only the main process may --force-delete the folder
        if begin_stage(out, "generate", h, force=force and topo.is_main):
            return out
    started = time.time()
    items = read_jsonl(run_dir / "instructions" / "train.jsonl")
    model, tok = load_model(recipe.model.name, revision=recipe.model.revision,
                            dtype=recipe.model.dtype, device=recipe.model.device)
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p,
                        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    records = generate_responses(model, tok, items, out / "generations.jsonl", k=cfg.k,
                                 sampling=sampling, system=recipe.model.system_prompt,
                                 batch_size=cfg.batch_size, where=str(run_dir / "instructions"),
                                 extra={"model": recipe.model.name})
    if topo.is_main:
        write_jsonl(out / "generations.jsonl", records)  # completion order -> instruction order
        write_manifest(out, "generate", h, started=started, counts={
            "instructions": len(items), "responses": len(records),
            "eos": sum(r["finish_reason"] == "eos" for r in records),
            "length": sum(r["finish_reason"] == "length" for r in records),
            "response_tokens": sum(r["response_tokens"] for r in records)},
            extra={"processes": topo.world_size})
    distributed.barrier()  # the next stage reads this manifest in every process
    return out
