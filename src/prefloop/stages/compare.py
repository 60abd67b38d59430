"""Stage 6: the original model against the DPO model on held-out instructions, side by side.

One base model is loaded and the trained adapter attached; the original's responses are generated
with the adapter disabled, so both sides share weights, chat template, decoding settings and
seeds. Generation is resumable (compare/original.jsonl, compare/dpo.jsonl).

Verdict: the recipe's ranker compares each (dpo, original) pair; a margin > 0 is a DPO win.
    win-rate  w = (wins + ties / 2) / n
    Wilson 95% interval (Wilson 1927), z = 1.96:
        (w + z²/2n ± z·sqrt(w(1−w)/n + z²/4n²)) / (1 + z²/n)
Identical responses are ties without asking the ranker; a margin the ranker could not give
(NaN/None, e.g. a judge that never produced a valid score) is counted as invalid and left out of n.
"""

from __future__ import annotations

import math
import shutil
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pandas as pd

from prefloop.artifacts import (
    RunDir,
    Stage,
    Upstream,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    write_jsonl,
)
from prefloop.config import Recipe
from prefloop.constraints.evaluate import evaluate
from prefloop.errors import PrefloopError
from prefloop.rankers import make_ranker, ranker_class
from prefloop.stages.instructions import normalize

COLUMNS = ["instruction", "original", "dpo"]
Z95 = 1.959964


# --- inputs ----------------------------------------------------------------------------------

def _first_overlap(items: list[dict], seen: set[str]) -> tuple[int, str | None]:
    hits = [it["id"] for it in items if normalize(it["instruction"]) in seen]
    return len(hits), (hits[0] if hits else None)


def pairs_prompts(run_dir: Path) -> set[str]:
    """Normalised user messages of the pairs dataset (empty when the folder is absent)."""
    path = RunDir(run_dir).dataset
    if not (path / "data").is_dir():
        return set()
    from prefloop.stages.pairs import read_dataset

    ds = read_dataset(path).select_columns(["prompt"])
    return {normalize(m["content"]) for row in ds["prompt"] for m in row if m["role"] == "user"}


def heldout_items(run_dir: Path) -> list[dict]:
    """Held-out instructions, refusing any that the model was trained on."""
    run = RunDir(run_dir)
    heldout_path, train_path = run.heldout_instructions, run.train_instructions
    items = read_jsonl(heldout_path)
    if not items:
        raise PrefloopError(f"{heldout_path}: no held-out instructions; set "
                            "instructions.n_heldout > 0 and re-run `prefloop instructions --force`")
    n, first = _first_overlap(items, {normalize(t["instruction"]) for t in read_jsonl(train_path)})
    if n:
        raise PrefloopError(f"{heldout_path}: {n} held-out instruction(s) also in {train_path} "
                            f"(first: '{first}'); held-out instructions must be unseen, re-run "
                            "`prefloop instructions --force` on a de-duplicated source")
    n, first = _first_overlap(items, pairs_prompts(run_dir))
    if n:
        raise PrefloopError(f"{heldout_path}: {n} held-out instruction(s) are prompts of the "
                            f"pairs dataset {run.dataset} (first: "
                            f"'{first}'); held-out instructions must be unseen, re-run "
                            "`prefloop pairs --force` and `prefloop train --force`")
    return items


def transfer_set(recipe: Recipe, run_dir: Path) -> tuple[list[dict], str | None]:
    """compare.transfer_n held-out-topic instructions of untrained kinds, with the note when the
    check does not apply (instructions.transfer_draw), refusing any instruction the model was
    trained on; [] when the check is off."""
    from prefloop.stages.instructions import transfer_draw

    items, note = transfer_draw(recipe)
    train_path = RunDir(run_dir).train_instructions
    if items and train_path.exists():
        n, first = _first_overlap(items, {normalize(t["instruction"])
                                          for t in read_jsonl(train_path)})
        if n:
            raise PrefloopError(f"compare.transfer_n: {n} transfer instruction(s) also in "
                                f"{train_path} (first: '{first}'); set compare.transfer_n=0 or "
                                "de-duplicate the source")
    return items, note


