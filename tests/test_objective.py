"""Verifiable instructions end to end without a model: sources, the constraints ranker, pairing
that cannot be won by length, the dataset's per-candidate checks, and the objective evaluation."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from prefloop.artifacts import read_manifest, write_jsonl, write_manifest
from prefloop.config import InstructionsConfig, PairsConfig, RankConfig, Recipe
from prefloop.constraints import evaluate as ev
from prefloop.errors import PrefloopError
from prefloop.rankers.constraints import ConstraintsRanker, check_response
from prefloop.stages import instructions, pairs, rank
from prefloop.stages.instructions import load_local, load_source, split_items

NO_COMMA = [{"kind": "punctuation:no_comma", "args": {}}]
TITLE_AND_PS = [{"kind": "detectable_format:title", "args": {}},
                {"kind": "detectable_content:postscript", "args": {"postscript_marker": "P.S."}}]
SHORT = [{"kind": "length_constraints:number_words",
          "args": {"relation": "less than", "num_words": 8}}]


# -- sources -------------------------------------------------------------------------------------


def test_builtin_verifiable_set_splits_by_its_own_topics():
    cfg = InstructionsConfig(source="verifiable", n_train=40, n_heldout=30, seed=3)
    items = load_source(cfg)
    train, heldout = split_items(items, cfg, "instructions")
    assert (len(train), len(heldout)) == (40, 30)
    assert {it["split"] for it in train} == {"train"} and {it["split"] for it in heldout} == {
        "heldout"}
    assert not {it["topic"] for it in train} & {it["topic"] for it in heldout}
    assert all(it["constraints"] and it["task"] for it in train + heldout)
    # the same seed draws the same instructions
    assert split_items(items, cfg, "instructions")[0] == train


def test_kinds_filter_keeps_only_instructions_of_those_kinds(tmp_path):
    recipe = Recipe(instructions=InstructionsConfig(
        source="verifiable", n_train=5, n_heldout=5,
        kinds="punctuation:no_comma,detectable_format:title,detectable_content:postscript"))
    out = instructions.run(recipe, tmp_path / "run")
    rows = [json.loads(x) for f in ("train", "heldout")
            for x in (out / f"{f}.jsonl").read_text().splitlines()]
    allowed = {"punctuation:no_comma", "detectable_format:title", "detectable_content:postscript"}
    assert len(rows) == 10 and all({c["kind"] for c in r["constraints"]} <= allowed for r in rows)
    with pytest.raises(PrefloopError, match="instructions.kinds: unknown constraint kind "
                                            "'punctuation:no_commas'"):
        instructions.keep_kinds(rows, "punctuation:no_commas", "x")


def test_strip_other_kinds_keeps_the_named_constraints_and_rebuilds_the_text():
    ps = {"kind": "detectable_content:postscript", "args": {"postscript_marker": "P.S."}}
    word = {"kind": "keywords:existence", "args": {"keywords": ["tide"]}}
    rows = [
        {"id": "a", "task": "Describe rain.", "constraints": [NO_COMMA[0], ps],
         "instruction": "Describe rain. Do not use any commas (,) in your answer. At the end, "
                        "add a postscript: a new line starting with P.S."},
        {"id": "b", "task": "Describe snow.", "constraints": NO_COMMA,
         "instruction": "Describe snow. Do not use any commas (,) in your answer."},
        # once the comma rule is gone, pasting the instruction would meet "include tide"
        {"id": "c", "task": "Describe the sea.", "constraints": [NO_COMMA[0], word],
         "instruction": "Describe the sea. Do not use any commas (,) in your answer. Include the "
                        "word \"tide\" in your answer."},
        {"id": "d", "task": "Describe a lake.", "constraints": [ps],
         "instruction": "Describe a lake. hand-written text kept as it is"},
    ]
    kept = instructions.keep_kinds(rows, "detectable_content:postscript,keywords:existence", "x",
                                   strip=True)
    assert [r["id"] for r in kept] == ["a", "d"]
    assert kept[0]["constraints"] == [ps]
    assert kept[0]["instruction"] == ('Describe rain. At the end, add a postscript on its own '
                                      'line starting with "P.S.".')
    assert kept[1] is rows[3]  # nothing to strip: the record is kept as written
    # the plain reading keeps only records whose constraints are all of the kinds
    assert [r["id"] for r in instructions.keep_kinds(
        rows, "detectable_content:postscript,keywords:existence", "x")] == ["d"]
    no_task = [{"id": "e", "instruction": "Describe wind.", "constraints": [NO_COMMA[0], ps]}]
    with pytest.raises(PrefloopError, match=r"^x: record 1 \(id e\) has no 'task' field"):
        instructions.keep_kinds(no_task, "detectable_content:postscript", "x", strip=True)


def test_degenerate_repetition_is_a_guard():
    """The main job's printed table of 2026-12-03 showed answers like these on both sides."""
    from prefloop.constraints import guards

    assert guards.is_degenerate("1. " + "1." * 60)
    assert guards.is_degenerate("P.S.\n\n" * 20)
    assert guards.is_degenerate("The bulbs flicker at night. " * 14)
    assert guards.is_degenerate(" ".join(f"{n}." for n in range(1, 40)))  # no letters
    assert not guards.is_degenerate("P.S. P.S. P.S.")  # too short to call
    prose = ("Rain forms when water vapour cools and condenses around tiny dust particles. The "
             "droplets merge until they are heavy enough to fall, and wind carries them along. "
             "1. Clouds form. 2. Droplets grow. 3. Rain falls on the hills below.")
    assert not guards.is_degenerate(prose)
    assert guards.repeated_share(prose) == 0.0
    item = {"id": "r", "instruction": "Describe rain.", "task": "Describe rain.",
            "constraints": NO_COMMA}
    o = ev.evaluate([item] * 3, [prose] * 3, [prose, "1. " + "1." * 60, "1. " + "1." * 60])
    assert (o["original"]["degenerate"], o["dpo"]["degenerate"]) == (0, 2)
    assert "more degenerate answers (repetition) (2 vs 0)" in o["guards_fired"]


