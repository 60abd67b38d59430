"""prefloop.engine against transformers' own generate() and against hand-computed sampling math.

Tiny random-weight Llama/Mistral models (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 300),
built in fixtures; everything runs on CPU in fp32 in a few seconds.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from prefloop.engine import (
    Completion,
    GenerationStats,
    Sampling,
    Session,
    common_prefix,
    generate,
    last_logits,
)
from prefloop.engine.fused import fused_kernels
from prefloop.engine.loop import LoopOptions, options_for
from prefloop.engine.sampling import (
    choose_tokens,
    mix32,
    nucleus_threshold,
    nucleus_threshold_bisect,
    nucleus_threshold_sorted,
    row_key,
    sample_inverse_cdf,
    uniform,
)

VOCAB = 300
PAD = 0
LENGTHS = (5, 9, 3, 12, 7)
# The CUDA settings (no top-k prefilter, row buckets, column blocks, sparse host syncs,
# chunked prefill), run eagerly: the same bookkeeping as the graphed loop.
GPU_LIKE = LoopOptions(cuda_graphs=False, prefilter=None, sync_every=4, kv_block=8,
                       bucket_rows=True, prefill_tokens=20)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Toy-sized ops gain nothing from threads, and on a busy machine OpenMP's waiting makes
    them ~50x slower; the thread count is restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(kind: str, seed: int = 0, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, **extra)).eval()
    extra.setdefault("sliding_window", None)
    return MistralForCausalLM(MistralConfig(**common, rope_theta=1e6, **extra)).eval()


@pytest.fixture(scope="module", params=["llama", "mistral"])
def model(request):
    return tiny(request.param)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


def hf_greedy(model, prompts, max_new, eos, min_new=0):
    """transformers' greedy generate on the left-padded batch, cut after the first EOS."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                         do_sample=False, max_new_tokens=max_new, min_new_tokens=min_new,
                         eos_token_id=eos, pad_token_id=PAD)[:, width:].tolist()
    return [r[: r.index(eos) + 1] if eos in r else r for r in out]


def mid_sequence_eos(model, prompts) -> int:
    """A token that greedy decoding emits part-way through some sequences but not others."""
    runs = hf_greedy(model, prompts, 12, eos=VOCAB + 7)  # an id never produced: no stopping
    for token in (t for r in runs for t in r[2:8]):
        hits = [token in r[1:] and token not in r[:1] for r in runs]
        if any(hits) and not all(token in r for r in runs):
            return token
    raise AssertionError("no suitable EOS token in the tiny model's greedy output")


def greedy(n=3, max_new=12, min_new=0):
    return Sampling(temperature=0.0, max_new_tokens=max_new, min_new_tokens=min_new)


# ---- greedy equivalence with transformers ----------------------------------------------------


@pytest.mark.parametrize("options", [None, GPU_LIKE], ids=["cpu", "gpu-like"])
def test_greedy_matches_transformers_generate(model, prompts, options):
    eos = mid_sequence_eos(model, prompts)
    want = hf_greedy(model, prompts, 12, eos)
    got = generate(model, prompts, 3, greedy(), eos_token_ids=[eos], pad_token_id=PAD,
                   batch_size=6, options=options)
    for w, comps in zip(want, got, strict=True):
        assert [c.token_ids for c in comps] == [w] * 3
        assert [c.finish_reason for c in comps] == ["eos" if eos in w else "length"] * 3
    reasons = {c.finish_reason for comps in got for c in comps}
    assert reasons == {"eos", "length"}  # both ways of stopping were exercised
    assert model.config._attn_implementation == "sdpa"  # the engine restored it


def test_min_and_max_new_tokens(model, prompts):
    first = hf_greedy(model, prompts, 1, eos=VOCAB + 7)
    eos = first[2][0]  # prompt 2 would stop at once
    want = hf_greedy(model, prompts, 10, eos, min_new=4)
    got = generate(model, prompts, 2, greedy(max_new=10, min_new=4), eos_token_ids=[eos],
                   pad_token_id=PAD)
    assert [c.token_ids for c in got[2]] == [want[2]] * 2
    for comps in got:
        for c in comps:
            assert 4 <= len(c.token_ids) <= 10
            assert eos not in c.token_ids[:3]
            assert c.finish_reason == ("eos" if c.token_ids[-1] == eos else "length")
            assert c.finish_reason == "eos" or len(c.token_ids) == 10


