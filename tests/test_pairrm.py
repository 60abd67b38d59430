"""Parity of the native PairRM with llm-blender 0.0.2 on a tiny random model (fp32, CPU).

Fixtures: tests/fixtures/pairrm, recorded by scripts/make_pairrm_fixtures.py in a transformers-4
venv (the reference cannot run on v5). Design: docs/pairrm.md §7.
"""

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors.torch import load_file
from tokenizers import Tokenizer

from prefloop.rankers import pairrm as pairrm_module
from prefloop.rankers.pairrm import (
    CANDIDATE_MARKER,
    MARKERS,
    PAIRRM_MAX_CANDIDATE_TOKENS,
    PAIRRM_REVISION,
    PairRM,
    PairRMTokenizer,
    PairRMUnavailable,
    backbone_config,
    build_modules,
    build_pair,
    expected_tensor_count,
)

FIXTURES = Path(__file__).parent / "fixtures" / "pairrm"
REF = json.loads((FIXTURES / "reference_outputs.json").read_text(encoding="utf-8"))
TINY = json.loads((FIXTURES / "backbone_config.json").read_text())
ATOL = 1e-5


@pytest.fixture(scope="module")
def model() -> PairRM:
    return PairRM.load(str(FIXTURES), backbone_overrides=TINY, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def ranked(model) -> dict:
    """Our rank() of the fixture inputs, per-example budget and llm-blender's batch budget."""
    return {
        "rank_bs1": model.rank(REF["inputs"], REF["candidates"]),
        "rank_all": model.rank(REF["inputs"], REF["candidates"], reference_batch_size=6),
    }


# -- loader --------------------------------------------------------------------------------------


def test_loader_is_strict_on_every_key_and_shape():
    tensors = load_file(str(FIXTURES / "model.safetensors"))
    config = backbone_config(TINY)
    assert len(tensors) == expected_tensor_count(config) == 42
    build_modules(config, tensors)  # loads
    missing = {k: v for k, v in tensors.items() if k != "head_layer.4.bias"}
    with pytest.raises(ValueError, match=r"missing \['head_layer.4.bias'\]"):
        build_modules(config, missing)
    extra = tensors | {"pretrained_model.embeddings.position_ids": torch.arange(512)}
    with pytest.raises(ValueError, match="unexpected"):
        build_modules(config, extra)
    wrong = tensors | {"head_layer.1.bias": torch.zeros(33)}
    with pytest.raises(ValueError, match="shape mismatch"):
        build_modules(config, wrong)


def test_loaded_weights_equal_the_file(model):
    tensors = load_file(str(FIXTURES / "model.safetensors"))
    assert torch.equal(model.head.dense.weight, tensors["head_layer.1.weight"])
    assert torch.equal(model.head.out.bias, tensors["head_layer.4.bias"])
    word = model.backbone.embeddings.word_embeddings.weight
    assert torch.equal(word, tensors["pretrained_model.embeddings.word_embeddings.weight"])
    assert model.backbone.embeddings.position_ids[0, :3].tolist() == [0, 1, 2]
    assert (model.source_max_tokens, model.candidate_max_tokens) == (64, 24)


def test_real_pairrm_shape_has_394_tensors_and_436m_parameters():
    config = backbone_config()
    with torch.device("meta"):
        backbone, head = build_modules(config)
    keys = backbone.state_dict()
    assert len(keys) + 4 == expected_tensor_count(config) == 394
    assert keys["embeddings.word_embeddings.weight"].shape == (128005, 1024)
    assert keys["encoder.rel_embeddings.weight"].shape == (512, 1024)
    assert sum(p.numel() for p in backbone.parameters()) == 433_914_880
    assert sum(p.numel() for p in head.parameters()) == 2_099_201


# -- tokenizer -------------------------------------------------------------------------------------


def test_special_and_marker_ids(model):
    tok, ids = model.tokenizer, REF["special_ids"]
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.unk_id) == (0, 1, 2, 3)
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.unk_id) == tuple(
        ids[k] for k in ("pad", "cls", "sep", "unk")
    )
    assert (tok.source_id, tok.left_id, tok.right_id, tok.candidate_id) == (201, 202, 203, 204)
    assert tok.candidate_id == ids["candidate"] and tok.left_id == ids["candidate1"]


