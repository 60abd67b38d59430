"""Stage 4: best-vs-worst preference pairs per instruction -> a Hub-ready dataset with its card.

Per instruction (Yuan et al. 2024; docs/self_rewarding.md §6): candidates are the responses with a
score (and, with pairs.require_eos, that ended with EOS), byte-identical duplicates removed;
chosen = the highest score, rejected = the lowest; instructions with fewer than two candidates,
all-equal scores (the paper discards ties) or a margin below pairs.min_margin are dropped.
Tie-break among equal best (worst) scores, which the paper leaves open: the lowest judge variance
(as NeMo-Aligner), then the shorter (longer) response in tokens, then the lower sample index.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

import yaml

from prefloop.artifacts import (
    atomic_write_text,
    begin_stage,
    config_hash,
    read_jsonl,
    upstream_hash,
    write_jsonl,
    write_manifest,
)
from prefloop.config import SHIPPED_RECIPES, Recipe, dump_recipe
from prefloop.errors import PrefloopError
from prefloop.rankers.judge import score_variance
from prefloop.stages.rank import read_generations

DATA_FILE = Path("data") / "train-00000-of-00001.parquet"
DROP_REASONS = ("too_few_scored", "all_tied", "below_min_margin")
LIMA_LICENSE_URL = "https://creativecommons.org/licenses/by-nc-sa/4.0/"


# -- selection (pure) ----------------------------------------------------------------------------


def candidates_of(group: list[dict], require_eos: bool) -> tuple[list[dict], Counter]:
    """Scored (and EOS-ended, if required) responses, first of each byte-identical set kept.

    group: one instruction's responses, each {"sample","response","score","scores",
    "response_tokens","finish_reason"}; returns (candidates, counts of what was removed).
    """
    removed: Counter = Counter()
    kept, seen = [], set()
    for c in sorted(group, key=lambda c: c["sample"]):
        if c["score"] is None:
            removed["unscored"] += 1
        elif require_eos and c["finish_reason"] != "eos":
            removed["not_eos"] += 1
        elif c["response"] in seen:
            removed["duplicate"] += 1
        else:
            seen.add(c["response"])
            kept.append(c)
    return kept, removed


def choose_pair(cands: list[dict], min_margin: float = 0.0) -> tuple[dict, dict] | str:
    """(chosen, rejected) = (argmax, argmin) of score, or the drop reason.

    Ties: chosen = min (variance, tokens, sample) over the best; rejected = min (variance,
    −tokens, sample) over the worst, variance being that of the valid judge samples.
    """
    if len(cands) < 2:
        return "too_few_scored"
    hi = max(c["score"] for c in cands)
    lo = min(c["score"] for c in cands)
    if hi == lo:
        return "all_tied"
    if hi - lo < min_margin:
        return "below_min_margin"
    chosen = min((c for c in cands if c["score"] == hi),
                 key=lambda c: (score_variance(c["scores"]), c["response_tokens"], c["sample"]))
    rejected = min((c for c in cands if c["score"] == lo),
                   key=lambda c: (score_variance(c["scores"]), -c["response_tokens"], c["sample"]))
    return chosen, rejected


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
    }


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
            "scores": s.get("scores", []), "ranker": s["ranker"]})
    return [sorted(g, key=lambda c: c["sample"]) for g in groups.values()]


def build_pairs(groups: list[list[dict]], recipe: Recipe) -> tuple[list[dict], list[dict], dict]:
    """(dataset rows, dropped instructions, counts) for every instruction's response group."""
    cfg = recipe.pairs
    rows, dropped = [], []
    counts: Counter = Counter({r: 0 for r in DROP_REASONS})
    for group in groups:
        cands, removed = candidates_of(group, cfg.require_eos)
        counts.update(removed)
        picked = choose_pair(cands, cfg.min_margin)
        if isinstance(picked, str):
            counts[picked] += 1
            dropped.append({"id": group[0]["id"], "reason": picked, "n_candidates": len(cands),
                            "scores": [c["score"] for c in group]})
            continue
        rows.append(pair_row(group, *picked, recipe.model.system_prompt))
    summary = {"instructions": len(groups), "responses": sum(len(g) for g in groups),
               "scored": sum(c["score"] is not None for g in groups for c in g),
               "pairs": len(rows), "dropped": len(dropped),
               **{f"dropped_{r}": counts[r] for r in DROP_REASONS},
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


def features():
    from datasets import Features, List, Value

    message = {"role": Value("string"), "content": Value("string")}
    return Features({
        "id": Value("string"), "prompt": List(message), "chosen": List(message),
        "rejected": List(message), "prompt_text": Value("string"),
        "chosen_score": Value("float64"), "rejected_score": Value("float64"),
        "candidates": List(Value("string")), "scores": List(Value("float64")),
        "ranker": Value("string"), "generator": Value("string"),
    })


def write_dataset(rows: list[dict], folder: Path) -> Path:
    """rows -> folder/data/train-00000-of-00001.parquet, atomically."""
    import pyarrow.parquet as pq
    from datasets import Dataset

    path = folder / DATA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    # the Arrow table carries the `datasets` features in its schema metadata
    pq.write_table(Dataset.from_list(rows, features=features()).data.table, tmp)
    os.replace(tmp, path)
    return path


def license_meta(source: str) -> tuple[dict, str]:
    """(YAML license keys, a sentence for the card) from the instruction source."""
    if source == "builtin":
        return {"license": "apache-2.0"}, (
            "The instructions are prefloop's built-in set (Apache-2.0).")
    if "lima" in source.lower():
        return {"license": "other", "license_name": "lima-derived",
                "license_link": LIMA_LICENSE_URL}, (
            f"License: other. The instructions come from LIMA (`{source}`), whose prompts are "
            f"under CC BY-NC-SA 4.0 ({LIMA_LICENSE_URL}: non-commercial, share-alike, "
            "attribution) and LIMA's own terms; this dataset inherits them.")
    return {"license": "unknown"}, (
        f"The instructions come from `{source}`; its license applies to them.")


def card_metadata(recipe: Recipe, n_rows: int) -> dict:
    from datasets import DatasetInfo

    meta = license_meta(recipe.instructions.source)[0]
    meta.update({
        "language": ["en"], "task_categories": ["text-generation"],
        "tags": ["dpo", "preference", "synthetic", "prefloop"],
        "size_categories": ["n<1K" if n_rows < 1000 else "1K<n<10K"],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": "data/train-*"}]}],
        "dataset_info": {**DatasetInfo(features=features())._to_yaml_dict(),
                         "splits": [{"name": "train", "num_examples": n_rows}]},
    })
    return meta


def _ranker_lines(recipe: Recipe) -> list[str]:
    r = recipe.rank
    if r.ranker == "judge":
        judge = (f"`{r.judge_model}`" if r.judge_model
                 else f"`{recipe.model.name}` (the generator judging itself)")
        return [
            f"- Ranker: LLM-as-a-judge, model {judge}",
            f"- Judge prompt: `prompts/judge_{r.judge_template}.txt` (the additive 5-point "
            "prompt of Yuan et al. 2024, Fig. 2, verbatim), sent as one user turn through the judge's chat "
            "template",
            f"- Judge sampling: {r.judge_samples} samples per response, temperature "
            f"{r.judge_temperature}, top-p {r.judge_top_p}, up to {r.judge_max_new_tokens} new "
            f"tokens; score = mean of the parsable samples (at least {r.min_valid}); the last "
            "\"Score: X\" in [0, 5] counts, "
            + ("unparsable samples get Σ d·p(d) over the judge's next-token probabilities of "
               "0-5 after an appended \"Score:\" (judge_force_score, G-Eval style, not in the "
               "paper)" if r.judge_force_score
               else "unparsable samples count as missing"),
        ]
    from prefloop.rankers.pairrm import (
        PAIRRM_MAX_CANDIDATE_TOKENS,
        PAIRRM_MAX_SOURCE_TOKENS,
        PAIRRM_REVISION,
    )

    return [
        f"- Ranker: PairRM `{r.pairrm_model}` at revision `{r.pairrm_revision or PAIRRM_REVISION}`"
        " (native reimplementation)",
        "- Score: (1/n) Σ_j (logit(i, j) − logit(j, i)) over the instruction's distinct "
        "responses",
        f"- Truncation: prompt ≤ {PAIRRM_MAX_SOURCE_TOKENS} tokens, each response ≤ "
        f"{PAIRRM_MAX_CANDIDATE_TOKENS} tokens plus half the prompt's unused budget; longer "
        "responses are judged on their beginning only",
    ]


def _hub_note(name: str) -> str:
    """Where an embedded model comes from on the Hub (nothing for Hub ids and folders)."""
    from prefloop.cards import EMBEDDED_HUB_IDS

    hub_id = EMBEDDED_HUB_IDS.get(name)
    return f" (embedded copy of [{hub_id}](https://huggingface.co/{hub_id}))" if hub_id else ""


def dataset_card(recipe: Recipe, counts: dict, stats: dict) -> str:
    """README.md: YAML front matter for the Hub, then provenance, counts and reproduction."""
    g = recipe.generate
    front = yaml.safe_dump(card_metadata(recipe, counts["pairs"]), sort_keys=False,
                           allow_unicode=True).strip()
    note = license_meta(recipe.instructions.source)[1]
    system = recipe.model.system_prompt
    shipped = (f"It started from the shipped recipe `{recipe.name}` (`prefloop run --recipe "
               f"{recipe.name}`); recipe.yaml records every override."
               if recipe.name in SHIPPED_RECIPES else f"Recipe name: `{recipe.name}`.")
    lines = [
        "---", front, "---", "",
        f"# Preference pairs from {recipe.model.name}", "",
        "Best-vs-worst DPO pairs built by [prefloop](https://pypi.org/project/prefloop/): "
        f"{g.k} sampled responses per instruction, scored by a ranker; per instruction the "
        "highest-scored response is `chosen` and the lowest-scored is `rejected`. Columns follow "
        "TRL's conversational format, so `DPOTrainer` takes the dataset unchanged.", "",
        "## Provenance", "",
        f"- Generator: `{recipe.model.name}`" + _hub_note(recipe.model.name)
        + (f" at revision `{recipe.model.revision}`" if recipe.model.revision else ""),
        f"- Sampling: k={g.k}, temperature {g.temperature}, top-p {g.top_p}, up to "
        f"{g.max_new_tokens} new tokens, seed {g.seed}; the model's own chat template, "
        + ("system prompt: " + repr(system) if system is not None else "no system prompt"),
        f"- Instructions: `{recipe.instructions.source}` ({recipe.instructions.n_train} for "
        f"training, seed {recipe.instructions.seed})",
        *_ranker_lines(recipe),
        "- Pairing: duplicates (byte-identical responses) removed first"
        + (", responses cut at the token limit excluded" if recipe.pairs.require_eos else "")
        + f"; ties (all scores equal) dropped; minimum margin {recipe.pairs.min_margin}; among "
        "equal best (worst) scores the lowest judge variance wins, then the shorter (longer) "
        "response",
        "", "## Counts", "",
        "| what | count |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in counts.items()],
        "", "## Scores", "",
        "| statistic | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in stats.items()],
        "", "## Columns", "",
        "`id`, `prompt` (user turn, after the system turn if any), `chosen` / `rejected` "
        "(one assistant turn each), `prompt_text` (the rendered chat prompt), `chosen_score`, "
        "`rejected_score`, `candidates` (all responses, in sample order) with their `scores` "
        "(null: no valid score), `ranker`, `generator`.",
        "", "## Reproduce", "",
        "recipe.yaml beside this card is the resolved recipe of this run. " + shipped, "",
        "```bash", "pip install prefloop", "prefloop run --recipe recipe.yaml --until pairs",
        "```",
        "", "## License", "", note + " Responses were generated by "
        f"`{recipe.model.name}`; its license and terms apply to them.", "",
    ]
    return "\n".join(lines)


# -- the stage -----------------------------------------------------------------------------------


def empty_error(out: Path, counts: dict) -> PrefloopError:
    reasons = ", ".join(f"{r} {counts[f'dropped_{r}']}" for r in DROP_REASONS)
    return PrefloopError(
        f"{out}: no preference pairs from {counts['instructions']} instructions "
        f"({counts['responses']} responses, {counts['scored']} scored; dropped: {reasons}); "
        "generate more responses per instruction (generate.k) or more instructions, sample more "
        "varied ones (higher generate.temperature), or lower pairs.min_margin; "
        f"see {out / 'dropped.jsonl'}")


def run(recipe: Recipe, run_dir: Path, *, force: bool = False) -> Path:
    run_dir = Path(run_dir)
    out = run_dir / "pairs"
    h = config_hash({"pairs": recipe.pairs, "name": recipe.name,
                     "upstream": upstream_hash(run_dir, "rank")})
    if begin_stage(out, "pairs", h, force=force):
        return out
    started = time.time()
    gens = read_generations(run_dir / "generate" / "generations.jsonl")
    scores_path = run_dir / "rank" / "scores.jsonl"
    groups = join(gens, read_jsonl(scores_path), scores_path, recipe.model.name)
    rows, dropped, counts = build_pairs(groups, recipe)
    write_jsonl(out / "dropped.jsonl", dropped)
    if not rows:  # not done, no manifest; dropped.jsonl stays. The fix changes the config, so
        (out / "in_progress.json").unlink(missing_ok=True)  # let the next run start afresh
        raise empty_error(out, counts)
    tokens = {(c["id"], c["response"]): c["response_tokens"] for g in groups for c in g}
    stats = pair_stats(rows, tokens)
    folder = out / "dataset"
    write_dataset(rows, folder)
    atomic_write_text(folder / "recipe.yaml", dump_recipe(recipe))
    atomic_write_text(folder / "README.md", dataset_card(recipe, counts, stats))
    write_manifest(out, "pairs", h, started=started, counts=counts, extra={"stats": stats})
    return out
