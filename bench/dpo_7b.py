"""DPO + LoRA throughput at 7B scale: TRL 1.16 DPOTrainer defaults vs prefloop's FastDPOTrainer.

Random weights of Mistral-7B-Instruct-v0.2's shape (built on the GPU, nothing downloaded), bf16,
LoRA r16 on all linear layers, synthetic pairs with LIMA-like lengths (log-normal prompt and
response lengths, fixed seed, the same data for every engine). Each engine trains on a freshly built
model with the same seed, so the same batches arrive in the same order and the per-step losses can
be compared. Run on a GPU:

    PYTHONPATH=src python bench/dpo_7b.py            # the 7B run (about 5 minutes on one H100)
    PYTHONPATH=src python bench/dpo_7b.py --tiny     # a tiny config on CPU, to check the script

Tokens are counted per optimizer step as the real tokens of the batch's pairs after TRL's
``max_length`` truncation, prompt counted once: Σ_pairs (|prompt| + |chosen| + |rejected|); padding
is never counted. "TRL-counted" adds the prompt a second time (TRL's ``num_tokens`` metric, the sum
of its attention mask). Time is wall time between the ends of steps (synchronised), after warm-up.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

STEPS_WARMUP = 2
DEADLINE_S = 450  # no new engine run starts after this many seconds (the device call has 600)


@dataclass
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    prompt_mean: float
    response_mean: float
    max_length: int
    batch: int


SHAPE_7B = Shape(hidden=4096, layers=32, heads=32, kv_heads=8, mlp=14336, vocab=32000,
                 prompt_mean=256, response_mean=768, max_length=1024, batch=8)
SHAPE_TINY = Shape(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, vocab=512,
                   prompt_mean=16, response_mean=48, max_length=64, batch=4)


def lognormal_lengths(rng: np.random.Generator, mean: float, sigma: float, n: int, low: int,
                      high: int) -> list[int]:
    """Lengths with the given mean from a log-normal of shape sigma: μ = ln(mean) − σ²/2, clipped."""
    mu = math.log(mean) - sigma**2 / 2
    return [int(x) for x in np.clip(np.round(rng.lognormal(mu, sigma, n)), low, high)]


def make_tokenizer(vocab: int):
    """Word-level tokenizer: 't<i>' is token i, so texts of exact token ids can be written."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")


def make_dataset(shape: Shape, n_pairs: int, seed: int = 0):
    """Standard-format pairs: prompt ~ shape.prompt_mean tokens, responses ~ shape.response_mean."""
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    prompts = lognormal_lengths(rng, shape.prompt_mean, 0.7, n_pairs, 8, shape.max_length - 8)
    chosen = lognormal_lengths(rng, shape.response_mean, 0.6, n_pairs, 8, 2 * shape.max_length)
    rejected = lognormal_lengths(rng, shape.response_mean, 0.6, n_pairs, 8, 2 * shape.max_length)

    def words(n: int) -> str:
        return " ".join(f"t{i}" for i in rng.integers(3, shape.vocab, n))

    rows = [{"prompt": words(p), "chosen": " " + words(c - 1) + " </s>",
             "rejected": " " + words(r - 1) + " </s>"}
            for p, c, r in zip(prompts, chosen, rejected, strict=True)]
    return Dataset.from_list(rows)


def build_model(shape: Shape, device: str, dtype: torch.dtype):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                           num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                           intermediate_size=shape.mlp, vocab_size=shape.vocab, rope_theta=1e6,
                           max_position_embeddings=32768, sliding_window=None,
                           attn_implementation="sdpa", pad_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = MistralForCausalLM._from_config(config, dtype=dtype)
    return model


class CountingCollator:
    """Wraps a collator and records each batch's real tokens (see the module docstring)."""

    def __init__(self, inner, max_length: int):
        self.inner = inner
        self.max_length = max_length
        self.tokens: list[int] = []
        self.trl_tokens: list[int] = []

    def __call__(self, examples):
        real = trl = 0
        for e in examples:
            p = len(e["prompt_ids"])
            room = max(self.max_length - p, 0)
            c, r = min(len(e["chosen_ids"]), room), min(len(e["rejected_ids"]), room)
            real += p + c + r
            trl += 2 * p + c + r
        self.tokens.append(real)
        self.trl_tokens.append(trl)
        return self.inner(examples)


