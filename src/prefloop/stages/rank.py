"""Stage 3: score every response with a ranker (LLM-as-a-judge or PairRM) into rank/scores.jsonl.

The judge appends its N judgments per response to rank/judgments.jsonl as each response finishes,
so a killed run resumes without judging anything twice. PairRM ranks each instruction's distinct
responses in one batched call (seconds on a GPU), so it simply reruns.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from prefloop.artifacts import (
    append_jsonl,
    begin_stage,
    config_hash,
    read_jsonl,
    upstream_hash,
    write_jsonl,
    write_manifest,
)
from prefloop.config import Recipe
from prefloop.errors import PrefloopError
from prefloop.rankers.judge import JudgeRanker, Judgment, mean_score

GENERATION_FIELDS = ("id", "sample", "instruction", "response", "finish_reason", "response_tokens")


# -- rankers -------------------------------------------------------------------------------------


def judge_model_name(recipe: Recipe) -> str:
    return recipe.rank.judge_model or recipe.model.name


def make_ranker(recipe: Recipe, model=None, tokenizer=None, *, name: str | None = None):
    """The recipe's ranker with `.name` and `.compare(...)` (judge: also `.judge`/`.score`;
    PairRM: `.rank_groups`).

    judge: `model`/`tokenizer` are the judge (e.g. the current policy in the iterate loop);
    when omitted, rank.judge_model is loaded (None: the policy of model.name).
    pairrm: loads rank.pairrm_model at rank.pairrm_revision (None: the pinned revision).
    """
    cfg = recipe.rank
    if cfg.ranker == "judge":
        if model is None:
            from prefloop.models import load_model

            judge = judge_model_name(recipe)
            revision = cfg.judge_revision if cfg.judge_model else recipe.model.revision
            model, tokenizer = load_model(judge, revision=revision, dtype=recipe.model.dtype,
                                          device=recipe.model.device)
        return JudgeRanker(model, tokenizer, cfg, name=name or f"judge:{judge_model_name(recipe)}")
    return PairRMRanker.load(recipe, name=name)


class PairRMRanker:
    """PairRM behind the ranker interface; score_i = (1/n) Σ_j (M_ij − M_ji) within a group."""

    def __init__(self, pairrm, name: str):
        self.pairrm = pairrm
        self.name = name
        self.candidate_max_tokens = pairrm.candidate_max_tokens

    @classmethod
    def load(cls, recipe: Recipe, *, name: str | None = None) -> PairRMRanker:
        from prefloop.rankers.pairrm import PAIRRM_REVISION, PairRM

        cfg = recipe.rank
        revision = cfg.pairrm_revision or PAIRRM_REVISION
        try:
            pm = PairRM.load(cfg.pairrm_model, revision=revision, device=recipe.model.device,
                             dtype="auto", batch_size=cfg.batch_size or 32)
        except ValueError as e:  # a bad folder or id; PairRMUnavailable is already a PrefloopError
            raise PrefloopError(f"rank.pairrm_model: {e}") from None
        return cls(pm, name or f"pairrm:{cfg.pairrm_model}@{revision}")

    def rank_groups(self, sources: list[str], groups: list[list[str]]) -> list[list[float]]:
        """PairRM scores of each group's candidates, all groups in one batched call."""
        if not sources:
            return []
        return [list(r.scores) for r in self.pairrm.rank(sources, groups)]

    def compare(self, instructions: list[str], a: list[str], b: list[str]) -> list[float]:
        """logit(a, b) − logit(b, a): both orders, so PairRM's position bias cancels."""
        return list(self.pairrm.compare(instructions, a, b))

    def over_budget(self, text: str) -> bool:
        """True when PairRM may see only the beginning of `text` (> 412 candidate tokens)."""
        return self.pairrm.count_candidate_tokens(text) > self.candidate_max_tokens


# -- the stage -----------------------------------------------------------------------------------


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


def duplicate_of(records: list[dict]) -> dict[tuple[str, int], int]:
    """(id, sample) -> the first sample of the same id with a byte-identical response."""
    first: dict[tuple[str, str], int] = {}
    dup = {}
    for r in records:
        key = (r["id"], r["response"])
        if key in first:
            dup[(r["id"], r["sample"])] = first[key]
        else:
            first[key] = r["sample"]
    return dup


def _base_record(r: dict, ranker: str, dup: dict) -> dict:
    return {"id": r["id"], "sample": r["sample"], "ranker": ranker,
            "finish_reason": r["finish_reason"], "response_tokens": r["response_tokens"],
            "duplicate_of": dup.get((r["id"], r["sample"]))}


def judged_groups(path: Path, n: int) -> dict[tuple[str, int], list[dict]]:
    """Judgments of responses with all n samples; rewrites the file without partial groups."""
    if not path.exists():
        return {}
    rows = read_jsonl(path, allow_partial_tail=True)
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["id"], row["sample"])].append(row)
    done = {k: sorted(g, key=lambda x: x["judge_sample"]) for k, g in groups.items()
            if sorted(x["judge_sample"] for x in g) == list(range(n))}
    kept = [row for row in rows if (row["id"], row["sample"]) in done]
    if len(kept) != len(rows):
        write_jsonl(path, kept)
    return done


