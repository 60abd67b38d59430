"""The train stage: DPO + LoRA through TRL on a tiny random Llama, CPU only."""

import inspect
import json
import re
import sys
import types

import pytest
import torch
import yaml
from tiny import PAIRS, one_thread, read_jsonl_lines, save_model_folder, write_pairs

from prefloop.cards import adapter_card
from prefloop.config import Recipe, apply_overrides
from prefloop.errors import PrefloopError
from prefloop.stages import train

STEPS = 2


def _recipe(model_dir, *extra):
    return apply_overrides(Recipe(), [f"model.name={model_dir}", f"train.max_steps={STEPS}",
                                      "train.batch_size=2", "train.learning_rate=0.01",
                                      "train.warmup_ratio=0.0", *extra])


def run_capturing(recipe, run_dir, **kw):
    """train.run, keeping the trainer it builds and the LoRA weights it started from."""
    seen = {}
    original = train.build_trainer

    def spy(*args, **kwargs):
        trainer = original(*args, **kwargs)
        seen["trainer"] = trainer
        seen["lora0"] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()
                         if "lora_" in k}
        return trainer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "build_trainer", spy)
        out = train.run(recipe, run_dir, **kw)
    return out, seen


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("train")
    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf-datasets")
        model_dir = save_model_folder(root / "model")
        run_dir = root / "run"
        write_pairs(run_dir)
        recipe = _recipe(model_dir)
        out, seen = run_capturing(recipe, run_dir)
    return {"root": root, "model_dir": model_dir, "run_dir": run_dir, "out": out,
            "recipe": recipe, **seen}


@pytest.fixture(autouse=True)
def _datasets_cache_and_one_thread(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    with one_thread():
        yield


def test_lora_changes_base_does_not_and_adapter_reloads(trained):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = trained["trainer"].model
    state = model.state_dict()
    lora0 = trained["lora0"]
    assert sorted(k for k in state if "lora_" in k) == sorted(lora0)
    assert len(lora0) == 2 * 2 * 7  # A and B, 2 layers, 7 linear layers each
    changed = [k for k in lora0 if not torch.equal(lora0[k], state[k])]
    assert sorted(changed) == sorted(lora0)  # every A and B moved
    base = load_file(trained["model_dir"] / "model.safetensors")
    for key, value in state.items():
        if "lora_" in key:
            continue
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert torch.equal(value, base[name]), name

    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(trained["model_dir"]),
        trained["out"] / "adapter").eval()
    model.eval()
    ids = torch.tensor([[2, 4, 50, 7, 54, 51, 52, 9, 53, 3, 5, 40, 41]])
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - plain).abs().max() > 1e-4  # the adapter does change the output


