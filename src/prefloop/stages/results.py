"""The compare stage's result, kept: compare/report.md (what it printed, and the per-kind table),
compare/eval_results.json (the metrics by name, the alignment-handbook habit), compare/per_kind.png,
and `prefloop show`, which prints a finished run's result again from these files.

Per-kind intervals: each model's strict accuracy on the constraints of one kind is a proportion
of n constraints; its 95% interval is Wilson's (compare.wilson_interval). The difference of the
two models over all prompts keeps its paired bootstrap interval (constraints/evaluate.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from prefloop.artifacts import (
    RunDir,
    atomic_write_json,
    atomic_write_text,
    read_manifest,
    save_figure,
)
from prefloop.config import Recipe
from prefloop.errors import PrefloopError
from prefloop.stages import compare

REPORT, METRICS, PLOT = "report.md", "eval_results.json", "per_kind.png"


# -- what compare prints ---------------------------------------------------------------------

def result_text(objective: dict | None, verdict: dict | None, training_ranker: str,
                transfer: dict | None = None) -> str:
    """The evaluation as compare prints it: the objective result, the transfer check (when
    compare.transfer_n > 0), the ranker's win-rate (with that ranker's caveat, kept in the
    verdict) and the verdict (the ranker's verdict alone when the instructions carry no
    constraints)."""
    from prefloop.rankers import ranker_class

    texts = []
    if objective is not None:
        texts.append(compare.objective_text(objective, training_ranker,
                                            ranker_class(training_ranker).checks_constraints))
    if transfer is not None:
        texts.append(compare.transfer_text(transfer))
    if verdict is not None:
        texts.append(compare.verdict_text(verdict) if objective is None
                     else compare.ranker_line(verdict, verdict.get("caveat", "")))
    if objective is not None:
        texts.append(compare.reading(objective))
    return "\n".join(texts)


def table_text(df, cfg, out: Path) -> str:
    """The first compare.show_rows rows, as compare.view asks, and where the rest is."""
    shown = df.head(cfg.show_rows)
    text = compare.format_blocks(shown) if cfg.view == "blocks" else compare.format_frame(shown)
    if len(df) > len(shown):
        text += f"\n({len(shown)} of {len(df)} rows; all of them in {out / 'comparison.csv'})"
    return text


# -- the metrics -----------------------------------------------------------------------------

def winner(lo: float, hi: float, null: float) -> str:
    """'dpo', 'original' or 'none': which side the 95% interval puts ahead of `null`."""
    return "dpo" if lo > null else "original" if hi < null else "none"


def per_kind(objective: dict) -> dict[str, dict]:
    """Each kind's strict constraint accuracy of both models with its Wilson 95% interval."""
    out = {}
    for kind, v in objective["per_kind"].items():
        row = {"n": v["n"]}
        for side in ("original", "dpo"):
            row[f"{side}_accuracy"] = v[side]
            row[f"{side}_ci95"] = list(compare.wilson_interval(round(v[side] * v["n"]), v["n"]))
        out[kind] = row
    return out


def _objective_metrics(o: dict) -> dict:
    d, ds = o["difference"], o["difference_sound"]
    out = {}
    for side in ("original", "dpo"):
        for key in ("prompt_strict", "prompt_loose", "prompt_sound", "constraint_strict",
                    "constraint_loose"):
            out[f"{side}_{key}_accuracy"] = o[side][key]
    out.update({
        "prompt_strict_accuracy_difference": d["prompt_strict"],
        "prompt_strict_accuracy_difference_ci95": d["ci95"],
        "prompt_strict_accuracy_difference_mcnemar_p": d["mcnemar_p"],
        "prompt_sound_accuracy_difference": ds["prompt_sound"],
        "prompt_sound_accuracy_difference_ci95": ds["ci95"],
        "prompt_sound_accuracy_difference_mcnemar_p": ds["mcnemar_p"],
        "difference_ci_method": d["ci_method"],
        "original_words_median": o["original"]["words_median"],
        "dpo_words_median": o["dpo"]["words_median"],
        "objective_winner": winner(*d["ci95"], 0.0),
        "guards_fired": o["guards_fired"],
        "per_kind_strict_accuracy": per_kind(o),
    })
    return out


