"""FastDPOTrainer against TRL's DPOTrainer on tiny random models (CPU, fp32)."""

from __future__ import annotations

import copy
import gc
import math
import weakref

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from prefloop.dpo import (
    SUPPORTED_LOSSES,
    ActivationCost,
    FastDPOConfig,
    FastDPOTrainer,
    PairCollator,
    kept_layers,
    memory,
    pack_mask,
    pack_pairs,
    plan_chunks,
    truncate_pair,
)
from prefloop.dpo import trainer as dpo_trainer

TOL = 1e-5
MAX_LENGTH = 24
WORDS = ["<pad>", "<s>", "</s>", "<user>", "<assistant>"] + [f"w{i}" for i in range(43)]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<user> "
            "{{ m['content'] }} {% else %}<assistant> {{ m['content'] }} {{ eos_token }} {% endif %}"
            "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Two cores shared with other work: one thread avoids OpenMP contention (3x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = TEMPLATE
    return fast


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    """Eight conversational pairs of varied lengths; the longest ones exceed MAX_LENGTH."""
    g = torch.Generator().manual_seed(0)

    def text(n: int) -> str:
        return " ".join(f"w{int(i)}" for i in torch.randint(0, 43, (n,), generator=g))

    rows = [{"prompt": [{"role": "user", "content": text(2 + i)}],
             "chosen": [{"role": "assistant", "content": text(1 + 3 * i)}],
             "rejected": [{"role": "assistant", "content": text(12 - i)}]} for i in range(8)]
    return Dataset.from_list(rows)


def tiny_model(arch: str):
    common = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    return LlamaForCausalLM(LlamaConfig(**common))


def make_trainer(cls, args_cls, model, dataset, tokenizer, **kwargs):
    """A trainer whose LoRA B weights are random (so policy and reference differ), GC enabled."""
    args = args_cls(output_dir="unused", bf16=False, use_cpu=True, report_to=[], save_strategy="no",
                    per_device_train_batch_size=8, beta=0.1, max_length=MAX_LENGTH, **kwargs)
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = cls(copy.deepcopy(model), args=args, train_dataset=dataset, processing_class=tokenizer,
                  peft_config=peft_config)
    torch.manual_seed(1)
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.3)
    if trainer.args.gradient_checkpointing:
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer.model.train()
    return trainer


def examples(trainer, n: int = 8) -> list[dict]:
    return [trainer.train_dataset[i] for i in range(n)]


def trl_batch(trainer, rows):
    return DataCollatorForPreference(pad_token_id=trainer._tokenizer.pad_token_id,
                                     max_length=MAX_LENGTH)(rows)


def last_metrics(trainer) -> dict[str, float]:
    return {k: v[-1] for k, v in trainer._metrics["train"].items()}


def lora_grads(trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


# ---- packing


def test_pack_pairs_layout():
    pack = pack_pairs([([10, 11, 12], [20, 21], [30]), ([13], [22], [31, 32])])
    assert pack.input_ids.tolist() == [[10, 11, 12, 20, 21, 12, 30, 13, 22, 13, 31, 32]]
    assert pack.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 0, 1, 2]]
    assert pack.shift_labels.tolist() == [[-100, -100, 20, 21, -100, 30, -100, 22, -100, 31, 32, -100]]
    assert pack.label_side.tolist() == [0, 0, 1, 1, 0, 2, 0, 1, 0, 2, 2, 0]
    assert pack.pair_id.tolist() == [0] * 7 + [1] * 5
    assert pack.kind.tolist() == [0, 0, 1, 2, 2, 3, 3, 1, 2, 3, 3, 3]
    assert pack.cu_q.tolist() == [0, 5, 7, 9, 12]
    assert pack.cu_k.tolist() == [0, 5, 9, 11, 14]
    assert pack.k_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 5, 6, 7, 8, 9, 10, 11]
    assert (pack.max_q, pack.max_k) == (5, 5)
    assert pack.row_starts == [0, 7, 12]
    assert pack.n_chosen.tolist() == [2, 1] and pack.n_rejected.tolist() == [1, 2]


def test_pack_mask_rejected_side_skips_chosen_and_last_prompt_token():
    pack = pack_pairs([([10, 11, 12], [20, 21], [30])])
    # rows: p0 p1 p2 c0 c1 | p2' r0
    expected = [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 0],
        [1, 1, 0, 0, 0, 1, 1],
    ]
    assert pack_mask(pack)[0, 0].int().tolist() == expected