def adapter_dir(run_dir: Path) -> Path:
    path = RunDir(run_dir).adapter
    if not (path / "adapter_config.json").exists():
        raise PrefloopError(f"{path}: no trained adapter found; run `prefloop train --output-dir "
                            f"{run_dir}` first")
    return path


def load_with_adapter(recipe: Recipe, adapter: Path):
    """(base model with the DPO adapter attached, tokenizer); one copy of the base weights."""
    from prefloop.models import load_adapter, load_model

    base, tok = load_model(recipe.model)
    run_dir = Path(adapter).parent.parent
    model = load_adapter(base, adapter, f"redo training: prefloop train --output-dir {run_dir} "
                         "--force")
    return model.eval(), tok


# --- tables ----------------------------------------------------------------------------------

def comparison_frame(items: list[dict], original: list[dict], dpo: list[dict]) -> pd.DataFrame:
    return pd.DataFrame({"instruction": [it["instruction"] for it in items],
                         "original": [r["response"] for r in original],
                         "dpo": [r["response"] for r in dpo]}, columns=COLUMNS)


def comparison(run_dir: Path) -> pd.DataFrame:
    """The finished compare stage's table (instruction, original, dpo) of a run directory, for
    notebooks: `prefloop.comparison("runs/default")`."""
    out = RunDir(run_dir).stage("compare")
    items = read_jsonl(RunDir(run_dir).heldout_instructions)
    original = {r["id"]: r for r in read_jsonl(out / "original.jsonl")}
    dpo = {r["id"]: r for r in read_jsonl(out / "dpo.jsonl")}
    missing = [it["id"] for it in items if it["id"] not in original or it["id"] not in dpo]
    if missing:
        raise PrefloopError(f"{out}: no responses for held-out '{missing[0]}'; run `prefloop "
                            f"compare --output-dir {run_dir}` first")
    return comparison_frame(items, [original[it["id"]] for it in items],
                            [dpo[it["id"]] for it in items])


def _clip(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max_chars - 1].rstrip() + "…"


def _wrap(text: str, width: int, indent: str = "  ") -> str:
    paragraphs = text.splitlines() or [""]
    return "\n".join(textwrap.fill(p, width, initial_indent=indent, subsequent_indent=indent)
                     if p.strip() else "" for p in paragraphs)


