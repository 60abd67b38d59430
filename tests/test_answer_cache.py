"""The greedy-answer cache (prefloop.engine.cache): compare's original side and iterate's M1
answers are computed once per model, prompt and decoding, and reused by later runs."""

import os

import pytest
from tiny import one_thread, save_model_folder

from prefloop.config import ModelConfig
from prefloop.engine import Sampling
from prefloop.engine.backend import LocalBackend
from prefloop.engine.cache import CachedBackend, answer_cache
from prefloop.models import model_fingerprint

GREEDY = Sampling(temperature=0.0, max_new_tokens=6)


class Counting:
    """A real LocalBackend that records which prompts it was asked to generate."""

    def __init__(self, backend):
        self.backend, self.asked = backend, []
        self.name, self.tokenizer = backend.name, backend.tokenizer
        self.eos_ids, self.context_length = backend.eos_ids, backend.context_length

    def generate(self, prompts, n, sampling, **kwargs):
        self.asked.append([list(p) for p in prompts])
        return self.backend.generate(prompts, n, sampling, **kwargs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_model_folder(tmp_path_factory.mktemp("cache") / "model")


@pytest.fixture(scope="module")
def backend(folder):
    with one_thread():
        yield LocalBackend.load(ModelConfig(name=str(folder), device="cpu", dtype="float32"))


def texts(comps):
    return [[c.token_ids for c in group] for group in comps]


def test_cached_prompts_are_not_generated_again_and_answers_are_unchanged(backend, tmp_path):
    prompts = [[2, 7, 30, 41], [2, 7, 55], [2, 9, 12, 13, 60]]
    with one_thread():
        want = backend.generate(prompts, 1, GREEDY)
        first = Counting(backend)
        got = CachedBackend(first, tmp_path, "model-a").generate(prompts[:2], 1, GREEDY)
        assert texts(got) == texts(want[:2]) and first.asked == [prompts[:2]]
        second = Counting(backend)
        cached = CachedBackend(second, tmp_path, "model-a")
        done = []
        got = cached.generate(prompts, 2, GREEDY, on_prompt_done=lambda i, c: done.append(i))
    assert second.asked == [prompts[2:]]  # only the new prompt reached the model
    assert cached.hits == 2 and sorted(done) == [0, 1, 2]
    assert texts(got) == [[w[0].token_ids] * 2 for w in want]
    assert [c[0].finish_reason for c in got] == [c[0].finish_reason for c in want]
    assert len(list(tmp_path.glob("*.jsonl"))) == 1


def test_other_models_settings_and_sampling_are_never_served_from_the_cache(backend, tmp_path):
    prompts = [[2, 7, 30, 41]]
    with one_thread():
        CachedBackend(backend, tmp_path, "model-a").generate(prompts, 1, GREEDY)
        for fingerprint, sampling in [("model-b", GREEDY),  # another model
                                      ("model-a", Sampling(temperature=0.0, max_new_tokens=5)),
                                      ("model-a", Sampling(temperature=0.8, max_new_tokens=6))]:
            counting = Counting(backend)
            CachedBackend(counting, tmp_path, fingerprint).generate(prompts, 1, sampling)
            assert counting.asked == [prompts], (fingerprint, sampling)
    assert len(list(tmp_path.glob("*.jsonl"))) == 3  # sampled answers were not stored


def test_fingerprint_names_the_weights_dtype_and_device(folder, tmp_path):
    cfg = ModelConfig(name=str(folder), device="cpu", dtype="float32")
    first = model_fingerprint(cfg)
    assert first == model_fingerprint(cfg)  # stable across calls
    assert model_fingerprint(ModelConfig(name=str(folder), device="cpu",
                                         dtype="bfloat16")) != first
    weights = folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # rewritten weights
    assert model_fingerprint(cfg) != first
    assert model_fingerprint(ModelConfig(name="someorg/not-in-the-hf-cache")) is None


def test_answer_cache_wraps_local_models_only(backend, folder, monkeypatch, tmp_path):
    monkeypatch.setenv("PREFLOOP_CACHE_DIR", str(tmp_path))
    cfg = ModelConfig(name=str(folder), device="cpu", dtype="float32")
    wrapped = answer_cache(backend, cfg)
    assert isinstance(wrapped, CachedBackend) and wrapped.folder == tmp_path / "answers"
    server = Counting(backend)
    server.name = "openai:http://127.0.0.1:1/v1 model"
    assert answer_cache(server, cfg) is server