def test_pack_mask_separates_pairs():
    mask = pack_mask(pack_pairs([([1, 2], [3], [4]), ([5], [6], [7])]))[0, 0]
    assert mask[:5, 5:].sum().item() == 0 and mask[5:, :5].sum().item() == 0


def test_truncate_pair_keeps_start_like_trl():
    assert truncate_pair([1, 2, 3], [4, 5, 6], [7], 5) == ([1, 2, 3], [4, 5], [7])
    assert truncate_pair([1, 2], [3], [4], None) == ([1, 2], [3], [4])


def test_kept_layers_and_plan_chunks():
    cost = ActivationCost(full=1000.0, layer=100.0, kept=10.0, n_layers=10)
    # budget/T = 1100 leaves room for all layers; 500 → (500 − 100 − 100) / 90 = 3.33 → 3.
    assert kept_layers(10, 11000.0, cost) == 10
    assert kept_layers(10, 5000.0, cost) == 3
    assert kept_layers(10, 100.0, cost) == 0
    assert plan_chunks([5, 9, 3, 4], 10) == [[1], [0, 3], [2]]
    assert plan_chunks([20, 1], 10) == [[0], [1]]


# ---- equivalence with TRL


@pytest.mark.parametrize("arch,budget_gb,min_chunk,lean", [
    ("llama", 1.0, 4096, True),    # one chunk, no layer checkpointed
    ("llama", None, 4096, False),  # auto budget, plain RMSNorm / MLP
    ("llama", 5e-4, 1, True),      # a chunk per pair, some layers checkpointed
    ("llama", 5e-4, 4096, True),   # chunks grown to the budget, every layer checkpointed
    ("mistral", 0.0, 4096, True),  # nothing fits: a chunk per pair, every layer checkpointed
])
def test_loss_metrics_and_gradients_match_trl(arch, budget_gb, min_chunk, lean, dataset, tokenizer,
                                             monkeypatch):
    kept = []
    original = dpo_trainer.kept_layers
    monkeypatch.setattr(dpo_trainer, "kept_layers", lambda *a: kept.append(original(*a)) or kept[-1])
    model = tiny_model(arch)
    trl = make_trainer(DPOTrainer, DPOConfig, model, dataset, tokenizer)
    fast = make_trainer(FastDPOTrainer, FastDPOConfig, model, dataset, tokenizer,
                        fast_activation_budget_gb=budget_gb, fast_lean_activations=lean,
                        fast_min_chunk_tokens=min_chunk)
    assert fast.fast_fallback_reason is None
    rows = examples(trl)
    assert any(len(r["prompt_ids"]) + len(r["chosen_ids"]) > MAX_LENGTH for r in rows)

    trl_loss = trl.compute_loss(trl.model, trl_batch(trl, rows))
    trl_loss.backward()
    fast_loss = fast.training_step(fast.model, PairCollator()(rows))

    assert fast_loss.item() == pytest.approx(trl_loss.item(), abs=TOL)
    want, got = last_metrics(trl), last_metrics(fast)
    assert set(want) == set(got)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=TOL), key
    assert abs(want["rewards/margins"]) > 1e-3  # the adapters make policy and reference differ
    want_grads, got_grads = lora_grads(trl), lora_grads(fast)
    assert set(want_grads) == set(got_grads) and len(want_grads) == 3 * 7 * 2
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, atol=TOL, rtol=0), name
    # The checkpointing of every layer and the modules' own forwards are restored after the step.
    assert all(layer.gradient_checkpointing for layer in fast._gc_layers())
    assert not any("forward" in vars(m) for m in fast.model.modules() if "RMSNorm" in type(m).__name__)
    if budget_gb == 1.0:
        assert kept == [3]
    elif budget_gb == 0.0:
        assert kept == [0] * 8
    elif min_chunk == 1:
        assert len(kept) == 8 and any(0 < k < 3 for k in kept)
    elif budget_gb is not None:
        assert 1 < len(kept) < 8 and kept.count(0) >= len(kept) - 1


