"""Self-rewarding iterative DPO (Yuan et al. 2024, arXiv:2401.10020): M_t builds its own pairs.

Starting from M1 = model.name, for t = 1..T (iterate.rounds), in run_dir/rounds/<t>/ (a run
directory of its own, driven by the ordinary stage functions and a per-round recipe):

    X_t        = new prompts: Self-Instruct by a FIXED model (selfinstruct.py), or seed prompts
    y_x^1..N   ~ M_t(· | x),  x ∈ X_t                          N = 4, T 0.7, top-p 0.9
    r(x, y)    = (1/|V|) Σ_{v∈V} v, V = M_t's parsable self-judgments (3 samples, Fig. 2 prompt)
    (y_w, y_l) = (argmax_y r, argmin_y r), prompts whose scores all tie are dropped
    M_{t+1}    = argmin_θ  −E log σ(β [log πθ(y_w|x)/π_ref(y_w|x) − log πθ(y_l|x)/π_ref(y_l|x)]),
                 with πθ initialised from M_t and π_ref = M_t,  β = 0.1

Reference model with LoRA: design A, "merge, then a fresh adapter" (docs/self_rewarding.md §7.2).
After round t the LoRA adapter is merged into M_t's weights and saved as a plain model folder,
rounds/<t>/model = M_{t+1}. Round t+1 trains a *new* adapter on that folder through the very same
`train.run` as `prefloop run`: TRL's reference is the adapter-disabled model, which is then
exactly M_{t+1}, and at step 0 policy = reference (LoRA B = 0). Why A rather than B (keep the
adapter; TRL adds a frozen "ref" copy of it):
- one reference mechanism for single runs and rounds, the one `train.run` already checks at
  step 0; B depends on TRL's "ref"-copy path, which has changed across versions and silently
  falls back to the base model for some LoRA kinds (huggingface/trl#6043);
- each round gets a fresh rank-r adapter instead of squeezing every round into one;
- every M_t is a standalone safetensors folder that generation, the self-judge, evaluation and
  other tools load without PEFT.
The cost is a full copy of the weights per round (0.5 GB for the 135M default in fp32), and in
bf16 the merged weights are rounded once. tests/test_iterate.py checks that round 2's reference
log-probs equal the merged M2's and differ from M1's.

Evaluation: rounds/0/eval holds M1's greedy responses to the fixed held-out prompts
(instructions/heldout.jsonl, never trained on), rounds/<t>/eval those of M_{t+1}, all scored by
a FIXED judge (`rank.make_ranker` on the recipe: the starting model, or rank.judge_model, or
PairRM), never by the model being trained. Win rate of a vs b over prompts where both were scored:

    w = (W + T/2) / (W + T + L),  W, T, L = #prompts with margin(a, b) > 0, = 0, < 0

margin = score(a) − score(b) for the pointwise judge (each response judged on its own, so order
cannot matter), PairRM's logit(a, b) − logit(b, a) (both orders) when pairwise.

Resume: every step is a stage folder with a manifest (config hash chained to the step before);
generation and judging append as they go, so a killed `prefloop iterate` resumes at the last
finished step and nothing saved is computed twice.
"""

from __future__ import annotations

import gc
import math
import shutil
import statistics
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from prefloop.artifacts import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    begin_stage,
    config_hash,
    read_jsonl,
    read_manifest,
    upstream_hash,
    write_manifest,
)
from prefloop.config import Recipe, dump_recipe
from prefloop.errors import PrefloopError
from prefloop.stages import generate, instructions, pairs, rank, selfinstruct, train


def round_dir(run_dir: Path, t: int) -> Path:
    return Path(run_dir) / "rounds" / str(t)


def model_name(recipe: Recipe, run_dir: Path, t: int) -> str:
    """M_{t+1}: the starting model for t = 0, else the merged folder rounds/<t>/model."""
    if t == 0:
        return recipe.model.name
    return str((round_dir(run_dir, t) / "model").resolve())


def label(t: int) -> str:
    """The paper's name of the model that round t produces (round 0: the start, M1)."""
    return f"M{t + 1}"


# -- recipes ---------------------------------------------------------------------------------------


def seed_recipe(recipe: Recipe) -> Recipe:
    """The run-level instructions: the seed pool (train) and the fixed eval set (held-out)."""
    return replace(recipe, instructions=replace(recipe.instructions,
                                                n_heldout=recipe.iterate.eval_prompts))