def run_engine(name: str, engine: str, shape: Shape, dataset, tokenizer, steps: int, device: str,
               budget_gb: float | None = None, lean: bool = True, min_chunk: int = 8192) -> dict:
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from prefloop.dpo import FastDPOConfig, FastDPOTrainer

    on_gpu = device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if on_gpu:
        print(f"[{name}] memory in use before the model: {torch.cuda.memory_allocated() / 2**30:.2f} GiB",
              flush=True)
    model = build_model(shape, device, dtype)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    config_cls, trainer_cls = (DPOConfig, DPOTrainer) if engine == "trl" else (FastDPOConfig, FastDPOTrainer)
    extra = {}
    if engine == "fast":
        extra = {"fast_activation_budget_gb": budget_gb, "fast_lean_activations": lean,
                 "fast_min_chunk_tokens": min_chunk}
    args = config_cls(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=shape.batch,
                      max_steps=STEPS_WARMUP + steps, learning_rate=5e-6, logging_steps=1,
                      report_to=[], save_strategy="no", bf16=on_gpu, use_cpu=not on_gpu,
                      max_length=shape.max_length, disable_tqdm=True, seed=0, **extra)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = trainer_cls(model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=peft_config)
    counter = CountingCollator(trainer.data_collator, shape.max_length)
    trainer.data_collator = counter
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if on_gpu:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.train()
    seconds = ends[-1] - ends[STEPS_WARMUP - 1]
    measured = slice(STEPS_WARMUP, STEPS_WARMUP + steps)
    tokens = sum(counter.tokens[measured])
    trl_tokens = sum(counter.trl_tokens[measured])
    result = {
        "name": name, "engine": engine, "seconds": seconds, "tokens": tokens,
        "tokens_per_s": tokens / seconds, "trl_tokens_per_s": trl_tokens / seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan"),
        "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if on_gpu else float("nan"),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "margins": [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h],
        "grad_norms": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
        "fallback": getattr(trainer, "fast_fallback_reason", None),
    }
    if engine == "fast" and trainer.activation_cost is not None:
        result["budget_gib"] = trainer.activation_budget(shape.batch) / 2**30
        result["cost"] = str(trainer.activation_cost)
        result["plan"] = trainer.last_plan
        print(f"[{name}] budget {result['budget_gib']:.2f} GiB; last step's chunks (tokens, "
              f"checkpointed layers): {trainer.last_plan}", flush=True)
    del trainer, model
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    print(f"[{name}] {result['tokens_per_s']:.0f} tokens/s, peak {result['peak_gib']:.1f} GiB, "
          f"losses {[round(x, 5) for x in result['losses']]}", flush=True)
    return result


def check_attention(device: str) -> str:
    """Flash variable-length path vs the masked SDPA path on random bf16 tensors (GPU only).

    If they disagree, the fast runs use the masked path (correct, slower) and say so.
    """
    from prefloop.dpo import disable_flash, flash_varlen, masked_sdpa, pack_pairs

    if device != "cuda":
        return "attention check skipped (no GPU)"
    torch.manual_seed(0)
    pack = pack_pairs([([1] * 37, [2] * 50, [3] * 21), ([4] * 5, [5] * 3, [6] * 64),
                       ([7] * 1, [8] * 9, [9] * 9)]).to(device)
    t = pack.n_tokens
    q = torch.randn(1, 32, t, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 8, t, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 8, t, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    grads = []
    outs = []
    for fn in (flash_varlen, masked_sdpa):
        out = fn(q, k, v, pack, 128**-0.5)
        out.float().square().sum().backward()
        outs.append(out.detach().float())
        grads.append([x.grad.detach().float().clone() for x in (q, k, v)])
        for x in (q, k, v):
            x.grad = None
    out_diff = (outs[0] - outs[1]).abs().max().item()
    grad_diff = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
                    for a, b in zip(grads[0], grads[1], strict=True))
    ok = out_diff < 0.05 and grad_diff < 0.05
    if not ok:
        disable_flash()
    return (f"attention check: max |out diff| {out_diff:.2e}, max relative grad diff {grad_diff:.2e}"
            f" -> {'flash varlen' if ok else 'MISMATCH, masked SDPA'} used")