def test_reference_is_the_base_with_adapter_disabled(trained):
    from peft import PeftModel
    from safetensors.torch import load_file

    trainer = trained["trainer"]
    assert trainer.ref_model is None
    assert isinstance(trainer.model, PeftModel)
    n_base = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" not in n)
    n_folder = sum(p.numel() for p in
                   load_file(trained["model_dir"] / "model.safetensors").values())
    assert n_base == n_folder  # one copy of the base weights, no reference copy
    log = read_jsonl_lines(trained["out"] / "log.jsonl")
    assert abs(log[0]["rewards/chosen"]) < 1e-6 and abs(log[0]["rewards/rejected"]) < 1e-6
    assert log[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # -log σ(0)
    assert abs(log[1]["rewards/margins"]) > 0  # after one update the policy moved
    m = json.loads((trained["out"] / "manifest.json").read_text())
    check = m["step0_check"]
    assert check["same_tokens"] is True
    # TRL's reference scores the first pair as the base model did before any adapter existed,
    # at step 0 and after training
    assert check["reference_is_base_step0"] is True and check["reference_is_base_end"] is True
    assert check["reference_logps_step0"] == pytest.approx(check["base_logps"], abs=1e-3)
    assert check["reference_logps_end"] == pytest.approx(check["base_logps"], abs=1e-3)
    assert check["first_logged_step"]["step"] == 1


def test_reference_check_fails_for_a_reference_that_moved(trained):
    """The check can fail: the trained policy (what a reference that followed the policy would
    be) no longer scores the first pair as the base did."""
    trainer = trained["trainer"]
    m = json.loads((trained["out"] / "manifest.json").read_text())
    base = m["step0_check"]["base_logps"]
    pairs = train.load_pairs(trained["run_dir"])
    ids = train.rendered_pair_ids(pairs[0], trainer.processing_class)
    moved = train.model_logps(trainer.model, ids)  # adapter on: the policy after training
    assert train.reference_check(base, moved, torch.float32, "end")[
        "reference_is_base_end"] is False
    assert train.reference_check(base, base, torch.float32, "end")["reference_is_base_end"]
    assert m["reference"] == "base model with the LoRA adapter disabled (no second copy)"


def test_log_curves_manifest_and_settings(trained):
    out = trained["out"]
    log = read_jsonl_lines(out / "log.jsonl")
    assert len(log) == 2
    assert all(set(r) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                          "rewards/accuracies", "learning_rate", "step", "epoch"} for r in log)
    assert [r["step"] for r in log] == [1, 2]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
        "recipe.yaml", "tokenizer.json", "tokenizer_config.json"]
    assert not (out / "trainer").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "done"
    assert m["counts"] == {"pairs": 6, "pairs_trained": 6, "eval_pairs": 0, "steps": 2,
                           "log_lines": 2}
    assert m["eval"] is None and m["resumed_from_step"] is None
    assert m["lora"]["targets"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                    "up_proj", "v_proj"]
    assert m["lora"]["modules"] == 14
    # r (in + out) per linear: q, o 32->32; k, v 32->16; gate, up 32->64; down 64->32
    per_layer = 16 * (2 * 64 + 2 * 48 + 3 * 96)
    assert m["lora"]["trainable_params"] == 2 * per_layer == 16384
    assert set(m["timing"]) == {"train_seconds", "steps", "seconds_per_step", "tokens",
                                "tokens_per_second", "pairs_per_second", "device"}
    assert m["timing"]["tokens"] > 0 and m["timing"]["device"] == "cpu"
    args = trained["trainer"].args
    assert (args.bf16, args.fp16, args.use_cpu, args.gradient_checkpointing) == (
        False, False, True, False)
    assert (args.beta, args.loss_type, args.learning_rate, args.max_length) == (
        0.1, ["sigmoid"], 0.01, 1024)
    assert (args.report_to, args.save_strategy, args.save_steps, args.disable_dropout,
            args.seed, args.eval_strategy) == ([], "steps", 10, True, 0, "no")
    assert args.lr_scheduler_type == "cosine"
    lora = trained["trainer"].model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 32, 0.05)


