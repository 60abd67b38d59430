"""The CUDA paths, on tiny random models: run with `pytest -m gpu` on a machine with a GPU.

Every test here is marked `gpu` and skips where torch.cuda is unavailable (CI, CPUs). Other
CUDA tests live beside the code they test and carry the same marker: test_engine.py (CUDA-graph
greedy + session replay), test_train.py (bf16 train stage), test_compare.py (original side =
base model on CUDA), test_pairrm.py (half precision keeps the fixture's ranks).

Tolerances, stated once:
- greedy decoding, fp32: every row identical to transformers' `generate`;
- greedy decoding, bf16: at least 6 of 8 rows identical (near-ties of bf16 logits flip the
  argmax when a kernel sums in another order; the engine's default kernels gave 8/8 on an H200,
  bench/results_gen.md), and every row identical for its first 4 tokens;
- FastDPOTrainer vs TRL on one bf16 batch: |loss difference| <= 1e-2, every logged metric
  within 5e-2, LoRA gradients cosine >= 0.99 (bf16 rounding of the summed log-probs; observed at
  the 7B width: loss 4e-3 apart, cosine 0.999, bench/results_dpo.md);
- PairRM fp16 on CUDA: ranks equal to the fp32 ranks for every prompt of the fixture.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda "
                                 "is unavailable here)")]

PAD = 0


def small_mistral(dtype: torch.dtype, seed: int = 0):
    """A 4-layer random Mistral (hidden 256, GQA 8/2, vocab 1000, rope 1e6, no window) on CUDA."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=1000, hidden_size=256, intermediate_size=512,
                        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                        max_position_embeddings=4096, rope_theta=1e6, sliding_window=None,
                        bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
                        tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = MistralForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


