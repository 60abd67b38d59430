"""Stage 4: best-vs-worst preference pairs per instruction -> a Hub-ready dataset with its card.

Per instruction (Yuan et al. 2024; docs/self_rewarding.md §6): candidates are the responses with a
score (and, with pairs.require_eos, that ended with EOS or that the ranker found to be a
repetition loop), byte-identical duplicates removed;
chosen = the highest score, rejected = the lowest; instructions with fewer than two candidates,
all-equal scores (the paper discards ties) or a margin below pairs.min_margin are dropped.
Tie-break among equal best (worst) scores, which the paper leaves open: the lowest judge variance
(as NeMo-Aligner; for the worst, a hollow response first), then the shorter (longer) response in
tokens, then the lower sample index.
With pairs.per_instruction = n > 1 (not the paper), up to n disjoint pairs per instruction: the
same choice is repeated on the candidates not yet paired, while a pair with a margin remains.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from prefloop.artifacts import (
    RunDir,
    Stage,
    Upstream,
    atomic_write_text,
    read_jsonl,
    read_manifest,
    write_jsonl,
)
from prefloop.cards import dataset_card
from prefloop.config import Recipe, dump_recipe
from prefloop.errors import PrefloopError
from prefloop.rankers import ranker_class
from prefloop.rankers.judge import score_variance
from prefloop.stages.rank import read_generations

DATA_FILE = Path("data") / "train-00000-of-00001.parquet"
DROP_REASONS = ("too_few_scored", "all_tied", "below_min_margin")
OPTIONAL_REASONS = ("length_unmatched", "quality_gate")  # counted when their setting is on
SCORE_EXTRAS = ("quality", "length_free", "checks", "hollow")  # ranker fields pairing reads


# -- selection (pure) ----------------------------------------------------------------------------


def candidates_of(group: list[dict], require_eos: bool) -> tuple[list[dict], Counter]:
    """Scored (and EOS-ended, if required) responses, first of each byte-identical set kept.

    group: one instruction's responses, each {"sample","response","score","scores",
    "response_tokens","finish_reason"}; returns (candidates, counts of what was removed).
    A repetition loop cut at the token limit (the ranker's hollow "degenerate") stays with
    require_eos: a loop never ends, so dropping it would keep it out of every pair, and as a
    hollow answer it scores 0, so it can be rejected but never chosen over a real answer.
    """
    removed: Counter = Counter()
    kept, seen = [], set()
    for c in sorted(group, key=lambda c: c["sample"]):
        if c["score"] is None:
            removed["unscored"] += 1
        elif require_eos and c["finish_reason"] != "eos" and c.get("hollow") != "degenerate":
            removed["not_eos"] += 1
        elif c["response"] in seen:
            removed["duplicate"] += 1
        else:
            seen.add(c["response"])
            kept.append(c)
    return kept, removed


def choose_pair(cands: list[dict], min_margin: float = 0.0, length_match: float = 0.0,
                quality_gate: bool = False, length_match_all: bool = False
                ) -> tuple[dict, dict] | str:
    """(chosen, rejected) = (argmax, argmin) of score, or the drop reason.

    Ties: chosen = min (−quality, variance, tokens, sample) over the best; rejected = min
    (quality, not hollow, variance, −tokens, sample) over the worst, variance being that of the
    valid judge samples, quality the rank.quality score (when there is one) and hollow the
    constraints ranker's verdict that a response answers nothing (a loop, a refusal, ...): of
    equally scored failures the hollow one is the clearest to reject. With length_match > 0 (and
    no length constraint on the instruction, or with length_match_all) the pair is the
    largest-margin one whose lengths are within that ratio, a hollow rejected one first.
    """
    if len(cands) < 2:
        return "too_few_scored"
    hi = max(c["score"] for c in cands)
    lo = min(c["score"] for c in cands)
    if hi == lo:
        return "all_tied"
    if hi - lo < min_margin:
        return "below_min_margin"
    if length_match and (length_match_all or not any(c.get("length_free") for c in cands)):
        picked = _matched_pair(cands, min_margin, length_match)
    else:
        chosen = min((c for c in cands if c["score"] == hi),
                     key=lambda c: (-_quality(c), score_variance(c["scores"]),
                                    c["response_tokens"], c["sample"]))
        rejected = min((c for c in cands if c["score"] == lo),
                       key=lambda c: (_quality(c), not c.get("hollow"),
                                      score_variance(c["scores"]), -c["response_tokens"],
                                      c["sample"]))
        picked = chosen, rejected
    if quality_gate and not isinstance(picked, str) and _quality(picked[0]) < _quality(picked[1]):
        return "quality_gate"
    return picked


def choose_pairs(cands: list[dict], cfg) -> list[tuple[dict, dict]] | str:
    """Up to cfg.per_instruction disjoint pairs: `choose_pair` on the candidates, then again on
    those not yet in a pair, while a pair is found. The drop reason when not even one is."""
    out: list[tuple[dict, dict]] = []
    rest = list(cands)
    while len(out) < cfg.per_instruction:
        picked = choose_pair(rest, cfg.min_margin, cfg.length_match, cfg.quality_gate,
                             cfg.length_match_all)
        if isinstance(picked, str):
            return out or picked
        out.append(picked)
        rest = [c for c in rest if c is not picked[0] and c is not picked[1]]
    return out


def _quality(c: dict) -> float:
    q = c.get("quality")
    return 0.0 if q is None else q


def length_ratio(a: dict, b: dict) -> float:
    """shorter / longer, in generated tokens (1.0 for equal lengths)."""
    x, y = sorted((max(a["response_tokens"], 1), max(b["response_tokens"], 1)))
    return x / y


def _matched_pair(cands: list[dict], min_margin: float, ratio: float) -> tuple[dict, dict] | str:
    """The pair with the largest score margin among those of comparable length; then the
    closest lengths, the better quality contrast, the lower sample indices."""
    pairs = [(c, r) for c in cands for r in cands
             if c["score"] - r["score"] > 0 and c["score"] - r["score"] >= min_margin
             and length_ratio(c, r) >= ratio]
    if not pairs:
        return "length_unmatched"
    return max(pairs, key=lambda p: (p[0]["score"] - p[1]["score"], bool(p[1].get("hollow")),
                                     length_ratio(*p), _quality(p[0]) - _quality(p[1]),
                                     -p[0]["sample"], -p[1]["sample"]))


def prompt_messages(instruction: str, system: str | None) -> list[dict]:
    """TRL's conversational prompt: the user turn, after the system turn when the recipe set one."""
    user = [{"role": "user", "content": instruction}]
    return ([{"role": "system", "content": system}] if system is not None else []) + user


def pair_row(group: list[dict], chosen: dict, rejected: dict, system: str | None) -> dict:
    first = group[0]
    return {
        "id": first["id"],
        "prompt": prompt_messages(first["instruction"], system),
        "chosen": [{"role": "assistant", "content": chosen["response"]}],
        "rejected": [{"role": "assistant", "content": rejected["response"]}],
        "prompt_text": first["prompt_text"],
        "chosen_score": chosen["score"],
        "rejected_score": rejected["score"],
        "candidates": [c["response"] for c in group],
        "scores": [c["score"] for c in group],
        "ranker": first["ranker"],
        "generator": first["generator"],
        **_checks_columns(group),
    }


def _checks_columns(group: list[dict]) -> dict:
    """The constraints ranker's per-candidate results (empty for other rankers)."""
    if "checks" not in group[0]:
        return {}
    return {"constraints": json.dumps(group[0]["constraints"], ensure_ascii=False),
            "candidate_checks": [c["checks"] for c in group],
            "candidate_hollow": [c["hollow"] for c in group]}


def join(generations: list[dict], scores: list[dict], where: Path, generator: str
         ) -> list[list[dict]]:
    """Responses with their scores, grouped per instruction in first-seen order."""
    by_key = {(s["id"], s["sample"]): s for s in scores}
    groups: dict[str, list[dict]] = defaultdict(list)
    for g in generations:
        s = by_key.get((g["id"], g["sample"]))
        if s is None:
            raise PrefloopError(f"{where}: no score for response {g['id']}#{g['sample']}; "
                                "rerun `prefloop rank --force`")
        groups[g["id"]].append({
            "id": g["id"], "sample": g["sample"], "instruction": g["instruction"],
            "prompt_text": g.get("prompt_text", ""), "response": g["response"],
            "response_tokens": g["response_tokens"], "finish_reason": g["finish_reason"],
            "generator": g.get("model", generator), "score": s["score"],
            "scores": s.get("scores", []), "ranker": s["ranker"],
            **{k: s[k] for k in SCORE_EXTRAS if k in s},
            **({"constraints": g["constraints"]} if "constraints" in g else {})})
    return [sorted(g, key=lambda c: c["sample"]) for g in groups.values()]


def drop_reasons(cfg) -> tuple[str, ...]:
    """The reasons a pairs stage with these settings can drop an instruction for."""
    return DROP_REASONS + tuple(r for r, on in zip(OPTIONAL_REASONS,
                                                   (cfg.length_match > 0, cfg.quality_gate),
                                                   strict=True) if on)


def build_pairs(groups: list[list[dict]], recipe: Recipe) -> tuple[list[dict], list[dict], dict]:
    """(dataset rows, dropped instructions, counts) for every instruction's response group."""
    cfg = recipe.pairs
    rows, dropped = [], []
    reasons = drop_reasons(cfg)
    counts: Counter = Counter({r: 0 for r in reasons})
    for group in groups:
        cands, removed = candidates_of(group, cfg.require_eos)
        counts.update(removed)
        picked = choose_pairs(cands, cfg)
        if isinstance(picked, str):
            counts[picked] += 1
            dropped.append({"id": group[0]["id"], "reason": picked, "n_candidates": len(cands),
                            "scores": [c["score"] for c in group]})
            continue
        rows += [pair_row(group, *p, recipe.model.system_prompt) for p in picked]
    summary = {"instructions": len(groups), "responses": sum(len(g) for g in groups),
               "scored": sum(c["score"] is not None for g in groups for c in g),
               "pairs": len(rows), "dropped": len(dropped),
               **{f"dropped_{r}": counts[r] for r in reasons},
               "removed_unscored": counts["unscored"], "removed_not_eos": counts["not_eos"],
               "removed_duplicate": counts["duplicate"]}
    return rows, dropped, summary


def pair_stats(rows: list[dict], tokens: dict[tuple[str, str], int]) -> dict:
    """Mean chosen/rejected score, margin and length: the length-hacking check of
    docs/self_rewarding.md §10.1."""
    if not rows:
        return {}
    margins = [r["chosen_score"] - r["rejected_score"] for r in rows]
    ch = [tokens[(r["id"], r["chosen"][0]["content"])] for r in rows]
    rj = [tokens[(r["id"], r["rejected"][0]["content"])] for r in rows]
    return {
        "chosen_score_mean": round(statistics.fmean(r["chosen_score"] for r in rows), 4),
        "rejected_score_mean": round(statistics.fmean(r["rejected_score"] for r in rows), 4),
        "margin_mean": round(statistics.fmean(margins), 4),
        "margin_min": round(min(margins), 4),
        "margin_max": round(max(margins), 4),
        "chosen_tokens_mean": round(statistics.fmean(ch), 1),
        "rejected_tokens_mean": round(statistics.fmean(rj), 1),
        "chosen_longer_fraction": round(sum(c > r for c, r in zip(ch, rj, strict=True))
                                        / len(rows), 4),
    }


# -- dataset and card ----------------------------------------------------------------------------


def features(checks: bool = False):
    """The dataset's columns; `checks`: with the constraints ranker's per-candidate results."""
    from datasets import Features, List, Value

    message = {"role": Value("string"), "content": Value("string")}
    columns = {
        "id": Value("string"), "prompt": List(message), "chosen": List(message),
        "rejected": List(message), "prompt_text": Value("string"),
        "chosen_score": Value("float64"), "rejected_score": Value("float64"),
        "candidates": List(Value("string")), "scores": List(Value("float64")),
        "ranker": Value("string"), "generator": Value("string"),
    }
    if checks:
        result = {"kind": Value("string"), "strict": Value("bool"), "loose": Value("bool")}
        columns.update({"constraints": Value("string"), "candidate_checks": List(List(result)),
                        "candidate_hollow": List(Value("string"))})
    return Features(columns)


def write_dataset(rows: list[dict], folder: Path) -> Path:
    """rows -> folder/data/train-00000-of-00001.parquet, atomically."""
    import pyarrow.parquet as pq
    from datasets import Dataset

    path = folder / DATA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    # the Arrow table carries the `datasets` features in its schema metadata
    feats = features(checks="candidate_checks" in rows[0])
    pq.write_table(Dataset.from_list(rows, features=feats).data.table, tmp)
    os.replace(tmp, path)
    return path


def read_dataset(folder: Path):
    """The pairs dataset as written, read straight from its parquet file(s). Not through
    `datasets.load_dataset`: its cache is keyed by the folder's card and file layout, so two run
    directories with the same card (a copied run, pairs redone with equal counts) would be served
    the first one's rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    files = sorted((Path(folder) / "data").glob("*.parquet"))
    return Dataset(pa.concat_tables([pq.read_table(f) for f in files]))


def dataset_sizes(folder: Path) -> dict:
    """num_bytes (the rows as Arrow holds them in memory) and download_size (parquet files)."""
    files = sorted((Path(folder) / "data").glob("*.parquet"))
    return {"num_bytes": read_dataset(folder).data.nbytes,
            "download_size": sum(f.stat().st_size for f in files)}


# -- the stage -----------------------------------------------------------------------------------


# The recipe keys behind each cause of an empty dataset, as the running command names them:
# `prefloop run` reads the generate section; the iterate loop maps its own keys onto each
# round's recipe (iterate.round_recipe), so it passes ITERATE's names (iterate.PAIR_KEYS).
RUN_KEYS = {"k": "generate.k", "temperature": "generate.temperature",
            "max_new_tokens": "generate.max_new_tokens",
            "judge": "set rank.judge_force_score=true or use a stronger rank.judge_model"}


def empty_causes(counts: dict) -> dict[str, int]:
    """Why no pair was made, counted: instructions per drop reason, and for those with fewer
    than two usable responses, the responses removed (cut, unscored, duplicate)."""
    out = {r: counts.get(f"dropped_{r}", 0) for r in (*DROP_REASONS, *OPTIONAL_REASONS)}
    out.update(cut=counts.get("removed_not_eos", 0), unscored=counts.get("removed_unscored", 0),
               duplicate=counts.get("removed_duplicate", 0))
    return out


def largest_cause(causes: dict[str, int]) -> str:
    """The drop reason of most instructions; `too_few_scored` is explained by the largest
    removal of responses behind it (none: too few responses were generated)."""
    reasons = (*DROP_REASONS, *OPTIONAL_REASONS)
    top = max(reasons, key=lambda r: causes[r])  # first of equals: DROP_REASONS order
    if top != "too_few_scored":
        return top
    removed = max(("cut", "unscored", "duplicate"), key=lambda r: causes[r])
    return removed if causes[removed] else "too_few_scored"


def _cause_text(cause: str, c: dict, counts: dict, rank_counts: dict, recipe: Recipe,
                keys: dict) -> str:
    g, p, n = recipe.generate, recipe.pairs, counts["responses"]
    if cause == "cut":
        return (f"{c['cut']} of {n} responses were cut at max_new_tokens and pairs.require_eos "
                f"dropped them; raise {keys['max_new_tokens']} (now {g.max_new_tokens}) or set "
                "pairs.require_eos=false")
    if cause == "unscored":
        samples = rank_counts.get("judge_samples")
        parsed = (f"; {samples - rank_counts.get('parse_failures', 0)} of {samples} judgments "
                  "parsable" if samples else "")
        return (f"{c['unscored']} of {n} responses got no score from the ranker{parsed}; "
                f"{keys['judge']}")
    if cause == "duplicate":
        return (f"{c['duplicate']} of {n} responses were identical to another of the same "
                f"instruction; raise {keys['temperature']} (now {g.temperature})")
    if cause == "too_few_scored":
        return (f"{c['too_few_scored']} instructions had fewer than 2 responses; raise "
                f"{keys['k']} (now {g.k})")
    if cause == "all_tied":
        return (f"every response of {c['all_tied']} instructions got the same score; raise "
                f"{keys['k']} (now {g.k}) or {keys['temperature']} (now {g.temperature}) for "
                "more varied responses")
    if cause == "below_min_margin":
        return (f"{c['below_min_margin']} instructions had a score margin below "
                f"pairs.min_margin; lower pairs.min_margin (now {p.min_margin})")
    if cause == "length_unmatched":
        return (f"{c['length_unmatched']} instructions had no pair of comparable length; lower "
                f"pairs.length_match (now {p.length_match}; 0 turns it off)")
    return (f"{c['quality_gate']} instructions' best pair failed the quality gate; set "
            "pairs.quality_gate=false")


def empty_error(out: Path, counts: dict, recipe: Recipe, rank_counts: dict | None = None,
                keys: dict | None = None) -> PrefloopError:
    """No pair: every cause counted, the largest named with the fix in the running command's
    keys (`keys`: RUN_KEYS unless the iterate loop passes its own)."""
    c = empty_causes(counts)
    cause = largest_cause(c)
    dropped = ", ".join(f"{k.replace('_', ' ')} {c[k]}" for k in drop_reasons(recipe.pairs))
    return PrefloopError(
        f"{out}: no preference pairs from {counts['instructions']} instructions "
        f"({counts['responses']} responses: {c['cut']} cut at max_new_tokens and dropped by "
        f"require_eos, {c['unscored']} unscored, {c['duplicate']} duplicates; instructions "
        f"dropped: {dropped}); the largest cause: "
        f"{_cause_text(cause, c, counts, rank_counts or {}, recipe, keys or RUN_KEYS)}; see "
        f"{out / 'dropped.jsonl'}")


def stage_config(recipe: Recipe, upstream) -> dict:
    """What the stage's manifest hash covers (prefloop.plan predicts it before a run)."""
    return {"pairs": recipe.pairs, "name": recipe.name, "upstream": upstream("rank")}


def run(recipe: Recipe, run_dir: Path, *, force: bool = False, keys: dict | None = None) -> Path:
    """`keys`: the recipe keys an empty result's error names (default RUN_KEYS)."""
    run = RunDir(run_dir)
    up = Upstream(run)  # the stages read: their finish ids go in the manifest
    stage = Stage(run.stage("pairs"), "pairs", stage_config(recipe, up), inputs=up.folders)
    if stage.begin(force=force):
        return stage.folder
    gens = read_generations(run.generations)
    groups = join(gens, read_jsonl(run.scores), run.scores, recipe.model.name)
    rows, dropped, counts = build_pairs(groups, recipe)
    write_jsonl(run.dropped, dropped)
    if not rows:  # not done, no manifest; dropped.jsonl stays. The fix changes the config, so
        stage.abandon()  # let the next run start afresh
        rank_counts = (read_manifest(run.stage("rank")) or {}).get("counts", {})
        raise empty_error(stage.folder, counts, recipe, rank_counts, keys)
    tokens = {(c["id"], c["response"]): c["response_tokens"] for g in groups for c in g}
    stats = pair_stats(rows, tokens)
    write_dataset(rows, run.dataset)
    atomic_write_text(run.dataset / "recipe.yaml", dump_recipe(recipe))
    backends = sorted({g["backend"] for g in gens if "backend" in g})  # absent: local engine
    card = dataset_card(recipe, counts, stats, features("candidate_checks" in rows[0]),
                        ranker_class(recipe.rank.ranker).card_lines(recipe), backends=backends,
                        sizes=dataset_sizes(run.dataset), first_prompt=rows[0]["prompt_text"])
    atomic_write_text(run.dataset / "README.md", card)
    return stage.finish(counts, extra={"stats": stats})