def round_recipe(recipe: Recipe, run_dir: Path, t: int) -> Recipe:
    """Round t's recipe: M_t generates N candidates and judges them itself."""
    it = recipe.iterate
    model = replace(recipe.model, name=model_name(recipe, run_dir, t - 1),
                    revision=recipe.model.revision if t == 1 else None)
    gen = replace(recipe.generate, k=it.n_candidates, temperature=it.temperature,
                  top_p=it.top_p, max_new_tokens=it.max_new_tokens, seed=it.seed + t)
    judge = replace(recipe.rank, ranker="judge", judge_model=None, judge_revision=None,
                    judge_samples=it.judge_samples)
    return replace(recipe, name=f"{recipe.name}-round{t}", model=model, generate=gen, rank=judge)


def check_recipe(recipe: Recipe) -> None:
    """Fail on settings that cannot work before any model loads."""
    it = recipe.iterate
    if it.prompt_source == "seed" and recipe.instructions.n_train < it.rounds * it.prompts_per_round:
        raise PrefloopError(
            f"instructions.n_train: {recipe.instructions.n_train} seed prompts cannot give "
            f"{it.rounds} disjoint rounds of iterate.prompts_per_round {it.prompts_per_round}; "
            f"raise instructions.n_train to {it.rounds * it.prompts_per_round}")
    if it.fewshot_seed < 1:
        raise PrefloopError("iterate.fewshot_seed: must be >= 1 (the paper uses 6)")
    if it.fewshot_generated < 0:
        raise PrefloopError("iterate.fewshot_generated: must be >= 0 (the paper uses 2)")
    if not 0 < it.rouge_threshold <= 1:
        raise PrefloopError(f"iterate.rouge_threshold: must be in (0, 1], got {it.rouge_threshold}")
    if it.min_words > it.max_words:
        raise PrefloopError(f"iterate.min_words ({it.min_words}) exceeds iterate.max_words "
                            f"({it.max_words}); lower min_words or raise max_words")
    if it.n_candidates < 2:
        raise PrefloopError("iterate.n_candidates: a pair needs at least 2 candidates "
                            "(the paper uses 4)")


# -- merge: M_{t+1} as a plain model folder --------------------------------------------------------


def merge(recipe_t: Recipe, rdir: Path, *, force: bool = False) -> Path:
    """rounds/<t>/model = M_t's weights W + (α/r)·B·A, saved as safetensors + tokenizer."""
    from peft import PeftModel

    from prefloop.models import load_model

    out = rdir / "model"
    adapter = rdir / "train" / "adapter"
    h = config_hash({"model": recipe_t.model, "upstream": upstream_hash(rdir, "train")})
    if begin_stage(out, "model", h, force=force):
        return out
    started = time.time()
    base, tok = load_model(recipe_t.model.name, revision=recipe_t.model.revision,
                           dtype=recipe_t.model.dtype, device=recipe_t.model.device)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    write_manifest(out, "model", h, started=started,
                   counts={"parameters": sum(p.numel() for p in merged.parameters())},
                   extra={"base": recipe_t.model.name, "adapter": str(adapter),
                          "dtype": str(next(merged.parameters()).dtype).replace("torch.", "")})
    return out


# -- evaluation on the fixed held-out prompts ------------------------------------------------------


def win_rate(margins: list[float | None]) -> dict:
    """w = (W + T/2) / (W + T + L) over the prompts with a margin; None/NaN count as unscored."""
    valid = [m for m in margins if m is not None and not math.isnan(m)]
    w, t_, lo = (sum(m > 0 for m in valid), sum(m == 0 for m in valid),
                 sum(m < 0 for m in valid))
    return {"wins": w, "ties": t_, "losses": lo, "unscored": len(margins) - len(valid),
            "win_rate": round((w + t_ / 2) / len(valid), 4) if valid else None}


class _LazyRanker:
    """The fixed evaluation judge, loaded only if something is left to judge."""

    def __init__(self, recipe: Recipe):
        self.recipe, self._ranker = recipe, None

    def get(self):
        if self._ranker is None:
            self._ranker = rank.make_ranker(self.recipe)
        return self._ranker