def format_blocks(df: pd.DataFrame, width: int | None = None, max_chars: int = 700) -> str:
    """One block per row (instruction, then each model's response), wrapped to the terminal."""
    if width is None:
        width = max(60, min(shutil.get_terminal_size((100, 24)).columns, 120))
    out = []
    for i, row in enumerate(df.itertuples(index=False), start=1):
        out.append(f"━━ {i}/{len(df)} " + "━" * max(0, width - 8 - len(str(i)) - len(str(len(df)))))
        out.append("instruction:")
        out.append(_wrap(_clip(row.instruction, max_chars), width))
        for name in ("original", "dpo"):
            out.append(f"── {name} ──")
            out.append(_wrap(_clip(getattr(row, name), max_chars), width))
        out.append("")
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "\n").replace(
        "\n", "<br>")


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table; `|` escaped and newlines as <br> so each row stays one line."""
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |"
              for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# --- verdict ---------------------------------------------------------------------------------

def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (ties count as half a success)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def error_bar(value: float, ci: list[float] | tuple[float, float]) -> tuple[float, float]:
    """matplotlib's (below, above) distances from `value` to the ends of its interval, never
    negative: a Wilson interval at a rate of 0 or 1 ends at the rate, up to rounding."""
    return max(0.0, value - ci[0]), max(0.0, ci[1] - value)


def outcome(margin: float | None) -> str:
    if margin is None or (isinstance(margin, float) and math.isnan(margin)):
        return "invalid"
    return "win" if margin > 0 else "loss" if margin < 0 else "tie"


def _content_tokens(record: dict) -> int:
    """Generated tokens without the final EOS."""
    return record["response_tokens"] - (record["finish_reason"] == "eos")


def win_rate(margins: list) -> dict:
    """W/T/L = #margins > 0 / = 0 / < 0 (None or NaN: invalid, left out of n = W + T + L),
    the win-rate w = (W + T/2) / n and its Wilson 95% interval."""
    return outcome_rate([outcome(m) for m in margins])


def outcome_rate(outcomes: list[str]) -> dict:
    """`win_rate` of margins already read by `outcome`."""
    wins, ties, losses = (outcomes.count(k) for k in ("win", "tie", "loss"))
    n = wins + ties + losses
    lo, hi = wilson_interval(wins + 0.5 * ties, n)
    return {"n": n, "wins": wins, "ties": ties, "losses": losses,
            "invalid": outcomes.count("invalid"),
            "win_rate": (wins + 0.5 * ties) / n if n else None,
            "ci95": [lo, hi] if n else None}


def tally(items: list[dict], original: list[dict], dpo: list[dict], margins: list,
          ranker_name: str) -> dict:
    """wins/ties/losses of DPO over the original, win-rate, Wilson 95% CI, mean lengths."""
    outcomes = [outcome(m) for m in margins]
    w = outcome_rate(outcomes)

    def mean(values):
        return sum(values) / len(values) if values else None

    return {
        "ranker": ranker_name, **{k: w[k] for k in ("n", "wins", "ties", "losses", "invalid")},
        "identical": sum(a["response"] == b["response"] for a, b in zip(original, dpo,
                                                                          strict=True)),
        "win_rate": w["win_rate"], "ci95": w["ci95"], "ci_method": "wilson",
        "mean_tokens": {"original": mean([_content_tokens(r) for r in original]),
                        "dpo": mean([_content_tokens(r) for r in dpo])},
        "mean_words": {"original": mean([len(r["response"].split()) for r in original]),
                       "dpo": mean([len(r["response"].split()) for r in dpo])},
        "items": [{"id": it["id"], "margin": None if o == "invalid" else float(m), "outcome": o}
                  for it, m, o in zip(items, margins, outcomes, strict=True)],
    }


def judge_margins(ranker, items: list[dict], original: list[dict], dpo: list[dict]) -> list:
    """Ranker margins of dpo over original; identical responses are ties (margin 0)."""
    todo = [i for i, (a, b) in enumerate(zip(original, dpo, strict=True))
            if a["response"] != b["response"]]
    margins: list = [0.0] * len(items)
    if todo:
        got = ranker.compare([items[i]["instruction"] for i in todo],
                             [dpo[i]["response"] for i in todo],
                             [original[i]["response"] for i in todo])
        if len(got) != len(todo):
            raise PrefloopError(f"{ranker.name}: returned {len(got)} margins for {len(todo)} pairs")
        for i, m in zip(todo, got, strict=True):
            margins[i] = m
    return margins


def verdict_text(v: dict) -> str:
    if not v["n"]:
        return (f"Verdict ({v['ranker']}): no valid comparison out of {v['invalid']} held-out "
                "instructions; the ranker gave no usable margin.")
    lo, hi = v["ci95"]
    if lo > 0.5:
        reading = "the DPO model is preferred"
    elif hi < 0.5:
        reading = "the original model is preferred"
    else:
        reading = "no difference is detectable at this sample size (the interval contains 0.5)"
    invalid = f", {v['invalid']} left out (no valid margin)" if v["invalid"] else ""
    mt, mw = v["mean_tokens"], v["mean_words"]
    return (f"Verdict ({v['ranker']}): on {v['n']} held-out instructions the DPO model wins "
            f"{v['wins']}, ties {v['ties']} ({v['identical']} identical responses) and loses "
            f"{v['losses']} against the original{invalid}; win-rate {v['win_rate']:.3f} (95% "
            f"Wilson interval {lo:.3f}–{hi:.3f}): {reading}. Mean response length: original "
            f"{mt['original']:.1f} tokens / {mw['original']:.1f} words, DPO {mt['dpo']:.1f} "
            f"tokens / {mw['dpo']:.1f} words; a longer winner may reflect the ranker's length "
            "bias as much as quality.")


def objective_text(o: dict, training_ranker: str, same_checks: bool) -> str:
    """The objective result: both models' accuracies, the paired difference, the guards;
    `same_checks`: the training ranker scored by these very checks (its `checks_constraints`)."""
    same = ("the same checks ranked the training pairs (on other instructions): the model was "
            "trained toward exactly this metric" if same_checks
            else f"independent of the training ranker ({training_ranker})")
    return "\n".join([
        f"Objective evaluation (program checks of each held-out instruction's constraints; "
        f"{same}), {o['n']} instructions:", *detail_lines(o)])


def detail_lines(o: dict) -> list[str]:
    """An `evaluate` result's lines: strict accuracy and its paired difference, the sound
    reading, loose and constraint-level accuracy, per kind, and the guards with median words."""
    so, sd, d, ds = o["original"], o["dpo"], o["difference"], o["difference_sound"]
    lo, hi = d["ci95"]
    kinds = "; ".join(f"{k.split(':')[-1]} {v['original']:.2f}→{v['dpo']:.2f} (n {v['n']})"
                      for k, v in o["per_kind"].items())
    return [
        f"  prompt-level strict accuracy: original {so['prompt_strict']:.3f}, DPO "
        f"{sd['prompt_strict']:.3f}; difference {d['prompt_strict']:+.3f} (95% CI {lo:+.3f} to "
        f"{hi:+.3f}, {d['ci_method']}; only DPO right {d['only_dpo_right']}, only original right "
        f"{d['only_original_right']}, exact McNemar p {d['mcnemar_p']:.3g})",
        f"  the same, hollow answers counted wrong (empty, refusal, copy, bare, degenerate): "
        f"original {so['prompt_sound']:.3f}, DPO {sd['prompt_sound']:.3f}; difference "
        f"{ds['prompt_sound']:+.3f} (95% CI {ds['ci95'][0]:+.3f} to {ds['ci95'][1]:+.3f}; "
        f"McNemar p {ds['mcnemar_p']:.3g})",
        f"  prompt-level loose: {so['prompt_loose']:.3f} → {sd['prompt_loose']:.3f}; "
        f"constraint-level strict: {so['constraint_strict']:.3f} → {sd['constraint_strict']:.3f}"
        f", loose: {so['constraint_loose']:.3f} → {sd['constraint_loose']:.3f}",
        f"  per kind (strict): {kinds}",
        f"  guards: median words {so['words_median']:g} → {sd['words_median']:g}; empty "
        f"{so['empty']} → {sd['empty']}, refusals {so['refusals']} → {sd['refusals']}, copies of "
        f"the instruction {so['copies']} → {sd['copies']}, bare postscript or closing phrase "
        f"{so['bare']} → {sd['bare']}, degenerate repetition {so['degenerate']} → "
        f"{sd['degenerate']}; relevance to the task "
        f"{so['relevance_mean']:.2f} → {sd['relevance_mean']:.2f}",
    ]


# The transfer check's reading of the paired difference (DPO minus original) of strict accuracy
# on instructions of untrained kinds: a drop of at most TRANSFER_MARGIN is not a regression.
TRANSFER_MARGIN = 0.05
# `transfer_reading` in words, for the reports
TRANSFER_RULE = (f"no regression when the 95% interval's lower end is above -{TRANSFER_MARGIN:.2f}, "
                 "a regression when its upper end is below zero (checked first), at the floor "
                 "when neither model meets any of these instructions, else inconclusive")


def transfer_reading(o: dict) -> str:
    """'regression' when the 95% interval of the difference lies below zero (a detectable drop,
    however small), 'at the floor' when neither model meets a single transfer instruction (a
    drop could not show: the set says nothing), else 'no regression' when its lower end is
    above -TRANSFER_MARGIN, else 'inconclusive'."""
    lo, hi = o["difference"]["ci95"]
    sides = [o.get(side, {}).get("prompt_strict") for side in ("original", "dpo")]
    if hi < 0:
        return "regression"
    if sides == [0.0, 0.0]:
        return "at the floor"
    if lo > -TRANSFER_MARGIN:
        return "no regression"
    return "inconclusive"


def transfer_text(o: dict) -> str:
    """The transfer check as compare prints it: the evaluation's lines, then its reading."""
    lo, hi = o["difference"]["ci95"]
    why = {"regression": f"the 95% interval {lo:+.3f} to {hi:+.3f} lies below zero",
           "no regression": f"the 95% interval's lower end {lo:+.3f} is above "
                            f"-{TRANSFER_MARGIN:.2f}",
           "inconclusive": f"the 95% interval {lo:+.3f} to {hi:+.3f} allows both a drop of "
                           f"{TRANSFER_MARGIN:.2f} or more and none",
           "at the floor": "neither model meets any of these instructions, so a drop could not "
                           "show; the constraint-level rates above are all it says"}
    reading = transfer_reading(o)
    fired = f"; guards: {'; '.join(o['guards_fired'])}" if o["guards_fired"] else ""
    return "\n".join([
        "Transfer check (held-out topics, only constraint kinds that were not trained), "
        f"{o['n']} instructions:", *detail_lines(o),
        f"Transfer: {reading} ({why[reading]}){fired}."])


