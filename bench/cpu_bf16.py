"""CPU precision benchmark: fp32 against bf16 for the engine, its matrix-product floor, and a DPO
step, on a random-weight model of SmolLM2-135M's shape (no download, no GGUF: runs anywhere).

    .venv/bin/python bench/cpu_bf16.py                    # 2 threads, 3 repeats, ~4 min (fp32)
    .venv/bin/python bench/cpu_bf16.py --threads 16 --repeats 5

Each repeat runs every variant once, interleaved (fp32, bf16, fp32, ...), so load that changes
during the run hits both; the table gives min / median / max over the repeats, and each bf16
figure's ratio to fp32's median from the same run.
- engine: 8 prompts of 120 tokens x 6 samples x 64 new tokens, every row running all 64 tokens
  (min_new_tokens = max_new_tokens): the main job's generate shape. Greedy: random weights give
  flat next-token distributions, for which exact top-p needs a bisection over the whole
  vocabulary at every step (~40 % of the non-matmul time, profiled 2026-12-07), a cost a
  trained model's peaked distributions rarely incur (top-64 covers them);
- floor: that workload's matrix products alone (every linear layer, lm_head included, over each
  prompt once and over 48 rows for each new token; random inputs, no attention or sampling):
  what no engine can beat; engine/floor is the share of the time spent in them;
- DPO step: prefloop's FastDPOTrainer, LoRA r 16 on all linear layers, 4 pairs of 128-token
  prompts with 96/64-token answers, one optimizer step; base weights in the dtype, LoRA in fp32.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prefloop.engine import Sampling, generate  # noqa: E402
from prefloop.models import cpu_bf16_native  # noqa: E402

SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
             rope_theta=100000.0, tie_word_embeddings=True, pad_token_id=2, bos_token_id=1,
             eos_token_id=2)  # SmolLM2-135M-Instruct's config.json
PROMPTS, PROMPT_LEN, SAMPLES, NEW = 8, 120, 6, 64


def smollm2_shaped(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SHAPE)).to(dtype).eval()


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, SHAPE["vocab_size"], (PROMPT_LEN,), generator=g).tolist()
            for _ in range(PROMPTS)]


def engine_seconds(model) -> float:
    sampling = Sampling(0.0, 1.0, NEW, min_new_tokens=NEW, seed=0)
    t0 = time.perf_counter()
    out = generate(model, prompts(), SAMPLES, sampling, eos_token_ids=[2], pad_token_id=2)
    seconds = time.perf_counter() - t0
    assert sum(len(c.token_ids) for comps in out for c in comps) == PROMPTS * SAMPLES * NEW
    return seconds


def floor_seconds(model) -> float:
    """The workload's matrix products alone (see the module docstring)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dtype = next(model.parameters()).dtype
    t0 = time.perf_counter()
    with torch.inference_mode():
        for rows, times in ((PROMPTS * PROMPT_LEN, 1), (PROMPTS * SAMPLES, NEW - 1)):
            inputs = {m: torch.randn(rows, m.in_features, dtype=dtype) for m in linears}
            for _ in range(times):
                for m in linears:
                    m(inputs[m])
    return time.perf_counter() - t0