def test_adapter_card_fields(trained):
    text = (trained["out"] / "adapter" / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta == {"library_name": "peft", "tags": ["dpo", "lora", "trl", "prefloop"]}
    assert f"- Base model: {trained['model_dir']}" in body
    assert "- Dataset: local (pairs/dataset)" in body
    assert "DATASET_LINK" not in text
    for key in ("loss_type", "beta", "learning_rate", "epochs", "max_steps", "batch_size",
                "grad_accum", "warmup_ratio", "scheduler", "max_length", "lora_r", "lora_alpha",
                "lora_dropout", "target_modules", "gradient_checkpointing", "qlora", "precision",
                "seed"):
        assert re.search(rf"^\| {re.escape(key)} \| .+ \|$", body, re.M), key
    assert "| learning_rate | 0.01 |" in body and "| precision | fp32 |" in body
    log = read_jsonl_lines(trained["out"] / "log.jsonl")
    loss_mean = (log[0]["loss"] + log[1]["loss"]) / 2
    assert f"| loss | {log[1]['loss']:.6g} / {loss_mean:.6g} |" in body
    assert "mean of the last 2 logged steps" in body
    adapter = trained["out"] / "adapter"
    assert f'model, tokenizer = prefloop.load_model("{adapter}")' in body
    assert f'AutoPeftModelForCausalLM.from_pretrained("{adapter}")' in body
    assert f"(base model: `{trained['model_dir']}`)" in body
    assert "prefloop run --recipe recipe.yaml --output-dir runs/default" in body
    assert "in a copy of its source tree, run `pip install -e .`" in body
    assert "pip install prefloop" not in body and "repository URL>" not in body
    assert "max_steps: 2" in body  # the resolved recipe is embedded
    assert "not on held-out pairs (train.eval_fraction was 0)" in body


def test_adapter_card_with_hub_ids(tmp_path):
    recipe = apply_overrides(Recipe(), ["model.name=mistralai/Mistral-7B-Instruct-v0.2",
                                        "push.adapter_repo_id=me/adapter"])
    text = adapter_card(recipe, tmp_path, hyper={"beta": 0.1}, final={"loss": 0.5}, last_n=1,
                        mean_last={"loss": 0.5}, dataset_repo_id="me/pairs",
                        timing={"train_seconds": 1.0})
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta == {"base_model": "mistralai/Mistral-7B-Instruct-v0.2", "library_name": "peft",
                    "tags": ["dpo", "lora", "trl", "prefloop"], "datasets": ["me/pairs"]}
    assert f"- Dataset: me/pairs on the Hub (local copy: {tmp_path / 'pairs' / 'dataset'})" in text
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/adapter")' in text
    embedded = adapter_card(Recipe(), tmp_path, hyper={}, final={}, last_n=0, mean_last={},
                            dataset_repo_id=None, timing={})
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in embedded
    assert "Trained on prefloop's embedded copy of HuggingFaceTB/SmolLM2-135M-Instruct" in embedded
    # the dataset repo the recipe will push to is named before the push happens
    planned = apply_overrides(Recipe(), ["push.dataset_repo_id=me/planned"])
    meta = yaml.safe_load(adapter_card(planned, tmp_path, hyper={}, final={}, last_n=0,
                                       mean_last={}, dataset_repo_id=None, timing={})
                          .split("---\n")[1])
    assert meta["datasets"] == ["me/planned"]


def test_adapter_card_yaml_parses_with_huggingface_hub(trained, tmp_path):
    from huggingface_hub import ModelCard

    card = ModelCard.load(trained["out"] / "adapter" / "README.md")
    assert card.data.to_dict() == {"library_name": "peft",
                                   "tags": ["dpo", "lora", "trl", "prefloop"]}
    recipe = apply_overrides(Recipe(), ["push.dataset_repo_id=me/pairs"])
    hub = ModelCard(adapter_card(recipe, tmp_path, hyper={}, final={}, last_n=0, mean_last={},
                                 dataset_repo_id=None, timing={}))
    assert (hub.data.base_model, hub.data.datasets, hub.data.library_name) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", ["me/pairs"], "peft")


def test_adapter_config_names_a_resolvable_base_and_load_model_applies_it(trained, tmp_path):
    """adapter_config.json names the model as the recipe did (here a folder), never the cache;
    prefloop.load_model gives the trained policy from the run directory or the adapter folder."""
    import shutil

    import prefloop

    adapter = trained["out"] / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(trained["model_dir"])
    ids = torch.tensor([[2, 4, 50, 7, 54, 51, 52, 9, 53, 3, 5, 40, 41]])
    policy = trained["trainer"].model.eval()
    with torch.no_grad():
        want = policy(input_ids=ids).logits
        for where in (trained["run_dir"], adapter):
            model, tok = prefloop.load_model(where)
            assert type(model).__name__ == "PeftModelForCausalLM" and not model.training
            torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=0)
        # an adapter folder without prefloop's recipe.yaml: its adapter_config names the base
        bare = shutil.copytree(adapter, tmp_path / "bare")
        (bare / "recipe.yaml").unlink()
        model, _ = prefloop.load_model(bare)
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=0)
        base, _ = prefloop.load_model(str(trained["model_dir"]))  # a plain model, no adapter
        assert type(base).__name__ == "LlamaForCausalLM"


def test_an_embedded_models_adapter_names_its_hub_source_and_loads_the_embedded_copy(tmp_path):
    from prefloop.models import adapter_base

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    train.portable_adapter_config(tmp_path, Recipe())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config == {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "r": 4}
    assert adapter_base(tmp_path).name == "smollm2-135m-instruct"  # from recipe.yaml
    (tmp_path / "recipe.yaml").unlink()
    assert adapter_base(tmp_path).name == "smollm2-135m-instruct"  # from the Hub id
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(PrefloopError, match="names no base model"):
        adapter_base(tmp_path)


def test_finished_stage_is_skipped(trained):
    before = (trained["out"] / "manifest.json").read_text()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "build_trainer", lambda *a, **k: pytest.fail("retrained"))
        assert train.run(trained["recipe"], trained["run_dir"]) == trained["out"]
    assert (trained["out"] / "manifest.json").read_text() == before


