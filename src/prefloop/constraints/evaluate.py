"""Objective evaluation of two models' responses to the same constrained instructions, and the
guards that expose a hollow gain. Pure Python + numpy; no model is involved.

Prompt-level accuracy (IFEval): a response counts when it satisfies every constraint of its
instruction; constraint-level accuracy counts constraints. Each held-out instruction is
answered by both models, so the comparison is paired:

    Δ = acc(dpo) − acc(original) = (n_10 − n_01) / n

n_10: instructions only the DPO model gets right, n_01: only the original. Its 95% interval is
a paired bootstrap (resampling instructions, 10,000 draws, percentile); the p-value is the exact
two-sided McNemar test: P(X ≤ min(n_01, n_10)) · 2 with X ~ Binomial(n_01 + n_10, 1/2).
"""

from __future__ import annotations

import math
import statistics

import numpy as np

from prefloop.constraints import guards
from prefloop.constraints.check import answer_body, check_all, required_phrases
from prefloop.constraints.spec import Constraint

BOOTSTRAP_DRAWS = 10_000
LENGTH_FLOOR = 0.7  # guard: the DPO model's median length below 70% of the original's


def response_report(item: dict, response: str) -> dict:
    """Everything the evaluation reads from one response to one constrained instruction."""
    constraints = [Constraint(c["kind"], c["args"]) for c in item["constraints"]]
    results = check_all(response, constraints, item["instruction"])
    hollow = {"empty": guards.is_empty(response), "refusal": guards.is_refusal(response),
              "copy": guards.copies_example(response, item["instruction"],
                                            required_phrases(constraints)),
              "bare": guards.is_bare(answer_body(response, constraints)),
              "degenerate": guards.is_degenerate(response)}
    strict = all(r.strict for r in results)
    return {
        "strict": strict, "loose": all(r.loose for r in results),
        # strict, and not hollow: what IFEval's reading credits but no user would
        "sound": strict and not any(hollow.values()),
        "checks": [{"kind": c.kind, "strict": r.strict, "loose": r.loose}
                   for c, r in zip(constraints, results, strict=True)],
        "words": guards.word_count(response), **hollow,
        "relevance": guards.relevance(item.get("task", item["instruction"]), response),
    }


def mcnemar_p(n01: int, n10: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts."""
    n = n01 + n10
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(n01, n10) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_interval(a: list[bool], b: list[bool], seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of mean(b) − mean(a) over instructions resampled with
    replacement (the pairs stay together)."""
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(diff), size=(BOOTSTRAP_DRAWS, len(diff)))
    means = diff[draws].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def _rate(values: list[bool]) -> float:
    return sum(values) / len(values) if values else math.nan


def side_summary(reports: list[dict]) -> dict:
    """Accuracies and guard statistics of one model."""
    checks = [c for r in reports for c in r["checks"]]
    words = [r["words"] for r in reports]
    return {
        "prompt_strict": _rate([r["strict"] for r in reports]),
        "prompt_loose": _rate([r["loose"] for r in reports]),
        "prompt_sound": _rate([r["sound"] for r in reports]),
        "constraint_strict": _rate([c["strict"] for c in checks]),
        "constraint_loose": _rate([c["loose"] for c in checks]),
        "words_median": statistics.median(words), "words_mean": statistics.fmean(words),
        "words_quartiles": [float(q) for q in np.quantile(words, [0.25, 0.75])],
        "empty": sum(r["empty"] for r in reports), "refusals": sum(r["refusal"] for r in reports),
        "copies": sum(r["copy"] for r in reports),
        "bare": sum(r["bare"] for r in reports),
        "degenerate": sum(r["degenerate"] for r in reports),
        "relevance_mean": statistics.fmean(r["relevance"] for r in reports),
    }


def per_kind(orig: list[dict], dpo: list[dict]) -> dict[str, dict]:
    """Strict constraint accuracy of each kind on both sides (n = constraints of that kind)."""
    out: dict[str, dict] = {}
    for o, d in zip(orig, dpo, strict=True):
        for co, cd in zip(o["checks"], d["checks"], strict=True):
            row = out.setdefault(co["kind"], {"n": 0, "original": 0, "dpo": 0})
            row["n"] += 1
            row["original"] += co["strict"]
            row["dpo"] += cd["strict"]
    return {k: {"n": v["n"], "original": v["original"] / v["n"], "dpo": v["dpo"] / v["n"]}
            for k, v in sorted(out.items())}


def hollow_signs(orig: dict, dpo: dict) -> list[str]:
    """The guards that fire: what makes a gain hollow rather than real."""
    fired = []
    if dpo["words_median"] < LENGTH_FLOOR * orig["words_median"]:
        fired.append(f"answers collapsed in length (median {dpo['words_median']:g} words vs "
                     f"{orig['words_median']:g}, floor {LENGTH_FLOOR:.0%})")
    for key, text in (("copies", "copies of the instruction"), ("empty", "empty answers"),
                      ("refusals", "refusals"),
                      ("bare", "bare answers (only the demanded postscript or closing phrase)"),
                      ("degenerate", "degenerate answers (repetition)")):
        if dpo[key] > orig[key]:
            fired.append(f"more {text} ({dpo[key]} vs {orig[key]})")
    return fired


def paired(a: list[bool], b: list[bool], seed: int = 0) -> dict:
    """Interval and exact test of b's accuracy minus a's on the same items."""
    n01 = sum(x and not y for x, y in zip(a, b, strict=True))  # only a (the original) is right
    n10 = sum(y and not x for x, y in zip(a, b, strict=True))
    lo, hi = paired_interval(a, b, seed)
    return {"ci95": [lo, hi], "ci_method": "paired bootstrap, 10,000 draws",
            "only_dpo_right": n10, "only_original_right": n01, "mcnemar_p": mcnemar_p(n01, n10)}


def reports(items: list[dict], responses: list[str]) -> list[dict]:
    """`response_report` of each item's response (one model's side)."""
    return [response_report(it, r) for it, r in zip(items, responses, strict=True)]


def evaluate(items: list[dict], original: list[str], dpo: list[str], seed: int = 0) -> dict:
    """The objective comparison of two models on constrained held-out instructions."""
    return compare_reports(items, reports(items, original), reports(items, dpo), seed)


def compare_reports(items: list[dict], ro: list[dict], rd: list[dict], seed: int = 0) -> dict:
    """`evaluate` from both sides' `reports`."""
    so, sd = side_summary(ro), side_summary(rd)
    return {
        "n": len(items), "original": so, "dpo": sd,
        "difference": {"prompt_strict": sd["prompt_strict"] - so["prompt_strict"],
                       **paired([r["strict"] for r in ro], [r["strict"] for r in rd], seed)},
        "difference_sound": {"prompt_sound": sd["prompt_sound"] - so["prompt_sound"],
                             **paired([r["sound"] for r in ro], [r["sound"] for r in rd], seed)},
        "per_kind": per_kind(ro, rd),
        "guards_fired": hollow_signs(so, sd),
        "items": [{"id": it["id"], "original": o, "dpo": d}
                  for it, o, d in zip(items, ro, rd, strict=True)],
    }