def test_sliding_window_matches_transformers(prompts):
    model = tiny("mistral", sliding_window=6)
    want = hf_greedy(model, prompts, 10, eos=VOCAB + 7)
    got = generate(model, prompts, 1, greedy(max_new=10), eos_token_ids=[], pad_token_id=PAD)
    assert [c[0].token_ids for c in got] == want


# ---- batching, padding, callbacks --------------------------------------------------------------


def test_left_padding_does_not_change_outputs(model, prompts):
    alone = generate(model, [prompts[3]], 1, greedy(max_new=16), eos_token_ids=[],
                     pad_token_id=PAD)
    mixed = generate(model, prompts, 1, greedy(max_new=16), eos_token_ids=[], pad_token_id=PAD)
    assert mixed[3][0].token_ids == alone[0][0].token_ids
    assert len(alone[0][0].token_ids) == 16


def test_sampling_is_deterministic_and_batch_independent(model, prompts):
    sampling = Sampling(temperature=0.8, top_p=0.9, max_new_tokens=10, seed=3)

    def run(batch_size, options=None):
        out = generate(model, prompts, 4, sampling, eos_token_ids=[], pad_token_id=PAD,
                       batch_size=batch_size, options=options)
        return [[c.token_ids for c in comps] for comps in out]

    one_group = run(None)
    assert run(4) == one_group  # one prompt per batch: other padding, other batch shapes
    assert run(8, GPU_LIKE) == one_group
    assert len({tuple(s) for comps in one_group for s in comps}) == 20  # samples differ
    other_seed = generate(model, prompts, 4, Sampling(0.8, 0.9, 10, seed=4), eos_token_ids=[],
                          pad_token_id=PAD)
    assert [[c.token_ids for c in comps] for comps in other_seed] != one_group


def test_finished_rows_leave_the_batch_without_changing_the_others(model, prompts):
    """Rows that stop are swapped out of the batch (their K/V overwritten by moved rows); the
    reference decodes each prompt alone in a fixed 4-row batch, where nothing moves."""
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=14, seed=5)
    stops = list(range(3, 23))  # ~7 % of the vocabulary: rows stop at scattered steps

    def run(batch_size, options):
        out = generate(model, prompts, 4, sampling, eos_token_ids=stops, pad_token_id=PAD,
                       batch_size=batch_size, options=options)
        return [[(c.token_ids, c.finish_reason) for c in comps] for comps in out]

    fixed = run(4, GPU_LIKE)  # a group of 4 rows is never shrunk (buckets stop at 8)
    lengths = {len(t) for comps in fixed for t, _ in comps}
    assert len(lengths) >= 5 and {r for comps in fixed for _, r in comps} == {"eos", "length"}
    assert run(None, None) == fixed  # CPU: compacted after every step
    assert run(None, GPU_LIKE) == fixed  # 20 rows → buckets of 16 and 8


def test_on_prompt_done_once_per_prompt_with_n_completions(model, prompts):
    eos = mid_sequence_eos(model, prompts)
    calls: list[tuple[int, list[Completion]]] = []
    out = generate(model, prompts, 3, Sampling(0.9, 0.95, 12), eos_token_ids=[eos],
                   pad_token_id=PAD, batch_size=6,
                   on_prompt_done=lambda i, comps: calls.append((i, list(comps))))
    assert sorted(i for i, _ in calls) == list(range(len(prompts)))
    assert generate(model, [], 3, greedy(), eos_token_ids=[eos], pad_token_id=PAD) == []
    for i, comps in calls:
        assert len(comps) == 3 and all(isinstance(c, Completion) for c in comps)
        assert comps == out[i]


def test_bad_arguments_name_the_field(model, prompts):
    cases = [({"n": 0}, "n:"), ({"sampling": Sampling(top_p=0.0)}, "sampling.top_p"),
             ({"sampling": Sampling(temperature=-1)}, "sampling.temperature"),
             ({"sampling": Sampling(max_new_tokens=4, min_new_tokens=5)},
              "sampling.min_new_tokens"),
             ({"prompts": [[5], []]}, r"prompts\[1\]"), ({"batch_size": 0}, "batch_size")]
    for change, field in cases:
        args = {"prompts": prompts, "n": 2, "sampling": Sampling(max_new_tokens=4)} | change
        with pytest.raises(ValueError, match=field):
            generate(model, args["prompts"], args["n"], args["sampling"], eos_token_ids=[2],
                     pad_token_id=PAD, batch_size=args.get("batch_size"))