def test_empty_dataset_is_refused(tmp_path):
    model_dir = save_model_folder(tmp_path / "model")
    write_pairs(tmp_path / "run", rows=[])
    with pytest.raises(PrefloopError) as e:
        train.run(_recipe(model_dir), tmp_path / "run")
    assert str(e.value) == (
        f"{tmp_path / 'run' / 'pairs' / 'dataset'}: the pairs dataset has no rows; give more "
        "instructions, lower pairs.min_margin, or raise generate.k, then re-run prefloop pairs")


def test_missing_pairs_stage_names_the_command(tmp_path):
    with pytest.raises(PrefloopError, match=r"stage 'pairs' has not finished; run `prefloop "
                                            r"pairs` --output-dir"):
        train.run(Recipe(), tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_qlora_on_cpu_is_refused(tmp_path):
    write_pairs(tmp_path / "run")
    with pytest.raises(PrefloopError) as e:
        train.run(apply_overrides(Recipe(), ["train.qlora=true"]), tmp_path / "run")
    assert str(e.value) == ("train.qlora: QLoRA (4-bit bitsandbytes base) needs a CUDA GPU; set "
                            "train.qlora=false on this machine")
    assert not (tmp_path / "run" / "train").exists()  # refused before the stage began


def test_option_errors_are_one_line():
    with pytest.raises(PrefloopError) as e:
        train.parse_loss_types("kto_pair")
    assert str(e.value) == ("train.loss_type: unknown loss kto_pair; use one of "
                            + ", ".join(train.TRL_LOSS_TYPES) + " (comma-separated to mix)")
    assert train.parse_loss_types("sigmoid, sft") == ["sigmoid", "sft"]
    with pytest.raises(PrefloopError, match="train.target_modules: LoRA on lm_head is not"):
        train.parse_target_modules("q_proj,lm_head")
    assert train.parse_target_modules("q_proj, v_proj") == ["q_proj", "v_proj"]
    cfg = apply_overrides(Recipe(), ["train.scheduler=wavy"]).train
    with pytest.raises(PrefloopError, match="train.scheduler: unknown scheduler 'wavy'; use one "
                                            "of linear, cosine"):
        train.check_options(cfg, torch.device("cpu"))


def test_loss_list_matches_trl():
    from trl import DPOTrainer

    src = inspect.getsource(DPOTrainer._compute_loss)
    assert set(re.findall(r'loss_type == "(\w+)"', src)) == set(train.TRL_LOSS_TYPES)


def test_fast_engine_is_imported_only_when_asked(monkeypatch):
    from trl import DPOTrainer

    monkeypatch.delitem(sys.modules, "prefloop.dpo", raising=False)
    assert train.trainer_class("trl") is DPOTrainer
    assert "prefloop.dpo" not in sys.modules
    fake = types.ModuleType("prefloop.dpo")
    fake.FastDPOTrainer = type("FastDPOTrainer", (), {})
    monkeypatch.setitem(sys.modules, "prefloop.dpo", fake)
    assert train.trainer_class("fast") is fake.FastDPOTrainer


def test_fast_settings_from_the_recipe_reach_the_trainer(tmp_path, monkeypatch, trained):
    from dataclasses import fields

    from trl import DPOConfig

    from prefloop.dpo import FastDPOConfig, FastDPOTrainer

    # TrainConfig's fast_* keys are FastDPOConfig's own fields, with the same defaults.
    defaults = {f.name: f.default for f in fields(FastDPOConfig) if f.name.startswith("fast_")}
    assert train.fast_settings(Recipe().train) == defaults
    assert type(trained["trainer"].args) is DPOConfig  # engine trl: TRL's config, no fast_* keys

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = save_model_folder(tmp_path / "model")
    write_pairs(tmp_path / "run")
    recipe = _recipe(model_dir, "train.engine=fast", "train.fast_activation_budget_gb=0.25",
                     "train.fast_min_chunk_tokens=1024", "train.fast_lean_activations=false")
    _, seen = run_capturing(recipe, tmp_path / "run")
    trainer = seen["trainer"]
    assert isinstance(trainer, FastDPOTrainer) and trainer.fast_fallback_reason is None
    assert isinstance(trainer.args, FastDPOConfig)
    assert (trainer.args.fast_activation_budget_gb, trainer.args.fast_min_chunk_tokens,
            trainer.args.fast_lean_activations) == (0.25, 1024, False)


@pytest.mark.parametrize("setting,message", [
    ("train.fast_min_chunk_tokens=0", "--set: train.fast_min_chunk_tokens: must be > 0, got 0"),
    ("train.fast_activation_budget_gb=-1",
     "--set: train.fast_activation_budget_gb: must be >= 0, got -1.0"),
    ("train.fast_lean_activations=sometimes",
     "--set: train.fast_lean_activations: expected true or false, got 'sometimes'"),
])
def test_invalid_fast_setting_is_one_clear_line(setting, message):
    with pytest.raises(PrefloopError) as e:
        apply_overrides(Recipe(), [setting])
    assert str(e.value) == message


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_trains_in_bf16_and_the_adapter_reloads(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = save_model_folder(tmp_path / "model")
    write_pairs(tmp_path / "run")
    out, seen = run_capturing(_recipe(model_dir), tmp_path / "run")
    trainer = seen["trainer"]
    args = trainer.args
    assert (args.bf16, args.fp16, args.use_cpu, args.gradient_checkpointing) == (
        True, False, False, False)
    model = trainer.model.eval()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert next(model.parameters()).device.type == "cuda"
    log = read_jsonl_lines(out / "log.jsonl")
    assert abs(log[0]["rewards/chosen"]) < 1e-6 and abs(log[1]["rewards/margins"]) > 0
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda(),
        out / "adapter").eval()
    ids = torch.tensor([[2, 4, 50, 7, 54, 51, 52, 9, 53, 3, 5, 40, 41]], device="cuda")
    # accelerate wrapped the trained model's forward in bf16 autocast + fp32 outputs; run the
    # reloaded copy the same way
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a = model(input_ids=ids).logits.float()
        b = reloaded(input_ids=ids).logits.float()
        with model.disable_adapter():
            plain = model(input_ids=ids).logits.float()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - plain).abs().max() > 1e-4
    m = json.loads((out / "manifest.json").read_text())
    assert m["timing"]["device"] == "cuda" and m["step0_check"]["reference_is_base_step0"]