def ranker_line(v: dict, caveat: str = "") -> str:
    """The ranker's win-rate, labelled by whether it also made the training pairs, then the
    ranker's own `caveat` sentence."""
    if not v["n"]:
        return f"Ranker ({v['ranker']}): no valid comparison."
    lo, hi = v["ci95"]
    label = ("independent of the training ranker" if v["independent_of_training_ranker"]
             else "the ranker that made the training pairs: optimistic")
    weak = f" {caveat}" if caveat else ""
    return (f"Ranker ({v['ranker']}; {label}): DPO wins {v['wins']}, ties {v['ties']}, loses "
            f"{v['losses']}; win-rate {v['win_rate']:.3f} (95% Wilson {lo:.3f}–{hi:.3f}).{weak}")


def reading(o: dict) -> str:
    """What the objective result means, guards included."""
    lo, hi = o["difference"]["ci95"]
    fired = o["guards_fired"]
    if lo > 0 and fired:
        return ("Verdict: the accuracy gain is hollow, not a success: " + "; ".join(fired) + ".")
    if lo > 0:
        return ("Verdict: the DPO model follows the held-out instructions' constraints better "
                "(the 95% interval of the difference is above zero) and no guard fired.")
    if hi < 0:
        return "Verdict: the DPO model follows the held-out constraints worse than the original."
    note = f" Guards: {'; '.join(fired)}." if fired else ""
    return ("Verdict: no difference is detectable at this sample size (the 95% interval of the "
            "difference contains zero)." + note)