def _eval_responses(recipe: Recipe, name: str, t: int, items: list[dict], out: Path) -> list[dict]:
    """One response per eval prompt from model `name` (compare-section decoding), resumable."""
    from prefloop.engine import Sampling
    from prefloop.models import load_model

    path = out / "generations.jsonl"
    done = generate.completed_groups(path, 1)
    if all(it["id"] in done for it in items):
        return [done[it["id"]][0] for it in items]
    c = recipe.compare
    model, tok = load_model(name, revision=recipe.model.revision if t == 0 else None,
                            dtype=recipe.model.dtype, device=recipe.model.device)
    sampling = Sampling(temperature=c.temperature, top_p=c.top_p,
                        max_new_tokens=c.max_new_tokens, seed=c.seed)
    records = generate.generate_responses(
        model, tok, items, path, k=1, sampling=sampling, system=recipe.model.system_prompt,
        batch_size=recipe.generate.batch_size, where=str(out), extra={"model": label(t)},
        desc=f"eval {label(t)}")
    del model, tok
    _free()
    return records


def _eval_scores(judge: _LazyRanker, gens: list[dict], path: Path) -> dict[str, dict]:
    """Fixed-judge score of each eval response, appended per response; id -> record."""
    from prefloop.rankers.judge import JudgeRanker, mean_score

    done = {r["id"]: r for r in read_jsonl(path, allow_partial_tail=True)} if path.exists() else {}
    todo = [g for g in gens if g["id"] not in done]
    if todo:
        ranker = judge.get()
        instr, resp = [g["instruction"] for g in todo], [g["response"] for g in todo]
        if isinstance(ranker, JudgeRanker):
            def on_done(i, judgments):
                samples = [j.score for j in judgments]
                append_jsonl(path, [{"id": todo[i]["id"], "ranker": ranker.name,
                                     "score": mean_score(samples, ranker.cfg.min_valid),
                                     "scores": samples, "texts": [j.text for j in judgments]}])

            ranker.judge(instr, resp, on_done=on_done)
        else:  # PairRM has no pointwise score for a lone response: only margins count
            append_jsonl(path, [{"id": g["id"], "ranker": ranker.name, "score": None,
                                 "scores": [], "texts": []} for g in todo])
        done = {r["id"]: r for r in read_jsonl(path)}
    return {g["id"]: done[g["id"]] for g in gens}


def _margins(judge: _LazyRanker, gens: list[dict], scores: dict, other_dir: Path,
             path: Path) -> list[float | None]:
    """margin(new, other) per eval prompt; pointwise from scores, else the ranker's compare."""
    other_gens = {g["id"]: g for g in read_jsonl(other_dir / "generations.jsonl")}
    other_scores = {r["id"]: r for r in read_jsonl(other_dir / "scores.jsonl")}
    done = {r["id"]: r for r in read_jsonl(path, allow_partial_tail=True)} if path.exists() else {}
    todo = [g for g in gens if g["id"] not in done]
    if todo:
        if _pointwise(scores):
            rows = [{"id": g["id"], "margin": _diff(scores[g["id"]]["score"],
                                                    other_scores[g["id"]]["score"])}
                    for g in todo]
        else:
            ranker = judge.get()
            m = ranker.compare([g["instruction"] for g in todo], [g["response"] for g in todo],
                               [other_gens[g["id"]]["response"] for g in todo])
            rows = [{"id": g["id"], "margin": None if math.isnan(x) else float(x)}
                    for g, x in zip(todo, m, strict=True)]
        append_jsonl(path, rows)
        done = {r["id"]: r for r in read_jsonl(path)}
    return [done[g["id"]]["margin"] for g in gens]


def _pointwise(scores: dict) -> bool:
    """True for the LLM judge (scores.jsonl holds judge samples), False for PairRM."""
    return any(r["ranker"].startswith("judge") for r in scores.values())


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def eval_stats(gens: list[dict], scores: dict) -> dict:
    """Mean fixed-judge score, mean response length and judge parse failures of one model."""
    values = [r["score"] for r in scores.values() if r["score"] is not None]
    samples = [s for r in scores.values() for s in r["scores"]]
    return {
        "prompts": len(gens),
        "score_mean": round(statistics.fmean(values), 4) if values else None,
        "scored": len(values),
        "response_tokens_mean": round(statistics.fmean(g["response_tokens"] for g in gens), 1),
        "eos_rate": round(sum(g["finish_reason"] == "eos" for g in gens) / len(gens), 4),
        "judge_samples": len(samples),
        "judge_parse_failure_rate": (round(sum(s is None for s in samples) / len(samples), 4)
                                     if samples else None),
    }


