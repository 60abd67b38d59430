"""PairRM throughput: ordered pairs per second through prefloop's native PairRM.

Workload: 50 instructions x 5 candidates = 50 * 5 * 4 = 1,000 ordered pairs, ranked by
``PairRM.rank`` (the path the rank stage uses: tokenise, budget, batch all pairs sorted by
length, forward, aggregate). The model has PairRM's real shape (DeBERTa-v3-large: hidden 1024,
24 layers, 16 heads, intermediate 4096, vocab 128005, position_buckets 256) with random weights,
so nothing is downloaded; a word-level stand-in tokenizer maps each word to one token, which
makes the token lengths exact:
- prompts: the first 50 LIMA prompts (../shared/data/lima_prompts.jsonl, 4.2 characters per
  token) when the file is there, else 50 lengths drawn like them (lognormal, median 27 tokens);
- responses: lognormal, median 200 tokens, cut at 400 (a 256-new-token generation cap).
A second table times fixed-shape batches (L=256, batch 32) against the reference figure in
docs/pairrm.md §8 (about 720 sequences/s in fp16 on one H100).

    python bench/pairrm_gpu.py                 # GPU: fp16, bf16, fp32; prints a table last
    python bench/pairrm_gpu.py --tiny          # CPU smoke test with a 2-layer model
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prefloop.rankers.pairrm import (  # noqa: E402
    CANDIDATE_MARKER,
    MARKERS,
    SOURCE_MARKER,
    SPECIAL_TOKENS,
    PairInput,
    PairRM,
    PairRMTokenizer,
    backbone_config,
    build_modules,
    build_pair,
    candidate_budget,
)

LIMA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lima_prompts.jsonl"
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "position_buckets": 16,
}


def word_tokenizer(vocab_size: int = 128005) -> PairRMTokenizer:
    """One token per whitespace-separated word "w<id>"; PairRM's special and marker ids."""
    vocab = dict(SPECIAL_TOKENS) | {f"w{i}": i for i in range(4, vocab_size - 4)}
    vocab |= {m: vocab_size - 4 + k for k, m in enumerate(MARKERS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(m, normalized=True) for m in MARKERS])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no NFKC normaliser: irrelevant for a speed test
        return PairRMTokenizer(tok)


def lima_like_lengths(
    n_prompts: int, n_candidates: int, seed: int, given: list[int] | None = None
) -> tuple[list, list, str]:
    """Token lengths of prompt and response texts (without [CLS] marker [SEP])."""
    rng = np.random.default_rng(seed)
    if given:
        prompts, origin = given[:n_prompts], "given LIMA prompt lengths"
    elif LIMA.exists():
        lines = LIMA.read_text(encoding="utf-8").splitlines()[:n_prompts]
        prompts = [max(1, round(len(json.loads(x)["question"]) / 4.2)) for x in lines]
        origin = f"first {n_prompts} LIMA prompts"
    else:
        prompts = np.clip(rng.lognormal(np.log(27), 1.1, n_prompts), 4, 1221).round()
        prompts, origin = prompts.astype(int).tolist(), "synthetic LIMA-like prompts"
    responses = np.clip(rng.lognormal(np.log(200), 0.45, (n_prompts, n_candidates)), 10, 400)
    return prompts, responses.round().astype(int).tolist(), origin


def words(n: int, rng: np.random.Generator) -> str:
    return " ".join(f"w{i}" for i in rng.integers(4, 128001, n))


def build_model(config, device: str, dtype: str, batch_size: int, tok) -> PairRM:
    torch.manual_seed(0)
    with torch.device(device):
        backbone, head = build_modules(config)
    return PairRM(backbone, head, tok, device=device, dtype=dtype, batch_size=batch_size)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def segments(model: PairRM, sources, candidates) -> list[tuple[list[int], list[list[int]]]]:
    """Per prompt: its source segment and candidate segments, cut to the per-example budget
    as rank() cuts them (docs/pairrm.md §4), built from the public pieces."""
    tok, s_max, c_max = model.tokenizer, model.source_max_tokens, model.candidate_max_tokens
    out = []
    for source, cands in zip(sources, candidates, strict=True):
        src = tok.segment(SOURCE_MARKER, source, s_max)
        budget = candidate_budget(len(src), s_max, c_max)
        out.append((src, [tok.segment(CANDIDATE_MARKER, c, budget) for c in cands]))
    return out


def padding_stats(model: PairRM, sources, candidates) -> tuple[int, int, int]:
    """(pairs, real tokens, padded tokens) of rank()'s batches: sorted by length, batch_size."""
    pairs = [
        len(build_pair(src, cands[i], cands[j], model.tokenizer).ids)
        for src, cands in segments(model, sources, candidates)
        for i in range(len(cands))
        for j in range(len(cands))
        if i != j
    ]
    lengths = sorted(pairs, reverse=True)
    b = model.batch_size
    padded = sum(
        max(lengths[k : k + b]) * len(lengths[k : k + b]) for k in range(0, len(lengths), b)
    )
    return len(pairs), sum(pairs), padded


