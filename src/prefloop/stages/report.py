"""The self-rewarding run's report: report.md, report.json and plots/*.png, read back from the
rounds' manifests (so it can be written at any time, also after a round stopped on an error).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from pathlib import Path

from prefloop.artifacts import (
    RunDir,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    read_manifest,
    save_figure,
)
from prefloop.config import Recipe


def label(t: int) -> str:
    """The paper's name of the model that round t produces (round 0: the start, M1)."""
    return f"M{t + 1}"


def round_dir(run_dir: Path, t: int) -> Path:
    return RunDir(run_dir).round(t).root


# -- tables ----------------------------------------------------------------------------------------


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
           "objective": ev.get("objective_strict"),
           "objective_vs_m1": ev.get("objective_vs_M1") if t else None,
           "objective_vs_prev": ev.get("objective_vs_previous"),
           "transfer": ev.get("transfer_strict"),
           "transfer_vs_m1": ev.get("transfer_vs_M1") if t else None,
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


def _vs_m1(v: dict | None) -> str:
    """'+10.0% (+3.6%, +16.8%), p 0.008': M_t's strict accuracy minus M1's, on the same prompts."""
    if not v:
        return "–"
    lo, hi = v["ci95"]
    return f"{100 * v['difference']:+.1f}% ({100 * lo:+.1f}%, {100 * hi:+.1f}%), p {v['mcnemar_p']:.2g}"


def _guards(v: dict | None) -> str:
    if not v:
        return "–"
    return f"{len(v['guards_fired'])} fired" if v["guards_fired"] else "none"


def guard_lines(rows: list[dict]) -> list[str]:
    """One bullet per guard that fires for a model against M1: a gain that comes with it is
    hollow, not a success (docs/constraints.md)."""
    return [f"- {r['model']} vs M1{where}: {g}" for r in rows
            for key, where in (("objective_vs_m1", ""), ("transfer_vs_m1", ", transfer check"))
            for g in (r.get(key) or {}).get("guards_fired", [])]


def _transfer(v: dict | None) -> str:
    """'-2.1% (-12.5%, +8.3%), p 0.75: inconclusive; median words 40 → 38'."""
    if not v:
        return "–"
    words = "; median words {:g} → {:g}".format(*v["words_median"])
    return f"{_vs_m1(v)}: {v['reading']}{words}"