def _ranker_metrics(v: dict) -> dict:
    out = {"ranker": v["ranker"], "ranker_independent_of_training": v.get(
        "independent_of_training_ranker"), "ranker_win_rate": v["win_rate"],
        "ranker_win_rate_ci95": v["ci95"], "ranker_win_rate_ci_method": v["ci_method"]}
    out.update({f"ranker_{k}": v[k] for k in ("n", "wins", "ties", "losses", "invalid")})
    out["ranker_winner"] = winner(*v["ci95"], 0.5) if v["n"] else "none"
    return out


def transfer_metrics(o: dict) -> dict:
    """The transfer check's numbers, named as the held-out set's, and its reading."""
    return {"instructions": o["n"], **_objective_metrics(o), "reading": o["reading"],
            "no_regression_margin": compare.TRANSFER_MARGIN}


def eval_results(n: int, objective: dict | None, verdict: dict | None, text: str,
                 transfer: dict | None = None) -> dict:
    """Every number of the result under a plain name; `verdict`: the printed verdict line;
    the transfer check's under "transfer"."""
    out: dict = {"heldout_instructions": n}
    if objective is not None:
        out.update(_objective_metrics(objective))
    if verdict is not None:
        out.update(_ranker_metrics(verdict))
    if transfer is not None:
        out["transfer"] = transfer_metrics(transfer)
    out["verdict"] = next((line for line in text.splitlines() if line.startswith("Verdict")),
                          None)
    return out


# -- report.md and the plot -----------------------------------------------------------------