def rank_with_judge(recipe: Recipe, records: list[dict], out: Path,
                    ranker=None) -> tuple[list[dict], dict]:
    """Judge every response not judged yet, then build one score record per response."""
    cfg = recipe.rank
    path = out / "judgments.jsonl"
    done = judged_groups(path, cfg.judge_samples)
    todo = [r for r in records if (r["id"], r["sample"]) not in done]
    name = ranker.name if ranker is not None else f"judge:{judge_model_name(recipe)}"
    if todo:
        ranker = ranker or make_ranker(recipe)
        bar = tqdm(total=len(records), initial=len(records) - len(todo), desc="judge",
                   unit="resp")

        def on_done(i: int, judgments: list[Judgment]) -> None:
            r = todo[i]
            append_jsonl(path, [_judgment_row(r, j, jd) for j, jd in enumerate(judgments)])
            bar.update(1)

        ranker.judge([r["instruction"] for r in todo], [r["response"] for r in todo],
                     on_done=on_done)
        bar.close()
        done = judged_groups(path, cfg.judge_samples)
    dup = duplicate_of(records)
    scored = []
    for r in records:
        samples = [row["score"] for row in done[(r["id"], r["sample"])]]
        rec = _base_record(r, name, dup)
        rec.update(score=mean_score(samples, cfg.min_valid), n_valid=sum(s is not None
                                                                          for s in samples),
                   scores=samples)
        scored.append(rec)
    rows = [row for r in records for row in done[(r["id"], r["sample"])]]
    return scored, judge_counts(scored, rows)


def _judgment_row(r: dict, j: int, jd: Judgment) -> dict:
    row = {"id": r["id"], "sample": r["sample"], "judge_sample": j, "text": jd.text,
           "score": jd.score}
    if jd.error:
        row["error"] = jd.error
    if jd.forced:
        row["forced"] = True
    return row


def rank_with_pairrm(recipe: Recipe, records: list[dict], ranker=None) -> tuple[list[dict], dict]:
    """Rank each instruction's distinct responses together; duplicates copy their first's score."""
    ranker = ranker or make_ranker(recipe)
    dup = duplicate_of(records)
    by_id: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if (r["id"], r["sample"]) not in dup:
            by_id[r["id"]].append(r)
    ids = list(by_id)
    ranked = ranker.rank_groups([by_id[i][0]["instruction"] for i in ids],
                                [[r["response"] for r in by_id[i]] for i in ids])
    score_of = {(r["id"], r["sample"]): s for i, scores in zip(ids, ranked, strict=True)
                for r, s in zip(by_id[i], scores, strict=True)}
    scored = []
    for r in records:
        key = (r["id"], r["sample"])
        rec = _base_record(r, ranker.name, dup)
        rec.update(score=score_of[(r["id"], dup.get(key, r["sample"]))], n_valid=1, scores=[],
                   over_budget=ranker.over_budget(r["response"]))
        scored.append(rec)
    counts = base_counts(scored)
    counts["over_candidate_budget"] = sum(r["over_budget"] for r in scored)
    if counts["over_candidate_budget"]:
        print(f"[prefloop] rank: {counts['over_candidate_budget']} responses exceed PairRM's "
              f"{ranker.candidate_max_tokens}-token candidate budget; it judges only their "
              "beginning", flush=True)
    return scored, counts


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


def judge_counts(scored: list[dict], rows: list[dict]) -> dict:
    """Base counts plus judge-sample parse failures and the exact per-sample score counts.

    parse_failures counts every sample without a parsable score, forced ones included;
    judge_sample_failure_rate is the share still without a score after forcing.
    """
    counts = base_counts(scored)
    failed = sum(row["score"] is None for row in rows)
    forced = sum(bool(row.get("forced")) for row in rows)
    counts.update(
        judge_samples=len(rows),
        parse_failures=sum(row["score"] is None and "error" not in row for row in rows) + forced,
        forced_scores=forced,
        prompt_too_long=sum("error" in row for row in rows),
        judge_sample_failure_rate=round(failed / len(rows), 4) if rows else 0.0,
        judge_sample_scores={f"{k:g}": v for k, v in sorted(  # 0.1 bins: forced scores vary
            Counter(round(row["score"], 1) for row in rows if row["score"] is not None).items())},
    )
    return counts


def stage_hash(recipe: Recipe, run_dir: Path) -> str:
    judge_is_policy = recipe.rank.ranker == "judge" and recipe.rank.judge_model is None
    return config_hash({"rank": recipe.rank,
                        "judge": recipe.model if judge_is_policy else None,
                        "upstream": upstream_hash(run_dir, "generate")})


def run(recipe: Recipe, run_dir: Path, *, force: bool = False, ranker=None) -> Path:
    """Score run_dir/generate/generations.jsonl into run_dir/rank/scores.jsonl.

    `ranker` (optional) is a ready ranker, e.g. the iterate loop's current policy as judge.
    """
    run_dir = Path(run_dir)
    out = run_dir / "rank"
    h = stage_hash(recipe, run_dir)
    if begin_stage(out, "rank", h, force=force):
        return out
    started = time.time()
    records = read_generations(run_dir / "generate" / "generations.jsonl")
    if recipe.rank.ranker == "judge":
        scored, counts = rank_with_judge(recipe, records, out, ranker)
    else:
        scored, counts = rank_with_pairrm(recipe, records, ranker)
    write_jsonl(out / "scores.jsonl", scored)
    write_manifest(out, "rank", h, started=started, counts=counts,
                   extra={"ranker": scored[0]["ranker"]})
    if recipe.rank.ranker == "judge" and counts["judge_samples"]:
        print(f"[prefloop] rank: {counts['scored']}/{counts['responses']} responses scored; "
              f"{counts['parse_failures']} of {counts['judge_samples']} judge samples had no "
              "parsable score", flush=True)
    return out