def test_fixture_tokenizer_has_the_nfkc_normaliser_and_loads_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok = PairRMTokenizer.from_file(FIXTURES / "tokenizer.json")
    assert tok.vocab_size == 205


def test_tokenizer_without_markers_is_rejected():
    data = json.loads((FIXTURES / "tokenizer.json").read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in MARKERS]
    with pytest.raises(ValueError, match="missing PairRM markers"):
        PairRMTokenizer(Tokenizer.from_str(json.dumps(data)))


@pytest.mark.parametrize("text", sorted(REF["tokens"]))
def test_tokenizer_ids_equal_the_reference(model, text):
    tok = model.tokenizer
    assert [tok.cls_id, *tok.encode(text), tok.sep_id] == REF["tokens"][text]


def test_plain_v5_auto_tokenizer_differs_on_nfkc_text():
    from transformers import AutoTokenizer

    v5 = AutoTokenizer.from_pretrained(str(FIXTURES))
    for text in ("hello…", "ﬁne"):
        assert v5.encode(text) != REF["tokens"][text], text
    assert v5.encode("Tell me a joke.") == REF["tokens"]["Tell me a joke."]


def test_sep_text_becomes_a_space_and_markers_in_text_become_unk(model):
    tok = model.tokenizer
    seg = tok.segment(CANDIDATE_MARKER, "a [SEP] b", 100)
    assert seg == tok.segment(CANDIDATE_MARKER, "a b", 100)  # spaces collapse in the normaliser
    assert seg.count(tok.sep_id) == 1 and seg[-1] == tok.sep_id
    seg = tok.segment(CANDIDATE_MARKER, "x <|source|> y <|candidate2|>", 100)
    assert seg[:2] == [1, 204] and tok.unk_id in seg
    assert not set(seg[2:]) & {201, 202, 203, 204}


def test_count_candidate_tokens(model):
    # [CLS] <|candidate|> + the text's ids + [SEP]
    assert (
        model.count_candidate_tokens("Tell me a joke.") == len(REF["tokens"]["Tell me a joke."]) + 1
    )
    assert PAIRRM_MAX_CANDIDATE_TOKENS == 412


# -- inputs, matrix, scores, ranks ---------------------------------------------------------------


@pytest.mark.parametrize(("key", "reference_batch_size"), [("rank_bs1", None), ("rank_all", 6)])
def test_concatenated_ids_equal_the_reference(model, key, reference_batch_size):
    recorded = REF[key]
    segments = model._segments(REF["inputs"], REF["candidates"], reference_batch_size)
    for p, (source, cands) in enumerate(segments):
        for k, (i, j) in enumerate(recorded["pair_order"]):
            pair = build_pair(source, cands[i], cands[j], model.tokenizer)
            assert list(pair.ids) == recorded["pair_ids"][p][k], (p, i, j)
            assert pair.ids[1] == 201 and pair.ids[pair.left_pos] == 202
            assert pair.ids[pair.right_pos] == 203


@pytest.mark.parametrize("key", ["rank_bs1", "rank_all"])
def test_matrix_scores_and_ranks_equal_the_reference(ranked, key):
    recorded = REF[key]
    for p, result in enumerate(ranked[key]):
        assert result.matrix.dtype == np.float32 and result.matrix.shape == (3, 3)
        np.testing.assert_allclose(result.matrix, recorded["matrix"][p], rtol=0, atol=ATOL)
        np.testing.assert_allclose(result.scores, recorded["scores"][p], rtol=0, atol=ATOL)
        assert result.ranks == recorded["ranks"][p], p


def test_fixture_shows_the_batch_quirk_and_our_default_ignores_batching(model, ranked):
    # The reference ranks prompt 0 differently alone and batched with the long prompt 1.
    assert REF["rank_bs1"]["ranks"][0] == [2, 3, 1]
    assert REF["rank_all"]["ranks"][0] == [2, 2, 1]
    alone = model.rank(REF["inputs"][:1], REF["candidates"][:1])[0]
    assert alone.ranks == [2, 3, 1]
    batched = ranked["rank_bs1"][0]
    np.testing.assert_allclose(batched.matrix, alone.matrix, rtol=0, atol=1e-6)