def summary_table(rows: list[dict]) -> str:
    """One line per model: what the round built and how the model does on the eval prompts."""
    lines = ["| model | prompts | pairs | dropped (tie / <2 scored) | self-judge parse fail | "
             "self-judge mean | reference = M_t | win vs previous (W/T/L) | win vs M1 (W/T/L) | "
             "eval score | eval tokens | eval judge parse fail | objective accuracy | "
             "objective vs M1 (95% CI), McNemar p | guards vs M1 | objective vs previous "
             "(95% CI), McNemar p |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    transfer = any(r.get("transfer") is not None for r in rows)
    if transfer:  # the transfer check (compare.transfer_n > 0): two more columns
        lines[0] += " transfer accuracy | transfer vs M1 (95% CI), McNemar p: reading |"
        lines[1] += "---|---|"
    for r in rows:
        d, s0 = r.get("dropped") or {}, r.get("step0") or {}
        prompts = (r.get("prompts") or {}).get("train")
        dropped = (f"{d.get('all_tied', 0)} / {d.get('too_few_scored', 0)}"
                   if r["round"] else "–")
        ref = [s0.get("reference_is_base_step0"), s0.get("reference_is_base_end")]
        reward = None if None in ref else ("yes" if all(ref) else "NO")
        lines.append(
            f"| {r['model']} | {_fmt(prompts)} | {_fmt(r.get('pairs'))} | {dropped} | "
            f"{_fmt(r.get('self_judge_fail'), pct=True)} | {_fmt(r.get('self_judge_score'))} | "
            f"{_fmt(reward)} | {_wtl(r['vs_prev'])} | {_wtl(r['vs_m1'])} | "
            f"{_fmt(r['eval_score'])} | {_fmt(r['eval_tokens'])} | "
            f"{_fmt(r['eval_judge_fail'], pct=True)} | {_fmt(r.get('objective'), pct=True)} | "
            f"{_vs_m1(r.get('objective_vs_m1'))} | {_guards(r.get('objective_vs_m1'))} | "
            f"{_vs_m1(r.get('objective_vs_prev'))} |"
            + (f" {_fmt(r.get('transfer'), pct=True)} | {_transfer(r.get('transfer_vs_m1'))} |"
               if transfer else ""))
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


def win_rate_errors(trained: list[dict], key: str) -> list[list[float]]:
    """matplotlib's yerr: each win rate's distance to the ends of its Wilson 95% interval (NaN
    where a model has no win rate)."""
    from prefloop.stages.compare import error_bar

    below, above = [], []
    for r in trained:
        w = r[key] or {}
        if w.get("win_rate") is None or not w.get("ci95"):
            below.append(math.nan)
            above.append(math.nan)
        else:
            low, high = error_bar(w["win_rate"], w["ci95"])
            below.append(low)
            above.append(high)
    return [below, above]


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
    for i, (key, text, style) in enumerate((("vs_prev", "vs previous model", "-o"),
                                            ("vs_m1", "vs M1 (start)", "--s"))):
        rates = [nan((r[key] or {}).get("win_rate")) for r in trained]
        # side by side, so the two Wilson 95% intervals of one model do not hide each other
        x = [j + (0.08 if i else -0.08) for j in range(len(trained))]
        ax.errorbar(x, rates, yerr=win_rate_errors(trained, key), fmt=style, capsize=3,
                    label=text + " (95% CI)", alpha=0.8)
    ax.set_xticks(range(len(trained)), names)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set(ylim=(0, 1), ylabel="win rate (ties = 1/2)", title="Held-out win rate, fixed judge")
    ax.legend()
    paths.append(folder / "win_rate.png")
    save_figure(fig, paths[-1])

    fig, ax = plt.subplots(figsize=(5, 3.5), constrained_layout=True)
    ax.plot(models, [nan(r["eval_score"]) for r in rows], marker="o",
            label="held-out, fixed judge")
    ax.plot(names, [nan(r["self_judge_score"]) for r in trained], marker="s",
            label="own candidates, self-judge")
    ax.set(ylim=(0, 5), ylabel="mean judge score (0-5)", title="Judge scores")
    ax.legend()
    paths.append(folder / "score.png")
    save_figure(fig, paths[-1])

    fig, ax = plt.subplots(figsize=(5, 3.5), constrained_layout=True)
    ax.plot(models, [nan(r["eval_tokens"]) for r in rows], marker="o", label="held-out responses")
    ax.plot(names, [nan(r["pair_stats"].get("chosen_tokens_mean")) for r in trained],
            marker="^", label="chosen (its training pairs)")
    ax.plot(names, [nan(r["pair_stats"].get("rejected_tokens_mean")) for r in trained],
            marker="v", label="rejected (its training pairs)")
    ax.set(ylabel="mean response tokens", title="Response length")
    ax.legend()
    paths.append(folder / "length.png")
    save_figure(fig, paths[-1])

    if any(r.get("objective") is not None for r in rows):
        fig, ax = plt.subplots(figsize=(5, 3.5), constrained_layout=True)
        acc = [nan(r.get("objective")) for r in rows]
        ax.plot(models, acc, marker="o", label="strict prompt-level accuracy")
        start = acc[0]
        bars = [(i, r["objective_vs_m1"]["ci95"]) for i, r in enumerate(rows)
                if r.get("objective_vs_m1")]
        if bars:  # M1's accuracy plus the 95% interval of the paired difference
            ax.vlines([models[i] for i, _ in bars], [start + lo for _, (lo, _) in bars],
                      [start + hi for _, (_, hi) in bars], color="grey",
                      label="M1 + 95% CI of the difference")
        ax.set(ylim=(0, 1), ylabel="share of held-out prompts", title="Objective accuracy")
        ax.legend()
        paths.append(folder / "objective.png")
        save_figure(fig, paths[-1])

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
    save_figure(fig, paths[-1])
    return paths


def _reward_text(recipe: Recipe) -> str:
    """How each round ranked its candidates: M_t's self-judgments, or the recipe's programmatic
    ranker (iterate.round_recipe)."""
    from prefloop.rankers import ranker_class

    if ranker_class(recipe.rank.ranker).programmatic:
        return f"reward: the `{recipe.rank.ranker}` ranker every round (no model judges)"
    return (f"self-judge: {recipe.iterate.judge_samples} samples, mean of parsable")


def write_report(recipe: Recipe, run_dir: Path, stopped: str | None = None) -> Path:
    """run_dir/report.md (+ report.json and plots/*.png) from the rounds' manifests; a round
    that stopped early (`stopped`: the error) is reported as far as it got."""
    from prefloop.stages.compare import TRANSFER_RULE

    run_dir = Path(run_dir)
    it = recipe.iterate
    rows = [round_row(run_dir, t) for t in range(it.rounds + 1)
            if read_manifest(round_dir(run_dir, t) / ("eval" if t == 0 else "instructions"))]
    finished = sum(bool(read_manifest(round_dir(run_dir, t) / "eval")) for t in range(1, len(rows)))
    atomic_write_json(run_dir / "report.json", rows)
    plots = plot_rounds(rows, run_dir / "plots") if rows else []
    judge = (read_manifest(round_dir(run_dir, 0) / "eval") or {}).get("judge", "?")
    guards = guard_lines(rows)
    text = [
        f"# Self-rewarding run: {recipe.model.name}, {finished} of {it.rounds} rounds", "",
        *([f"**Stopped in round {len(rows) - 1}:** {stopped}", ""] if stopped else []),
        f"- Prompts per round: {it.prompts_per_round} ({it.prompt_source}"
        + (f", generated by the fixed `{it.prompt_model or recipe.model.name}`"
           if it.prompt_source == "self-instruct" else "") + ")",
        f"- Candidates: {it.n_candidates} per prompt (T {it.temperature}, top-p {it.top_p}, "
        f"≤ {it.max_new_tokens} tokens); " + _reward_text(recipe)
        + "; pairs: best vs worst, ties dropped",
        f"- DPO: β {recipe.train.beta}, lr {recipe.train.learning_rate} ({recipe.train.scheduler}),"
        f" LoRA r {recipe.train.lora_r}; reference = M_t (merged, adapter disabled)",
        f"- Evaluation: {it.eval_prompts} held-out prompts, decoding T "
        f"{recipe.compare.temperature}, ≤ {recipe.compare.max_new_tokens} tokens; fixed judge "
        f"`{judge}`; win rate = (W + T/2)/(W + T + L)",
        *([f"- Transfer check: {recipe.compare.transfer_n} held-out-topic prompts whose "
           f"constraint kinds no round trained, each M_t against M1: {TRANSFER_RULE} "
           "(docs/cli.md)"] if recipe.compare.transfer_n else []), "",
        "## Summary", "", summary_table(rows), "",
        *(["Guards of the objective evaluation (a gain that comes with one of these is hollow):",
           "", *guards, ""] if guards else []),
        "## Per round", "", detail_table(rows), "",
        *[f"![{p.stem}](plots/{p.name})" for p in plots], "",
    ]
    atomic_write_text(run_dir / "report.md", "\n".join(text))
    return run_dir / "report.md"