def evaluate(recipe: Recipe, run_dir: Path, t: int, *, force: bool = False) -> Path:
    """rounds/<t>/eval: M_{t+1} on the held-out prompts, judged by the fixed judge; for t >= 1
    also its margins and win rates against M_t (rounds/<t-1>/eval) and M1 (rounds/0/eval)."""
    run_dir = Path(run_dir)
    rdir = round_dir(run_dir, t)
    out = rdir / "eval"
    name = model_name(recipe, run_dir, t)
    h = config_hash({
        "compare": recipe.compare, "judge": recipe.rank, "start": recipe.model, "model": name,
        "upstream": upstream_hash(run_dir, "instructions"),
        "trained": upstream_hash(rdir, "model") if t else None,
        "previous": upstream_hash(round_dir(run_dir, t - 1), "eval") if t else None})
    if begin_stage(out, "eval", h, force=force):
        return out
    started = time.time()
    items = read_jsonl(run_dir / "instructions" / "heldout.jsonl")
    gens = _eval_responses(recipe, name, t, items, out)
    judge = _LazyRanker(recipe)
    scores = _eval_scores(judge, gens, out / "scores.jsonl")
    counts = eval_stats(gens, scores)
    others = sorted({t - 1, 0}) if t else []
    for o in others:
        m = _margins(judge, gens, scores, round_dir(run_dir, o) / "eval",
                     out / f"vs_{label(o)}.jsonl")
        counts[f"vs_{label(o)}"] = win_rate(m)
    write_manifest(out, "eval", h, started=started, counts=counts,
                   extra={"model": label(t), "model_path": name,
                          "judge": judge._ranker.name if judge._ranker else _judge_label(recipe)})
    return out


def _judge_label(recipe: Recipe) -> str:
    if recipe.rank.ranker == "pairrm":
        return f"pairrm:{recipe.rank.pairrm_model}"
    return f"judge:{rank.judge_model_name(recipe)}"


# -- report ----------------------------------------------------------------------------------------


def _counts(stage_dir: Path) -> dict:
    return (read_manifest(stage_dir) or {}).get("counts", {})


def length_score_corr(scores: list[dict]) -> float | None:
    """Pearson r between response length (tokens) and the self-judge's mean score: > 0 means
    longer answers score higher, the length bias of docs/self_rewarding.md §10.1."""
    pts = [(r["response_tokens"], r["score"]) for r in scores if r["score"] is not None]
    if len(pts) < 3 or len({x for x, _ in pts}) < 2 or len({y for _, y in pts}) < 2:
        return None
    return round(statistics.correlation([x for x, _ in pts], [y for _, y in pts]), 3)


def round_row(run_dir: Path, t: int) -> dict:
    """Every per-round number of the report, read back from the round's manifests."""
    rdir = round_dir(run_dir, t)
    ev = _counts(rdir / "eval")
    row = {"round": t, "model": label(t), "eval_score": ev.get("score_mean"),
           "eval_tokens": ev.get("response_tokens_mean"), "eval_eos_rate": ev.get("eos_rate"),
           "eval_judge_fail": ev.get("judge_parse_failure_rate"),
           "vs_prev": ev.get(f"vs_{label(t - 1)}") if t else None,
           "vs_m1": ev.get("vs_M1") if t else None}
    if t == 0:
        return row
    gen, rk, pr = _counts(rdir / "generate"), _counts(rdir / "rank"), _counts(rdir / "pairs")
    pm = read_manifest(rdir / "pairs") or {}
    tm = read_manifest(rdir / "train") or {}
    scores_path = rdir / "rank" / "scores.jsonl"
    dropped = _dropped_reasons(rdir / "pairs")
    row.update({
        "prompts": _counts(rdir / "instructions"),
        "candidates": gen.get("responses"),
        "cand_tokens": (round(gen["response_tokens"] / gen["responses"], 1)
                        if gen.get("responses") else None),
        "cand_eos_rate": (round(gen["eos"] / gen["responses"], 4)
                          if gen.get("responses") else None),
        "self_judge_fail": rk.get("judge_sample_failure_rate"),
        "self_judge_score": rk.get("score_mean"),
        "self_judge_hist": _histogram(rk),
        "len_score_corr": (length_score_corr(read_jsonl(scores_path))
                           if scores_path.exists() else None),
        "pairs": pr.get("pairs", 0 if dropped else None),
        "dropped": ({k[len("dropped_"):]: v for k, v in pr.items() if k.startswith("dropped_")}
                    or dropped),
        "pair_stats": pm.get("stats", {}),
        "train_steps": tm.get("counts", {}).get("steps"),
        "step0": tm.get("step0_check", {}),
        "train_final": tm.get("final", {}),
    })
    return row


