"""Self-Instruct prompt creation: template, parsing, filters, ROUGE-L, seeding, resume."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from prefloop.artifacts import write_manifest
from prefloop.config import InstructionsConfig, IterateConfig, Recipe
from prefloop.engine import Completion
from prefloop.engine.backend import LocalBackend
from prefloop.errors import PrefloopError
from prefloop.stages import selfinstruct as si

# -- template and parsing --------------------------------------------------------------------------


def test_fewshot_prompt_numbers_demos_and_leaves_the_next_item_open():
    text = si.fewshot_prompt(["Say  hi\nplease.", "Name a colour."], head="Tasks:\n")
    assert text == "Tasks:\n1. Say hi please.\n2. Name a colour.\n3."


def test_shipped_header_is_our_own_wording_and_one_line():
    head = si.header()
    assert head.endswith("\n") and head.count("\n") == 1
    assert "come up with a series of tasks" not in head.lower()
    assert si.fewshot_prompt(["a b c d"] * 8).endswith("\n8. a b c d\n9.")


@pytest.mark.parametrize("text,truncated,expected", [
    (" Plan a trip to Rome.\n10. Explain tides to a child.", False,
     ["Plan a trip to Rome.", "Explain tides to a child."]),
    # a cut continuation loses its (incomplete) last item
    (" Plan a trip to Rome.\n10. Explain tides to", True, ["Plan a trip to Rome."]),
    # a blank line ends the list, so what follows is ignored and nothing is incomplete
    (" Plan a trip.\n10 . Sing a song.\n\n11. Ignored text that", True,
     ["Plan a trip.", "Sing a song."]),
    ("   \n", False, []),
    (" Only one item, cut", True, []),
])
def test_parse_continuation(text, truncated, expected):
    assert si.parse_continuation(text, truncated) == expected


# -- rule filters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text,reason", [
    ("Too short here", "too_short"),  # 3 words
    ("Four words is enough", None),
    ("word " * 150, None),
    ("word " * 151, "too_long"),
    ("Describe this image in detail please", "banned_keyword"),
    ("Sketch the Maps of two old cities", "banned_keyword"),
    ("How do I go to the station?", "banned_keyword"),
    ("Explain the mapping between two sets", None),  # word boundary: 'mapping' is fine
    ("Explain what a goto statement does", None),
    ("Draw me a friendly dog please", "banned_keyword"),
    ("Write a program that sorts numbers", "write_a_program"),
    ("write a Program to add two numbers", "write_a_program"),
    ("Write a poem about programs today", None),
    ("- List three fruits you like", "starts_with_punctuation"),
    ('"Quote" a famous person for me', "starts_with_punctuation"),
    ("Explain the café culture in Paris", "non_ascii"),
])
def test_rule_violation(text, reason):
    assert si.rule_violation(text.strip(), 4, 150) == reason


def test_rule_violation_order_is_length_first():
    assert si.rule_violation("Draw images", 4, 150) == "too_short"


# -- ROUGE-L ---------------------------------------------------------------------------------------


def test_rouge_index_matches_rouge_score_exactly():
    from rouge_score import rouge_scorer

    rng = random.Random(0)
    vocab = "the cat sat on a mat dog ran far away big small red blue".split()
    existing = [" ".join(rng.choices(vocab, k=rng.randint(1, 40))) for _ in range(30)]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    index = si.RougeIndex(existing)
    for _ in range(15):
        new = " ".join(rng.choices(vocab, k=rng.randint(1, 12)))
        expected = max(scorer.score(e, new)["rougeL"].fmeasure for e in existing)
        best, text = index.most_similar(new)
        assert best == pytest.approx(expected, abs=1e-12)
        assert scorer.score(text, new)["rougeL"].fmeasure == pytest.approx(best, abs=1e-12)


def test_rouge_index_exact_values():
    index = si.RougeIndex(["a b c d"])
    assert index.most_similar("a c d e") == (0.75, "a b c d")
    assert index.most_similar("x y z") == (0.0, None)
    assert si.RougeIndex().most_similar("a b") == (0.0, None)


def test_judge_candidate_threshold_is_strictly_greater():
    cfg = IterateConfig(rouge_threshold=0.75)
    index = si.RougeIndex(["alpha beta gamma delta"])
    assert si.judge_candidate("alpha gamma delta epsilon", index, cfg) == (None, 0.75)
    reason, score = si.judge_candidate("alpha beta gamma delta epsilon", index, cfg)
    assert (reason, round(score, 4)) == ("rouge", 0.8889)


# -- demos and seed mode ---------------------------------------------------------------------------


def test_sample_demos_six_seed_two_generated_when_available():
    rng = random.Random(0)
    seeds = [f"seed {i}" for i in range(20)]
    demos = si.sample_demos(rng, seeds, ["gen a", "gen b", "gen c"], 6, 2)
    assert len(demos) == 8 and len(set(demos)) == 8
    assert sum(d.startswith("gen") for d in demos) == 2
    demos = si.sample_demos(rng, seeds, ["gen a"], 6, 2)
    assert sum(d.startswith("gen") for d in demos) == 1 and len(demos) == 8
    assert all(d.startswith("seed") for d in si.sample_demos(rng, seeds, [], 6, 2))


def test_seed_round_prompts_are_disjoint_and_deterministic():
    pool = [{"id": f"p{i}", "instruction": f"prompt {i}"} for i in range(10)]
    r1, r2 = (si.seed_round_prompts(pool, t, 4, seed=3) for t in (1, 2))
    assert len(r1) == len(r2) == 4
    assert not {x["id"] for x in r1} & {x["id"] for x in r2}
    assert si.seed_round_prompts(pool, 2, 4, seed=3) == r2
    with pytest.raises(PrefloopError, match=r"round 3 needs 12 seed prompts .* holds 10"):
        si.seed_round_prompts(pool, 3, 4, seed=3)


# -- generation with a scripted engine -------------------------------------------------------------

EOS = 0


class CharTokenizer:
    """One id per character; id 0 is EOS/PAD."""

    eos_token_id = EOS
    pad_token_id = EOS

    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i != EOS)


FAKE_MODEL = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=EOS),
                             config=SimpleNamespace(max_position_embeddings=4096))


def fake_backend() -> LocalBackend:
    return LocalBackend(FAKE_MODEL, CharTokenizer())

SCRIPT = [
    " Plan a weekend trip to Rome.\n10. Plan a weekend trip to Rome.\n11. Hi\n\n",
    " Describe this picture for me now.\n10. Write a program that prints primes.",
    " Explain tides to a curious child.\n10. ¿Qué hora es ahora mismo?\n11. Suggest",
    " Compose a haiku about autumn rain.",
]


def scripted_engine(calls: list, fail_on_call: int | None = None, sessions: list | None = None):
    """engine.generate stand-in: continuation i of SCRIPT (cycled) for the i-th prompt overall;
    records each call's engine session in `sessions`."""
    sessions = [] if sessions is None else sessions

    def generate(model, prompts, n, sampling, *, eos_token_ids, pad_token_id, batch_size=None,
                 on_prompt_done=None, stream_ids=None, session=None):
        assert n == 1 and eos_token_ids == {EOS} and pad_token_id == EOS
        assert (sampling.temperature, sampling.top_p) == (0.6, 0.9)
        sessions.append(session)
        session.loop = "a loop"  # what a real call leaves for the next
        calls.append((len(prompts), sampling.seed))
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise KeyboardInterrupt
        out = []
        for i, _ in enumerate(prompts):
            text = SCRIPT[(len(calls) - 1 + i) % len(SCRIPT)]
            cut = text.endswith("Suggest")
            ids = [ord(c) for c in text] + ([] if cut else [EOS])
            out.append([Completion(ids, "length" if cut else "eos")])
        return out

    return generate