def test_trainer_and_model_are_freed_after_a_step(dataset, tokenizer):
    """The activation probe must not leave a graph (and with it the model) alive."""
    fast = make_trainer(FastDPOTrainer, FastDPOConfig, tiny_model("llama"), dataset, tokenizer)
    fast.training_step(fast.model, PairCollator()(examples(fast)))
    assert fast._cost is not None
    model = weakref.ref(fast.model)
    del fast
    gc.collect()
    assert model() is None


def test_every_per_pair_loss_type_matches_trl(dataset, tokenizer):
    model = tiny_model("llama")
    trl = make_trainer(DPOTrainer, DPOConfig, model, dataset, tokenizer, gradient_checkpointing=False)
    fast = make_trainer(FastDPOTrainer, FastDPOConfig, model, dataset, tokenizer,
                        gradient_checkpointing=False, fast_activation_budget_gb=3e-5)
    rows = examples(trl)
    cases = [[t] for t in sorted(SUPPORTED_LOSSES - {"sft"})] + [["sigmoid", "sft"]]
    with torch.no_grad():
        for loss_types in cases:
            for trainer in (trl, fast):
                trainer.loss_types = loss_types
                trainer.loss_weights = [1.0, 0.5][: len(loss_types)]
                trainer.label_smoothing = 0.1  # robust and exo_pair use it
            want = trl.compute_loss(trl.model, trl_batch(trl, rows)).item()
            got = fast.compute_loss(fast.model, PairCollator()(rows)).item()
            # sppo_hard is ~50: fp32 gives ~1e-7 relative, so allow that much besides TOL.
            assert math.isfinite(want) and got == pytest.approx(want, abs=TOL, rel=1e-6), loss_types


def test_precomputed_reference_logps_equal_adapter_disabled_forward(dataset, tokenizer, monkeypatch):
    calls = []
    original = FastDPOTrainer._reference_logps

    def spy(self, pack, model=None):
        calls.append(pack.n_pairs)
        return original(self, pack, model)

    monkeypatch.setattr(FastDPOTrainer, "_reference_logps", spy)
    model = tiny_model("llama")
    fast = make_trainer(FastDPOTrainer, FastDPOConfig, model, dataset, tokenizer,
                        precompute_ref_log_probs=True)
    assert sum(calls) == len(dataset)  # the packed path computed them
    # The reference is the base model: score each completion by hand with a plain forward.
    with torch.no_grad():
        for row in examples(fast):
            for side in ("chosen", "rejected"):
                prompt, completion, _ = truncate_pair(row["prompt_ids"], row[f"{side}_ids"], [], MAX_LENGTH)
                ids = torch.tensor([prompt + completion])
                logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
                total = logp[torch.arange(len(prompt) - 1, ids.shape[1] - 1), ids[0, len(prompt):]].sum()
                assert row[f"ref_{side}_logps"] == pytest.approx(total.item(), abs=TOL)
    # Training reads them from the batch instead of running the reference again.
    calls.clear()
    fast.training_step(fast.model, PairCollator()(examples(fast)))
    assert calls == []


def test_unsupported_loss_falls_back_to_trl(dataset, tokenizer):
    model = tiny_model("llama")
    fast = make_trainer(FastDPOTrainer, FastDPOConfig, model, dataset, tokenizer,
                        loss_type=["aot"], gradient_checkpointing=False)
    trl = make_trainer(DPOTrainer, DPOConfig, model, dataset, tokenizer, loss_type=["aot"],
                       gradient_checkpointing=False)
    assert "aot" in fast.fast_fallback_reason
    assert not isinstance(fast.data_collator, PairCollator)
    rows = examples(trl)
    want = trl.compute_loss(trl.model, trl_batch(trl, rows)).item()
    # A pair batch handed to the fallback is converted to TRL's layout.
    got = fast.compute_loss(fast.model, PairCollator()(rows)).item()
    assert got == pytest.approx(want, abs=TOL)


