from pathlib import Path

import pytest
import torch

from prefloop import models
from prefloop.errors import PrefloopError


def test_resolve_model_names():
    with pytest.raises(PrefloopError) as e:
        models.resolve_model("not-a-model")
    assert str(e.value) == (
        "model.name: unknown model 'not-a-model'; use an embedded model (smollm2-135m-instruct), "
        "a local folder, or a Hub id such as mistralai/Mistral-7B-Instruct-v0.2")
    assert models.resolve_model("mistralai/Mistral-7B-Instruct-v0.2") == (
        "mistralai/Mistral-7B-Instruct-v0.2")


def test_dtype_and_device_rules(monkeypatch):
    monkeypatch.setenv(models.CPU_BF16_ENV, "0")  # a CPU without bf16 units: today's fp32
    assert models.pick_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setenv(models.CPU_BF16_ENV, "1")
    assert models.pick_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert models.pick_dtype("float32", torch.device("cpu")) == torch.float32
    assert models.pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert models.pick_dtype("float16", torch.device("cpu")) == torch.float16
    if not torch.cuda.is_available():
        with pytest.raises(PrefloopError, match="model.device: 'cuda' asked for but CUDA"):
            models.pick_device("cuda")


def test_cpu_bf16_detector_reads_torchs_cpu_features(monkeypatch):
    """Without the override, the answer is torch's own feature detection: AMX tiles or
    AVX512-BF16, either one."""
    monkeypatch.delenv(models.CPU_BF16_ENV, raising=False)
    for amx, avx512_bf16, want in [(False, False, False), (True, False, True),
                                   (False, True, True)]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert models.cpu_bf16_native() is want
        assert models.pick_dtype("auto", torch.device("cpu")) == (
            torch.bfloat16 if want else torch.float32)


def test_dtype_record_says_what_was_chosen_and_why(monkeypatch):
    from prefloop.config import ModelConfig

    monkeypatch.setenv(models.CPU_BF16_ENV, "1")
    assert models.dtype_record(ModelConfig(device="cpu")) == {
        "dtype": "bfloat16", "dtype_why": "auto: this CPU has native bf16 units"}
    monkeypatch.setenv(models.CPU_BF16_ENV, "0")
    assert models.dtype_record(ModelConfig(device="cpu")) == {
        "dtype": "float32", "dtype_why": "auto: this CPU has no native bf16 units"}
    assert models.dtype_record(ModelConfig(device="cpu", dtype="bfloat16")) == {
        "dtype": "bfloat16", "dtype_why": "model.dtype"}


def test_hub_id_offline_names_what_works_offline():
    with pytest.raises(PrefloopError) as e:
        models.load_tokenizer("someorg/some-model-that-is-not-cached")
    msg = str(e.value)
    assert msg.startswith("model 'someorg/some-model-that-is-not-cached': cannot be loaded from "
                          "the Hugging Face Hub")
    assert "Works offline: the embedded smollm2-135m-instruct, a local folder" in msg


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFLOOP_CACHE_DIR", str(tmp_path))
    assert models.cache_dir() == tmp_path


@pytest.mark.slow
def test_embedded_model_conversion_matches_the_gguf():
    """The cached safetensors copy gives the same logits as transformers' GGUF loader."""
    from transformers import AutoModelForCausalLM

    model, tok = models.load_model("smollm2-135m-instruct")
    folder = models.resolve_model("smollm2-135m-instruct")
    assert sorted(p.name for p in Path(folder).iterdir()) == [
        "chat_template.jinja", "checksums.json", "config.json", "generation_config.json",
        "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    gguf = models.embedded_gguf_path("smollm2-135m-instruct")
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                               dtype=torch.float32).eval()
    ids = torch.tensor([tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert torch.equal(a, b)
    assert (model.dtype, model.device.type, models.context_length(model)) == (
        torch.float32, "cpu", 8192)
    assert (tok.eos_token, tok.pad_token_id) == ("<|im_end|>", 2)


def test_concurrent_first_uses_convert_the_embedded_model_once(tmp_path, monkeypatch):
    """A second caller that finds no converted model while the first converts waits for it."""
    import threading

    name = "smollm2-135m-instruct"
    monkeypatch.setenv("PREFLOOP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "embedded_gguf_path", lambda n: tmp_path / "x.gguf")
    second_looked, second_converts = threading.Event(), threading.Event()
    converted_by, real_converted = [], models.cache_is_intact

    def converted(target):
        if threading.current_thread().name == "second":
            second_looked.set()
        return real_converted(target)

    def fake_convert(gguf, out):
        converted_by.append(threading.current_thread().name)
        if threading.current_thread().name == "second":
            second_converts.set()
        else:  # hold the conversion open until the second found no model, and a second longer:
            assert second_looked.wait(timeout=30)  # time enough for it to start its own
            second_converts.wait(timeout=1)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"w")

    monkeypatch.setattr(models, "cache_is_intact", converted)
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    got = {}

    def use():
        got[threading.current_thread().name] = models.embedded_model_dir(name)

    first = threading.Thread(target=use, name="first")
    first.start()
    while not converted_by:  # the first holds the lock and converts
        assert first.is_alive()
        threading.Event().wait(0.01)
    second = threading.Thread(target=use, name="second")
    second.start()
    first.join(timeout=60)
    second.join(timeout=60)
    target = tmp_path / "cache" / "models" / name
    assert converted_by == ["first"] and got == {"first": target, "second": target}
    assert sorted(p.name for p in target.iterdir()) == ["checksums.json", "config.json",
                                                        "model.safetensors"]
