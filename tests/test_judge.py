"""The LLM-as-a-judge ranker: the verbatim Yuan et al. 2024 prompt, score parsing, N samples."""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from importlib import resources

import pytest
from tiny import CHAT_TEMPLATE, SPECIALS, WORDS, tiny_llama

from prefloop import engine
from prefloop.chat import render_prompt
from prefloop.config import RankConfig
from prefloop.engine.backend import LocalBackend
from prefloop.errors import PrefloopError
from prefloop.rankers import judge as J

TEMPLATE_SHA256 = "ce88e57166e4a8cfc8a3ee6e32fe34f11bddeb50949acf0a582de2dea868e802"
FIRST_LINE = ("Review the user\u2019s question and the corresponding response using the additive "
              "5-point")
LAST_LINE = "systematically attribute points based on the outlined criteria."
# Words the fake judge writes and the responses use; the tokenizer also covers the template.
EXTRA = ("alpha beta gamma delta Score score Points Total points 0 1 2 3 4 5 6 7 . : ** :** / "
         "fine okay it is").split()


def test_template_file_is_the_papers_prompt_byte_for_byte():
    path = resources.files("prefloop") / "prompts" / "judge_yuan2024.txt"
    raw = path.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == TEMPLATE_SHA256
    text = raw.decode("utf-8")
    lines = text.split("\n")
    assert len(lines) == 25 and lines[-1] == ""  # 24 lines, the PDF's wrapping, final newline
    assert lines[0] == FIRST_LINE and lines[23] == LAST_LINE
    assert lines[16:18] == ["User: <INSTRUCTION_HERE>", "<response><RESPONSE_HERE></response>"]
    assert lines[20] == ("- Conclude with the score using the format: "
                         "\u201cScore: <total points>\u201d")
    assert text.count("\u2019") == 9 and "'" not in text and '"' not in text


def test_load_and_fill_template():
    t = J.load_template("yuan2024")
    assert t.endswith(LAST_LINE) and t.startswith(FIRST_LINE)
    filled = J.fill_template(t, "Name <RESPONSE_HERE> a river", "The Nile.")
    assert "User: Name <RESPONSE_HERE> a river\n<response>The Nile.</response>\n" in filled
    assert J.INSTRUCTION_SLOT not in filled and filled.count("The Nile.") == 1
    with pytest.raises(PrefloopError, match="rank.judge_template: unknown template 'nope'; "
                                            "shipped: yuan2024"):
        J.load_template("nope")


@pytest.mark.parametrize("text, expected", [
    ("Good answer.\nScore: 4", 4.0),
    ("score: 3", 3.0),
    ("SCORE:5", 5.0),
    ("**Score:** 4", 4.0),
    ("**Score: 4**", 4.0),
    ("Score: **2**", 2.0),
    ("__Score__: 1", 1.0),
    ("Score: 4/5", 4.0),
    ("Score: 4 / 5 points", 4.0),
    ("Score: 3.5", 3.5),
    ("Total points: 2", 2.0),
    ("Points: 0", 0.0),
    ("Score: 4. The response is helpful.", 4.0),
    ("Score: 1 at first... on reflection, Score: 3", 3.0),  # the last one counts
    ("Score: 2\nScore: <total points>", 2.0),  # the template's echo is not a score
    ("Score: 6", None),
    ("Score: 5.5", None),
    ("Score: -1", None),
    ("Score: 3\nScore: 7", None),  # the last, out of range, is a failure, not the earlier 3
    ("Score: 4/10", None),
    ("I would give it four points.", None),
    ("Score: <total points>", None),
    ("", None),
    ("The underscore: 4 and scores: 3", None),
])
def test_parse_score(text, expected):
    assert J.parse_score(text) == expected


def test_mean_and_variance_of_valid_samples():
    assert J.mean_score([4.0, None, 2.0]) == 3.0
    assert J.mean_score([4.0, None, None], min_valid=2) is None
    assert J.mean_score([None, None]) is None
    assert J.mean_score([0.0]) == 0.0
    assert J.score_variance([4.0, None, 2.0]) == 1.0
    assert J.score_variance([5.0]) == 0.0


# -- the ranker with a fake engine -----------------------------------------------------------