def check_equivalence(device: str) -> str:
    """One batch through TRL and FastDPOTrainer on a 4-layer model of the 7B width, bf16 autocast,
    random LoRA B (so policy and reference differ): loss, rewards and LoRA gradients compared."""
    import copy

    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from prefloop.dpo import FastDPOConfig, FastDPOTrainer, PairCollator, TRLInternals

    shape = Shape(**{**vars(SHAPE_7B), "layers": 4})
    on_gpu = device == "cuda"
    if not on_gpu:
        shape = SHAPE_TINY
    base = build_model(shape, device, torch.bfloat16 if on_gpu else torch.float32)
    tokenizer = make_tokenizer(shape.vocab)
    dataset = make_dataset(shape, shape.batch, seed=1)
    found = {}
    for engine, config_cls, trainer_cls in (("trl", DPOConfig, DPOTrainer),
                                            ("fast", FastDPOConfig, FastDPOTrainer)):
        args = config_cls(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=shape.batch,
                          report_to=[], bf16=on_gpu, use_cpu=not on_gpu, max_length=shape.max_length)
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
        trainer = trainer_cls(copy.deepcopy(base), args=args, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=peft_config)
        torch.manual_seed(1)
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 1e-3)
        trainer.model.gradient_checkpointing_enable()
        trainer.model.train()
        rows = [trainer.train_dataset[i] for i in range(shape.batch)]
        internals = TRLInternals(trainer)  # TRL's private attributes, for either trainer
        if engine == "trl":
            batch = TRLInternals.padded_collator(pad_token_id=tokenizer.pad_token_id,
                                                 max_length=shape.max_length)(rows)
            with trainer.accelerator.autocast():
                loss = trainer.compute_loss(trainer.model, internals.prepare_inputs(batch))
            loss.backward()
        else:
            loss = trainer.training_step(trainer.model, PairCollator()(rows))
        metrics = {k: v[-1] for k, v in internals.metrics("train").items()}
        grads = torch.cat([p.grad.float().flatten() for n, p in trainer.model.named_parameters()
                           if p.grad is not None])
        found[engine] = (loss.item(), metrics, grads)
        del trainer
        gc.collect()
    (l_trl, m_trl, g_trl), (l_fast, m_fast, g_fast) = found["trl"], found["fast"]
    cosine = torch.nn.functional.cosine_similarity(g_trl, g_fast, dim=0).item()
    norm_diff = ((g_fast - g_trl).norm() / g_trl.norm()).item()
    lines = [f"equivalence check ({shape.layers} layers, hidden {shape.hidden}, one batch of "
             f"{shape.batch} pairs): loss TRL {l_trl:.6f} fast {l_fast:.6f}"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        lines.append(f"  {key}: TRL {m_trl[key]:.6f} fast {m_fast[key]:.6f}")
    lines.append(f"  LoRA gradients: cosine {cosine:.6f}, |g_fast - g_trl| / |g_trl| {norm_diff:.2e}, "
                 f"|g_trl| {g_trl.norm().item():.4e}")
    return "\n".join(lines)


CONFIGS = {
    "trl": ("TRL DPOTrainer defaults", "trl", {}),
    "fast": ("FastDPOTrainer defaults (auto budget, chunks >= 8192 tokens)", "fast", {}),
    "fast4k": ("FastDPOTrainer, chunks >= 4096 tokens", "fast", {"min_chunk": 4096}),
    "fast16k": ("FastDPOTrainer, one chunk per batch", "fast", {"min_chunk": 16384}),
    "fast-plain": ("FastDPOTrainer, lean activations off", "fast", {"lean": False}),
    # The default settings with the budget raised by 90% of the memory TRL's peak leaves over the
    # default run's peak (measured in this same invocation).
    "fast-boost": ("FastDPOTrainer, raised budget", "fast", {}),
}


def run_one(config: str, steps: int, tiny: bool, out: str, budget: float | None = None) -> None:
    """One configuration in this process; its result is written as JSON to `out`."""
    import json

    shape = SHAPE_TINY if tiny else SHAPE_7B
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)
    if config == "check":
        try:
            print(check_attention(device), flush=True)
        except RuntimeError as error:
            print(f"attention check failed ({error})", flush=True)
        print(check_equivalence(device), flush=True)
        return
    name, engine, kwargs = CONFIGS[config]
    if budget is not None:
        kwargs = {**kwargs, "budget_gb": budget}
        name = f"{name}, budget {budget:.2f} GiB"
    tokenizer = make_tokenizer(shape.vocab)
    dataset = make_dataset(shape, shape.batch * (STEPS_WARMUP + steps))
    result = run_engine(name, engine, shape, dataset, tokenizer, steps, device, **kwargs)
    with open(out, "w") as f:
        json.dump(result, f)