# ---- a prefix shared by every prompt, next-token logits, stream ids ---------------------------

HEAD = 20  # tokens every prompt of `prefixed` starts with
NO_SHARING = replace(options_for(torch.device("cpu")), shared_prefix=0)


@pytest.fixture(scope="module")
def prefixed(prompts):
    g = torch.Generator().manual_seed(7)
    head = torch.randint(3, VOCAB, (HEAD,), generator=g).tolist()
    return [head + p for p in prompts]


def forward_shapes(model, fn):
    """Run fn(); return the input_ids shape of every forward of `model` it made."""
    shapes = []
    handle = model.register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        return fn(), shapes
    finally:
        handle.remove()


@pytest.mark.parametrize("options", [None, GPU_LIKE], ids=["cpu", "gpu-like"])
def test_shared_prefix_is_prefilled_once_and_matches_transformers(model, prefixed, options):
    want = hf_greedy(model, prefixed, 8, eos=VOCAB + 7)
    got, shapes = forward_shapes(model, lambda: generate(
        model, prefixed, 2, greedy(max_new=8), eos_token_ids=[], pad_token_id=PAD,
        batch_size=4, options=options))  # 2 prompts a group: the prefix serves 3 groups
    assert [[c.token_ids for c in comps] for comps in got] == [[w] * 2 for w in want]
    assert shapes[0] == (1, HEAD)  # the prefix, once for the whole call
    assert max(width for _, width in shapes[1:]) == max(LENGTHS)  # never the prefix again
    prefill = [s for s in shapes[1:] if s[1] > 1]
    assert sum(rows for rows, _ in prefill) == len(prefixed)  # each remainder once


def test_shared_prefix_keeps_every_sample(model, prefixed):
    sampling = Sampling(temperature=0.8, top_p=0.9, max_new_tokens=10, seed=3)

    def run(options):
        out = generate(model, prefixed, 3, sampling, eos_token_ids=[7, 8, 9], pad_token_id=PAD,
                       options=options)
        return [[(c.token_ids, c.finish_reason) for c in comps] for comps in out]

    shared, shapes = forward_shapes(model, lambda: run(None))
    assert shapes[0] == (1, HEAD)
    assert shared == run(NO_SHARING)


def test_common_prefix_leaves_every_prompt_a_token():
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 5]]) == 2
    assert common_prefix([[1, 2, 4], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2], [3, 2]]) == 0
    assert common_prefix([[4, 5, 6]]) == 2


def test_last_logits_equal_one_forward_per_prompt(model, prefixed):
    select = [3, 17, VOCAB - 1]
    (got, shapes) = forward_shapes(model, lambda: last_logits(
        model, prefixed, select, pad_token_id=PAD, batch_size=2))
    assert shapes[0] == (1, HEAD) and got.shape == (len(prefixed), 3) and got.dtype == torch.float32
    with torch.inference_mode():
        want = torch.stack([model(torch.tensor([p])).logits[0, -1, select] for p in prefixed])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert last_logits(model, [], select, pad_token_id=PAD).shape == (0, 3)


def test_stream_ids_reproduce_the_draws_of_a_larger_call(model, prompts):
    sampling = Sampling(temperature=0.9, top_p=0.95, max_new_tokens=8, seed=11)
    full = generate(model, prompts, 2, sampling, eos_token_ids=[], pad_token_id=PAD)
    part = generate(model, prompts[2:4], 2, sampling, eos_token_ids=[], pad_token_id=PAD,
                    stream_ids=[2, 3])
    assert [[c.token_ids for c in comps] for comps in part] == \
        [[c.token_ids for c in comps] for comps in full[2:4]]
    plain = generate(model, prompts[2:4], 2, sampling, eos_token_ids=[], pad_token_id=PAD)
    assert plain != part  # without them, prompts 2-3 would draw as prompts 0-1
    with pytest.raises(ValueError, match="stream_ids: 1 ids for 2 prompts"):
        generate(model, prompts[2:4], 2, sampling, eos_token_ids=[], pad_token_id=PAD,
                 stream_ids=[2])



