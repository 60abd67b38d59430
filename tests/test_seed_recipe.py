"""The seed recipe (Mistral-7B-Instruct-v0.2) on a tiny random Mistral of the same architecture.

The Hub id is swapped for a local folder with `--set model.name=...`; everything else is the
seed recipe's own train section (gradient checkpointing on, batch 2 x 4 accumulation, ...).
"""

import importlib.util
import json

import pytest
import torch
from tiny import one_thread, read_jsonl_lines, save_model_folder, write_pairs

from prefloop.config import load_recipe
from prefloop.models import load_model
from prefloop.stages import train

MISTRAL_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture
def seed_run(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    model_dir = save_model_folder(tmp_path / "mistral", kind="mistral")
    write_pairs(tmp_path / "run")
    recipe = load_recipe("seed", [f"model.name={model_dir}", "train.max_steps=1"])
    with one_thread():
        yield recipe, model_dir, tmp_path / "run"


def test_seed_recipe_loads_the_mistral_architecture(seed_run):
    recipe, model_dir, _ = seed_run
    assert recipe.model.name == str(model_dir)
    model, tok = load_model(recipe.model)
    cfg = model.config
    assert type(model).__name__ == "MistralForCausalLM"
    assert (cfg.sliding_window, cfg.num_attention_heads, cfg.num_key_value_heads) == (None, 4, 2)
    assert cfg.rope_parameters["rope_theta"] == 1e6
    assert model.dtype == torch.float32  # dtype auto: fp32 on CPU
    assert tok.pad_token_id is not None


def train_keeping_trainer(recipe, run_dir):
    """Run the train stage; return (the trainer it built, the stage folder)."""
    seen = {}
    original = train.build_trainer

    def spy(*args, **kwargs):
        seen["trainer"] = original(*args, **kwargs)
        return seen["trainer"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "build_trainer", spy)
        out = train.run(recipe, run_dir)
    return seen["trainer"], out


def test_seed_train_section_trains_with_lora_on_every_linear_layer(seed_run):
    recipe, _, run_dir = seed_run
    t = recipe.train
    assert (t.gradient_checkpointing, t.batch_size, t.grad_accum, t.epochs, t.max_length) == (
        True, 2, 4, 3.0, 1536)
    trainer, out = train_keeping_trainer(recipe, run_dir)
    args = trainer.args
    assert (args.gradient_checkpointing, args.bf16, args.fp16, args.use_cpu) == (
        True, False, False, True)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 4)
    # parameter names end in <layer>.lora_A.default.weight
    targeted = sorted({n.split(".")[-4] for n, _ in trainer.model.named_parameters()
                       if ".lora_A." in n})
    assert targeted == MISTRAL_LINEAR
    for layer in range(2):
        for name in MISTRAL_LINEAR:
            group = "mlp" if name in ("down_proj", "gate_proj", "up_proj") else "self_attn"
            assert any(f"layers.{layer}.{group}.{name}.lora_A" in n
                       for n, _ in trainer.model.named_parameters()), (layer, name)
    assert not any("lm_head.lora" in n for n, _ in trainer.model.named_parameters())
    m = json.loads((out / "manifest.json").read_text())
    assert m["lora"] == {"targets": MISTRAL_LINEAR, "modules": 14, "trainable_params":
                         m["lora"]["trainable_params"]}
    assert m["step0_check"]["reference_is_base_step0"] is True
    log = read_jsonl_lines(out / "log.jsonl")
    assert [r["step"] for r in log] == [1]
    assert abs(log[0]["rewards/margins"]) < 1e-6  # step 1 is computed before any update


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes is not installed (pip install 'prefloop[qlora]')")
def test_seed_recipe_qlora_on_cuda(seed_run):
    """4-bit NF4 base + bf16 LoRA on every Mistral linear layer, gradient checkpointing on."""
    import bitsandbytes as bnb

    recipe, _, run_dir = seed_run
    from prefloop.config import apply_overrides

    recipe = apply_overrides(recipe, ["train.qlora=true", "train.max_steps=2",
                                      "train.grad_accum=1", "train.warmup_ratio=0.0",
                                      "train.learning_rate=0.01"])
    trainer, out = train_keeping_trainer(recipe, run_dir)
    assert (trainer.args.bf16, trainer.args.gradient_checkpointing) == (True, True)
    assert trainer.ref_model is None
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    assert n4 == 14  # every linear layer of the 2 blocks; lm_head stays unquantized
    assert {p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad} == {
        torch.bfloat16}
    m = json.loads((out / "manifest.json").read_text())
    assert m["lora"]["targets"] == MISTRAL_LINEAR and m["lora"]["modules"] == 14
    log = read_jsonl_lines(out / "log.jsonl")
    assert abs(log[0]["rewards/margins"]) < 1e-6 and abs(log[1]["rewards/margins"]) > 0
    assert (out / "adapter" / "adapter_model.safetensors").exists()
