"""GPU generation benchmark at Mistral-7B-Instruct-v0.2's shape: transformers' generate vs
prefloop's engine, 50 prompts x 5 samples x 256 new tokens (min = max, so the work is fixed).

    PYTHONUNBUFFERED=1 python bench/gen_7b.py            # on one H100/H200 (about 2 min)
    python bench/gen_7b.py --tiny                        # debug the script on CPU

Random weights (built on the GPU from the config in bf16, nothing is downloaded): speed does
not depend on weights. Before the timings it checks that greedy output of the engine equals
transformers' generate on a small random model (fp32 and bf16). Prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prefloop.engine import GenerationStats, Sampling, Session, generate  # noqa: E402
from prefloop.engine.kv import decode_mask, grouped_attention  # noqa: E402
from prefloop.engine.loop import DecodeLoop, options_for  # noqa: E402
from prefloop.engine.sampling import choose_tokens  # noqa: E402

EOS, PAD = 2, 0


def mistral(device, dtype, tiny: bool, **size):
    from transformers import MistralConfig, MistralForCausalLM

    shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
    if tiny:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    shape.update(size)
    cfg = MistralConfig(**shape, max_position_embeddings=32768, rope_theta=1e6,
                        sliding_window=None, bos_token_id=1, eos_token_id=EOS,
                        pad_token_id=PAD, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = MistralForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def hf_generate(model, prompts, n, sampling: Sampling, eos=EOS):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    dev = next(model.parameters()).device
    kwargs = dict(do_sample=False) if sampling.temperature == 0 else dict(
        do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
        num_return_sequences=n)
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                             max_new_tokens=sampling.max_new_tokens,
                             min_new_tokens=sampling.min_new_tokens, eos_token_id=eos,
                             pad_token_id=PAD, **kwargs)
    stop = {eos} if isinstance(eos, int) else set(eos)
    rows = out[:, width:].tolist()
    return [r[: next((i + 1 for i, t in enumerate(r) if t in stop), len(r))] for r in rows]


def sampling_times(device, rows: int, vocab: int) -> list[tuple[str, float]]:
    """Token choice alone (graphed), from bf16 logits (sorts the logits: 16-bit keys) vs from
    their float32 copy (sorts the probabilities), with identical outputs."""
    if device.type != "cuda":
        return []
    logits = (torch.randn(rows, vocab, device=device) * 2).to(torch.bfloat16)
    keys, step = torch.arange(rows, device=device), torch.ones(1, dtype=torch.long, device=device)
    eos = torch.tensor([EOS], device=device)
    kw = dict(temperature=0.7, top_p=0.9, prefilter=None, eos_ids=eos, min_new_tokens=0)
    same = torch.equal(choose_tokens(logits, keys, step, **kw),
                       choose_tokens(logits.float(), keys, step, **kw))
    wide = logits.float()
    return [(f"token choice, bf16 logits (sorted as bf16), {rows} rows",
             timed(graphed(lambda: choose_tokens(logits, keys, step, **kw), device), device, 50)),
            (f"token choice, float32 logits (probs sorted), {rows} rows; same tokens: {same}",
             timed(graphed(lambda: choose_tokens(wide, keys, step, **kw), device), device, 50))]


def greedy_check(device, dtype, options=None, label="") -> tuple[str, int, int, int]:
    """Engine greedy vs transformers greedy on a small random Mistral: identical prompts?"""
    torch.manual_seed(0)
    model = mistral(device, dtype, tiny=False, hidden_size=256, intermediate_size=512,
                    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                    vocab_size=1000)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist()
               for n in (5, 17, 9, 33, 12, 40, 3, 21)]
    free = hf_generate(model, prompts, 1, Sampling(0.0, max_new_tokens=32), eos=999_999)
    eos = sorted({free[i][5 + 4 * i] for i in range(4)})  # stop some rows part-way
    want = hf_generate(model, prompts, 1, Sampling(0.0, max_new_tokens=32), eos=eos)
    got = generate(model, prompts, 2, Sampling(0.0, max_new_tokens=32), eos_token_ids=eos,
                   pad_token_id=PAD, options=options)
    same = sum(all(c.token_ids == w for c in comps) for w, comps in zip(want, got, strict=True))
    stops = sum(w[-1] in eos for w in want)
    return str(dtype).replace("torch.", "") + label, same, len(prompts), stops


def engine_run(model, prompts, n, sampling, label, rows, options=None, session=None):
    device = next(model.parameters()).device
    if session is None:
        reset_peak(device)
    stats = GenerationStats()
    sync(device)
    t0 = time.perf_counter()
    out = generate(model, prompts, n, sampling, eos_token_ids=[EOS], pad_token_id=PAD,
                   stats=stats, options=options, session=session)
    sync(device)
    dt = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for comps in out for c in comps)
    rows.append((label, dt, tokens, peak_gib(device), stats.capture_seconds,
                 f"{len(stats.graphs)} graphs, {stats.rows_per_batch} rows/batch"))
    print(f"  {label}: {dt:.2f} s, {tokens} tokens, {tokens / dt:,.0f} tok/s, "
          f"capture {stats.capture_seconds:.2f} s, graphs {stats.graphs}", flush=True)
    return out


def timed(fn, device, reps: int) -> float:
    """Mean milliseconds per call of fn (after one untimed call)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps * 1e3