def test_identical_candidates_tie_exactly(ranked):
    results = ranked["rank_bs1"]
    assert results[2].scores[0] == results[2].scores[1]  # "Hello!" twice
    assert results[4].scores[0] == results[4].scores[2]  # equal after NFKC
    assert results[2].ranks == [1, 1, 3] and results[2].order == [0, 1, 2]


def test_candidate_counts_may_differ_between_prompts(model):
    sources = [REF["inputs"][0], REF["inputs"][2], REF["inputs"][3]]
    cands = [REF["candidates"][0][:2], REF["candidates"][2], ["only one"]]
    results = model.rank(sources, cands)
    assert [r.matrix.shape for r in results] == [(2, 2), (3, 3), (1, 1)]
    full = np.array(REF["rank_bs1"]["matrix"][0])
    np.testing.assert_allclose(results[0].matrix, full[:2, :2], rtol=0, atol=ATOL)
    assert results[2].scores == [0.0] and results[2].ranks == [1]


def test_rank_rejects_bad_input(model):
    with pytest.raises(ValueError, match="candidates: 1 lists for 2 sources"):
        model.rank(["a", "b"], [["x"]])
    with pytest.raises(ValueError, match=r"candidates\[0\]: empty"):
        model.rank(["a"], [[]])
    with pytest.raises(ValueError, match="sources: expected a list of strings"):
        model.rank("a", [["x"]])


# -- compare and reference rewards -----------------------------------------------------------


def test_compare_modes_equal_the_reference(model):
    ref = REF["compare"]
    sources, a, b = REF["inputs"], ref["a"], ref["b"]
    np.testing.assert_allclose(model.pair_logits(sources, a, b), ref["[A,B]"], rtol=0, atol=ATOL)
    # llm-blender's "[B,A]" is logit(B, A), not negated.
    np.testing.assert_allclose(model.pair_logits(sources, b, a), ref["[B,A]"], rtol=0, atol=ATOL)
    compared = model.compare(sources, a, b)
    np.testing.assert_allclose(compared, ref["[A,B]+[B,A]"], rtol=0, atol=ATOL)
    assert compared[4] == 0.0  # equal after NFKC normalisation


def test_rewards_against_a_reference_candidate(model):
    # llm-blender's rank_with_ref: reward(c) = logit(c, ref) - logit(ref, c), 0 for ref itself.
    rows, expected, is_ref = [], [], []
    for mode, pick in (("longest", lambda c: max(c, key=len)), ("first", lambda c: c[0])):
        for p, (source, cands) in enumerate(zip(REF["inputs"], REF["candidates"], strict=True)):
            ref_text = pick(cands)
            rows += [(source, c, ref_text) for c in cands]
            expected += REF["rank_with_ref"][mode][p]
            is_ref += [k == cands.index(ref_text) for k in range(len(cands))]
    sources, cands, refs = (list(x) for x in zip(*rows, strict=True))
    rewards = model.compare(sources, cands, refs)
    np.testing.assert_allclose(rewards, expected, rtol=0, atol=ATOL)
    assert [r for r, ref in zip(rewards, is_ref, strict=True) if ref] == [0.0] * 12


# -- offline -------------------------------------------------------------------------------------


def test_offline_raises_pairrm_unavailable_with_instructions(monkeypatch):
    asked = []

    def offline(repo_id, filename, revision=None, **kwargs):
        asked.append(revision)
        raise LocalEntryNotFoundError("no connection and not in the cache")

    monkeypatch.setattr(pairrm_module, "hf_hub_download", offline)
    with pytest.raises(PairRMUnavailable) as info:
        PairRM.load(revision=None)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "\n" not in message
    assert f"hf download llm-blender/PairRM --revision {PAIRRM_REVISION}" in message
    assert "rank.pairrm_model" in message and "`judge` ranker" in message
    assert asked == [PAIRRM_REVISION]