def judge_tokenizer():
    """tiny.py's word-level tokenizer, its vocabulary widened to cover the judge prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    corpus = J.load_template("yuan2024") + " " + " ".join(WORDS + EXTRA)
    words = sorted({w for w, _ in pre.pre_tokenize_str(corpus)} - set(SPECIALS))
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIALS + words)},
                                      unk_token="<unk>"))
    core.pre_tokenizer = pre
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=SPECIALS[4:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def default_script(prompt_text: str, sample: int) -> str:
    """alpha -> 5, beta -> 4 / 2 / 3 by sample, gamma -> 1, anything else -> no score."""
    if "alpha" in prompt_text:
        return "it is fine . Score : 5"
    if "beta" in prompt_text:
        return f"it is okay . Score : {[4, 2, 3][sample % 3]}"
    if "gamma" in prompt_text:
        return "** Score :** 1"
    return "it is fine ."


def decoded(tok, text: str) -> str:
    """What the judge ranker reads back after a round trip through the tokenizer."""
    return tok.decode(tok(text, add_special_tokens=False)["input_ids"])


class FakeEngine:
    """Stands in for prefloop.engine.generate: scripted judge texts, every call recorded."""

    def __init__(self, tok, script=default_script, finish="eos"):
        self.tok, self.script, self.finish, self.calls = tok, script, finish, []

    def __call__(self, model, prompts, n, sampling, *, eos_token_ids, pad_token_id,
                 batch_size=None, on_prompt_done=None, stream_ids=None, session=None):
        self.calls.append({"prompts": [list(p) for p in prompts], "n": n, "sampling": sampling,
                           "eos": set(eos_token_ids), "pad": pad_token_id,
                           "stream_ids": None if stream_ids is None else list(stream_ids),
                           "session": session})
        out = []
        for i, ids in enumerate(prompts):
            text = self.tok.decode(ids)
            comps = []
            for s in range(n):
                gen = self.tok(self.script(text, s), add_special_tokens=False)["input_ids"]
                tail = [self.tok.eos_token_id] if self.finish == "eos" else []
                comps.append(engine.Completion(list(gen) + tail, self.finish))
            out.append(comps)
            if on_prompt_done:
                on_prompt_done(i, comps)
        return out


@pytest.fixture
def tok():
    return judge_tokenizer()


@pytest.fixture
def fake(tok, monkeypatch):
    f = FakeEngine(tok)
    monkeypatch.setattr(engine, "generate", f)
    return f


def make_judge(tok, **cfg) -> J.JudgeRanker:
    rank = replace(RankConfig(), judge_max_new_tokens=32, **cfg)
    return J.JudgeRanker(LocalBackend(tiny_llama(tok), tok), rank, name="judge:tiny")


def contract_scores(jr, tmp_path, responses: list[str]) -> list[float | None]:
    """The ranker contract's per-response scores (one instruction "q")."""
    records = [{"id": f"r{i}", "sample": 0, "instruction": "q", "response": r}
               for i, r in enumerate(responses)]
    fields, _ = jr.score(records, tmp_path)
    return [f["score"] for f in fields]


def test_judge_samples_and_scores_in_one_batched_call(tok, fake, tmp_path):
    jr = make_judge(tok)
    done = []
    out = jr.judge(["name a river"] * 4, ["alpha", "beta", "gamma", "delta"],
                   on_done=lambda i, js: done.append(i))
    assert [[j.score for j in js] for js in out] == [[5.0] * 3, [4.0, 2.0, 3.0], [1.0] * 3,
                                                     [None] * 3]
    assert out[0][0].text == decoded(tok, "it is fine . Score : 5") == "it is fine. Score : 5"
    assert out[2][0].text == "** Score :** 1" and out[3][0].error is None
    assert sorted(done) == [0, 1, 2, 3]
    (call,) = fake.calls  # one call for all responses, n samples share one prefill each
    assert call["n"] == 3 and len(call["prompts"]) == 4
    assert call["sampling"] == engine.Sampling(temperature=0.7, top_p=0.9, max_new_tokens=32,
                                               seed=0)
    assert call["eos"] == {tok.eos_token_id} and call["pad"] == tok.pad_token_id
    # the filled prompt goes through the chat template as one user turn
    expected = J.fill_template(jr.template, "name a river", "beta")
    rendered = tok.apply_chat_template([{"role": "user", "content": expected}], tokenize=False,
                                       add_generation_prompt=True)
    assert call["prompts"][1] == tok(rendered, add_special_tokens=False)["input_ids"]
    assert contract_scores(jr, tmp_path, ["alpha", "beta", "gamma", "delta"]) == [
        5.0, 3.0, 1.0, None]


def test_judge_min_valid_and_length_finish(tok, monkeypatch, tmp_path):
    def script(text, s):
        return "Score : 4" if s == 0 else "it is fine ."

    monkeypatch.setattr(engine, "generate", FakeEngine(tok, script, finish="length"))
    out = make_judge(tok, min_valid=2).judge(["q"], ["alpha"])
    assert [j.text for j in out[0]] == ["Score : 4", "it is fine.", "it is fine."]
    assert contract_scores(make_judge(tok, min_valid=2), tmp_path / "a", ["alpha"]) == [None]
    assert contract_scores(make_judge(tok, min_valid=1), tmp_path / "b", ["alpha"]) == [4.0]


def test_prompt_too_long_is_a_failure_without_generation(tok, fake):
    jr = make_judge(tok)
    jr.cfg = replace(jr.cfg, judge_max_new_tokens=500)  # tiny llama: 512 positions
    out = jr.judge(["q"], ["alpha"])
    assert out == [[J.Judgment("", None, "prompt_too_long")] * 3]
    assert fake.calls == []


