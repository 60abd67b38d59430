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
import textwrap
from pathlib import Path

import pandas as pd

from prefloop.artifacts import RunDir, Stage, atomic_write_json, atomic_write_text, read_jsonl
from prefloop.config import Recipe
from prefloop.errors import PrefloopError
from prefloop.rankers import make_ranker
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
    from datasets import load_dataset

    ds = load_dataset(str(path), split="train").select_columns(["prompt"])
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


def adapter_dir(run_dir: Path) -> Path:
    path = RunDir(run_dir).adapter
    if not (path / "adapter_config.json").exists():
        raise PrefloopError(f"{path}: no trained adapter found; run `prefloop train --output-dir "
                            f"{run_dir}` first")
    return path


def load_with_adapter(recipe: Recipe, adapter: Path):
    """(base model with the DPO adapter attached, tokenizer); one copy of the base weights."""
    from peft import PeftModel

    from prefloop.models import load_model

    base, tok = load_model(recipe.model)
    model = PeftModel.from_pretrained(base, str(adapter))
    return model.eval(), tok


# --- tables ----------------------------------------------------------------------------------

def comparison_frame(items: list[dict], original: list[dict], dpo: list[dict]) -> pd.DataFrame:
    return pd.DataFrame({"instruction": [it["instruction"] for it in items],
                         "original": [r["response"] for r in original],
                         "dpo": [r["response"] for r in dpo]}, columns=COLUMNS)


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
    outcomes = [outcome(m) for m in margins]
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
    w = win_rate(margins)

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
                  for it, m, o in zip(items, margins, [outcome(m) for m in margins],
                                      strict=True)],
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


# --- stage -----------------------------------------------------------------------------------

def stage_config(recipe: Recipe, upstream) -> dict:
    """What the stage's manifest hash covers (prefloop.plan predicts it before a run)."""
    return {"compare": recipe.compare, "model": recipe.model,
            "rank": recipe.rank if recipe.compare.verdict else None,
            "instructions": upstream("instructions"), "upstream": upstream("train")}


def run(recipe: Recipe, run_dir: Path, *, force: bool = False, ranker=None) -> Path:
    """Generate both sides, write comparison.{csv,md}, print them and (optionally) the verdict.

    `ranker`: an object with `.name` and `.compare(instructions, a, b)`; default: the recipe's.
    """
    from prefloop.engine import Sampling
    from prefloop.engine.backend import LocalBackend
    from prefloop.stages.generate import generate_responses

    cfg = recipe.compare
    run = RunDir(run_dir)
    out = run.stage("compare")
    adapter = adapter_dir(run_dir)
    stage = Stage(out, "compare", stage_config(recipe, run.upstream))
    items = heldout_items(run_dir)
    if stage.begin(force=force):
        return out
    model, tok = load_with_adapter(recipe, adapter)
    backend = LocalBackend(model, tok)  # one base, the adapter switched off for the original
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p,
                        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    common = {"k": 1, "sampling": sampling, "system": recipe.model.system_prompt,
              "where": str(run.heldout_instructions)}
    with model.disable_adapter():
        original = generate_responses(backend, items, out / "original.jsonl",
                                      extra={"model": "original"}, desc="compare: original",
                                      **common)
    dpo = generate_responses(backend, items, out / "dpo.jsonl", extra={"model": "dpo"},
                             desc="compare: dpo", **common)

    df = comparison_frame(items, original, dpo)
    atomic_write_text(out / "comparison.csv", df.to_csv(index=False))
    atomic_write_text(out / "comparison.md", markdown_table(df))
    print(format_blocks(df))

    counts = {"heldout": len(items), "identical": sum(a["response"] == b["response"]
                                                      for a, b in zip(original, dpo, strict=True))}
    if cfg.verdict:
        # A self-judging ranker judges with the original model (the adapter disabled).
        ranker = ranker or make_ranker(recipe, policy=backend)
        with model.disable_adapter():
            margins = judge_margins(ranker, items, original, dpo)
        v = tally(items, original, dpo, margins, ranker.name)
        atomic_write_json(out / "verdict.json", v)
        print(verdict_text(v))
        counts.update({k: v[k] for k in ("wins", "ties", "losses", "invalid")})
    return stage.finish(counts)