def test_hub_download_at_the_pinned_revision(monkeypatch):
    # An old revision without config.json falls back to ranker_config.json (same content).
    asked = []

    def from_fixtures(repo_id, filename, revision=None, **kwargs):
        asked.append((repo_id, filename, revision))
        if filename == "config.json":
            raise EntryNotFoundError("config.json: 404 at this revision")
        name = "config.json" if filename == "ranker_config.json" else filename
        return str(FIXTURES / name)

    monkeypatch.setattr(pairrm_module, "hf_hub_download", from_fixtures)
    loaded = PairRM.load(device="cpu", backbone_overrides=TINY)
    assert loaded.source_max_tokens == 64 and loaded.tokenizer.vocab_size == 205
    assert [a[1] for a in asked] == [
        "config.json",
        "ranker_config.json",
        "tokenizer.json",
        "model.safetensors",
    ]
    assert {a[0] for a in asked} == {"llm-blender/PairRM"}
    assert {a[2] for a in asked} == {PAIRRM_REVISION}


def test_local_folder_missing_files_is_a_value_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"lacks \['tokenizer.json', 'model.safetensors'\]"):
        PairRM.load(str(tmp_path))


def test_dtype_names_are_checked():
    with pytest.raises(ValueError, match="dtype"):
        pairrm_module.resolve_device_dtype("cpu", "half-ish")
    assert pairrm_module.resolve_device_dtype("cpu", "auto")[1] == torch.float32
    assert pairrm_module.resolve_device_dtype("cuda", "auto")[1] == torch.float16
    assert pairrm_module.resolve_device_dtype("cuda", "bf16")[1] == torch.bfloat16


HALF_ATOL = {"float16": 3e-2, "bfloat16": 0.2}  # seen on CPU: 1e-2 and 7e-2


def check_half_precision(device: str, dtype: str) -> None:
    """Matrix near the fp32 reference; no pair the reference separates by > 0.2 is inverted."""
    half = PairRM.load(str(FIXTURES), backbone_overrides=TINY, device=device, dtype=dtype)
    for p, result in enumerate(half.rank(REF["inputs"], REF["candidates"])):
        np.testing.assert_allclose(
            result.matrix, REF["rank_bs1"]["matrix"][p], rtol=0, atol=HALF_ATOL[dtype]
        )
        ref = np.array(REF["rank_bs1"]["scores"][p])
        ours = np.array(result.scores)
        separated = np.abs(ref[:, None] - ref[None, :]) > 0.2
        agree = np.sign(ref[:, None] - ref[None, :]) == np.sign(ours[:, None] - ours[None, :])
        assert agree[separated].all(), (p, ref, ours)
        assert result.ranks == REF["rank_bs1"]["ranks"][p] or dtype == "bfloat16"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_gpu_keeps_the_ranks(dtype):
    check_half_precision("cuda", dtype)


# -- optional: the real weights (docs/pairrm.md §7.3); PREFLOOP_PAIRRM_WEIGHTS = their folder

REAL = os.environ.get("PREFLOOP_PAIRRM_WEIGHTS")


@pytest.fixture(scope="module")
def real_model() -> PairRM:
    if not REAL:
        pytest.skip("PREFLOOP_PAIRRM_WEIGHTS not set (folder of llm-blender/PairRM files)")
    return PairRM.load(REAL, dtype="float32")


@pytest.mark.slow
def test_real_weights_published_logits(real_model):
    logits = real_model.pair_logits(
        ["hello!", "I love you!"], ["hi!", "I hate you!"], ["f**k off!", "I love you, too!"]
    )
    np.testing.assert_allclose(logits, [1.9003021717071533, -1.2547134160995483], atol=1e-3)


@pytest.mark.slow
def test_real_weights_readme_ranks_and_trl_golden(real_model):
    ranks = real_model.rank(
        ["hello, how are you!", "I love you!"],
        [
            ["get out!", "hi! I am fine, thanks!", "bye!"],
            ["I love you too!", "I hate you!", "Thanks! You're a good guy!"],
        ],
    )
    assert [r.ranks for r in ranks] == [[3, 1, 2], [1, 3, 2]]
    margins = real_model.compare(
        ["The capital of France is", "The biggest planet in the solar system is"],
        ["Paris", "Saturn"],
        ["Marseille", "Jupiter"],
    )
    # TRL's PairRMJudge: 0 = first preferred (ties too), 1 = second.
    assert [0 if m >= 0 else 1 for m in margins] == [0, 1]