def _one_line(text) -> str:
    return " ".join(str(text).split())


def format_frame(df: pd.DataFrame, width: int | None = None) -> str:
    """pandas' own rendering, each cell cut to fit the terminal (full text in the CSV/MD)."""
    if width is None:
        width = max(80, shutil.get_terminal_size((120, 24)).columns)
    cell = max(20, (width - 8) // len(df.columns) - 2)
    return df.to_string(max_colwidth=cell, justify="left",
                        formatters={c: _one_line for c in df.columns})


def transfer_counts(o: dict) -> dict:
    """The transfer check's numbers in the manifest (what the stage line reads)."""
    return {"n": o["n"], "strict": {"original": o["original"]["prompt_strict"],
                                    "dpo": o["dpo"]["prompt_strict"]},
            "ci95": o["difference"]["ci95"], "reading": o["reading"],
            "guards_fired": len(o["guards_fired"])}


# --- stage -----------------------------------------------------------------------------------

def stage_config(recipe: Recipe, upstream) -> dict:
    """What the stage's manifest hash covers (prefloop.plan predicts it before a run)."""
    return {"compare": recipe.compare, "model": recipe.model,
            "rank": recipe.rank if recipe.compare.verdict else None,
            "instructions": upstream("instructions"), "upstream": upstream("train")}


def run(recipe: Recipe, run_dir: Path, *, force: bool = False, ranker=None) -> Path:
    """Generate both sides, write comparison.{csv,md}, print them and the evaluation, and keep
    the result (report.md, eval_results.json, per_kind.png: stages/results.py).

    `ranker`: an object with `.name` and `.compare(instructions, a, b)`; default: the recipe's.
    """
    from prefloop.engine import Sampling
    from prefloop.engine.backend import LocalBackend
    from prefloop.engine.cache import answer_cache
    from prefloop.stages import results
    from prefloop.stages.generate import generate_responses

    cfg = recipe.compare
    run = RunDir(run_dir)
    out = run.stage("compare")
    adapter = adapter_dir(run_dir)
    up = Upstream(run)  # the stages read: their finish ids go in the manifest
    stage = Stage(out, "compare", stage_config(recipe, up), inputs=up.folders)
    items = heldout_items(run_dir)
    transfer, note = transfer_set(recipe, run_dir)
    if stage.begin(force=force):
        return out
    model, tok = load_with_adapter(recipe, adapter)
    backend = LocalBackend(model, tok)  # one base, the adapter switched off for the original
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p,
                        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    common = {"k": 1, "sampling": sampling, "system": recipe.model.system_prompt,
              "where": str(run.heldout_instructions)}
    cached = answer_cache(backend, recipe.model)  # the original's answers, from earlier runs
    with model.disable_adapter():
        original = generate_responses(cached, items, out / "original.jsonl",
                                      extra={"model": "original"}, desc="compare: original",
                                      **common)
    dpo = generate_responses(backend, items, out / "dpo.jsonl", extra={"model": "dpo"},
                             desc="compare: dpo", **common)

    df = comparison_frame(items, original, dpo)
    atomic_write_text(out / "comparison.csv", df.to_csv(index=False))
    atomic_write_text(out / "comparison.md", markdown_table(df))
    print(results.table_text(df, cfg, out))

    counts = {"heldout": len(items), "identical": sum(a["response"] == b["response"]
                                                      for a, b in zip(original, dpo, strict=True)),
              "original_from_cache": getattr(cached, "hits", 0)}
    transferred = None
    if note:
        print(f"[prefloop] compare: {note}", file=sys.stderr)
    if transfer:  # the same greedy answers to instructions of kinds that were not trained
        where = out / "transfer_instructions.jsonl"
        write_jsonl(where, transfer)
        common["where"], hits = str(where), getattr(cached, "hits", 0)
        with model.disable_adapter():
            t_original = generate_responses(cached, transfer, out / "transfer_original.jsonl",
                                            extra={"model": "original"},
                                            desc="compare: transfer original", **common)
        t_dpo = generate_responses(backend, transfer, out / "transfer_dpo.jsonl",
                                   extra={"model": "dpo"}, desc="compare: transfer dpo", **common)
        transferred = evaluate(transfer, [r["response"] for r in t_original],
                               [r["response"] for r in t_dpo], seed=cfg.seed)
        transferred["reading"] = transfer_reading(transferred)
        atomic_write_json(out / "transfer.json", transferred)
        counts["transfer"] = transfer_counts(transferred)
        counts["transfer"]["original_from_cache"] = getattr(cached, "hits", 0) - hits
    objective = v = None
    if all(it.get("constraints") for it in items):
        objective = evaluate(items, [r["response"] for r in original],
                             [r["response"] for r in dpo], seed=cfg.seed)
        atomic_write_json(out / "objective.json", objective)
        d = objective["difference"]
        counts.update(objective_strict={"original": objective["original"]["prompt_strict"],
                                        "dpo": objective["dpo"]["prompt_strict"]},
                      objective_ci95=d["ci95"], guards_fired=len(objective["guards_fired"]))
    name = cfg.ranker or recipe.rank.ranker
    if cfg.verdict and (ranker is not None or ranker_class(name).compares):
        # A self-judging ranker judges with the original model (the adapter disabled).
        ranker = ranker or make_ranker(replace(recipe, rank=replace(recipe.rank, ranker=name)),
                                       policy=backend)
        with model.disable_adapter():
            margins = judge_margins(ranker, items, original, dpo)
        v = tally(items, original, dpo, margins, ranker.name)
        v["independent_of_training_ranker"] = name != recipe.rank.ranker
        v["caveat"] = getattr(ranker, "caveat", "")  # what show prints after the win-rate too
        atomic_write_json(out / "verdict.json", v)
        counts.update({k: v[k] for k in ("wins", "ties", "losses", "invalid")})
        counts.update(win_rate=v["win_rate"], win_rate_ci95=v["ci95"], ranker=v["ranker"])
    text = results.result_text(objective, v, recipe.rank.ranker, transferred)
    print(text)
    results.write_results(recipe, run_dir, df, objective, v, text, transferred)
    print(f"[prefloop] compare: result -> {out / results.REPORT} (`prefloop show --output-dir "
          f"{run_dir}` prints it again)", file=sys.stderr)
    from prefloop.models import dtype_record

    return stage.finish(counts, extra=dtype_record(recipe.model))