def main() -> None:
    import json
    import subprocess
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU, to test the script")
    parser.add_argument("--steps", type=int, default=6, help="measured optimizer steps per engine")
    parser.add_argument("--configs", default="check,trl,fast,fast-boost,fast4k,fast16k,fast-plain",
                        help="comma-separated, run in this order, each in its own process")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config here
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.steps, args.tiny, args.out, args.budget)
        return
    import peft
    import transformers
    import trl

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "cpu"
    print(f"{time.strftime('%Y-%m-%d %H:%M')} {gpu}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}", flush=True)
    started = time.perf_counter()
    results = []
    for config in args.configs.split(","):
        if time.perf_counter() - started > DEADLINE_S:
            print(f"[{config}] skipped: past the {DEADLINE_S} s deadline", flush=True)
            continue
        out = tempfile.mktemp(suffix=".json")
        command = [sys.executable, __file__, "--one", config, "--out", out, "--steps", str(args.steps)]
        if config == "fast-boost":
            done = {r.get("config"): r for r in results if "failed" not in r}
            if "trl" not in done or "fast" not in done or "budget_gib" not in done["fast"]:
                print("[fast-boost] skipped: needs the trl and fast results", flush=True)
                continue
            spare = done["trl"]["peak_gib"] - done["fast"]["peak_gib"]
            if not spare > 0.25:
                print(f"[fast-boost] skipped: {spare:.2f} GiB to spare", flush=True)
                continue
            command += ["--budget", f"{done['fast']['budget_gib'] + 0.9 * spare:.3f}"]
        code = subprocess.call(command + (["--tiny"] if args.tiny else []))
        if config == "check":
            continue
        if code != 0 or not os.path.exists(out):
            results.append({"name": CONFIGS[config][0], "failed": f"exit code {code}"})
            continue
        with open(out) as f:
            results.append({**json.load(f), "config": config})
    ok = [r for r in results if "failed" not in r]
    base = next((r["tokens_per_s"] for r in ok if r["engine"] == "trl"), float("nan"))
    shape = SHAPE_TINY if args.tiny else SHAPE_7B
    print()
    print(f"shape: hidden {shape.hidden}, {shape.layers} layers, batch {shape.batch} pairs, "
          f"max_length {shape.max_length}, {args.steps} measured steps after {STEPS_WARMUP} warm-up")
    for r in ok:
        print(f"{r['name']}: per-step loss {[round(x, 4) for x in r['losses']]}, "
              f"grad_norm {[round(x, 2) for x in r['grad_norms']]}")
        if "plan" in r:
            print(f"    budget {r['budget_gib']:.2f} GiB, cost {r['cost']}, last step's chunks "
                  f"(tokens, checkpointed layers) {r['plan']}")
    print()
    print("| engine | tokens/s | TRL-counted tokens/s | peak GiB (reserved) | tokens | seconds | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "failed" in r:
            print(f"| {r['name']} | failed: {r['failed']} | | | | | |")
            continue
        print(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {r['trl_tokens_per_s']:,.0f} | "
              f"{r['peak_gib']:.1f} ({r['reserved_gib']:.1f}) | {r['tokens']:,} | {r['seconds']:.1f} | "
              f"{r['tokens_per_s'] / base:.2f}x |")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