def test_flex_kernel_options_reach_flex_attention(model, monkeypatch):
    from prefloop.engine import kv
    from prefloop.engine.loop import CUDA_FLEX_KERNEL

    seen = []
    monkeypatch.setattr(kv, "flex_decode_kernel", lambda: lambda q, k, v, bias, scale, options: (
        seen.append(options) or torch.zeros_like(q)))
    q, k = torch.zeros(3, 4, 1, 16), torch.zeros(3, 2, 5, 16)  # head_dim >= FLEX_MIN_HEAD_DIM
    with kv.grouped_attention(model, flex_decode=True, flex_kernel=CUDA_FLEX_KERNEL):
        kv.gqa_sdpa_attention(None, q, k, k, torch.zeros(3, 1, 1, 5))
    with kv.grouped_attention(model, flex_decode=True):
        kv.gqa_sdpa_attention(None, q, k, k, torch.zeros(3, 1, 1, 5))
    assert seen == [{"BLOCK_N": 64, "num_stages": 1, "num_warps": 4}, None]
    assert kv._FLEX_KERNEL == [None] and kv._FLEX_DECODE == [False]

# ---- sessions: one loop (buffers, CUDA graphs) for several calls --------------------------------


@pytest.mark.parametrize("options", [None, GPU_LIKE], ids=["cpu", "gpu-like"])
def test_session_reuses_its_loop_and_changes_no_output(model, prompts, prefixed, options):
    def run(batch, seed, session=None, temperature=0.8):
        out = generate(model, batch, 3, Sampling(temperature, 0.9, 10, seed=seed),
                       eos_token_ids=[7, 8, 9], pad_token_id=PAD, options=options,
                       session=session)
        return [[(c.token_ids, c.finish_reason) for c in comps] for comps in out]

    other = [[p[0] + 1] + p[1:] for p in prefixed]  # the same prefix length, other tokens
    session = Session()
    assert run(prompts, 1, session) == run(prompts, 1)
    loop = session.loop
    assert loop is not None and loop.capacity == len(prompts) * 3
    assert run(prompts, 2, session) == run(prompts, 2)  # another seed, same loop
    assert run(prompts[:2], 2, session) == run(prompts[:2], 2)  # fewer prompts, same loop
    assert session.loop is loop
    session.close()
    assert run(prompts[:2], 2, session) == run(prompts[:2], 2)
    assert session.loop.capacity == 6
    assert run(prompts, 1, session) == run(prompts, 1)  # more prompts: a larger loop
    assert session.loop.capacity == len(prompts) * 3
    loop = session.loop
    assert run(prefixed, 4, session) == run(prefixed, 4)  # a shared prefix: a new loop
    prefixed_loop = session.loop
    assert prefixed_loop is not loop and prefixed_loop.prefix == HEAD
    assert run(other, 4, session) == run(other, 4)  # its prefix prefilled again
    assert session.loop is prefixed_loop
    assert run(other, 4, session, temperature=0.5) == run(other, 4, temperature=0.5)
    assert session.loop is not prefixed_loop  # other sampling settings: a new loop
    session.close()
    assert session.loop is None


@pytest.mark.slow
def test_compiled_kernels_and_flex_decode_match_transformers(prompts, monkeypatch):
    """The CUDA defaults' compiled RMSNorm/rotary kernels and FlexAttention decode, run on the
    CPU (torch.compile works there too, ~1 min): greedy output equals transformers', also once
    the cap on compiled attention shapes sends the later shapes to SDPA; the model's own
    modules are restored afterwards."""
    import transformers.models.llama.modeling_llama as llama

    from prefloop.engine import kv

    model = tiny("llama")
    rope = llama.apply_rotary_pos_emb
    eos = mid_sequence_eos(model, prompts)
    want = hf_greedy(model, prompts, 12, eos)
    opt = replace(options_for(torch.device("cpu")), fused=True, flex_decode=True)
    shapes = {}
    for cap in (64, 2):
        monkeypatch.setattr(kv, "FLEX_MAX_SHAPES", cap)
        monkeypatch.setattr(kv, "_FLEX_SHAPES", set())
        got = generate(model, prompts, 2, greedy(), eos_token_ids=[eos], pad_token_id=PAD,
                       options=opt)
        assert [[c.token_ids for c in comps] for comps in got] == [[w] * 2 for w in want]
        shapes[cap] = len(kv._FLEX_SHAPES)
    assert shapes[64] > 2 and shapes[2] == 2  # with the cap, most steps ran SDPA
    assert llama.apply_rotary_pos_emb is rope
    assert "forward" not in model.model.norm.__dict__
    with fused_kernels(model) as on:  # what generate() swapped in
        assert on and llama.apply_rotary_pos_emb is not rope
        assert "forward" in model.model.norm.__dict__
    cuda = options_for(torch.device("cuda"))
    assert cuda.fused and cuda.flex_decode and cuda.cuda_graphs
    assert dict(cuda.flex_kernel) == {"BLOCK_N": 64, "num_stages": 1, "num_warps": 4}


