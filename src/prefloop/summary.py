"""The one line per stage that the command line prints on stdout: what the stage produced, from
its manifest counts, and how long it took. Progress bars, start lines and diagnostics go to
stderr; stdout carries these lines and what compare prints (the table and the verdict)."""

from __future__ import annotations

from pathlib import Path

from prefloop.artifacts import read_manifest


def duration(seconds: float) -> str:
    """7.5s, 2m03s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = round(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _instructions(c: dict, m: dict) -> str:
    line = f"{c.get('train', 0)} training + {c.get('heldout', 0)} held-out instructions"
    if "after_dedupe_and_filter" in c:
        line += (f" (of {c['loaded']} loaded, {c['after_dedupe_and_filter']} after de-duplication"
                 " and filtering)")
    return line


def _generate(c: dict, m: dict) -> str:
    return (f"{c.get('responses', 0)} responses to {_plural(c.get('instructions', 0), 'instruction')}"
            f" ({c.get('length', 0)} cut at max_new_tokens, {c.get('response_tokens', 0)} tokens)")


def _rank(c: dict, m: dict) -> str:
    # the ranker's own account of how the scores were obtained (rankers' summary())
    return m.get("summary") or (f"{c.get('scored', 0)}/{c.get('responses', 0)} responses scored"
                                f" by {m.get('ranker', 'the ranker')}")


def _pairs(c: dict, m: dict) -> str:
    dropped = {k[len("dropped_"):].replace("_", " "): v for k, v in c.items()
               if k.startswith("dropped_") and v}
    why = ", ".join(f"{v} {k}" for k, v in dropped.items())
    line = (f"{_plural(c.get('pairs', 0), 'pair')} from "
            f"{_plural(c.get('instructions', 0), 'instruction')}")
    if c.get("dropped"):
        line += f", {c['dropped']} dropped" + (f" ({why})" if why else "")
    return line


def _train(c: dict, m: dict) -> str:
    final = m.get("final") or {}
    line = (f"{_plural(c.get('steps', 0), 'step')} on "
            f"{_plural(c.get('pairs_trained', 0), 'pair')}")
    if final.get("loss") is not None:
        line += f", last loss {final['loss']:.4f}"
    if final.get("rewards/accuracies") is not None:  # the batch just trained on: not held out
        line += f", reward accuracy {final['rewards/accuracies']:.2f} on the last training batch"
    ev = m.get("eval") or {}
    if ev.get("eval_rewards/accuracies") is not None:
        line += (f"; on {_plural(c.get('eval_pairs', 0), 'held-out pair')}: reward accuracy "
                 f"{ev['eval_rewards/accuracies']:.2f}, margin {ev['eval_rewards/margins']:.3f}")
    return line


def _who(lo: float, hi: float, null: float) -> str:
    return ("DPO better" if lo > null else "original better" if hi < null
            else "no detectable difference")


def _compare(c: dict, m: dict) -> str:
    """The objective accuracy of both models and who won first; the ranker's win-rate after
    it (the second opinion), or alone when the instructions carry no constraints."""
    parts = [f"{c.get('heldout', 0)} held-out instructions"]
    if "objective_strict" in c:
        acc, (lo, hi) = c["objective_strict"], c["objective_ci95"]
        who = _who(lo, hi, 0.0)
        if lo > 0 and c.get("guards_fired"):
            who += f" but hollow ({_plural(c['guards_fired'], 'guard')} fired)"
        parts.append(f"strict accuracy original {acc['original']:.3f}, DPO {acc['dpo']:.3f}, "
                     f"difference {acc['dpo'] - acc['original']:+.3f} (95% CI {lo:+.3f} to "
                     f"{hi:+.3f}): {who}")
    if "transfer" in c:
        parts.append(transfer_part(c["transfer"]))
    if "wins" in c:
        wtl = f"{c['wins']} wins, {c['ties']} ties, {c['losses']} losses"
        if c.get("win_rate_ci95"):
            lo, hi = c["win_rate_ci95"]
            who = f": {_who(lo, hi, 0.5)}" if "objective_strict" not in c else ""
            parts.append(f"{c.get('ranker', 'ranker')} win-rate {c['win_rate']:.3f} (95% CI "
                         f"{lo:.3f}-{hi:.3f}; {wtl}){who}")
        else:
            parts.append(f"{c.get('ranker', 'ranker')}: {wtl}")
    if len(parts) == 1:
        parts.append("original vs DPO, not evaluated (no constraints on the held-out "
                     "instructions and no ranker verdict)")
    return "; ".join(parts)


def transfer_part(t: dict) -> str:
    """The transfer check in a stage line: both accuracies, the difference and its reading."""
    acc, (lo, hi) = t["strict"], t["ci95"]
    guards = (f", {_plural(t['guards_fired'], 'guard')} fired" if t.get("guards_fired")
              else "")
    return (f"transfer ({_plural(t['n'], 'instruction')} of untrained kinds): original "
            f"{acc['original']:.3f}, DPO {acc['dpo']:.3f}, difference "
            f"{acc['dpo'] - acc['original']:+.3f} (95% CI {lo:+.3f} to {hi:+.3f}): "
            f"{t['reading']}{guards}")


LINES = {"instructions": _instructions, "generate": _generate, "rank": _rank, "pairs": _pairs,
         "train": _train, "compare": _compare}


def stage_line(stage: str, folder: Path, seconds: float | None,
               title: str | None = None) -> str | None:
    """`[prefloop] <title or stage>: <what it produced>; took <time>`, or `; finished earlier`
    when seconds is None (the stage was skipped). None when the stage left no manifest."""
    m = read_manifest(folder)
    if m is None or stage not in LINES:
        return None
    when = "finished earlier" if seconds is None else f"took {duration(seconds)}"
    precision = f"; {m['dtype']} ({m['dtype_why']})" if m.get("dtype") else ""
    return (f"[prefloop] {title or stage}: {LINES[stage](m.get('counts') or {}, m)}{precision}; "
            f"{when}")