def time_rank(model: PairRM, sources, candidates, repeats: int, device: str) -> dict:
    model.rank(sources[:4], candidates[:4])  # warm-up: kernels, cuBLAS handles
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        results = model.rank(sources, candidates)
        sync(device)
        seconds.append(time.perf_counter() - start)
    finite = all(np.isfinite(r.matrix).all() for r in results)
    n_pairs, real, padded = padding_stats(model, sources, candidates)
    median = statistics.median(seconds)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
    return {"pairs": n_pairs, "median_s": median, "min_s": min(seconds),
            "pairs_per_s": n_pairs / median, "real_tokens_per_s": real / median,
            "mean_pair_tokens": real / n_pairs, "padding": padded / real - 1,
            "peak_gib": peak, "finite": finite}  # fmt: skip


def time_fixed(model: PairRM, length: int, batch: int, repeats: int, device: str) -> dict:
    """Fixed-shape forwards (all rows `length` tokens) through score_pairs."""
    rng, tok = np.random.default_rng(1), model.tokenizer
    mid = (length - 3) // 2
    pairs = []
    for _ in range(batch * repeats):
        ids = rng.integers(4, 128000, length)  # layout as build_pair; [SEP]s omitted
        ids[[0, mid, length - 3]] = tok.cls_id
        ids[1], ids[mid + 1], ids[length - 2] = tok.source_id, tok.left_id, tok.right_id
        pairs.append(PairInput(tuple(ids.tolist()), left_pos=mid + 1, right_pos=length - 2))
    model.score_pairs(pairs[:batch])  # warm-up
    sync(device)
    start = time.perf_counter()
    model.score_pairs(pairs)
    sync(device)
    elapsed = time.perf_counter() - start
    return {"ms_per_batch": 1000 * elapsed / repeats, "seq_per_s": len(pairs) / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description="PairRM ordered pairs per second")
    parser.add_argument("--tiny", action="store_true", help="2-layer model on CPU (smoke test)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtypes", default="float16,bfloat16,float32")
    parser.add_argument("--batch-sizes", default="32", help="comma list, for the first dtype")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument(
        "--prompt-lengths", default="", help="comma list (see --print-lima-lengths)"
    )
    parser.add_argument(
        "--print-lima-lengths", action="store_true", help="print LIMA prompt lengths and exit"
    )
    args = parser.parse_args()

    if args.print_lima_lengths:  # for machines without ../shared
        print(",".join(map(str, lima_like_lengths(args.prompts, 1, 0)[0])))
        return
    given = [int(x) for x in args.prompt_lengths.split(",") if x]
    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    config = backbone_config(TINY if args.tiny else None)
    tok = word_tokenizer(config.vocab_size)
    prompt_lens, response_lens, origin = lima_like_lengths(
        args.prompts, args.candidates, seed=0, given=given
    )
    rng = np.random.default_rng(0)
    sources = [words(n, rng) for n in prompt_lens]
    candidates = [[words(n, rng) for n in row] for row in response_lens]
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(f"device {gpu}; torch {torch.__version__}; workload: {origin}, "
          f"{args.prompts}x{args.candidates} candidates", flush=True)  # fmt: skip

    rows, fixed = [], []
    dtypes = args.dtypes.split(",")
    for d, dtype in enumerate(dtypes):
        sizes = [int(b) for b in args.batch_sizes.split(",")] if d == 0 else [32]
        for batch_size in sizes:
            model = build_model(config, device, dtype, batch_size, tok)
            row = {"dtype": dtype, "batch_size": batch_size}
            try:
                row |= time_rank(model, sources, candidates, args.repeats, device)
            except (ValueError, torch.OutOfMemoryError) as err:  # non-finite scores, OOM
                row |= {"error": f"{type(err).__name__}: {str(err)[:80]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if batch_size == 32 and not args.tiny:
                fixed.append({"dtype": dtype} | time_fixed(model, 256, 32, 10, device))
                print(json.dumps(fixed[-1]), flush=True)
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps({"device": gpu, "rank": rows, "fixed": fixed}, indent=1))

    ok = [r for r in rows if "error" not in r]
    pairs, mean = (ok[0]["pairs"], ok[0]["mean_pair_tokens"]) if ok else (0, 0.0)
    print(f"\nPairRM rank(), {pairs} ordered pairs, mean pair {mean:.0f} tokens, {gpu}")
    print("| dtype | batch | pairs/s | median s | real tok/s | padding | peak GiB | finite |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['dtype']} | {r['batch_size']} | {r['error']} |")
            continue
        print(f"| {r['dtype']} | {r['batch_size']} | {r['pairs_per_s']:.1f} | "
              f"{r['median_s']:.2f} | {r['real_tokens_per_s']:,.0f} | {r['padding']:.1%} | "
              f"{r['peak_gib']:.2f} | {r['finite']} |")  # fmt: skip
    if fixed:
        print("\nFixed shape L=256, batch 32 (docs/pairrm.md §8: ~720 seq/s fp16 on H100)")
        print("| dtype | ms/batch | seq/s |")
        print("|---|---|---|")
        for f in fixed:
            print(f"| {f['dtype']} | {f['ms_per_batch']:.1f} | {f['seq_per_s']:.0f} |")


if __name__ == "__main__":
    main()