def hf_greedy(model, prompts, max_new: int, eos: list[int]) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time (no padding), cut after an EOS."""
    out = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new, eos_token_id=eos, pad_token_id=PAD)
        out.append(cut_at_eos(gen[0, len(p):].tolist(), eos))
    return out


def cut_at_eos(ids: list[int], eos: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 1000, (n,), generator=g).tolist()
            for n in (5, 17, 9, 33, 12, 40, 3, 21)]


def eos_midway(model, prompts) -> list[int]:
    """EOS ids that stop some rows part-way (random weights never pick a fixed EOS)."""
    free = hf_greedy(model, prompts, 32, [999_999])
    return sorted({free[i][5 + 4 * i] for i in range(4)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graphs_and_flex_decode_greedy_match_generate(prompts, dtype):
    from prefloop.engine import GenerationStats, Sampling, generate, kv
    from prefloop.engine.loop import options_for

    opt = options_for(torch.device("cuda"))
    assert opt.cuda_graphs and opt.flex_decode and opt.fused  # the CUDA defaults under test
    model = small_mistral(dtype)
    eos = eos_midway(model, prompts)
    want = hf_greedy(model, prompts, 32, eos)
    assert sum(w[-1] in eos for w in want) >= 2  # some rows do stop early
    kv._FLEX_SHAPES.clear()
    stats = GenerationStats()
    got = generate(model, prompts, 2, Sampling(0.0, max_new_tokens=32), eos_token_ids=eos,
                   pad_token_id=PAD, stats=stats)
    assert stats.capture_seconds > 0 and stats.graphs  # decoded through captured graphs
    assert kv._FLEX_SHAPES  # FlexAttention decode ran
    same = [all(c.token_ids == w for c in comps) for w, comps in zip(want, got, strict=True)]
    if dtype == torch.float32:
        assert all(same), same
    else:
        assert sum(same) >= 6, same
        for w, comps in zip(want, got, strict=True):
            assert all(c.token_ids[:4] == w[:4] for c in comps)


def test_session_replays_its_graphs_with_the_same_outputs(prompts):
    from prefloop.engine import GenerationStats, Sampling, Session, generate

    model = small_mistral(torch.bfloat16)
    sampling = Sampling(0.8, 0.9, 24, seed=3)
    kw = {"eos_token_ids": [7], "pad_token_id": PAD}
    plain = generate(model, prompts, 3, sampling, **kw)
    session = Session()
    captures = []
    for _ in range(3):
        stats = GenerationStats()
        out = generate(model, prompts, 3, sampling, session=session, stats=stats, **kw)
        captures.append(stats.capture_seconds)
        assert [[c.token_ids for c in cs] for cs in out] == [[c.token_ids for c in cs]
                                                               for cs in plain]
    assert captures[0] > 0 and captures[1] == captures[2] == 0
    fewer = generate(model, prompts[:3], 3, sampling, session=session, **kw)
    assert [[c.token_ids for c in cs] for cs in fewer] == [[c.token_ids for c in cs]
                                                           for cs in generate(model, prompts[:3], 3,
                                                                              sampling, **kw)]
    session.close()
    assert session.loop is None


def test_pairrm_fp16_keeps_the_fp32_ranks():
    import numpy as np
    from test_pairrm import FIXTURES, REF, TINY

    from prefloop.rankers.pairrm import PairRM

    fp32 = PairRM.load(str(FIXTURES), backbone_overrides=TINY, device="cuda", dtype="float32")
    fp16 = PairRM.load(str(FIXTURES), backbone_overrides=TINY, device="cuda", dtype="auto")
    assert fp16.dtype == torch.float16 and fp16.head.dense.weight.dtype == torch.float32
    a = fp32.rank(REF["inputs"], REF["candidates"])
    b = fp16.rank(REF["inputs"], REF["candidates"])
    for p, (x, y) in enumerate(zip(a, b, strict=True)):
        np.testing.assert_allclose(x.matrix, REF["rank_bs1"]["matrix"][p], rtol=0, atol=1e-4)
        np.testing.assert_allclose(y.matrix, x.matrix, rtol=0, atol=3e-2)
        assert y.ranks == x.ranks == REF["rank_bs1"]["ranks"][p], p


# -- training: bf16 LoRA through the train stage, both engines, then compare ---------------------


@pytest.fixture
def stage_env(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    return tmp_path


@pytest.mark.parametrize("engine", ["trl", "fast"])
def test_bf16_lora_training_lowers_the_loss_and_the_adapter_reloads(stage_env, engine):
    from peft import PeftModel
    from tiny import read_jsonl_lines, save_model_folder, write_instructions, write_pairs
    from transformers import AutoModelForCausalLM

    from prefloop.config import Recipe, apply_overrides
    from prefloop.models import load_model
    from prefloop.stages import compare, train

    model_dir = save_model_folder(stage_env / "model")
    run = stage_env / "run"
    write_pairs(run)
    write_instructions(run, ["write a short poem about the sea"],
                       ["name a big city", "give two tips to sleep"])
    recipe = apply_overrides(Recipe(), [
        f"model.name={model_dir}", f"train.engine={engine}", "train.max_steps=12",
        "train.batch_size=6", "train.learning_rate=0.02", "train.warmup_ratio=0.0",
        "train.scheduler=constant", "train.lora_dropout=0.0", "compare.max_new_tokens=8",
        "compare.verdict=false"])
    out = train.run(recipe, run)
    log = read_jsonl_lines(out / "log.jsonl")
    assert len(log) == 12
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # adapter starts as a no-op
    assert log[-1]["loss"] < log[0]["loss"] - 0.1, [r["loss"] for r in log]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["timing"]["device"] == "cuda"
    check = manifest["step0_check"]  # bf16: the reference equals the loaded base within 2e-2
    assert check["reference_is_base_step0"] is True and check["reference_is_base_end"] is True

    base, _ = load_model(str(model_dir))
    assert base.dtype == torch.bfloat16
    tuned = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    ids = torch.tensor([[2, 4, 50, 7, 54, 51, 52, 9, 53, 3, 5, 40, 41]], device="cuda")
    with torch.no_grad():
        on = tuned(input_ids=ids).logits.float()
        with tuned.disable_adapter():
            off = tuned(input_ids=ids).logits.float()
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        torch.testing.assert_close(off, plain(input_ids=ids).logits.float(), atol=0, rtol=0)
    assert (on - off).abs().max() > 1e-3

    # compare: the original side is the base with the adapter off, the dpo side has it on
    cmp = compare.run(recipe, run)
    original = read_jsonl_lines(cmp / "original.jsonl")
    dpo = read_jsonl_lines(cmp / "dpo.jsonl")
    assert len(original) == len(dpo) == 2
    assert all(r["response_tokens"] > 0 for r in original + dpo)
    del tuned, base, plain
    torch.cuda.empty_cache()


def test_fastdpo_matches_trl_on_one_bf16_batch():
    from datasets import Dataset
    from peft import LoraConfig
    from test_fastdpo import MAX_LENGTH, TEMPLATE, WORDS
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from prefloop.dpo import FastDPOConfig, FastDPOTrainer, PairCollator

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.chat_template = TEMPLATE
    g = torch.Generator().manual_seed(0)

    def text(n: int) -> str:
        return " ".join(f"w{int(i)}" for i in torch.randint(0, 43, (n,), generator=g))

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": text(2 + i)}],
                               "chosen": [{"role": "assistant", "content": text(1 + 3 * i)}],
                               "rejected": [{"role": "assistant", "content": text(12 - i)}]}
                              for i in range(8)])
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        sliding_window=None)).to("cuda", torch.bfloat16)

    def trainer(cls, args_cls):
        args = args_cls(output_dir="unused", bf16=True, report_to=[], save_strategy="no",
                        per_device_train_batch_size=8, beta=0.1, max_length=MAX_LENGTH)
        t = cls(copy.deepcopy(model), args=args, train_dataset=data, processing_class=tok,
                peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                       target_modules="all-linear", task_type="CAUSAL_LM"))
        torch.manual_seed(1)
        for name, p in t.model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.3)
        if t.args.gradient_checkpointing:  # TRL's default; the trainer enables it in train()
            t.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        t.model.train()
        return t

    trl, fast = trainer(DPOTrainer, DPOConfig), trainer(FastDPOTrainer, FastDPOConfig)
    assert fast.fast_fallback_reason is None
    rows = [trl.train_dataset[i] for i in range(8)]
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=MAX_LENGTH)(rows)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        trl_loss = trl.compute_loss(trl.model, batch)
    trl_loss.backward()
    fast_loss = fast.training_step(fast.model, PairCollator()(rows))
    assert abs(fast_loss.item() - trl_loss.item()) <= 1e-2
    want = {k: v[-1] for k, v in trl._metrics["train"].items()}
    got = {k: v[-1] for k, v in fast._metrics["train"].items()}
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=5e-2, rel=5e-3), key

    def grads(t):
        return torch.cat([p.grad.float().flatten() for n, p in sorted(t.model.named_parameters())
                          if "lora_" in n and p.grad is not None])

    a, b = grads(trl), grads(fast)
    assert a.numel() == b.numel() > 0
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) >= 0.99


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes is not installed (pip install 'prefloop[qlora]'; on the lent GPU "
                           "machine its 43 MB wheel is carried)")
def test_qlora_trains_a_4bit_base(stage_env):
    from tiny import read_jsonl_lines, save_model_folder, write_pairs

    from prefloop.config import Recipe, apply_overrides
    from prefloop.stages import train

    model_dir = save_model_folder(stage_env / "model")
    write_pairs(stage_env / "run")
    recipe = apply_overrides(Recipe(), [f"model.name={model_dir}", "train.qlora=true",
                                        "train.max_steps=2", "train.batch_size=2"])
    out = train.run(recipe, stage_env / "run")
    assert len(read_jsonl_lines(out / "log.jsonl")) == 2
    assert (out / "adapter" / "adapter_model.safetensors").exists()
