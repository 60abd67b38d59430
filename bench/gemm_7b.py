"""Decode-step matrix products at Mistral-7B's shape: separate vs fused projections.

    python3 bench/gemm_7b.py            # on one GPU, ~20 s

Per layer of a decode step at M rows: q, k, v, o, gate, up, down as separate products, vs
q|k|v as one (N 6144) and gate|up as one (N 28672). Timed inside CUDA graphs (20 layers'
worth of replays), bf16, random weights. Prints a table last.
"""

from __future__ import annotations

import sys
import time

import torch
from gen_7b import graphed  # bench/ is on sys.path when this runs as a script


def timed(fn, reps=50) -> float:
    """Milliseconds per call of fn, replayed ten calls at a time in a CUDA graph."""
    replay = graphed(lambda: [fn() for _ in range(10)], torch.device("cuda"))
    replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps / 10 * 1e3


def measure(m: int, w: dict, qkv: torch.Tensor, gu: torch.Tensor):
    """(separate ms, fused ms, {part: ms}) for one layer's products at m rows."""
    F = torch.nn.functional
    dev, dt = qkv.device, qkv.dtype
    x = torch.randn(m, w["q"].shape[1], device=dev, dtype=dt)
    h = torch.randn(m, w["down"].shape[1], device=dev, dtype=dt)

    def separate():
        F.linear(x, w["q"]), F.linear(x, w["k"]), F.linear(x, w["v"]), F.linear(x, w["o"])
        a, b = F.linear(x, w["gate"]), F.linear(x, w["up"])
        F.linear(F.silu(a) * b, w["down"])

    def fused():
        F.linear(x, qkv), F.linear(x, w["o"])
        a, b = F.linear(x, gu).chunk(2, -1)
        F.linear(F.silu(a) * b, w["down"])

    parts = {n: timed(lambda n=n: F.linear(x, w[n])) for n in ("q", "k", "o", "gate")}
    parts["down"] = timed(lambda: F.linear(h, w["down"]))
    parts["qkv fused"] = timed(lambda: F.linear(x, qkv))
    parts["gate|up fused"] = timed(lambda: F.linear(x, gu))
    parts["silu*mul"] = timed(lambda: F.silu(h) * h)
    return timed(separate), timed(fused), parts


def main() -> None:
    d, kv, ff = 4096, 1024, 14336
    dev, dt = torch.device("cuda"), torch.bfloat16
    w = {n: torch.randn(o, i, device=dev, dtype=dt) * 0.02 for n, (o, i) in {
        "q": (d, d), "k": (kv, d), "v": (kv, d), "o": (d, d), "gate": (ff, d), "up": (ff, d),
        "down": (d, ff)}.items()}
    qkv = torch.cat([w["q"], w["k"], w["v"]])
    gu = torch.cat([w["gate"], w["up"]])
    rows = []
    for m in [int(x) for x in (sys.argv[1:] or ["250", "256", "128"])]:
        sep, fus, parts = measure(m, w, qkv, gu)
        rows.append((m, sep, fus, parts))
        print(m, sep, fus, parts, flush=True)
    weight_gb = sum(t.numel() for t in w.values()) * 2 / 1e9
    print(f"\n| rows | separate ms/layer | fused ms/layer | x32 layers separate | x32 fused | "
          f"TB/s separate ({weight_gb:.3f} GB/layer) |")
    print("|---|---|---|---|---|---|")
    for m, sep, fus, _ in rows:
        print(f"| {m} | {sep:.3f} | {fus:.3f} | {sep * 32:.2f} | {fus * 32:.2f} | "
              f"{weight_gb / sep:.2f} |")
    print("\n| rows | " + " | ".join(rows[0][3]) + " |")
    print("|---|" + "---|" * len(rows[0][3]))
    for m, _, _, parts in rows:
        print(f"| {m} | " + " | ".join(f"{v * 1e3:.0f} µs" for v in parts.values()) + " |")


if __name__ == "__main__":
    main()