def test_short_training_run_matches_trl(dataset, tokenizer, tmp_path):
    model = tiny_model("llama")
    logs = {}
    for name, cls in (("trl", DPOTrainer), ("fast", FastDPOTrainer)):
        args = DPOConfig(output_dir=str(tmp_path / name), bf16=False, use_cpu=True, report_to=[],
                         save_strategy="no", max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-3, logging_steps=1, max_length=MAX_LENGTH,
                         disable_tqdm=True)
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = cls(copy.deepcopy(model), args=args, train_dataset=dataset,
                      processing_class=tokenizer, peft_config=peft_config)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        logs[name] = [h for h in trainer.state.log_history if "loss" in h]
        changed = [n for n, p in trainer.model.named_parameters()
                   if p.requires_grad and not torch.equal(p.detach(), before[n])]
        assert changed, name
    assert len(logs["fast"]) == 3
    for want, got in zip(logs["trl"], logs["fast"], strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                    "rewards/accuracies", "logps/chosen", "logps/rejected", "num_tokens"):
            assert got[key] == pytest.approx(want[key], abs=1e-4), key


def _norm_and_swiglu(lean: bool, x, w, g, u):
    if lean:
        return memory._RMSNormFunction.apply(x, w, 1e-6), memory._SiluMulFunction.apply(g, u)
    h32 = x.float()
    y = w * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    return y, torch.nn.functional.silu(g) * u


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_lean_functions_match_autograd(dtype, tol):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    w = (torch.rand(16) + 0.5).to(dtype).requires_grad_()
    g, u = (torch.randn(3, 5, 24, dtype=dtype, requires_grad=True) for _ in range(2))
    grad_y, grad_h = torch.randn(3, 5, 16, dtype=dtype), torch.randn(3, 5, 24, dtype=dtype)
    results = []
    for lean in (False, True):
        y, h = _norm_and_swiglu(lean, x, w, g, u)
        grads = torch.autograd.grad((y, h), (x, w, g, u), (grad_y, grad_h))
        results.append((y, h, *grads))
    # Same forward ops, so the outputs are identical; SwiGLU's backward is autograd's own (exact),
    # RMSNorm's differs only by rounding.
    (y0, h0, dx0, dw0, dg0, du0), (y1, h1, dx1, dw1, dg1, du1) = results
    assert torch.equal(y0, y1) and torch.equal(h0, h1)
    assert torch.equal(dg0, dg1) and torch.equal(du0, du1)
    for want, got in ((dx0, dx1), (dw0, dw1)):
        assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)


def test_bf16_base_with_fp32_lora_matches_fp32_within_bf16_rounding(dataset, tokenizer):
    """The CPU bf16 path: frozen bf16 base weights, fp32 LoRA weights (peft's adapter autocast),
    no autocast. Against the all-fp32 step on the same batch and the same LoRA init:
    - loss within 1e-3: the loss (~0.69) is a smooth function of logps whose relative error is
      bf16's unit roundoff (2^-9 ≈ 0.2 %) times a few layers; measured 1.3e-5;
    - each LoRA gradient within 10 % relative (L2) and cosine ≥ 0.99 with fp32's: gradients are
      products of bf16 activations, so a few % per tensor is expected (measured ≤ 5.1 %,
      cosine ≥ 0.9987); Adam normalises magnitudes, so the direction is what the update uses;
    - logps within 0.01 nats (measured 1.3e-3 on sums of ~18 tokens)."""
    model = tiny_model("llama")
    steps = {}
    for dtype in (torch.float32, torch.bfloat16):
        trainer = make_trainer(FastDPOTrainer, FastDPOConfig, model.to(dtype), dataset, tokenizer)
        params = dict(trainer.model.named_parameters())
        assert {p.dtype for n, p in params.items() if "lora_" in n} == {torch.float32}
        assert {p.dtype for n, p in params.items() if "base_layer" in n} == {dtype}
        loss = trainer.training_step(trainer.model, PairCollator()(examples(trainer)))
        steps[dtype] = (loss.item(), lora_grads(trainer), last_metrics(trainer))
    (loss32, grads32, m32), (loss16, grads16, m16) = steps[torch.float32], steps[torch.bfloat16]
    assert loss16 == pytest.approx(loss32, abs=1e-3)
    assert set(grads16) == set(grads32) and len(grads32) == 3 * 7 * 2
    for name, want in grads32.items():
        got = grads16[name]
        assert got.dtype == torch.float32, name
        assert ((got - want).norm() / want.norm()).item() < 0.10, name
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99
    for key in ("logps/chosen", "logps/rejected"):
        assert m16[key] == pytest.approx(m32[key], abs=0.01), key
    assert m16["rewards/accuracies"] == m32["rewards/accuracies"]