def _histogram(rank_counts: dict) -> dict | None:
    """Per-sample judge scores when they are few distinct values (integers), else the unit-bin
    histogram of the mean scores (a probability read-out gives a different value every time)."""
    samples = rank_counts.get("judge_sample_scores")
    if samples is not None and len(samples) <= 8:
        return samples
    return rank_counts.get("score_histogram")


def _dropped_reasons(pairs_dir: Path) -> dict:
    """Drop reasons from pairs/dropped.jsonl: what a pairs stage that found no pair leaves."""
    path = pairs_dir / "dropped.jsonl"
    if not path.exists():
        return {}
    return dict(Counter(r["reason"] for r in read_jsonl(path)))


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "–"
    if pct:
        return f"{100 * v:.1f}%"
    if isinstance(v, dict):  # a histogram: "score×count"
        return ", ".join(f"{k}×{n}" for k, n in v.items())
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)


def _wtl(w: dict | None) -> str:
    if not w:
        return "–"
    return f"{_fmt(w['win_rate'], pct=True)} ({w['wins']}/{w['ties']}/{w['losses']})"


def summary_table(rows: list[dict]) -> str:
    """One line per model: what the round built and how the model does on the eval prompts."""
    lines = ["| model | prompts | pairs | dropped (tie / <2 scored) | self-judge parse fail | "
             "self-judge mean | step-0 reward | win vs previous (W/T/L) | win vs M1 (W/T/L) | "
             "eval score | eval tokens | eval judge parse fail |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, s0 = r.get("dropped") or {}, r.get("step0") or {}
        prompts = (r.get("prompts") or {}).get("train")
        dropped = (f"{d.get('all_tied', 0)} / {d.get('too_few_scored', 0)}"
                   if r["round"] else "–")
        reward = s0.get("rewards/chosen")
        lines.append(
            f"| {r['model']} | {_fmt(prompts)} | {_fmt(r.get('pairs'))} | {dropped} | "
            f"{_fmt(r.get('self_judge_fail'), pct=True)} | {_fmt(r.get('self_judge_score'))} | "
            f"{_fmt(reward)} | {_wtl(r['vs_prev'])} | {_wtl(r['vs_m1'])} | "
            f"{_fmt(r['eval_score'])} | {_fmt(r['eval_tokens'])} | "
            f"{_fmt(r['eval_judge_fail'], pct=True)} |")
    return "\n".join(lines)


def detail_table(rows: list[dict]) -> str:
    """Per round: prompt creation, candidates, self-judge score spread, pairs and training."""
    lines = ["| round | prompts: generated / parsed / accepted | rejected by filter | candidates "
             "(tokens, EOS) | self-judge sample scores | length-score r | chosen / rejected "
             "tokens | chosen / rejected score | DPO steps | final loss | final reward acc |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["round"]:
            continue
        p, st, fin = r["prompts"], r["pair_stats"], r["train_final"]
        reasons = {k: v for k, v in p.items() if k in _FILTER_REASONS and v}
        made = (f"{p.get('generations', '–')} / {p.get('parsed', '–')} / {p.get('accepted', '–')}"
                if p.get("source") == "self-instruct" else f"seed: {p.get('train', '–')}")
        lines.append(
            f"| {r['round']} | {made} | {_fmt(reasons or None)} | {r['candidates']} "
            f"({_fmt(r['cand_tokens'])}, {_fmt(r['cand_eos_rate'], pct=True)}) | "
            f"{_fmt(r['self_judge_hist'] or None)} | {_fmt(r['len_score_corr'])} | "
            f"{_fmt(st.get('chosen_tokens_mean'))} / {_fmt(st.get('rejected_tokens_mean'))} | "
            f"{_fmt(st.get('chosen_score_mean'))} / {_fmt(st.get('rejected_score_mean'))} | "
            f"{_fmt(r['train_steps'])} | {_fmt(fin.get('loss'))} | "
            f"{_fmt(fin.get('rewards/accuracies'))} |")
    return "\n".join(lines)


_FILTER_REASONS = ("too_short", "too_long", "banned_keyword", "write_a_program",
                   "starts_with_punctuation", "non_ascii", "rouge")


def _save(fig, path: Path) -> None:
    import os
    import tempfile

    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a plot is for everyone to read
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


def plot_rounds(rows: list[dict], folder: Path) -> list[Path]:
    """win_rate.png, score.png, length.png and pairs.png: one point or bar per model/round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def nan(v):
        return math.nan if v is None else v

    models = [r["model"] for r in rows]
    trained = [r for r in rows if r["round"]]
    names = [r["model"] for r in trained]
    paths = []

    fig, ax = plt.subplots(figsize=(5, 3.5), constrained_layout=True)
    for key, text, style in (("vs_prev", "vs previous model", "-o"),
                             ("vs_m1", "vs M1 (start)", "--s")):
        ax.plot(names, [nan((r[key] or {}).get("win_rate")) for r in trained], style,
                label=text, alpha=0.8)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set(ylim=(0, 1), ylabel="win rate (ties = 1/2)", title="Held-out win rate, fixed judge")
    ax.legend()
    paths.append(folder / "win_rate.png")
    _save(fig, paths[-1])

    fig, ax = plt.subplots(figsize=(5, 3.5), constrained_layout=True)
    ax.plot(models, [nan(r["eval_score"]) for r in rows], marker="o",
            label="held-out, fixed judge")
    ax.plot(names, [nan(r["self_judge_score"]) for r in trained], marker="s",
            label="own candidates, self-judge")
    ax.set(ylim=(0, 5), ylabel="mean judge score (0-5)", title="Judge scores")
    ax.legend()
    paths.append(folder / "score.png")
    _save(fig, paths[-1])

    fig, ax = plt.subplots(figsize=(5, 3.5), constrained_layout=True)
    ax.plot(models, [nan(r["eval_tokens"]) for r in rows], marker="o", label="held-out responses")
    ax.plot(names, [nan(r["pair_stats"].get("chosen_tokens_mean")) for r in trained],
            marker="^", label="chosen (its training pairs)")
    ax.plot(names, [nan(r["pair_stats"].get("rejected_tokens_mean")) for r in trained],
            marker="v", label="rejected (its training pairs)")
    ax.set(ylabel="mean response tokens", title="Response length")
    ax.legend()
    paths.append(folder / "length.png")
    _save(fig, paths[-1])

    fig, ax = plt.subplots(figsize=(5, 3.5), constrained_layout=True)
    bottom = [0] * len(trained)
    for key, text in (("pairs", "kept"), ("all_tied", "dropped: tie"),
                      ("too_few_scored", "dropped: < 2 scored"),
                      ("below_min_margin", "dropped: margin")):
        vals = [(r["pairs"] if key == "pairs" else r["dropped"].get(key, 0)) or 0
                for r in trained]
        ax.bar([f"round {r['round']}" for r in trained], vals, bottom=bottom, label=text)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set(ylabel="prompts", title="Preference pairs per round")
    ax.legend()
    paths.append(folder / "pairs.png")
    _save(fig, paths[-1])
    return paths


def write_report(recipe: Recipe, run_dir: Path, stopped: str | None = None) -> Path:
    """run_dir/report.md (+ report.json and plots/*.png) from the rounds' manifests; a round
    that stopped early (`stopped`: the error) is reported as far as it got."""
    run_dir = Path(run_dir)
    it = recipe.iterate
    rows = [round_row(run_dir, t) for t in range(it.rounds + 1)
            if read_manifest(round_dir(run_dir, t) / ("eval" if t == 0 else "instructions"))]
    finished = sum(bool(read_manifest(round_dir(run_dir, t) / "eval")) for t in range(1, len(rows)))
    atomic_write_json(run_dir / "report.json", rows)
    plots = plot_rounds(rows, run_dir / "plots") if rows else []
    judge = (read_manifest(round_dir(run_dir, 0) / "eval") or {}).get("judge", "?")
    text = [
        f"# Self-rewarding run: {recipe.model.name}, {finished} of {it.rounds} rounds", "",
        *([f"**Stopped in round {len(rows) - 1}:** {stopped}", ""] if stopped else []),
        f"- Prompts per round: {it.prompts_per_round} ({it.prompt_source}"
        + (f", generated by the fixed `{it.prompt_model or recipe.model.name}`"
           if it.prompt_source == "self-instruct" else "") + ")",
        f"- Candidates: {it.n_candidates} per prompt (T {it.temperature}, top-p {it.top_p}, "
        f"≤ {it.max_new_tokens} tokens); self-judge: {it.judge_samples} samples, mean of "
        "parsable; pairs: best vs worst, ties dropped",
        f"- DPO: β {recipe.train.beta}, lr {recipe.train.learning_rate} ({recipe.train.scheduler}),"
        f" LoRA r {recipe.train.lora_r}; reference = M_t (merged, adapter disabled)",
        f"- Evaluation: {it.eval_prompts} held-out prompts, decoding T "
        f"{recipe.compare.temperature}, ≤ {recipe.compare.max_new_tokens} tokens; fixed judge "
        f"`{judge}`; win rate = (W + T/2)/(W + T + L)", "",
        "## Summary", "", summary_table(rows), "",
        "## Per round", "", detail_table(rows), "",
        *[f"![{p.stem}](plots/{p.name})" for p in plots], "",
    ]
    atomic_write_text(run_dir / "report.md", "\n".join(text))
    return run_dir / "report.md"


# -- one round -------------------------------------------------------------------------------------


def _free() -> None:
    """Collect dropped models between steps so GPU memory is returned before the next load."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # torch is a dependency; keep the loop usable in stripped test envs
        pass


def run_round(recipe: Recipe, run_dir: Path, t: int) -> Path:
    """Round t: prompts, N candidates, self-judging, pairs, DPO against M_t, merge, evaluate."""
    rdir = round_dir(run_dir, t)
    rr = round_recipe(recipe, run_dir, t)
    rdir.mkdir(parents=True, exist_ok=True)
    text = dump_recipe(rr)
    if not (rdir / "recipe.yaml").exists() or (rdir / "recipe.yaml").read_text("utf-8") != text:
        atomic_write_text(rdir / "recipe.yaml", text)
    steps = [("prompts", lambda: selfinstruct.run_round(recipe, run_dir, t)),
             ("generate", lambda: generate.run(rr, rdir)),
             ("rank", lambda: rank.run(rr, rdir)),
             ("pairs", lambda: pairs.run(rr, rdir)),
             ("train", lambda: train.run(rr, rdir)),
             ("model", lambda: merge(rr, rdir)),
             ("eval", lambda: evaluate(recipe, run_dir, t))]
    for step, fn in steps:
        print(f"[prefloop] iterate: round {t}/{recipe.iterate.rounds} {step}", file=sys.stderr,
              flush=True)
        fn()
        _free()
    check = (read_manifest(rdir / "train") or {}).get("step0_check", {})
    if check and not check.get("policy_equals_reference", True):
        print(f"[prefloop] warning: round {t}: policy != reference (M{t}) at step 0: {check}",
              file=sys.stderr)
    return rdir


def run(recipe: Recipe, run_dir: Path, *, force: bool = False) -> Path:
    """All rounds, resuming from the last finished step; writes run_dir/report.md (also when a
    round stops on an error, with what finished and the reason)."""
    check_recipe(recipe)
    run_dir = Path(run_dir)
    if force:
        shutil.rmtree(run_dir / "rounds", ignore_errors=True)
    instructions.run(seed_recipe(recipe), run_dir, force=force)
    evaluate(recipe, run_dir, 0)
    try:
        for t in range(1, recipe.iterate.rounds + 1):
            run_round(recipe, run_dir, t)
            rows = [round_row(run_dir, s) for s in range(t + 1)]
            print(summary_table(rows), flush=True)
    except PrefloopError as e:
        write_report(recipe, run_dir, stopped=str(e))
        raise
    write_report(recipe, run_dir)
    print(f"[prefloop] iterate: report -> {run_dir / 'report.md'}", file=sys.stderr)
    return run_dir