def test_a_loop_after_prose_is_degenerate_too():
    """Loops that zlib does not shrink below 15 %: they start after a sentence of prose or count
    up. The main job's greedy answers of 2026-12-07 held 10 (original) and 11 (DPO) of 60 such;
    the narrower rule alone (is_tight_loop, the guard before that day) counted 0 and 1."""
    from prefloop.constraints import guards

    handle = ("To replace a worn-out cabinet handle, you need to carefully remove the handle and "
              "remove the handle itself. This can be done by using " + "a combination of " * 12)
    listed = "".join(f"{n}. Keep warm: " for n in range(1, 16))
    sign = "\n\n".join(f"{n}. Learn the alphabet: The alphabet consists of 20 letters in the "
                        "language of sign language." for n in range(1, 5))
    for text in (handle, listed, sign):
        assert not guards.is_tight_loop(text)
        assert guards.is_degenerate(text)
    # 15 items "N. Keep warm:" are 45 words (numbers masked): 42 4-grams, 3 of them distinct
    assert guards.repeated_share(listed) == 1 - 3 / 42
    # a numbered list whose items differ stays prose; a paragraph said twice is a loop
    steps = ("1. Unscrew the old handle from the inside of the door. 2. Measure the distance "
             "between the holes. 3. Buy a handle with the same spacing and finish. 4. Fit the "
             "new screws and tighten them by hand.")
    assert guards.repeated_share(steps) == 0.0 and not guards.is_degenerate(steps)
    twice = ("Mulch keeps the soil moist and cool in summer and it feeds the worms that loosen "
             "the ground. ") * 2
    assert 0.4 < guards.repeated_share(twice) < 0.5 and guards.is_degenerate(twice)
    assert not guards.is_degenerate("a b " * 12)  # under 60 bytes: too short to call