# ---- sampling math -----------------------------------------------------------------------------


def test_top_p_threshold_hand_computed():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.15, 0.2],    # top_p 0.8: 0.5+0.2+0.15 → τ 0.15
                          [0.3, 0.3, 0.2, 0.1, 0.1]])     # 0.3+0.3+0.2 = 0.8 ≥ 0.8 → τ 0.2
    want = torch.tensor([0.15, 0.2])
    assert torch.equal(nucleus_threshold_bisect(probs, 0.8), want)
    assert torch.equal(nucleus_threshold_sorted(probs.sort(descending=True).values, 0.8), want)
    assert torch.equal(nucleus_threshold(probs, 0.8, prefilter=2), want)  # top-2 < 0.8: bisect
    assert torch.equal(nucleus_threshold(probs, 0.8, prefilter=None), want)  # full sort
    assert torch.equal(nucleus_threshold(probs, 0.55, prefilter=2), torch.tensor([0.2, 0.3]))
    kept = probs >= nucleus_threshold(probs, 0.8, prefilter=3).unsqueeze(-1)
    assert kept.tolist() == [[False, True, False, True, True], [True, True, True, False, False]]


def test_top_p_threshold_bisection_equals_sorting():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, 1000, generator=g) * 3, dim=-1)
    for top_p in (0.1, 0.5, 0.9, 0.99):
        ref = nucleus_threshold_sorted(probs.sort(descending=True).values, top_p)
        assert torch.equal(nucleus_threshold_bisect(probs, top_p), ref)
        assert torch.equal(nucleus_threshold(probs, top_p, prefilter=16), ref)
        assert torch.equal(nucleus_threshold(probs, top_p, prefilter=None), ref)


def test_top_p_threshold_sorting_bf16_logits_equals_sorting_probs():
    """The CUDA path sorts bf16 logits (16-bit keys) and reads the probs in that order: exactly
    the sorted probs, ties included (bf16 logits tie often)."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 2000, generator=g) * 2).to(torch.bfloat16)
    assert logits[0].unique().numel() < 1500  # many ties within a row
    for temperature in (0.7, 1.0):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        for top_p in (0.1, 0.5, 0.9, 0.99):
            ref = nucleus_threshold_sorted(probs.sort(descending=True).values, top_p)
            got = nucleus_threshold(probs, top_p, prefilter=None, order=logits)
            assert torch.equal(got, ref)
    wrong = nucleus_threshold(probs, 0.9, prefilter=None, order=-logits)  # a wrong order fails
    assert not torch.equal(wrong, nucleus_threshold(probs, 0.9, prefilter=None))
    keys, step = torch.arange(64), torch.tensor([3])
    eos = torch.tensor([5])
    for min_new in (0, 8):  # choose_tokens: same tokens from bf16 logits as from their fp32 copy
        kw = dict(temperature=0.7, top_p=0.9, prefilter=None, eos_ids=eos, min_new_tokens=min_new)
        assert torch.equal(choose_tokens(logits, keys, step, **kw),
                           choose_tokens(logits.float(), keys, step, **kw))


def test_inverse_cdf_hand_computed():
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0]] * 4)
    u = torch.tensor([0.2, 0.25, 0.3, 0.999])  # targets 0.8, 1.0, 1.2, 3.996 on cdf 0 1 1 4
    assert sample_inverse_cdf(weights, u).tolist() == [1, 3, 3, 3]


def test_counter_based_uniforms():
    assert mix32(torch.tensor([0, 1, 2**32 - 1])).tolist() == [mix32(0), mix32(1), mix32(2**32 - 1)]
    keys = torch.tensor([row_key(0, p, s) for p in range(50) for s in range(40)])
    u0, u1 = uniform(keys, torch.tensor([0])), uniform(keys, torch.tensor([1]))
    assert torch.equal(u0, uniform(keys.clone(), torch.tensor([0])))
    assert 0 < float(u0.min()) and float(u0.max()) < 1
    assert abs(float(u0.mean()) - 0.5) < 0.02 and abs(float(u1.mean()) - 0.5) < 0.02
    assert len(set(u0.tolist())) > 1990 and float((u0 - u1).abs().mean()) > 0.25


def peaked(kind="llama"):
    """A tiny model whose next-token distribution has a head and a tail (a few dozen tokens
    matter), so that frequencies over a few thousand samples can tell T and top-p apart."""
    model = tiny(kind, seed=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(15.0)
    return model


def reference_probs(logits: torch.Tensor, temperature: float, top_p: float | None):
    """transformers' own warpers: temperature, then top-p; softmax of what is left."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, dim=-1)[0]