def step_profile(model, prompts, n, sampling) -> list[tuple[str, float]]:
    """Milliseconds of one decode step and of its parts, at the benchmark's batch."""
    device = next(model.parameters()).device
    opt = options_for(device)
    width = max(map(len, prompts))
    rows = len(prompts) * n
    columns = width + sampling.max_new_tokens - 1
    out = []
    with torch.inference_mode(), grouped_attention(model):
        loop = DecodeLoop(model, n=n, rows=rows, columns=columns,
                          temperature=sampling.temperature, top_p=sampling.top_p,
                          max_new_tokens=sampling.max_new_tokens,
                          min_new_tokens=sampling.min_new_tokens, seed=0, eos_token_ids=[EOS],
                          pad_token_id=PAD, window=None, options=opt)
        sync(device)
        t0 = time.perf_counter()
        loop.start_group(list(enumerate(prompts)))
        sync(device)
        out.append((f"prefill {len(prompts)}x{width} tokens (ms)", (time.perf_counter() - t0) * 1e3))

        def step(kv):
            def run():
                loop.col.fill_(width)
                loop.step.fill_(1)
                loop.decode_step(rows, kv)
            return run

        for kv in sorted({-(-(width + 1) // opt.kv_block) * opt.kv_block, columns}):
            out.append((f"decode step, {rows} rows, {kv} columns (ms)", timed(step(kv), device, 20)))

        def forward():
            loop.cache.mode, loop.cache.rows, loop.cache.kv_len = "decode", rows, columns
            mask = decode_mask(loop.pad[:rows], loop.col, loop.columns[:columns], None)
            return model(input_ids=loop.tok[:rows], attention_mask=loop.additive_mask(mask),
                         position_ids=loop.pos[:rows], **loop.fwd_kwargs).logits

        loop.col.fill_(width)  # (token choice alone: `sampling_times`)
        out.append((f"forward only, {rows} rows (ms)", timed(graphed(forward, device), device, 20)))
        out += attention_backends(model, rows, columns, device, loop.dtype)
        out += other_attention(rows, columns, device, loop.dtype, model.config.num_hidden_layers)
    return out


@contextmanager
def flex_mode(mode: str | None):
    """Compile the engine's FlexAttention decode with `mode` (e.g. autotuning) inside."""
    from prefloop.engine import kv

    if mode is None:
        yield
        return
    saved = list(kv.FLEX_COMPILED)
    kv.flex_decode_kernel()  # raises the recompile limit once
    kv.FLEX_COMPILED[:] = [torch.compile(kv.flex_decode_attention, dynamic=False, mode=mode)]
    try:
        yield
    finally:
        kv.FLEX_COMPILED[:] = saved


def kernel_profile(model, prompts, n, sampling, options, steps: int = 5):
    """GPU time per kernel name over `steps` eager decode steps (the graphs replay the same
    kernels without launch gaps), per step, largest first, plus the total."""
    from torch.profiler import ProfilerActivity, profile

    from prefloop.engine.fused import fused_kernels

    device = next(model.parameters()).device
    width = max(map(len, prompts))
    columns = width + sampling.max_new_tokens - 1
    rows = len(prompts) * n
    with (torch.inference_mode(),
          grouped_attention(model, options.flex_decode, options.flex_kernel),
          fused_kernels(model, options.fused)):
        loop = DecodeLoop(model, n=n, rows=rows, columns=columns,
                          temperature=sampling.temperature, top_p=sampling.top_p,
                          max_new_tokens=sampling.max_new_tokens,
                          min_new_tokens=sampling.min_new_tokens, seed=0, eos_token_ids=[EOS],
                          pad_token_id=PAD, window=None, options=options)
        loop.start_group(list(enumerate(prompts)))
        kv = -(-(width + 1) // 64) * 64
        for _ in range(3):  # compile and warm up
            loop.eager_step(rows, kv)
        sync(device)
        cuda = device.type == "cuda"
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                loop.eager_step(rows, kv)
            sync(device)
    totals: dict[str, list] = {}
    for evt in prof.key_averages():
        spent = evt.device_time_total if cuda else evt.self_cpu_time_total
        if (cuda and evt.device_type.name != "CUDA") or spent <= 0:
            continue
        t = totals.setdefault(evt.key[:90].replace("|", "/"), [0.0, 0])
        t[0] += spent / 1e3 / steps
        t[1] += evt.count // steps
    out = sorted(((k, ms, c) for k, (ms, c) in totals.items()), key=lambda x: -x[1])
    return out[:25] + [("total", sum(ms for _, ms, _ in out), sum(c for _, _, c in out))]


def attention_backends(model, rows, columns, device, dtype) -> list[tuple[str, float]]:
    """One layer's decode attention (grouped heads folded into the query) per SDPA backend."""
    if device.type != "cuda":
        return []
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = model.config
    kv_heads, dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // kv_heads
    q = torch.randn(rows, kv_heads, group, dim, device=device, dtype=dtype)
    k = torch.randn(rows, kv_heads, columns, dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    mask = torch.ones(rows, 1, 1, columns, dtype=torch.bool, device=device)
    out = []
    for name, backend in (("default", None), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("math", SDPBackend.MATH), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        def run(backend=backend):
            if backend is None:
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        try:
            ms = timed(run, device, 20)
        except RuntimeError as e:
            print(f"  sdpa {name}: {str(e).splitlines()[0][:120]}")
            continue
        out.append((f"attention of one layer, {name} SDPA, x{cfg.num_hidden_layers} layers", ms * cfg.num_hidden_layers))
    return out


def other_attention(rows, columns, device, dtype, layers) -> list[tuple[str, float]]:
    """Decode attention done other ways, for the record: two bf16 matmuls around a float32
    softmax, and FlexAttention (compiled; its decoding kernel splits the keys)."""
    if device.type != "cuda":
        return []
    q = torch.randn(rows, 8, 4, 128, device=device, dtype=dtype)
    k = torch.randn(rows, 8, columns, 128, device=device, dtype=dtype)
    v = torch.randn_like(k)
    bias = torch.zeros(rows, 1, 1, columns, device=device)
    out = []

    def matmuls():
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * 128**-0.5 + bias
        return torch.matmul(torch.softmax(scores, -1).to(dtype), v)

    out.append(("attention, two matmuls, x32 layers", timed(graphed(matmuls, device), device, 20) * layers))
    try:
        from torch.nn.attention.flex_attention import flex_attention

        pad = torch.zeros(rows, dtype=torch.long, device=device)

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(kv_idx >= pad[b], score, -float("inf"))

        flex = torch.compile(flex_attention, dynamic=False)
        q1 = q.reshape(rows, 32, 1, 128)
        t0 = time.perf_counter()
        flex(q1, k, v, score_mod=score_mod, enable_gqa=True)
        sync(device)
        compile_s = time.perf_counter() - t0
        ms = timed(graphed(lambda: flex(q1, k, v, score_mod=score_mod, enable_gqa=True), device),
                   device, 20)
        out.append((f"attention, FlexAttention compiled ({compile_s:.0f} s), x32 layers", ms * layers))
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        print(f"  flex attention failed: {type(e).__name__}: {str(e)[:200]}")
    return out


def graphed(fn, device):
    if device.type != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy config on CPU to debug the script")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-profile", action="store_true")
    ap.add_argument("--eager", action="store_true", help="also time the engine without graphs")
    ap.add_argument("--variants", default="plain,fused,flex",
                    help="engine variants to time besides the default (fused kernels + flex "
                         "decode on CUDA): '+'-joined parts of fused, flex, tuned (autotuned "
                         "flex), kB.S.W (flex kernel options BLOCK_N.num_stages.num_warps); "
                         "'plain' for none of them ('' for no variants)")
    ap.add_argument("--kernels", default="",
                    help="profile the CUDA kernels of eager decode steps with this variant")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.prompts, args.prompt_len, args.max_new = 6, 16, 24
    import transformers

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# {datetime.date.today()} {gpu}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}\n# command: python {' '.join(sys.argv)}", flush=True)

    variants = {}
    for name in filter(None, args.variants.split(",")):
        parts = set(name.split("+"))
        kernel = [p[1:].split(".") for p in parts if p.startswith("k")]  # kBLOCK_N.stages.warps
        flex_kernel = tuple(zip(("BLOCK_N", "num_stages", "num_warps"),
                                map(int, kernel[0]), strict=True)) if kernel else None
        variants[name] = replace(options_for(device), fused="fused" in parts,
                                 flex_decode="flex" in parts, flex_kernel=flex_kernel)
    checks = []
    if not args.skip_check:
        for dtype in (torch.float32, torch.bfloat16):
            checks.append(greedy_check(device, dtype))
            print(f"  greedy check {checks[-1]}", flush=True)
            for name, opt in variants.items():
                checks.append(greedy_check(device, dtype, opt, f", {name}"))
                print(f"  greedy check {checks[-1]}", flush=True)

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = mistral(device, dtype, args.tiny)
    sync(device)
    print(f"  model built in {time.perf_counter() - t0:.1f} s: "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters", flush=True)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.prompts)]
    sampling = Sampling(0.7, 0.9, args.max_new, min_new_tokens=args.max_new, seed=0)

    rows: list[tuple] = []
    if not args.skip_hf:
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        out = hf_generate(model, prompts, args.n, sampling)
        sync(device)
        dt = time.perf_counter() - t0
        tokens = sum(map(len, out))
        rows.append(("transformers generate (dynamic cache)", dt, tokens, peak_gib(device), 0.0,
                     "num_return_sequences, top_k=0"))
        print(f"  generate: {dt:.2f} s, {tokens} tokens, {tokens / dt:,.0f} tok/s", flush=True)
        del out
    engine_run(model, prompts, args.n, sampling, "prefloop engine, 1st call", rows)
    for name, opt in variants.items():
        with flex_mode("max-autotune-no-cudagraphs" if "tuned" in name.split("+") else None):
            engine_run(model, prompts, args.n, sampling, f"prefloop engine {name}, 1st call",
                       rows, opt)
            engine_run(model, prompts, args.n, sampling, f"prefloop engine {name}, 2nd call",
                       rows, opt)
    engine_run(model, prompts, args.n, sampling, "prefloop engine, 2nd call", rows)
    session = Session()  # later calls of a session replay the graphs of its first
    engine_run(model, prompts, args.n, sampling, "prefloop engine, session, 1st call", rows,
               session=session)
    engine_run(model, prompts, args.n, sampling, "prefloop engine, session, 2nd call", rows,
               session=session)
    session.close()
    if args.eager:
        eager = replace(options_for(device), cuda_graphs=False)
        engine_run(model, prompts, args.n, sampling, "prefloop engine, no CUDA graphs", rows, eager)
        rows.append(rows.pop(-2))  # keep the graphed 2nd call last, for the ratio

    profile = sampling_times(device, len(prompts) * args.n, model.config.vocab_size)
    profile += [] if args.skip_profile else step_profile(model, prompts, args.n, sampling)
    kernel_opt = variants.get(args.kernels, options_for(device))  # "default": the defaults
    kernels = kernel_profile(model, prompts, args.n, sampling, kernel_opt) if args.kernels else []

    if checks:
        print("\n| greedy check (engine vs generate) | prompts identical | prompts stopping on EOS |")
        print("|---|---|---|")
        for name, same, total, stops in checks:
            print(f"| small random Mistral, {name} | {same}/{total} | {stops} |")
    if kernels:
        print(f"\n| CUDA kernels of one eager decode step ({args.kernels}) | ms | calls |")
        print("|---|---|---|")
        for name, ms, calls in kernels:
            print(f"| {name} | {ms:.3f} | {calls} |")
    if profile:
        print("\n| one decode step, parts | ms |\n|---|---|")
        for name, ms in profile:
            print(f"| {name} | {ms:.2f} |")
    print(f"\n{args.prompts} prompts x {args.prompt_len} tokens x {args.n} samples x "
          f"{args.max_new} new tokens (min = max), T 0.7, top-p 0.9, {dtype}, {gpu}")
    base = rows[0][2] / rows[0][1] if not args.skip_hf else None
    print("| engine | seconds | tokens | tokens/s | vs generate | peak GiB | capture s | note |")
    print("|---|---|---|---|---|---|---|---|")
    for label, dt, tokens, peak, cap, note in rows:
        ratio = f"{tokens / dt / base:.2f}x" if base else ""
        print(f"| {label} | {dt:.2f} | {tokens} | {tokens / dt:,.0f} | {ratio} | {peak:.1f} "
              f"| {cap:.2f} | {note} |")

if __name__ == "__main__":
    main()