def test_local_file_constraints_are_checked_with_file_line_and_field(tmp_path):
    path = tmp_path / "mine.jsonl"
    good = {"id": "a", "instruction": "Describe rain.", "constraints": NO_COMMA}
    bad = {"id": "b", "instruction": "Describe snow.",
           "constraints": [{"kind": "length_constraints:number_words",
                            "args": {"relation": "less than", "num_words": "forty"}}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(PrefloopError) as e:
        load_local(path, None)
    msg = str(e.value)
    assert msg.startswith(f"{path}:2: constraints[0].args.num_words: ") and "\n" not in msg
    path.write_text(json.dumps(good) + "\n")
    assert load_local(path, None) == [{"id": "a", "instruction": "Describe rain.",
                                       "constraints": NO_COMMA}]


def test_ifeval_rows_from_the_hub_use_the_same_loader(monkeypatch):
    rows = [{"key": 1000, "prompt": "Write a poem about tea. Do not use any commas.",
             "instruction_id_list": ["punctuation:no_comma", "keywords:existence"],
             "kwargs": [{"num_words": None}, {"keywords": ["leaf"], "num_words": None}]}]
    seen = {}

    def fake_load_dataset(source, split, revision=None):
        seen.update(source=source, split=split)
        return rows

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    items = load_source(InstructionsConfig(source="google/IFEval"))
    assert seen == {"source": "google/IFEval", "split": "train"}
    assert items == [{"id": "1000", "instruction": rows[0]["prompt"], "constraints": [
        {"kind": "punctuation:no_comma", "args": {}},
        {"kind": "keywords:existence", "args": {"keywords": ["leaf"]}}]}]


# -- the ranker ----------------------------------------------------------------------------------


def test_constraints_ranker_fields_and_hollow_answers():
    instruction = "Describe a storm. Do not use any commas."
    ok = check_response("Rain falls hard and the wind howls.", instruction, NO_COMMA)
    assert ok == {"score": 1.0, "n_valid": 1, "scores": [], "strict": 1.0, "loose": 1.0,
                  "hollow": None, "length_free": False,
                  "checks": [{"kind": "punctuation:no_comma", "strict": True, "loose": True}]}
    refusal = check_response("I'm sorry for the confusion.", instruction, NO_COMMA)
    assert (refusal["score"], refusal["strict"], refusal["hollow"]) == (0.0, 1.0, "refusal")
    copy = check_response("Describe a storm. Do not use any", instruction, NO_COMMA)
    assert (copy["score"], copy["hollow"]) == (0.0, "copy")
    both = check_response("<<Storm>>\nThunder rolls in over the hills.\nP.S. stay dry",
                          "Describe a storm.", TITLE_AND_PS)
    assert both["score"] == 1.0 and [c["strict"] for c in both["checks"]] == [True, True]
    half = check_response("Thunder rolls in over the hills.\nP.S. stay dry", "Describe a storm.",
                          TITLE_AND_PS)
    assert half["score"] == 0.5
    assert check_response("Short one.", "Be brief.", SHORT)["length_free"] is True


def test_a_repetition_loop_is_hollow_whatever_it_satisfies():
    """A greedy loop ("1.1.1...", one phrase again and again) has no comma and may repeat the
    postscript, but answers nothing: score 0, hollow "degenerate"; the ranker's counts name it."""
    ps = [{"kind": "detectable_content:postscript", "args": {"postscript_marker": "P.S."}},
          {"kind": "punctuation:no_comma", "args": {}}]
    task = "Why is the sky blue?"
    loop = "The sky is blue. " * 30 + "\nP.S. The sky is blue."
    r = check_response(loop, task, ps)
    assert (r["score"], r["strict"], r["hollow"]) == (0.0, 1.0, "degenerate")
    answer = "Air scatters blue light more than red light so the sky looks blue.\nP.S. Look up"
    assert (check_response(answer, task, ps)["score"], check_response(answer, task, ps)["hollow"]
            ) == (1.0, None)
    from prefloop.config import RankConfig
    from prefloop.rankers.constraints import ConstraintsRanker

    records = [{"id": "a", "instruction": task, "constraints": ps, "response": x}
               for x in (loop, answer, "1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1")]
    fields, counts = ConstraintsRanker(RankConfig(ranker="constraints")).score(records, Path("."))
    assert [f["hollow"] for f in fields] == ["degenerate", None, "degenerate"]
    assert counts["hollow"] == {"empty": 0, "refusal": 0, "copy": 0, "bare": 0, "degenerate": 2}


def test_a_bare_postscript_or_closing_phrase_is_hollow():
    """What a 135M model learned from postscript pairs at first: the P.S. instead of an answer."""
    ps = [{"kind": "detectable_content:postscript", "args": {"postscript_marker": "P.P.S"}}]
    end = [{"kind": "startend:end_checker", "args": {"end_phrase": "Hope this helps."}}]
    task = "Why do mountains form?"
    bare = check_response("P.P.S. Mountains form when rock rises and cools down slowly.", task, ps)
    assert (bare["score"], bare["strict"], bare["hollow"]) == (0.0, 1.0, "bare")
    # four words before the P.S. are still bare; five make an answer
    assert check_response("Plates push rock up.\np.p.s. neat", task, ps)["hollow"] == "bare"
    real = check_response("Plates push the rock upward.\np.p.s. neat", task, ps)
    assert (real["score"], real["hollow"]) == (1.0, None)
    assert check_response('"Hope this helps."', task, end)["hollow"] == "bare"
    closing = check_response("Plates collide and fold the crust upward. Hope this helps.", task,
                             end)
    assert (closing["score"], closing["hollow"]) == (1.0, None)
    # a short answer to an instruction with neither constraint is not bare
    assert check_response("Short one.", "Be brief.", SHORT)["hollow"] is None
    # the evaluation counts bare answers and the guard names them
    item = {"id": "m", "instruction": task + " End with P.P.S", "task": task, "constraints": ps}
    answer = "Plates push the rock upward.\nP.P.S. neat"
    o = ev.evaluate([item] * 4, [answer] * 4, ["P.P.S. neat"] * 3 + [answer])
    assert (o["original"]["bare"], o["dpo"]["bare"]) == (0, 3)
    assert ("more bare answers (only the demanded postscript or closing phrase) (3 vs 0)"
            in o["guards_fired"])


def test_constraints_ranker_refuses_instructions_without_constraints(tmp_path):
    records = [{"id": "x", "sample": 0, "instruction": "hi", "response": "hello"}]
    with pytest.raises(PrefloopError, match="instruction 'x' has no constraints; use "
                                            "instructions.source=verifiable"):
        ConstraintsRanker(RankConfig(ranker="constraints")).score(records, tmp_path)


# -- pairing -------------------------------------------------------------------------------------


def cand(sample: int, score: float, tokens: int, **extra) -> dict:
    return {"sample": sample, "score": score, "scores": [], "response_tokens": tokens,
            "response": f"r{sample}", **extra}


def test_length_matched_pair_prefers_comparable_lengths():
    cands = [cand(0, 1.0, 10), cand(1, 0.5, 40), cand(2, 0.0, 45), cand(3, 0.0, 12)]
    chosen, rejected = pairs.choose_pair(cands)  # unmatched: argmax vs argmin (longest)
    assert (chosen["sample"], rejected["sample"]) == (0, 2)
    chosen, rejected = pairs.choose_pair(cands, length_match=0.7)
    assert (chosen["sample"], rejected["sample"]) == (0, 3)  # 10 vs 12 tokens, margin 1
    assert pairs.choose_pair([cand(0, 1.0, 10), cand(1, 0.0, 40)],
                             length_match=0.7) == "length_unmatched"
    # a length constraint: length may differ (it is what the constraint is about)
    free = [cand(0, 1.0, 10, length_free=True), cand(1, 0.0, 40, length_free=True)]
    assert [c["sample"] for c in pairs.choose_pair(free, length_match=0.7)] == [0, 1]
    # ... unless every pair must be length-matched (pairs.length_match_all)
    assert pairs.choose_pair(free, length_match=0.7, length_match_all=True) == "length_unmatched"
    free.append(cand(2, 0.5, 11, length_free=True))
    assert [c["sample"] for c in pairs.choose_pair(free, length_match=0.7,
                                                   length_match_all=True)] == [0, 2]


def test_quality_breaks_ties_and_gates():
    cands = [cand(0, 1.0, 10, quality=1.0), cand(1, 1.0, 10, quality=3.0),
             cand(2, 0.0, 10, quality=2.0), cand(3, 0.0, 10, quality=4.0)]
    chosen, rejected = pairs.choose_pair(cands)
    assert (chosen["sample"], rejected["sample"]) == (1, 2)  # best quality vs worst quality
    gated = [cand(0, 1.0, 10, quality=1.0), cand(1, 0.0, 10, quality=4.0)]
    assert pairs.choose_pair(gated, quality_gate=True) == "quality_gate"
    assert [c["sample"] for c in pairs.choose_pair(gated)] == [0, 1]


def _write_generations(run_dir: Path, rows: list[tuple[str, int, str, int]]) -> None:
    recs = [{"id": i, "sample": s, "instruction": f"Tell me about {i}. Do not use any commas.",
             "prompt_text": "p", "prompt_tokens": 3, "response": text, "response_tokens": n,
             "finish_reason": "eos", "constraints": NO_COMMA, "task": f"Tell me about {i}.",
             "model": "tiny"} for i, s, text, n in rows]
    write_jsonl(run_dir / "generate" / "generations.jsonl", recs)
    write_manifest(run_dir / "generate", "generate", "g", started=time.time())


def test_rank_and_pairs_keep_every_candidates_checks(tmp_path, capsys):
    from datasets import load_dataset

    run_dir = tmp_path / "run"
    _write_generations(run_dir, [
        ("tea", 0, "Tea is a leaf brewed in hot water.", 10),
        ("tea", 1, "Tea, a leaf, is brewed, then sipped.", 11),
        ("tea", 2, "Tea is a drink made from leaves and water.", 30),
        ("sun", 0, "The sun is a star.", 6), ("sun", 1, "The sun is hot and bright.", 7)])
    recipe = Recipe(rank=RankConfig(ranker="constraints"),
                    pairs=PairsConfig(length_match=0.8))
    rank.run(recipe, run_dir)
    assert capsys.readouterr().out == ""  # the command line prints the stage's summary line
    assert read_manifest(run_dir / "rank")["summary"].startswith(
        "5 responses checked against their constraints (no model)")
    out = pairs.run(recipe, run_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["pairs"] == 1 and manifest["counts"]["dropped_all_tied"] == 1
    assert manifest["counts"]["dropped_length_unmatched"] == 0
    (row,) = load_dataset(str(out / "dataset"), split="train")
    assert row["chosen"][0]["content"] == "Tea is a leaf brewed in hot water."  # 10 vs 11 tokens
    assert row["rejected"][0]["content"] == "Tea, a leaf, is brewed, then sipped."
    assert json.loads(row["constraints"]) == NO_COMMA
    assert row["candidate_checks"] == [[{"kind": "punctuation:no_comma", "strict": s,
                                         "loose": s}] for s in (True, False, True)]
    assert row["candidate_hollow"] == [None, None, None]
    card = (out / "dataset" / "README.md").read_text()
    assert "verifiable constraints (IFEval-style checks" in card


# -- objective evaluation -------------------------------------------------------------------------


def test_mcnemar_exact_p_values():
    assert ev.mcnemar_p(0, 0) == 1.0
    assert ev.mcnemar_p(1, 6) == pytest.approx(2 * (1 + 7) / 128)
    assert ev.mcnemar_p(6, 1) == ev.mcnemar_p(1, 6)
    assert ev.mcnemar_p(3, 3) == 1.0


def test_paired_interval_brackets_the_difference_and_is_seeded():
    a = [False] * 30 + [True] * 30
    b = [True] * 45 + [False] * 15
    lo, hi = ev.paired_interval(a, b, seed=0)
    assert lo < 0.25 < hi and lo > 0  # Δ = 45/60 − 30/60 = 0.25
    assert ev.paired_interval(a, b, seed=0) == (lo, hi)
    same = ev.paired_interval(a, a, seed=0)
    assert same == (0.0, 0.0)


def items_and_answers():
    items = [{"id": f"i{k}", "instruction": f"Write about topic {k}. Do not use any commas.",
              "task": f"Write about topic {k}.", "constraints": NO_COMMA} for k in range(6)]
    original = [f"Topic {k} is big, wide, and deep in every sense of the word today." for k in
                range(6)]
    return items, original


def test_evaluate_counts_a_real_gain_without_guards():
    items, original = items_and_answers()
    dpo = [f"Topic {k} is big and wide and deep in every sense of the word today." for k in
           range(6)]
    o = ev.evaluate(items, original, dpo)
    assert (o["original"]["prompt_strict"], o["dpo"]["prompt_strict"]) == (0.0, 1.0)
    assert o["difference"]["only_dpo_right"] == 6 and o["guards_fired"] == []
    assert o["difference"]["mcnemar_p"] == pytest.approx(2 / 64)
    assert o["per_kind"] == {"punctuation:no_comma": {"n": 6, "original": 0.0, "dpo": 1.0}}
    assert (o["original"]["prompt_sound"], o["dpo"]["prompt_sound"]) == (0.0, 1.0)
    assert o["difference_sound"]["prompt_sound"] == 1.0


def test_sound_accuracy_counts_a_passing_hollow_answer_wrong():
    """IFEval's strict reading passes a refusal or a loop with no comma; the sound reading (strict
    and not empty, refusal, copy, bare or degenerate) does not."""
    items, original = items_and_answers()
    loop = "Topic is big. " * 20  # no comma, and degenerate repetition
    dpo = [f"Topic {k} is big and wide and deep in every sense of the word today." for k in
           range(4)] + [loop, "I'm sorry but I cannot write about that topic today."]
    o = ev.evaluate(items, original, dpo)
    assert o["dpo"]["prompt_strict"] == 1.0
    assert o["dpo"]["prompt_sound"] == pytest.approx(4 / 6)
    assert [it["dpo"]["sound"] for it in o["items"]] == [True] * 4 + [False, False]
    assert (o["dpo"]["degenerate"], o["dpo"]["refusals"]) == (1, 1)
    d = o["difference_sound"]
    assert (d["only_dpo_right"], d["only_original_right"]) == (4, 0)
    assert d["mcnemar_p"] == pytest.approx(2 / 16)
    assert o["difference"]["only_dpo_right"] == 6


def test_evaluate_calls_a_collapsed_or_refusing_gain_hollow():
    items, original = items_and_answers()
    dpo = ["I'm sorry for the confusion."] * 3 + ["Topic is big."] * 3
    o = ev.evaluate(items, original, dpo)
    assert o["dpo"]["prompt_strict"] == 1.0  # every answer has no comma...
    fired = o["guards_fired"]
    assert fired[0].startswith("answers collapsed in length (median")  # ...but it is hollow
    assert "more refusals (3 vs 0)" in fired
    from prefloop.stages.compare import reading

    assert reading(o).startswith("Verdict: the accuracy gain is hollow, not a success:")


def test_recipe_keys_are_validated():
    from prefloop.config import apply_overrides

    with pytest.raises(PrefloopError, match=r"pairs.length_match: must be in \[0, 1\), got 1.5"):
        apply_overrides(Recipe(), ["pairs.length_match=1.5"])
    with pytest.raises(PrefloopError, match="rank.quality: 'gpt' is not one of none, judge"):
        apply_overrides(Recipe(), ["rank.quality=gpt"])
    r = apply_overrides(Recipe(), ["rank.ranker=constraints", "compare.ranker=judge"])
    assert replace(r.rank, ranker="constraints") == r.rank and r.compare.ranker == "judge"
