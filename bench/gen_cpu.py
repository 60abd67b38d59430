"""CPU generation benchmark: SmolLM2-135M-Instruct (fp32), the first 10 LIMA prompts x 5 samples
x 128 new tokens, T 0.7, top-p 0.9: prefloop's engine vs plain `model.generate(do_sample=True,
num_return_sequences=5)` on the left-padded batch, as a notebook would call it.

    .venv/bin/python bench/gen_cpu.py                 # both settings, about 10 min on 2 cores
    .venv/bin/python bench/gen_cpu.py --skip-fixed    # only the early-stopping run
    .venv/bin/python bench/gen_cpu.py --threads 1     # on a busy machine (see results_gen.md)

Counting: generated tokens per sequence up to and including its first EOS (all max_new tokens
when it never stops); prompt and padding tokens are not counted. "free" lets sequences stop at
EOS; "fixed" sets min_new_tokens = max_new_tokens so both do exactly the same work.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prefloop.engine import Sampling, generate  # noqa: E402
from prefloop.models import load_model  # noqa: E402

LIMA = ROOT.parent / "shared" / "data" / "lima_prompts.jsonl"


def lima_prompts(tokenizer, count: int) -> list[list[int]]:
    with open(LIMA) as f:
        rows = [json.loads(line) for line, _ in zip(f, range(count), strict=False)]
    out = []
    for r in rows:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": r["question"]}],
                                            add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        out.append(list(ids))
    return out


def count_tokens(rows: list[list[int]], eos: int) -> int:
    return sum(r.index(eos) + 1 if eos in r else len(r) for r in rows)


def plain_generate(model, tok, prompts, n, sampling: Sampling) -> tuple[float, int]:
    """The notebook way: one padded batch, num_return_sequences=n, transformers' sampler."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                             temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                             max_new_tokens=sampling.max_new_tokens,
                             min_new_tokens=sampling.min_new_tokens, num_return_sequences=n,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    dt = time.perf_counter() - t0
    return dt, count_tokens(out[:, width:].tolist(), tok.eos_token_id)


def engine(model, tok, prompts, n, sampling: Sampling) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = generate(model, prompts, n, sampling, eos_token_ids=[tok.eos_token_id],
                   pad_token_id=tok.pad_token_id)
    dt = time.perf_counter() - t0
    return dt, sum(len(c.token_ids) for comps in out for c in comps)


def matmul_floor(model, prompts, n, max_new) -> float:
    """Seconds of the matrix products alone that any generator of this workload must run: every
    linear layer (lm_head included) over each prompt once and over n rows for each new token
    (random inputs of the right shapes; no attention, sampling or bookkeeping)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dtype = next(model.parameters()).dtype
    prompt_tokens = sum(map(len, prompts))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for rows, times in ((prompt_tokens, 1), (len(prompts) * n, max_new - 1)):
            inputs = {m: torch.randn(rows, m.in_features, dtype=dtype) for m in linears}
            for _ in range(times):
                for m in linears:
                    m(inputs[m])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--skip-fixed", action="store_true", help="only the early-stopping setting")
    ap.add_argument("--floor", action="store_true",
                    help="also time the matrix products alone (a floor for any generator)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--dtype", default="float32", help="model dtype for both (float32, bfloat16)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    model, tok = load_model("smollm2-135m-instruct", dtype=args.dtype, device="cpu")
    prompts = lima_prompts(tok, args.prompts)
    print(f"# {datetime.date.today()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} "
          f"threads, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}\n# command: python {' '.join(sys.argv)}\n"
          f"# prompt tokens: {[len(p) for p in prompts]}", flush=True)
    engine(model, tok, prompts[:1], 1, Sampling(max_new_tokens=2))  # first-call set-up
    plain_generate(model, tok, prompts[:1], 1, Sampling(max_new_tokens=2))

    settings = [("free", 0)] + ([] if args.skip_fixed else [("fixed", args.max_new)])
    table = []
    for name, min_new in settings:
        sampling = Sampling(0.7, 0.9, args.max_new, min_new_tokens=min_new, seed=0)
        for label, fn in (("model.generate", plain_generate), ("prefloop engine", engine)):
            dt, tokens = fn(model, tok, prompts, args.n, sampling)
            table.append((name, label, dt, tokens))
            print(f"  {name} {label}: {dt:.1f} s, {tokens} tokens, {tokens / dt:.1f} tok/s",
                  flush=True)

    floor = matmul_floor(model, prompts, args.n, args.max_new) if args.floor else 0.0
    print(f"\n{args.prompts} LIMA prompts x {args.n} samples x {args.max_new} new tokens, "
          f"T 0.7, top-p 0.9, SmolLM2-135M-Instruct {args.dtype}, load average now "
          f"{os.getloadavg()[0]:.1f}")
    print("| setting | engine | seconds | generated tokens | tokens/s |\n|---|---|---|---|---|")
    for name, label, dt, tokens in table:
        print(f"| {name} | {label} | {dt:.1f} | {tokens} | {tokens / dt:.1f} |")
    if floor:
        tokens = len(prompts) * args.n * args.max_new
        print(f"| fixed | matrix products alone (floor) | {floor:.1f} | {tokens} "
              f"| {tokens / floor:.1f} |")
        base = [t for t in table if t[0] == settings[-1][0] and t[1] == "model.generate"][0]
        print(f"| {settings[-1][0]} | ceiling for any engine: generate s / floor s | | "
              f"| {base[2] / floor:.2f}x |")
    for name, _ in settings:
        base, ours = [t for t in table if t[0] == name]
        print(f"| {name} | ratio engine / generate | | | {ours[3] / ours[2] / (base[3] / base[2]):.2f}x |")


if __name__ == "__main__":
    main()