def test_step0_ids_fallback_matches_trl_tokenisation(trained):
    """A trainer without TRL's id columns gets the same ids from the chat template."""
    trainer = trained["trainer"]
    pairs = train.load_pairs(trained["run_dir"])
    trl_ids = train.first_pair_ids(trainer.train_dataset, pairs, trainer.processing_class)
    ours = train.first_pair_ids([{"prompt": None}], pairs, trainer.processing_class)
    assert ours == trl_ids
    assert trl_ids["prompt_ids"] == [2, 4, 50, 7, 54, 51, 52, 9, 53, 3, 5]  # ... <|assistant|>
    assert trl_ids["chosen_ids"] == [9, 53, 10, 95, 16, 9, 72, 10, 78, 111, 3]  # ... . </s>


def test_pairs_are_read_from_their_own_folder_not_a_cache(tmp_path):
    """Two run directories with the same dataset card but other rows (a copied run whose pairs
    were redone): each trains on its own rows, read from its own parquet file."""
    import shutil

    from prefloop.stages import pairs as pairs_stage

    first = tmp_path / "a"
    write_pairs(first)
    assert train.load_pairs(first)[0]["chosen"][0]["content"] == PAIRS[0][1]
    second = tmp_path / "b"
    shutil.copytree(first, second)
    assert train.load_pairs(second)[0]["chosen"][0]["content"] == PAIRS[0][1]  # a true copy
    rows = [dict(r) for r in pairs_stage.read_dataset(second / "pairs" / "dataset")]
    for r in rows:
        r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
    pairs_stage.write_dataset(rows, second / "pairs" / "dataset")
    assert train.load_pairs(second)[0]["chosen"][0]["content"] == PAIRS[0][2]
    assert train.load_pairs(first)[0]["chosen"][0]["content"] == PAIRS[0][1]