SEEDS = ["Give me three tips for better sleep.", "What is the capital city of France?",
         "Write a short poem about the sea.", "Explain recursion with a simple example.",
         "How do I learn to play the guitar?", "Summarize the plot of Hamlet briefly.",
         "Suggest a name for my new bakery."]


def test_generate_prompts_filters_and_counts(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("prefloop.engine.generate", scripted_engine(calls))
    cfg = IterateConfig(prompts_per_round=3)
    out = tmp_path / "candidates.jsonl"
    got = si.generate_prompts(fake_backend(), SEEDS, SEEDS, [], cfg, out,
                              round_seed=7)
    # one call of 8 prompts runs through the 4 scripted continuations twice
    assert calls == [(8, 7)]
    assert got == ["Plan a weekend trip to Rome.", "Explain tides to a curious child.",
                   "Compose a haiku about autumn rain."]
    counts = si.reason_counts(out)
    assert counts == {"generations": 8, "parsed": 16, "unparsable_generations": 0,
                      "accepted": 3, "rouge": 5, "too_short": 2, "banned_keyword": 2,
                      "write_a_program": 2, "non_ascii": 2}


def test_generate_prompts_stops_at_the_budget(tmp_path, monkeypatch):
    calls, sessions = [], []
    monkeypatch.setattr("prefloop.engine.generate", scripted_engine(calls, sessions=sessions))
    cfg = IterateConfig(prompts_per_round=5)
    monkeypatch.setattr(si, "MAX_GENERATIONS_PER_PROMPT", 3)  # ceil(5 * 3 / 8) = 2 calls
    got = si.generate_prompts(fake_backend(), SEEDS, SEEDS, [], cfg,
                              tmp_path / "c.jsonl", round_seed=7)
    assert len(calls) == 2 and len(got) == 3  # the second call only repeats itself
    assert sessions[0] is sessions[1] and sessions[0].loop is None  # one session, closed after


def test_generate_prompts_resumes_after_an_interrupt(tmp_path, monkeypatch):
    cfg = IterateConfig(prompts_per_round=4)
    seeds = SEEDS
    script = [" Plan a weekend trip to Rome.\n\n", " Explain tides to a curious child.\n\n",
              " Compose a haiku about autumn rain.\n\n", " Teach me a card trick today.\n\n"]
    monkeypatch.setattr(si, "CALLS_PER_BATCH", 1)

    def run(fail_on_call):
        calls = []

        def generate(model, prompts, n, sampling, **kw):
            calls.append(sampling.seed)
            if fail_on_call is not None and len(calls) == fail_on_call:
                raise KeyboardInterrupt
            text = script[sampling.seed - 100]  # one continuation per call number
            return [[Completion([ord(c) for c in text] + [EOS], "eos")]]

        monkeypatch.setattr("prefloop.engine.generate", generate)
        return calls

    out = tmp_path / "candidates.jsonl"
    first = run(fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        si.generate_prompts(fake_backend(), seeds, seeds, [], cfg, out,
                            round_seed=100)
    assert first == [100, 101, 102] and len(out.read_text().splitlines()) == 2
    second = run(fail_on_call=None)
    got = si.generate_prompts(fake_backend(), seeds, seeds, [], cfg, out,
                              round_seed=100)
    assert second == [102, 103]  # calls 0 and 1 were not redone
    assert got == [s.strip() for s in script]
    assert [json.loads(x)["call"] for x in out.read_text().splitlines()] == [0, 1, 2, 3]


# -- the round step --------------------------------------------------------------------------------


def _run_dir(tmp_path: Path, n_train: int = 12) -> Path:
    from prefloop.artifacts import write_jsonl

    run_dir = tmp_path / "run"
    pool = [{"id": f"tr-{i}", "instruction": f"Seed instruction number {i} for you"}
            for i in range(n_train)]
    write_jsonl(run_dir / "instructions" / "train.jsonl", pool)
    write_jsonl(run_dir / "instructions" / "heldout.jsonl",
                [{"id": "ho-0", "instruction": "A held out evaluation prompt here"}])
    write_manifest(run_dir / "instructions", "instructions", "h0", started=0.0)
    return run_dir


def test_run_round_seed_mode(tmp_path):
    run_dir = _run_dir(tmp_path)
    recipe = Recipe(iterate=IterateConfig(prompt_source="seed", prompts_per_round=5))
    out = si.run_round(recipe, run_dir, 1)
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert len(train) == 5 and all(r["id"].startswith("tr-") for r in train)
    assert (out / "heldout.jsonl").read_text() == (
        run_dir / "instructions" / "heldout.jsonl").read_text()
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"] == {"source": "seed", "accepted": 5, "train": 5, "heldout": 1}
    # round 2 chains to round 1's model: it refuses to start before that exists
    with pytest.raises(PrefloopError, match="rounds/1/model: stage 'model' has not finished"):
        si.run_round(recipe, run_dir, 2)


def test_run_round_self_instruct_loads_the_fixed_prompt_model(tmp_path, monkeypatch):
    run_dir = _run_dir(tmp_path)
    loaded = []

    def fake_load(cfg):
        loaded.append(cfg.name)
        return FAKE_MODEL, CharTokenizer()

    monkeypatch.setattr("prefloop.models.load_model", fake_load)
    monkeypatch.setattr("prefloop.engine.generate", scripted_engine([]))
    recipe = Recipe(instructions=InstructionsConfig(source="x.jsonl"),
                    iterate=IterateConfig(prompts_per_round=3, prompt_model="fixed-judge/m"))
    out = si.run_round(recipe, run_dir, 1)
    assert loaded == ["fixed-judge/m"]
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert [r["id"] for r in train] == ["r1-si-0000", "r1-si-0001", "r1-si-0002"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["accepted"] == 3 and m["counts"]["prompt_model"] == "fixed-judge/m"
    # finished: a second call loads nothing
    si.run_round(recipe, run_dir, 1)
    assert loaded == ["fixed-judge/m"]
    # a changed prompt setting is refused instead of silently mixing prompt sets
    changed = replace(recipe, iterate=replace(recipe.iterate, prompt_temperature=1.0))
    with pytest.raises(PrefloopError, match="finished with a different config"):
        si.run_round(changed, run_dir, 1)


def test_too_few_demos_is_a_one_line_error(tmp_path, monkeypatch):
    run_dir = _run_dir(tmp_path, n_train=3)
    monkeypatch.setattr("prefloop.models.load_model", lambda *a, **k: (FAKE_MODEL,
                                                                        CharTokenizer()))
    with pytest.raises(PrefloopError, match="only 3 seed prompts pass .* needs 6"):
        si.run_round(Recipe(), run_dir, 1)
