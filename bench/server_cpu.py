"""CPU generation through a server vs in process: SmolLM2-135M-Instruct, the first 10 LIMA prompts
x 5 samples x up to 128 new tokens (stop at EOS), T 0.7, top-p 0.9, 2 threads everywhere.

Rows: prefloop's engine (fp32 safetensors converted from the embedded GGUF), llama.cpp's server
(xllamacpp's prebuilt CPU wheel, the embedded Q4_1 GGUF itself) through `OpenAIBackend` with 1
slot and with several (requests in flight = slots), and transformers' `generate` with
num_return_sequences=5 on the left-padded batch.

    .venv/bin/python bench/server_cpu.py                  # every row, ~10 min on 2 idle cores
    .venv/bin/python bench/server_cpu.py --slots 1 8      # choose the server rows

Counting: generated tokens up to and including the first EOS (all of them when a sequence never
stops); wall time of the generate call only (model loading and server start excluded).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from gen_cpu import engine, lima_prompts, plain_generate  # noqa: E402

from prefloop.config import ModelConfig  # noqa: E402
from prefloop.engine import Sampling  # noqa: E402
from prefloop.engine.openai import OpenAIBackend  # noqa: E402
from prefloop.models import load_model  # noqa: E402

SAMPLING = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=128, seed=0)


def start_server(slots: int, threads: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "llamacpp_server.py"),
                             "--slots", str(slots), "--threads", str(threads), "--ctx", "1024"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    line = proc.stdout.readline()  # "listening URL" once the model is loaded
    if not line.startswith("listening "):
        proc.kill()
        raise SystemExit(f"llama.cpp server did not start: {line!r}")
    return proc, line.split()[1] + "/v1"


def server_row(prompts, n, slots: int, threads: int) -> tuple[float, int]:
    proc, url = start_server(slots, threads)
    try:
        backend = OpenAIBackend.load(ModelConfig(backend="openai", base_url=url,
                                                 max_concurrency=slots, request_timeout=900.0))
        t0 = time.perf_counter()
        out = backend.generate(prompts, n, SAMPLING)
        dt = time.perf_counter() - t0
        backend.close()
        return dt, sum(len(c.token_ids) for comps in out for c in comps)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 5, 50])
    ap.add_argument("--skip-generate", action="store_true", help="no transformers row")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m-instruct")
    prompts = lima_prompts(tok, args.prompts)
    rows = []

    def add(name: str, result: tuple[float, int]) -> None:
        dt, tokens = result
        rows.append((name, dt, tokens, os.getloadavg()[0]))
        print(f"{name}: {tokens} tokens in {dt:.1f} s = {tokens / dt:.1f} tok/s", flush=True)

    add("prefloop engine (in process, fp32)", engine(model, tok, prompts, args.n, SAMPLING))
    for slots in args.slots:
        add(f"llama.cpp server, {slots} slot(s), OpenAIBackend (Q4_1)",
            server_row(prompts, args.n, slots, args.threads))
    if not args.skip_generate:
        add("transformers generate (fp32)", plain_generate(model, tok, prompts, args.n,
                                                           SAMPLING))
    print(f"\n{datetime.date.today()}, {os.cpu_count()} cores, {args.threads} threads, "
          f"{args.prompts} LIMA prompts x {args.n} x <= {SAMPLING.max_new_tokens} new tokens\n")
    print("| setting | seconds | tokens | tokens/s | load avg (1 min) after |")
    print("|---|---|---|---|---|")
    for name, dt, tokens, load in rows:
        print(f"| {name} | {dt:.1f} | {tokens} | {tokens / dt:.1f} | {load:.1f} |")


if __name__ == "__main__":
    main()