@pytest.mark.parametrize("engine", ["trl", "fast"])
def test_eval_split_metrics_in_log_manifest_line_and_curves(tmp_path, engine):
    """2 of the 6 pairs held out: scored at every step, the end's metrics in the manifest and
    the stage line, which names the training-batch accuracy as such."""
    from prefloop.summary import stage_line

    model_dir = save_model_folder(tmp_path / "model")
    run_dir = tmp_path / "run"
    write_pairs(run_dir)
    recipe = _recipe(model_dir, "train.eval_fraction=0.34", "train.eval_steps=1",
                     f"train.engine={engine}")
    out, seen = run_capturing(recipe, run_dir)
    log = read_jsonl_lines(out / "log.jsonl")
    assert [(r["step"], "eval_loss" in r) for r in log] == [(1, False), (1, True), (2, False),
                                                          (2, True)]
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"] == {"pairs": 6, "pairs_trained": 4, "eval_pairs": 2, "steps": 2,
                           "log_lines": 4}
    assert m["eval"] == {k: log[-1][k] for k in train.EVAL_KEYS}
    assert len(seen["trainer"].eval_dataset) == 2
    trained_prompts = {r["prompt"][-1]["content"] for r in seen["trainer"].train_dataset}
    held = {r["prompt"][-1]["content"] for r in seen["trainer"].eval_dataset}
    assert len(trained_prompts) == 4 and not trained_prompts & held
    line = stage_line("train", out, 1.0)
    acc, margin = m["eval"]["eval_rewards/accuracies"], m["eval"]["eval_rewards/margins"]
    assert "on the last training batch" in line
    assert f"; on 2 held-out pairs: reward accuracy {acc:.2f}, margin {margin:.3f}" in line
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "adapter" / "README.md").read_text()
    assert f"| rewards/accuracies | {acc:.6g} |" in card.split("## Held-out pairs")[1]


def test_eval_fraction_that_leaves_nothing_to_train_is_refused():
    from datasets import Dataset

    pairs = Dataset.from_list([{"prompt": str(i)} for i in range(3)])
    cfg = apply_overrides(Recipe(), ["train.eval_fraction=0.9"]).train
    with pytest.raises(PrefloopError, match=r"train.eval_fraction: 0.9 of 3 pair\(s\) leaves none"):
        train.split_pairs(pairs, cfg)
    assert train.split_pairs(pairs, Recipe().train) == (pairs, None)


def test_epoch_marks_fall_between_the_epochs_logged_steps():
    log = [{"step": s, "epoch": e} for s, e in [(1, 0.5), (2, 1.0), (3, 1.5), (4, 2.0), (5, 2.5)]]
    assert train.epoch_starts(log) == [2.5, 4.5]
    assert train.epoch_starts(log[:2]) == []


def test_report_to_is_checked_against_transformers_trackers(monkeypatch):
    from transformers.integrations import integration_utils

    assert train.parse_report_to("none") == [] and train.parse_report_to("") == []
    with pytest.raises(PrefloopError, match="train.report_to: unknown tracker tensorbord; use "
                                            "none or some of .*tensorboard"):
        train.parse_report_to("tensorbord")
    monkeypatch.setattr(integration_utils, "get_available_reporting_integrations",
                        lambda: ["tensorboard"])
    assert train.parse_report_to("tensorboard") == ["tensorboard"]
    with pytest.raises(PrefloopError, match="train.report_to: wandb is not installed; pip "
                                            "install wandb"):
        train.parse_report_to("tensorboard,wandb")


def test_trl_names_are_aliases_of_the_recipe_keys():
    r = apply_overrides(Recipe(), ["train.gradient_accumulation_steps=4",
                                   "train.per_device_train_batch_size=3",
                                   "train.num_train_epochs=2", "train.learning_rate=1e-4",
                                   "train.lr_scheduler_type=linear"])
    t = r.train
    assert (t.grad_accum, t.batch_size, t.epochs, t.learning_rate, t.scheduler) == (
        4, 3, 2.0, 1e-4, "linear")
    with pytest.raises(PrefloopError, match="--set: train: 'gradient_accumulation_steps' and 'grad_accum' name "
                                            "the same setting; keep one"):
        apply_overrides(Recipe(), ["train.grad_accum=2", "train.gradient_accumulation_steps=4"])


def test_unhashed_settings_leave_the_stage_hash_alone():
    up = lambda stage: "up"  # noqa: E731
    base = train.stage_config(Recipe(), up)
    same = apply_overrides(Recipe(), ["train.save_steps=0", "train.report_to=tensorboard",
                                      "train.eval_steps=3"])
    assert train.stage_config(same, up) == base
    split = apply_overrides(Recipe(), ["train.eval_fraction=0.1"])
    assert train.stage_config(split, up)["train"]["eval_fraction"] == 0.1