def kind_table(kinds: dict[str, dict]) -> str:
    lines = ["| kind | constraints | original (95% CI) | DPO (95% CI) |", "|---|---|---|---|"]
    for kind, r in kinds.items():
        cells = [f"{r[f'{s}_accuracy']:.3f} ({r[f'{s}_ci95'][0]:.2f}–{r[f'{s}_ci95'][1]:.2f})"
                 for s in ("original", "dpo")]
        lines.append(f"| {kind} | {r['n']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def plot_per_kind(kinds: dict[str, dict], path: Path) -> Path:
    """Horizontal bars: each kind's strict accuracy, original and DPO, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(kinds)
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.5 * len(names)), constrained_layout=True)
    for i, (side, text) in enumerate((("original", "original"), ("dpo", "DPO"))):
        acc = [kinds[k][f"{side}_accuracy"] for k in names]
        bars = [compare.error_bar(a, kinds[k][f"{side}_ci95"])
                for a, k in zip(acc, names, strict=True)]
        err = [[b[0] for b in bars], [b[1] for b in bars]]
        ax.barh([j + (-0.2 if i == 0 else 0.2) for j in range(len(names))], acc, height=0.38,
                xerr=err, capsize=3, label=text)
    ax.set_yticks(range(len(names)), [f"{k.split(':')[-1]} (n {kinds[k]['n']})" for k in names])
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="strict constraint accuracy (95% Wilson interval)",
           title="Held-out accuracy per constraint kind")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars
    save_figure(fig, path)
    return path


def transfer_section(t: dict) -> list[str]:
    """report.md's transfer check: the reading, both accuracies and the paired difference (strict
    and sound), median words, guards, and the per-kind table."""
    lo, hi = t["prompt_strict_accuracy_difference_ci95"]
    slo, shi = t["prompt_sound_accuracy_difference_ci95"]
    fired = t["guards_fired"]
    return [
        "## Transfer check: constraint kinds that were not trained", "",
        f"**{t['reading'].capitalize()}** (rule: {compare.TRANSFER_RULE}).", "",
        f"{t['instructions']} held-out-topic instructions whose constraints are all of kinds "
        "outside instructions.kinds. Strict prompt-level accuracy: original "
        f"{t['original_prompt_strict_accuracy']:.3f}, DPO {t['dpo_prompt_strict_accuracy']:.3f}; "
        f"difference {t['prompt_strict_accuracy_difference']:+.3f} (95% CI {lo:+.3f} to "
        f"{hi:+.3f}, McNemar p {t['prompt_strict_accuracy_difference_mcnemar_p']:.3g}). "
        "Hollow answers counted wrong (sound): original "
        f"{t['original_prompt_sound_accuracy']:.3f}, DPO {t['dpo_prompt_sound_accuracy']:.3f}; "
        f"difference {t['prompt_sound_accuracy_difference']:+.3f} (95% CI {slo:+.3f} to "
        f"{shi:+.3f}). Median words: original {t['original_words_median']:g}, DPO "
        f"{t['dpo_words_median']:g}.", "",
        kind_table(t["per_kind_strict_accuracy"]), "",
        "Guards: " + ("; ".join(fired) + "." if fired else "none fired."), ""]


def report_md(recipe: Recipe, run_dir: Path, metrics: dict, text: str, table_md: str,
              plot: Path | None) -> str:
    o = metrics.get("per_kind_strict_accuracy")
    fired = metrics.get("guards_fired")
    parts = [
        f"# Result: original vs DPO, {recipe.model.name}", "",
        f"Run directory `{run_dir}`; {metrics['heldout_instructions']} held-out instructions "
        f"(never trained on), greedy at T {recipe.compare.temperature}, at most "
        f"{recipe.compare.max_new_tokens} new tokens. Every number: `{METRICS}`.", "",
        "## Verdict", "", metrics["verdict"] or "(no verdict: see below)", "",
        "## Evaluation, as printed", "", "```text", text, "```", ""]
    if o is not None:
        parts += ["## Per constraint kind", "", kind_table(o), "",
                  *([f"![per kind]({plot.name})", ""] if plot else []),
                  "## Guards", "", *([f"- {g}" for g in fired] if fired else
                                     ["None fired (a gain that comes with one is hollow)."]), ""]
    if "transfer" in metrics:
        parts += transfer_section(metrics["transfer"])
    if "ranker_win_rate" in metrics:
        parts += ["## Second opinion: the ranker", "",
                  f"`{metrics['ranker']}`: DPO wins {metrics['ranker_wins']}, ties "
                  f"{metrics['ranker_ties']}, loses {metrics['ranker_losses']}"
                  + (f"; win-rate {metrics['ranker_win_rate']:.3f} (95% Wilson "
                     f"{metrics['ranker_win_rate_ci95'][0]:.3f}–"
                     f"{metrics['ranker_win_rate_ci95'][1]:.3f})"
                     if metrics["ranker_n"] else "; no valid comparison") + ".", ""]
    parts += ["## The responses", "", table_md]
    return "\n".join(parts)


def write_results(recipe: Recipe, run_dir: Path, df, objective: dict | None,
                  verdict: dict | None, text: str, transfer: dict | None = None) -> dict:
    """compare/report.md, eval_results.json and (with constraints) per_kind.png."""
    out = RunDir(run_dir).stage("compare")
    metrics = eval_results(len(df), objective, verdict, text, transfer)
    atomic_write_json(out / METRICS, metrics)
    plot = None
    if objective is not None and objective["per_kind"]:
        plot = plot_per_kind(metrics["per_kind_strict_accuracy"], out / PLOT)
    atomic_write_text(out / REPORT, report_md(recipe, Path(run_dir), metrics, text,
                                              compare.markdown_table(df), plot))
    return metrics


# -- prefloop show ---------------------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def show(recipe: Recipe, run_dir: Path) -> str:
    """What compare printed for a finished run (table and evaluation), or an iterate run's
    summary; a one-line error naming the command when neither has finished."""
    run_dir = Path(run_dir)
    out = RunDir(run_dir).stage("compare")
    m = read_manifest(out)
    if m is not None and m.get("status") == "done":
        df = compare.comparison(run_dir)
        text = result_text(_read_json(out / "objective.json"), _read_json(out / "verdict.json"),
                           recipe.rank.ranker, _read_json(out / "transfer.json"))
        return "\n".join(s for s in (table_text(df, recipe.compare, out), text) if s)
    if (run_dir / "report.md").exists():  # an iterate loop: its summary table
        return (run_dir / "report.md").read_text(encoding="utf-8").rstrip()
    raise PrefloopError(f"{run_dir}: no finished result (no {out / 'manifest.json'} and no "
                        f"{run_dir / 'report.md'}); run `prefloop run --output-dir {run_dir}` "
                        "(or `prefloop iterate`) first")