def dpo_trainer(model):
    """prefloop's FastDPOTrainer on 4 synthetic pairs, word-level tokenizer over the vocab."""
    import pyarrow as pa
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from prefloop.dpo import FastDPOConfig, FastDPOTrainer

    vocab = {f"w{i}": i for i in range(SHAPE["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w1", eos_token="w2",
                                   pad_token="w2")
    fast.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                          "{% if not add_generation_prompt %}w2{% endif %}")
    g = torch.Generator().manual_seed(1)

    def text(n: int) -> str:
        return " ".join(f"w{int(i)}" for i in torch.randint(3, 40000, (n,), generator=g))

    rows = [{"prompt": [{"role": "user", "content": text(128)}],
             "chosen": [{"role": "assistant", "content": text(96)}],
             "rejected": [{"role": "assistant", "content": text(64)}]} for _ in range(4)]
    args = FastDPOConfig(output_dir="/tmp/prefloop-bench-dpo", bf16=False, use_cpu=True,
                         report_to=[], save_strategy="no", per_device_train_batch_size=4,
                         max_length=512, learning_rate=1e-4, beta=0.1,
                         gradient_checkpointing=False)  # as the recipes train (train.py)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    # a fixed fingerprint: hashing the Arrow table fails under some dill/pyarrow pairs (Py 3.12)
    pairs = Dataset(pa.Table.from_pylist(rows), fingerprint="prefloop-bench-pairs")
    trainer = FastDPOTrainer(model, args=args, train_dataset=pairs, processing_class=fast,
                             peft_config=lora)
    trainer.create_optimizer()
    return trainer


def dpo_step_seconds(trainer) -> float:
    from prefloop.dpo import PairCollator

    batch = PairCollator()([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    t0 = time.perf_counter()
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    return time.perf_counter() - t0


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Plain `a @ b` throughput at one shape: the matrix units' own speed, nothing else."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(2):
        a @ b
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        calls += 1
    return 2 * m * k * n * calls / (time.perf_counter() - t0) / 1e9


MATMUL_SHAPES = [(48, 576, 1536), (960, 576, 1536), (48, 576, 49152)]  # decode, prefill, lm_head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-dpo", action="store_true", help="engine and floor only")
    ap.add_argument("--dpo-only", action="store_true", help="the DPO step only")
    ap.add_argument("--dtypes", default="fp32,bf16", help="which of fp32,bf16 to run")
    ap.add_argument("--matmul-only", action="store_true",
                    help="plain a @ b GFLOP/s at the model's shapes, fp32 and bf16, then stop")
    ap.add_argument("--quick", action="store_true",
                    help="2 prompts x 8 new tokens: checks the script, measures nothing")
    args = ap.parse_args()
    if args.quick:
        global PROMPTS, NEW
        PROMPTS, NEW = 2, 8
    torch.set_num_threads(args.threads)
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    found = [f for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")
             if f" {f}" in flags]
    model_name = next((line.split(":", 1)[1].strip() for line in flags.splitlines()
                       if line.startswith("model name")), "?")
    print(f"# {datetime.date.today()}, CPU '{model_name}' ({os.cpu_count()} cores; flags "
          f"{' '.join(found)}), {args.threads} threads, torch {torch.__version__} (capability "
          f"{torch.backends.cpu.get_cpu_capability()}), native bf16: {cpu_bf16_native()}, "
          f"load average {os.getloadavg()[0]:.1f}\n# command: python {' '.join(sys.argv)}",
          flush=True)
    dtypes = {n: dt for n, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))
              if n in args.dtypes.split(",")}
    if args.matmul_only:
        print("| M x K x N | fp32 GFLOP/s | bf16 GFLOP/s | bf16 vs fp32 |\n|---|---|---|---|")
        for m, k, n in MATMUL_SHAPES:
            f32, b16 = (matmul_gflops(m, k, n, dt) for dt in dtypes.values())
            print(f"| {m} x {k} x {n} | {f32:.1f} | {b16:.1f} | {b16 / f32:.2f}x |")
        return
    models = {name: smollm2_shaped(dt) for name, dt in dtypes.items()} if not args.dpo_only else {}
    work = {} if args.dpo_only else {"engine": engine_seconds, "floor": floor_seconds}
    trainers = {}
    if not args.skip_dpo:
        trainers = {name: dpo_trainer(smollm2_shaped(dt)) for name, dt in dtypes.items()}
        work["dpo step"] = None
    for name, model in models.items():  # first-call set-up, not timed
        if "engine" in work:
            generate(model, prompts()[:1], 1, Sampling(max_new_tokens=2), eos_token_ids=[2],
                     pad_token_id=2)
        if trainers:
            dpo_step_seconds(trainers[name])
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.repeats):
        for what, fn in work.items():
            for name in dtypes:
                s = dpo_step_seconds(trainers[name]) if fn is None else fn(models[name])
                times.setdefault((what, name), []).append(s)
                print(f"  repeat {r + 1} {what} {name}: {s:.2f} s", flush=True)
    print(f"\n# load average now {os.getloadavg()[0]:.1f}")
    print("| what | dtype | seconds min / median / max | rate (median) | vs the first dtype |")
    print("|---|---|---|---|---|")
    for what in work:
        base = statistics.median(times[(what, next(iter(dtypes)))])
        for name in dtypes:
            t = times[(what, name)]
            med = statistics.median(t)
            rate = (f"{PROMPTS * SAMPLES * NEW / med:.1f} tok/s" if what != "dpo step"
                    else f"{1 / med:.3f} steps/s")
            print(f"| {what} | {name} | {min(t):.2f} / {med:.2f} / {max(t):.2f} | {rate} | "
                  f"{base / med:.2f}x |")
    for name in dtypes if "engine" in work else []:
        share = (statistics.median(times[("floor", name)])
                 / statistics.median(times[("engine", name)]))
        print(f"| engine at its floor | {name} | | {share:.0%} of the floor's speed | |")


if __name__ == "__main__":
    main()