def test_compare_judges_each_side_independently(tok, fake):
    jr = make_judge(tok)
    m = jr.compare(["q", "q", "q"], ["alpha", "gamma", "delta"], ["beta", "alpha", "alpha"])
    assert m[:2] == [2.0, -4.0] and math.isnan(m[2])
    (call,) = fake.calls
    assert len(call["prompts"]) == 6
    with pytest.raises(ValueError, match=r"judge: inputs differ in length \(1, 2, 1\)"):
        jr.compare(["q"], ["a", "b"], ["c"])


def test_forced_score_weighs_the_judges_digits_after_score(tok, fake):
    jr = make_judge(tok, judge_force_score=True)
    two = tok.convert_tokens_to_ids("2")
    seen = []
    jr.backend.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].tolist()),
                                       with_kwargs=True)

    def favour_two(module, args, output):
        output = output.clone()
        output[..., two] += 1e4
        return output

    jr.backend.model.lm_head.register_forward_hook(favour_two)
    out = jr.judge(["q", "q"], ["alpha", "delta"])  # alpha parses (5), delta never does
    assert [j.score for j in out[0]] == [5.0] * 3 and not any(j.forced for j in out[0])
    assert [(j.text, j.score, j.forced) for j in out[1]] == [("it is fine.", 2.0, True)] * 3
    (batch,) = seen  # one forward: the 3 failed samples are the same text, read once
    suffix = tok(J.FORCE_SUFFIX, add_special_tokens=False)["input_ids"]
    judged = tok("it is fine .", add_special_tokens=False)["input_ids"]
    assert batch == [fake.calls[0]["prompts"][1] + judged + suffix]
    assert J.digit_tokens(tok) == {tok.convert_tokens_to_ids(str(d)): d for d in range(6)}


def test_forced_scores_left_padding_matches_single_sequences(tok):
    import torch

    model = tiny_llama(tok, seed=3)
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in
            ("it is fine .", "alpha beta gamma delta it is okay .", "Score", "1 2 3 4 5 6 7 .")]
    batched = J.forced_scores(LocalBackend(model, tok), seqs)
    digits = J.digit_tokens(tok)
    suffix = tok(J.FORCE_SUFFIX, add_special_tokens=False)["input_ids"]
    alone = []
    for seq in seqs:  # reference: one unpadded forward, Σ d·p(d) / Σ p(d) over the digit ids
        with torch.inference_mode():
            p = model(torch.tensor([seq + suffix])).logits[0, -1].softmax(-1)
        alone.append(sum(d * p[t].item() for t, d in digits.items())
                     / sum(p[t].item() for t in digits))
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(round(x, 4) for x in batched)) == 4 and all(0 < x < 5 for x in batched)


def test_forcing_runs_per_chunk_with_the_draws_of_one_call(tok, fake, monkeypatch):
    """With forcing on, responses are judged (then forced) FORCE_CHUNK at a time; each keeps the
    random stream it would have in one call, and on_done fires once per response."""
    monkeypatch.setattr(J, "FORCE_CHUNK", 2)
    jr = make_judge(tok, judge_force_score=True)
    done = []
    out = jr.judge(["q"] * 5, ["alpha", "delta", "beta", "delta", "gamma"],
                   on_done=lambda i, js: done.append(i))
    assert [c["stream_ids"] for c in fake.calls] == [[0, 1], [2, 3], [4]]
    session = fake.calls[0]["session"]  # one engine session serves every chunk, closed after
    assert all(c["session"] is session for c in fake.calls) and session.loop is None
    assert sorted(done) == [0, 1, 2, 3, 4] and len(done) == 5
    assert [j.score for j in out[0]] == [5.0] * 3 and [j.score for j in out[4]] == [1.0] * 3
    assert all(j.forced and 0 < j.score < 5 for i in (1, 3) for j in out[i])
    assert out[1] == out[3]  # same response, same forced score


def test_forced_scores_share_the_rubric_prefix_with_the_same_result(tok):
    """Real judge prompts all start with the rubric: the engine prefills it once, and the
    scores equal those of one unpadded forward per sequence."""
    import torch

    model = tiny_llama(tok, seed=4)
    prompts = [render_prompt(tok, J.fill_template(J.load_template("yuan2024"), "q", r)).ids
               for r in ("alpha", "beta gamma", "delta it is okay")]
    seqs = [p + tok("it is fine .", add_special_tokens=False)["input_ids"] for p in prompts]
    shapes = []
    handle = model.register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    got = J.forced_scores(LocalBackend(model, tok), seqs)
    handle.remove()
    head = next(i for i in range(len(seqs[0])) if len({s[i] for s in seqs}) > 1)
    assert shapes[0] == (1, head) and head > 100  # the rubric, once
    digits = J.digit_tokens(tok)
    suffix = tok(J.FORCE_SUFFIX, add_special_tokens=False)["input_ids"]
    want = []
    for seq in seqs:
        with torch.inference_mode():
            p = model(torch.tensor([seq + suffix])).logits[0, -1].softmax(-1)
        want.append(sum(d * p[t].item() for t, d in digits.items())
                    / sum(p[t].item() for t in digits))
    assert got == pytest.approx(want, abs=1e-5)
