"""LLM-as-a-judge throughput on CPU with the embedded SmolLM2-135M-Instruct.

N LIMA prompts x K responses (generated first, timed apart) x S judge samples with the verbatim
Yuan et al. 2024 prompt, through prefloop.engine exactly as `prefloop rank` runs it. Prints the
judgments per second, judge tokens per second and the score-parse failure rate, table last.

    .venv/bin/python bench/judge_cpu.py [--prompts 10] [--responses 2] [--samples 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from prefloop import engine
from prefloop.chat import render_prompt
from prefloop.config import RankConfig
from prefloop.engine.backend import eos_ids
from prefloop.models import load_model
from prefloop.rankers.judge import JudgeRanker, mean_score

LIMA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lima_prompts.jsonl"


def lima_prompts(n: int, max_chars: int) -> list[str]:
    """The first n LIMA questions of at most max_chars characters (keeps the prefill short)."""
    out = []
    for line in LIMA.read_text(encoding="utf-8").splitlines():
        q = json.loads(line)["question"]
        if len(q) <= max_chars:
            out.append(q)
        if len(out) == n:
            break
    return out


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def responses_for(model, tok, prompts: list[str], k: int, max_new: int) -> tuple[list, float]:
    """k sampled responses per prompt (T 0.8, p 0.95), and the seconds it took."""
    ids = [render_prompt(tok, p).ids for p in prompts]
    started = time.perf_counter()
    outs = engine.generate(model, ids, k, engine.Sampling(temperature=0.8, top_p=0.95,
                                                          max_new_tokens=max_new, seed=0),
                           eos_token_ids=eos_ids(model, tok), pad_token_id=tok.pad_token_id)
    seconds = time.perf_counter() - started
    texts = [[tok.decode(c.token_ids[:-1] if c.finish_reason == "eos" else c.token_ids,
                         skip_special_tokens=True).strip() for c in comps] for comps in outs]
    return texts, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--responses", type=int, default=2)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--response-tokens", type=int, default=96)
    ap.add_argument("--judge-tokens", type=int, default=256)
    ap.add_argument("--max-chars", type=int, default=400)
    ap.add_argument("--force-score", action="store_true",
                    help="rank.judge_force_score (non-paper): a digit for unparsable judgments")
    args = ap.parse_args()
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    model, tok = load_model("smollm2-135m-instruct", device="cpu")
    prompts = lima_prompts(args.prompts, args.max_chars)
    texts, gen_s = responses_for(model, tok, prompts, args.responses, args.response_tokens)
    instr = [p for p in prompts for _ in range(args.responses)]
    resp = [r for rs in texts for r in rs]
    cfg = replace(RankConfig(), judge_samples=args.samples, judge_max_new_tokens=args.judge_tokens,
                  judge_force_score=args.force_score)
    judge = JudgeRanker(model, tok, cfg, name="judge:smollm2-135m-instruct")

    completions = []  # every judge completion, to count tokens and cut-off judgments exactly
    real_generate = engine.generate

    def spy(*a, **kw):
        out = real_generate(*a, **kw)
        completions.extend(c for comps in out for c in comps)
        return out

    engine.generate = spy
    started = time.perf_counter()
    judged = judge.judge(instr, resp)
    judge_s = time.perf_counter() - started
    engine.generate = real_generate
    flat = [j for js in judged for j in js]
    judge_tokens = sum(len(c.token_ids) for c in completions)
    cut = sum(c.finish_reason == "length" for c in completions)
    failures = sum(j.score is None or j.forced for j in flat)
    cut_failures = sum((j.score is None or j.forced) and c.finish_reason == "length"
                       for j, c in zip(flat, completions, strict=True))
    means = [mean_score([j.score for j in js]) for js in judged]
    hist = Counter(j.score for j in flat if j.score is not None)

    print("\nexample judgments (first 2):")
    for j in flat[:2]:
        print("---\n" + j.text[-400:])
    print("\nper-sample scores:", dict(sorted(hist.items())))
    print("mean score per response:", [None if m is None else round(m, 2) for m in means])
    print("\n| metric | value |\n|---|---|")
    rows = [
        ("date", time.strftime("%Y-%m-%d")),
        ("cpu", f"{cpu_name()}, {os.cpu_count()} cores, "
                f"torch {torch.__version__}, {torch.get_num_threads()} threads"),
        ("load average (1 min) before / after",
         f"{load_before:.1f} / {os.getloadavg()[0]:.1f} (above the core count: other work "
         "shared the CPU)"),
        ("prompts x responses x judge samples", f"{len(prompts)} x {args.responses} x "
                                                f"{args.samples} = {len(flat)} judgments"),
        ("response generation", f"{gen_s:.1f} s ({args.response_tokens} max new tokens)"),
        ("judging", f"{judge_s:.1f} s (max {args.judge_tokens} new tokens per judgment)"),
        ("judgments / s", f"{len(flat) / judge_s:.3f}"),
        ("responses judged / s", f"{len(resp) / judge_s:.3f}"),
        ("judge tokens / s", f"{judge_tokens / judge_s:.1f} ({judge_tokens} tokens)"),
        ("mean judge tokens", f"{judge_tokens / len(flat):.0f}"),
        ("judgments cut at the token limit", f"{cut} / {len(flat)}"),
        ("parse failures", f"{failures} / {len(flat)} = {failures / len(flat):.1%} "
                           f"({cut_failures} of them cut at the limit)"),
        ("forced scores (judge_force_score)", f"{sum(j.forced for j in flat)}"),
        ("responses without any valid score", f"{sum(m is None for m in means)} / {len(means)}"),
    ]
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