def total_variation(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


def test_samples_follow_temperature_and_top_p():
    model = peaked()
    prompt = [5, 17, 42, 99]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[:, -1]
    samples = 6000
    out = generate(model, [prompt], samples, Sampling(0.7, 0.8, max_new_tokens=2, seed=11),
                   eos_token_ids=[], pad_token_id=PAD)[0]
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in out]), minlength=VOCAB).float()
    right = reference_probs(logits, 0.7, 0.8)
    assert 5 <= int((right > 0).sum()) <= 60  # the nucleus is a real cut of the vocabulary
    assert counts[right == 0].sum() == 0  # nothing outside the nucleus, ever
    assert total_variation(counts, right) < 0.03
    assert total_variation(counts, reference_probs(logits, 0.7, None)) > 0.1  # no top-p
    assert total_variation(counts, reference_probs(logits, 1.0, 0.8)) > 0.1  # T ignored
    # step 2 comes from the decode path: check it given the most frequent first token
    first = int(counts.argmax())
    seconds = torch.tensor([c.token_ids[1] for c in out if c.token_ids[0] == first])
    with torch.no_grad():
        logits2 = model(input_ids=torch.tensor([prompt + [first]])).logits[:, -1]
    counts2 = torch.bincount(seconds, minlength=VOCAB).float()
    assert len(seconds) > 1000
    assert total_variation(counts2, reference_probs(logits2, 0.7, 0.8)) < 0.06


# ---- CUDA -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_greedy_matches_transformers(prompts):
    model = tiny("mistral").cuda()
    eos = mid_sequence_eos(model, prompts)
    want = hf_greedy(model, prompts, 12, eos)
    got = generate(model, prompts, 3, greedy(), eos_token_ids=[eos], pad_token_id=PAD)
    assert [[c.token_ids for c in comps] for comps in got] == [[w] * 3 for w in want]
    session, stats = Session(), GenerationStats()
    for capture in (True, False):  # a session's second call replays the first call's graphs
        got = generate(model, prompts, 3, greedy(), eos_token_ids=[eos], pad_token_id=PAD,
                       session=session, stats=stats)
        assert [[c.token_ids for c in comps] for comps in got] == [[w] * 3 for w in want]
        assert (stats.capture_seconds > 0) == capture


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_bf16_greedy_matches_transformers_generate_in_bf16(kind, prompts):
    """The bf16 path (what model.dtype auto picks on CPUs with bf16 units) is token-exact with
    transformers' own bf16 generate, as the fp32 path is."""
    bf16 = tiny(kind).to(torch.bfloat16)
    eos = mid_sequence_eos(bf16, prompts)
    want = hf_greedy(bf16, prompts, 12, eos)
    got = generate(bf16, prompts, 2, greedy(), eos_token_ids=[eos], pad_token_id=PAD,
                   batch_size=4)
    assert [[c.token_ids for c in comps] for comps in got] == [[w] * 2 for w in want]
    assert {c.finish_reason for comps in got for c in comps} == {"eos", "length"}
