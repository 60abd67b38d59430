"""Stage 3: score every response with a ranker (LLM-as-a-judge or PairRM) into rank/scores.jsonl.

The stage knows rankers only through their contract (prefloop.rankers): each keeps whatever log
it needs in rank/ to resume (the judge appends its judgments as each response finishes; PairRM,
seconds on a GPU, simply reruns).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

from prefloop.artifacts import RunDir, Stage, Upstream, read_jsonl, write_jsonl
from prefloop.config import Recipe
from prefloop.errors import PrefloopError
from prefloop.rankers import make_ranker, ranker_class
from prefloop.rankers.groups import duplicate_of

GENERATION_FIELDS = ("id", "sample", "instruction", "response", "finish_reason", "response_tokens")


def read_generations(path: Path) -> list[dict]:
    records = read_jsonl(path)
    if not records:
        raise PrefloopError(f"{path}: no responses; run `prefloop generate` first")
    for n, r in enumerate(records, 1):
        missing = [f for f in GENERATION_FIELDS if f not in r]
        if missing:
            raise PrefloopError(f"{path}:{n}: missing field(s) {', '.join(missing)}; "
                                "regenerate with `prefloop generate --force`")
    return records


def _base_record(r: dict, ranker: str, dup: dict) -> dict:
    return {"id": r["id"], "sample": r["sample"], "ranker": ranker,
            "finish_reason": r["finish_reason"], "response_tokens": r["response_tokens"],
            "duplicate_of": dup.get((r["id"], r["sample"]))}


def histogram(values: list[float]) -> dict[str, int]:
    """Counts per unit bin [k, k+1), labelled "k..k+1"; the top score 5 falls in "4..5"."""
    bins: Counter[str] = Counter()
    for v in values:
        k = math.floor(v) - (1 if v == 5.0 else 0)
        bins[f"{k}..{k + 1}"] += 1
    return dict(sorted(bins.items(), key=lambda kv: float(kv[0].split("..")[0])))


def base_counts(scored: list[dict]) -> dict:
    values = [r["score"] for r in scored if r["score"] is not None]
    return {
        "responses": len(scored),
        "scored": len(values),
        "unscored": len(scored) - len(values),
        "duplicates": sum(r["duplicate_of"] is not None for r in scored),
        "score_mean": round(sum(values) / len(values), 4) if values else None,
        "score_histogram": histogram(values),
    }


def with_quality(recipe: Recipe, records: list[dict], fields: list[dict],
                 workdir: Path) -> list[dict]:
    """Each response's rank.quality score beside the main one (pairing breaks ties with it)."""
    quality = make_ranker(replace(recipe, rank=replace(recipe.rank, ranker=recipe.rank.quality)))
    extra, _ = quality.score(records, workdir)
    return [f | {"quality": q["score"]} for f, q in zip(fields, extra, strict=True)]


def stage_config(recipe: Recipe, upstream) -> dict:
    """What the stage's manifest hash covers (prefloop.plan predicts it before a run)."""
    names = [recipe.rank.ranker] + ([recipe.rank.quality] if recipe.rank.quality != "none" else [])
    depends = any(ranker_class(n).depends_on_policy(recipe.rank) for n in names)
    return {"rank": recipe.rank, "judge": recipe.model if depends else None,
            "upstream": upstream("generate")}


def run(recipe: Recipe, run_dir: Path, *, force: bool = False, ranker=None) -> Path:
    """Score run_dir/generate/generations.jsonl into run_dir/rank/scores.jsonl.

    `ranker` (optional) is a ready ranker, e.g. the iterate loop's current policy as judge.
    """
    run = RunDir(run_dir)
    up = Upstream(run)  # the stages read: their finish ids go in the manifest
    stage = Stage(run.stage("rank"), "rank", stage_config(recipe, up), inputs=up.folders)
    if stage.begin(force=force):
        return stage.folder
    records = read_generations(run.generations)
    ranker = ranker or make_ranker(recipe)
    fields, own_counts = ranker.score(records, stage.folder)
    if recipe.rank.quality != "none":
        fields = with_quality(recipe, records, fields, stage.folder / "quality")
    dup = duplicate_of(records)
    scored = [{**_base_record(r, ranker.name, dup), **f}
              for r, f in zip(records, fields, strict=True)]
    write_jsonl(run.scores, scored)
    counts = {**base_counts(scored), **own_counts}
    # how the scores were obtained, in one line: the command line prints it (prefloop.summary)
    summary = ranker.summary(counts) or (f"{counts['scored']}/{counts['responses']} responses "
                                         f"scored by {ranker.name}")
    return stage.finish(counts, extra={"ranker": scored[0]["ranker"], "summary": summary})
