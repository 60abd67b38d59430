"""Does bf16 change the original model's held-out result? SmolLM2-135M-Instruct (the embedded
GGUF) answers the same held-out instructions greedily in fp32 and in bf16 on the CPU, with
compare's decoding (128 new tokens); the objective evaluation reads fp32 as "original" and
bf16 as "dpo": both accuracies, the paired difference with its 95 % interval, McNemar's p.

    PREFLOOP_CACHE_DIR=/tmp/pf python bench/cpu_bf16_parity.py HELDOUT.jsonl [--threads N]

HELDOUT.jsonl: an instructions stage's held-out file, e.g. all 167 of the default's kinds:
    prefloop instructions --output-dir runs/ho --set instructions.n_heldout=167
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

from prefloop.artifacts import read_jsonl  # noqa: E402
from prefloop.chat import render_prompt  # noqa: E402
from prefloop.config import ModelConfig  # noqa: E402
from prefloop.constraints.evaluate import evaluate  # noqa: E402
from prefloop.engine import Sampling, generate  # noqa: E402
from prefloop.engine.backend import decode, eos_ids  # noqa: E402
from prefloop.models import cpu_bf16_native, load_model  # noqa: E402


def answers(dtype: str, items: list[dict]) -> tuple[list[str], float]:
    model, tok = load_model(ModelConfig(dtype=dtype, device="cpu"))
    prompts = [render_prompt(tok, it["instruction"]).ids for it in items]
    t0 = time.perf_counter()
    out = generate(model, prompts, 1, Sampling(temperature=0.0, top_p=1.0, max_new_tokens=128),
                   eos_token_ids=eos_ids(model, tok), pad_token_id=tok.pad_token_id)
    return [decode(tok, c[0]) for c in out], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("heldout", type=Path)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, help="write both sides' answers and the report here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    items = read_jsonl(args.heldout)
    print(f"# {datetime.date.today()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads,"
          f" torch {torch.__version__}, native bf16: {cpu_bf16_native()}\n# command: python "
          f"{' '.join(sys.argv)}", flush=True)
    fp32, s32 = answers("float32", items)
    bf16, s16 = answers("bfloat16", items)
    rep = evaluate(items, fp32, bf16)
    d, o, b = rep["difference"], rep["original"], rep["dpo"]
    if args.out:
        args.out.write_text(json.dumps({"fp32": fp32, "bf16": bf16, "report": rep}))
    same = sum(x == y for x, y in zip(fp32, bf16, strict=True))
    print(f"\n{len(items)} held-out instructions, greedy, 128 new tokens")
    print("| dtype | strict accuracy | sound accuracy | median words | seconds |")
    print("|---|---|---|---|---|")
    for name, side, s in (("fp32", o, s32), ("bf16", b, s16)):
        print(f"| {name} | {side['prompt_strict']:.3f} | {side.get('prompt_sound', 0):.3f} | "
              f"{side.get('words_median', '?')} | {s:.1f} |")
    lo, hi = d["ci95"]
    print(f"\nbf16 - fp32: {d['prompt_strict']:+.3f} (95 % CI {lo:+.3f}, {hi:+.3f}), McNemar p "
          f"{d['mcnemar_p']:.3f}; identical answers {same}/{len(items)}; guards: "
          f"{rep['guards_fired'] or 'none'}")


if __name__ == "__main__":
    main()
