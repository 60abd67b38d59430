"""The rank and pairs stages: scores.jsonl, judgments, resume, drops, the dataset and its card."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from test_judge import FakeEngine, judge_tokenizer
from tiny import read_jsonl_lines, tiny_llama

from prefloop import cards, engine
from prefloop.artifacts import read_manifest, write_jsonl, write_manifest
from prefloop.config import RankConfig, Recipe, dump_recipe
from prefloop.errors import PrefloopError
from prefloop.rankers.pairrm import PairRMRanker
from prefloop.stages import pairs, rank

INSTRUCTIONS = {"q0": "name a big river", "q1": "write a poem about the sea",
                "q2": "give three tips to sleep"}


def gen(id_: str, sample: int, response: str, tokens: int | None = None,
        finish: str = "eos") -> dict:
    return {"id": id_, "sample": sample, "instruction": INSTRUCTIONS[id_],
            "prompt_text": f"<s><|user|> {INSTRUCTIONS[id_]} </s> <|assistant|>",
            "prompt_tokens": 9, "response": response,
            "response_tokens": len(response.split()) + 1 if tokens is None else tokens,
            "finish_reason": finish, "model": "tiny"}


def write_generations(run_dir: Path, records: list[dict]) -> None:
    write_jsonl(run_dir / "generate" / "generations.jsonl", records)
    write_manifest(run_dir / "generate", "generate", "gen-hash", started=time.time())


def write_scores(run_dir: Path, records: list[dict], scores: list) -> None:
    """generations + rank/scores.jsonl for pairs tests; a score may be (mean, [samples])."""
    write_generations(run_dir, records)
    rows = []
    for r, s in zip(records, scores, strict=True):
        mean, samples = s if isinstance(s, tuple) else (s, [s])
        rows.append({"id": r["id"], "sample": r["sample"], "score": mean,
                     "n_valid": sum(x is not None for x in samples), "scores": samples,
                     "ranker": "judge:tiny", "finish_reason": r["finish_reason"],
                     "response_tokens": r["response_tokens"], "duplicate_of": None})
    write_jsonl(run_dir / "rank" / "scores.jsonl", rows)
    write_manifest(run_dir / "rank", "rank", "rank-hash", started=time.time())


@pytest.fixture
def judge_setup(tmp_path, monkeypatch):
    """A tiny judge model folder, a recipe that names it, and the fake engine."""
    tok = judge_tokenizer()
    folder = tmp_path / "judge-model"
    tiny_llama(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    recipe = Recipe(name="default")
    recipe = replace(recipe, model=replace(recipe.model, name=str(folder)),
                     rank=replace(RankConfig(), judge_max_new_tokens=32))
    fake = FakeEngine(tok)
    monkeypatch.setattr(engine, "generate", fake)
    return recipe, fake, tmp_path / "run"


def test_rank_with_judge_then_pairs(judge_setup, tmp_path):
    recipe, fake, run_dir = judge_setup
    write_generations(run_dir, [gen("q0", 0, "alpha"), gen("q0", 1, "beta"),
                                gen("q0", 2, "gamma"), gen("q1", 0, "alpha"),
                                gen("q1", 1, "alpha"), gen("q1", 2, "delta")])
    out = rank.run(recipe, run_dir)
    name = f"judge:{recipe.model.name}"
    scores = read_jsonl_lines(out / "scores.jsonl")
    assert [(s["id"], s["sample"], s["score"], s["n_valid"], s["scores"], s["duplicate_of"])
            for s in scores] == [
        ("q0", 0, 5.0, 3, [5.0] * 3, None), ("q0", 1, 3.0, 3, [4.0, 2.0, 3.0], None),
        ("q0", 2, 1.0, 3, [1.0] * 3, None), ("q1", 0, 5.0, 3, [5.0] * 3, None),
        ("q1", 1, 5.0, 3, [5.0] * 3, 0), ("q1", 2, None, 0, [None] * 3, None)]
    assert scores[0] == {"id": "q0", "sample": 0, "ranker": name, "finish_reason": "eos",
                         "response_tokens": 2, "duplicate_of": None, "score": 5.0,
                         "n_valid": 3, "scores": [5.0, 5.0, 5.0]}
    judgments = read_jsonl_lines(out / "judgments.jsonl")
    assert len(judgments) == 18
    assert judgments[3] == {"id": "q0", "sample": 1, "judge_sample": 0,
                            "text": "it is okay. Score : 4", "score": 4.0}
    counts = read_manifest(out)["counts"]
    assert counts == {"responses": 6, "scored": 5, "unscored": 1, "duplicates": 1,
                      "score_mean": 3.8, "score_histogram": {"1..2": 1, "3..4": 1, "4..5": 3},
                      "judge_samples": 18, "parse_failures": 3, "forced_scores": 0,
                      "prompt_too_long": 0,
                      "judge_sample_failure_rate": 0.1667,
                      "judge_sample_scores": {"1": 3, "2": 1, "3": 1, "4": 1, "5": 9}}
    assert read_manifest(out)["summary"] == (
        "5/6 responses scored from 18 judge samples: 15 parsed 'Score: X' from the judge's "
        "text, 3 without a score")
    assert len(fake.calls) == 1 and len(fake.calls[0]["prompts"]) == 6
    rank.run(recipe, run_dir)  # finished: a no-op, nothing judged again
    assert len(fake.calls) == 1

    pairs.run(recipe, run_dir)
    ds = load(run_dir, tmp_path)
    assert ds.to_list() == [{
        "id": "q0", "prompt": [{"role": "user", "content": "name a big river"}],
        "chosen": [{"role": "assistant", "content": "alpha"}],
        "rejected": [{"role": "assistant", "content": "gamma"}],
        "prompt_text": "<s><|user|> name a big river </s> <|assistant|>",
        "chosen_score": 5.0, "rejected_score": 1.0, "candidates": ["alpha", "beta", "gamma"],
        "scores": [5.0, 3.0, 1.0], "ranker": name, "generator": "tiny"}]
    m = read_manifest(run_dir / "pairs")
    assert m["counts"] == {"instructions": 2, "responses": 6, "scored": 5, "pairs": 1,
                           "dropped": 1, "dropped_too_few_scored": 1, "dropped_all_tied": 0,
                           "dropped_below_min_margin": 0, "removed_unscored": 1,
                           "removed_not_eos": 0, "removed_duplicate": 1}
    assert m["stats"]["margin_mean"] == 4.0 and m["stats"]["chosen_tokens_mean"] == 2.0
    assert read_jsonl_lines(run_dir / "pairs" / "dropped.jsonl") == [
        {"id": "q1", "reason": "too_few_scored", "n_candidates": 1, "scores": [5.0, 5.0, None]}]


def test_judge_resumes_from_appended_judgments(judge_setup):
    recipe, fake, run_dir = judge_setup
    write_generations(run_dir, [gen("q0", 0, "alpha"), gen("q0", 1, "beta"),
                                gen("q1", 0, "gamma")])
    path = run_dir / "rank" / "judgments.jsonl"
    done = [{"id": "q0", "sample": 0, "judge_sample": j, "text": "Score : 2", "score": 2.0}
            for j in range(3)]
    partial = [{"id": "q0", "sample": 1, "judge_sample": j, "text": "x", "score": 0.0}
               for j in range(2)]
    path.parent.mkdir(parents=True)
    # what a killed run leaves: its partial marker (written first) and the appended judgments
    from prefloop.artifacts import RunDir, config_hash

    marker = {"stage": "rank",
              "config_hash": config_hash(rank.stage_config(recipe, RunDir(run_dir).upstream))}
    (path.parent / "in_progress.json").write_text(json.dumps(marker))
    path.write_text("".join(json.dumps(r) + "\n" for r in done + partial) + '{"id": "q1", "sa')
    out = rank.run(recipe, run_dir)
    (call,) = fake.calls
    assert len(call["prompts"]) == 2  # (q0, 1) redone from scratch, (q1, 0); (q0, 0) kept
    scores = {(s["id"], s["sample"]): s["score"] for s in read_jsonl_lines(out / "scores.jsonl")}
    assert scores == {("q0", 0): 2.0, ("q0", 1): 3.0, ("q1", 0): 1.0}
    rows = read_jsonl_lines(path)
    assert len(rows) == 9 and rows[:3] == done


def test_judge_that_never_parses(judge_setup, monkeypatch):
    recipe, _, run_dir = judge_setup
    tok = judge_tokenizer()
    monkeypatch.setattr(engine, "generate", FakeEngine(tok, lambda text, s: "it is fine ."))
    write_generations(run_dir, [gen("q0", 0, "alpha"), gen("q0", 1, "beta")])
    out = rank.run(recipe, run_dir)
    assert [s["score"] for s in read_jsonl_lines(out / "scores.jsonl")] == [None, None]
    counts = read_manifest(out)["counts"]
    assert (counts["parse_failures"], counts["judge_sample_failure_rate"], counts["scored"]) == (
        6, 1.0, 0)
    with pytest.raises(PrefloopError) as e:
        pairs.run(recipe, run_dir)
    assert str(e.value) == (
        f"{run_dir / 'pairs'}: no preference pairs from 1 instructions (2 responses: 0 cut at "
        "max_new_tokens and dropped by require_eos, 2 unscored, 0 duplicates; instructions "
        "dropped: too few scored 1, all tied 0, below min margin 0); the largest cause: 2 of 2 "
        "responses got no score from the ranker; 0 of 6 judgments parsable; set "
        "rank.judge_force_score=true or use a stronger rank.judge_model; see "
        f"{run_dir / 'pairs' / 'dropped.jsonl'}")
    assert read_manifest(run_dir / "pairs") is None  # not done: a rerun recomputes
    assert len(read_jsonl_lines(run_dir / "pairs" / "dropped.jsonl")) == 1
    forced = replace(recipe, rank=replace(recipe.rank, judge_force_score=True))
    out = rank.run(forced, run_dir, force=True)
    counts = read_manifest(out)["counts"]
    assert (counts["parse_failures"], counts["forced_scores"], counts["scored"],
            counts["judge_sample_failure_rate"]) == (6, 6, 2, 0.0)
    rows = read_jsonl_lines(out / "judgments.jsonl")
    assert all(r["forced"] and 0.0 < r["score"] < 5.0 for r in rows) and len(rows) == 6
    # the summary says where each score came from, not "6 had no parsable score"
    assert read_manifest(out)["summary"] == (
        "2/2 responses scored from 6 judge samples: 0 parsed 'Score: X' from the judge's text, "
        "6 read from the judge's digit probabilities after 'Score:' (judge_force_score: the "
        "expectation Σ d·p(d)), 0 without a score")


# -- pairs from given scores -------------------------------------------------------------------


def load(run_dir: Path, tmp_path: Path):
    from datasets import load_dataset

    return load_dataset(str(run_dir / "pairs" / "dataset"), split="train",
                        cache_dir=str(tmp_path / "hf-cache"))


def test_one_response_per_prompt_drops_everything(tmp_path):
    run_dir = tmp_path / "run"
    write_scores(run_dir, [gen("q0", 0, "a"), gen("q1", 0, "b"), gen("q2", 0, "c")],
                 [4.0, 3.0, 2.0])
    with pytest.raises(PrefloopError) as e:
        pairs.run(Recipe(), run_dir)
    assert str(e.value).split("; see ")[0] == (
        f"{run_dir / 'pairs'}: no preference pairs from 3 instructions (3 responses: 0 cut at "
        "max_new_tokens and dropped by require_eos, 0 unscored, 0 duplicates; instructions "
        "dropped: too few scored 3, all tied 0, below min margin 0); the largest cause: 3 "
        "instructions had fewer than 2 responses; raise generate.k (now 5)")


def test_all_ties_and_margin_are_dropped(tmp_path):
    run_dir = tmp_path / "run"
    write_scores(run_dir, [gen("q0", 0, "a"), gen("q0", 1, "b"), gen("q1", 0, "c"),
                           gen("q1", 1, "d"), gen("q2", 0, "e"), gen("q2", 1, "f")],
                 [4.0, 4.0, 3.0, 3.0, 1.0, 1.0])
    with pytest.raises(PrefloopError, match=r"dropped: too few scored 0, all tied 3, below min "
                       r"margin 0\); the largest cause: every response of 3 instructions got the "
                       r"same score; raise generate.k \(now 5\) or generate.temperature \(now "
                       r"0.8\) for more varied responses; see "):
        pairs.run(Recipe(), run_dir)
    write_scores(run_dir, [gen("q0", 0, "a"), gen("q0", 1, "b"), gen("q1", 0, "c"),
                           gen("q1", 1, "d")], [4.0, 4.0, 5.0, 4.5])
    r = replace(Recipe(), pairs=replace(Recipe().pairs, min_margin=1.0))
    with pytest.raises(PrefloopError, match=r"too few scored 0, all tied 1, below min margin 1\); "
                       r"the largest cause: every response of 1 instructions"):
        pairs.run(r, run_dir)


def test_empty_pairs_name_the_cut_responses_and_the_running_commands_keys(tmp_path):
    """Every response cut at max_new_tokens and dropped by require_eos: the error says so and
    names generate.max_new_tokens for `run`, iterate.max_new_tokens for the iterate loop."""
    from prefloop.stages.iterate import PAIR_KEYS

    run_dir = tmp_path / "run"
    recs = [gen(q, i, f"{q} answer {i}", finish="length") for q in ("q0", "q1") for i in range(3)]
    recs.append(gen("q2", 0, "short", finish="eos"))
    write_scores(run_dir, recs, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 4.0])
    r = replace(Recipe(), pairs=replace(Recipe().pairs, require_eos=True))
    expected = (f"{run_dir / 'pairs'}: no preference pairs from 3 instructions (7 responses: 6 "
                "cut at max_new_tokens and dropped by require_eos, 0 unscored, 0 duplicates; "
                "instructions dropped: too few scored 3, all tied 0, below min margin 0); the "
                "largest cause: 6 of 7 responses were cut at max_new_tokens and "
                "pairs.require_eos dropped them; raise {key} (now 256) or set "
                f"pairs.require_eos=false; see {run_dir / 'pairs' / 'dropped.jsonl'}")
    with pytest.raises(PrefloopError) as e:
        pairs.run(r, run_dir)
    assert str(e.value) == expected.format(key="generate.max_new_tokens")
    with pytest.raises(PrefloopError) as e:
        pairs.run(r, run_dir, keys=PAIR_KEYS)
    assert str(e.value) == expected.format(key="iterate.max_new_tokens")


def test_largest_cause_explains_too_few_scored_by_what_removed_the_responses():
    c = {"too_few_scored": 4, "all_tied": 3, "below_min_margin": 0, "length_unmatched": 0,
         "quality_gate": 0, "cut": 2, "unscored": 5, "duplicate": 1}
    assert pairs.largest_cause(c) == "unscored"
    assert pairs.largest_cause({**c, "all_tied": 5}) == "all_tied"
    assert pairs.largest_cause({**c, "length_unmatched": 9}) == "length_unmatched"
    assert pairs.largest_cause({**c, "cut": 0, "unscored": 0, "duplicate": 0}) == "too_few_scored"


def test_duplicates_eos_and_tie_break(tmp_path):
    run_dir = tmp_path / "run"
    recs = [gen("q0", 0, "same"), gen("q0", 1, "same"), gen("q0", 2, "other"),  # dup only
            gen("q1", 0, "long cut", finish="length"), gen("q1", 1, "b"), gen("q1", 2, "c"),
            gen("q2", 0, "one two three", tokens=9), gen("q2", 1, "one", tokens=3),
            gen("q2", 2, "x y", tokens=5), gen("q2", 3, "w", tokens=2),
            gen("q2", 4, "v", tokens=2)]
    scores = [4.0, 1.0, 4.0,  # q0: "same" kept once (first, 4.0) ties "other" -> all_tied
              5.0, 4.0, 2.0,  # q1: the cut 5.0 is excluded with require_eos
              (4.0, [4.0, 4.0]), (4.0, [4.0, 4.0]), (1.0, [0.0, 2.0]), (1.0, [1.0, 1.0]),
              (1.0, [1.0, 1.0])]
    write_scores(run_dir, recs, scores)
    r = replace(Recipe(), pairs=replace(Recipe().pairs, require_eos=True))
    pairs.run(r, run_dir)
    rows = load(run_dir, tmp_path).to_list()
    assert [(x["id"], x["chosen"][0]["content"], x["rejected"][0]["content"]) for x in rows] == [
        ("q1", "b", "c"),
        # q2: best tie (equal variance) -> shorter "one"; worst tie: "x y" has variance 1, the
        # two zero-variance ones tie on length 2 -> lower sample "w"
        ("q2", "one", "w")]
    counts = read_manifest(run_dir / "pairs")["counts"]
    assert (counts["removed_duplicate"], counts["removed_not_eos"], counts["dropped_all_tied"],
            counts["pairs"]) == (1, 1, 1, 2)


def test_choose_pair_rules():
    def c(sample, score, tokens, scores=None):
        return {"sample": sample, "score": score, "response_tokens": tokens,
                "scores": scores if scores is not None else [score]}

    hi_noisy, hi_calm = c(0, 4.0, 5, [5.0, 3.0]), c(1, 4.0, 50, [4.0, 4.0])
    lo_short, lo_long = c(2, 1.0, 3), c(3, 1.0, 30)
    assert pairs.choose_pair([hi_noisy, hi_calm, lo_short, lo_long]) == (hi_calm, lo_long)
    assert pairs.choose_pair([lo_short]) == "too_few_scored"
    assert pairs.choose_pair([c(0, 2.0, 1), c(1, 2.0, 9)]) == "all_tied"
    assert pairs.choose_pair([c(0, 2.0, 1), c(1, 1.5, 9)], min_margin=0.5) != "below_min_margin"
    assert pairs.choose_pair([c(0, 2.0, 1), c(1, 1.6, 9)], min_margin=0.5) == "below_min_margin"


def test_a_cut_loop_can_be_rejected_and_hollow_answers_are_rejected_first():
    """require_eos keeps a repetition loop cut at the limit (the constraints ranker's hollow
    "degenerate", scored 0) so that it can be rejected; of equally scored worst answers the
    hollow one is rejected, with and without length matching."""
    def c(sample, score, tokens, finish="eos", hollow=None):
        return {"sample": sample, "score": score, "response_tokens": tokens, "scores": [score],
                "finish_reason": finish, "response": f"r{sample}", "hollow": hollow}

    group = [c(0, 1.0, 40), c(1, 0.0, 48, "length"), c(2, 0.0, 44),
             c(3, 0.0, 48, "length", "degenerate"), c(4, 0.0, 20, "eos", "refusal")]
    kept, removed = pairs.candidates_of(group, require_eos=True)
    assert [k["sample"] for k in kept] == [0, 2, 3, 4] and removed == {"not_eos": 1}
    assert [k["sample"] for k in pairs.choose_pair(kept)] == [0, 3]  # hollow first, then longer
    assert [k["sample"] for k in pairs.choose_pair([kept[0], kept[1], kept[3]])] == [0, 4]
    matched = pairs.choose_pair(kept, length_match=0.75, length_match_all=True)
    assert [k["sample"] for k in matched] == [0, 3]  # 40/48 and 40/44 both match: hollow wins
    assert [k["sample"] for k in pairs.choose_pair(kept[:2])] == [0, 2]  # no hollow: as before


def test_choose_pairs_disjoint_up_to_n():
    from prefloop.config import PairsConfig

    def c(sample, score, tokens):
        return {"sample": sample, "score": score, "response_tokens": tokens, "scores": [score]}

    group = [c(0, 1.0, 10), c(1, 1.0, 12), c(2, 0.5, 11), c(3, 0.0, 9), c(4, 0.0, 30)]
    one = pairs.choose_pairs(group, PairsConfig())
    assert [(a["sample"], b["sample"]) for a, b in one] == [(0, 4)]  # the paper's single pair
    three = pairs.choose_pairs(group, PairsConfig(per_instruction=3))
    # best vs worst (shorter best, longer worst), then the rest: 1 vs 3, then 2 is left alone
    assert [(a["sample"], b["sample"]) for a, b in three] == [(0, 4), (1, 3)]
    matched = pairs.choose_pairs(group, PairsConfig(per_instruction=3, length_match=0.75))
    # closest lengths among the largest margin: 0 (10) vs 3 (9), then 1 (12) vs 2 (11)
    assert [(a["sample"], b["sample"]) for a, b in matched] == [(0, 3), (1, 2)]
    assert pairs.choose_pairs([c(0, 1.0, 5), c(1, 1.0, 6)], PairsConfig(per_instruction=2)) \
        == "all_tied"


def test_per_instruction_rows_and_card(tmp_path):
    run_dir = tmp_path / "run"
    write_scores(run_dir, [gen("q0", i, t) for i, t in enumerate("abcd")], [4.0, 3.0, 2.0, 1.0])
    r = replace(Recipe(name="default"), pairs=replace(Recipe().pairs, per_instruction=2))
    pairs.run(r, run_dir)
    rows = pairs.read_dataset(run_dir / "pairs" / "dataset").to_list()
    assert [(x["id"], x["chosen"][0]["content"], x["rejected"][0]["content"]) for x in rows] == [
        ("q0", "a", "d"), ("q0", "b", "c")]
    assert read_manifest(run_dir / "pairs")["counts"]["pairs"] == 2
    card = (run_dir / "pairs" / "dataset" / "README.md").read_text()
    assert "up to 2 pairs per instruction, no response in two" in card
    assert "highest-scored response is `chosen`" not in card  # not true of the second pair
    assert ("per instruction up to 2 pairs, no response in two: the highest-scored vs the "
            "lowest-scored, then the highest vs the lowest of the rest") in card


def test_card_and_recipe_copy(tmp_path):
    run_dir = tmp_path / "run"
    write_scores(run_dir, [gen("q0", 0, "a"), gen("q0", 1, "b")], [4.0, 2.0])
    r = replace(Recipe(name="default"), model=replace(Recipe().model, system_prompt="Be brief."))
    pairs.run(r, run_dir)
    folder = run_dir / "pairs" / "dataset"
    assert (folder / "recipe.yaml").read_text() == dump_recipe(r)
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "apache-2.0" and front["tags"][:2] == ["dpo", "preference"]
    assert front["configs"] == [{"config_name": "default",
                                 "data_files": [{"split": "train", "path": "data/train-*"}]}]
    data = pairs.read_dataset(folder)
    parquet = sum(f.stat().st_size for f in (folder / "data").glob("*.parquet"))
    assert front["dataset_info"]["splits"] == [{"name": "train", "num_bytes": data.data.nbytes,
                                                "num_examples": 1}]
    assert (front["dataset_info"]["download_size"], front["dataset_info"]["dataset_size"]) == (
        parquet, data.data.nbytes)
    assert data.data.nbytes > 0 and parquet > 0
    from huggingface_hub import DatasetCard

    hub = DatasetCard.load(folder / "README.md")  # the Hub library's parser takes the YAML
    assert hub.data.license == "apache-2.0" and hub.data.dataset_info == front["dataset_info"]
    # every column of the dataset is described, in order
    columns = [ln.split("`")[1] for ln in card.split("## Columns")[1].split("\n\n")[1]
               .splitlines()]
    assert columns == data.column_names
    assert f"```text\n{data[0]['prompt_text'].rstrip()}\n```" in card
    assert "- Generator: `smollm2-135m-instruct`" in card
    assert ("- Sampling: k=5, temperature 0.8, top-p 0.95, up to 256 new tokens, seed 0; the "
            "model's own chat template, system prompt: 'Be brief.'") in card
    assert "3 samples per response, temperature 0.7, top-p 0.9, up to 256 new tokens" in card
    assert "`prompts/judge_yuan2024.txt`" in card and "| pairs | 1 |" in card
    assert "| dropped_all_tied | 0 |" in card and "| margin_mean | 2.0 |" in card
    assert "prefloop run --recipe recipe.yaml --until pairs" in card
    # prefloop is not on PyPI: the card installs it from its repository and links no PyPI page
    assert "pypi.org" not in card and "pip install prefloop" not in card
    assert "it is not on PyPI" in card
    assert "repository URL>" not in card
    assert "in a copy of its source tree, run `pip install -e .`" in card
    assert "- Generation: prefloop's in-process engine (`model.backend: local`)" in card
    assert cards.generation_line("server") == (
        "Generation: the `server` backend (`model.backend: server`)")
    assert "shipped recipe `default` (`prefloop run --recipe default`)" in card
    row = load(run_dir, tmp_path)[0]
    assert row["prompt"] == [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "name a big river"}]
    lima = replace(r, instructions=replace(r.instructions, source="GAIR/lima"))
    meta, note = cards.license_meta(lima.instructions.source)
    assert meta == {"license": "other", "license_name": "lima-derived",
                    "license_link": "https://creativecommons.org/licenses/by-nc-sa/4.0/"}
    assert "CC BY-NC-SA 4.0" in note
    lima_pairrm = replace(lima, rank=replace(lima.rank, ranker="pairrm"))
    assert "PairRM `llm-blender/PairRM` at revision" in cards.dataset_card(
        lima_pairrm, {"pairs": 1}, {}, pairs.features(),
        PairRMRanker.card_lines(lima_pairrm), sizes={"num_bytes": 1, "download_size": 1},
        first_prompt="x")
    for builtin in ("builtin", "verifiable"):  # both written for prefloop, shipped under its license
        meta, note = cards.license_meta(builtin)
        assert meta == {"license": "apache-2.0"} and f"built-in `{builtin}` set" in note
    assert cards.license_meta("me/my-set")[0] == {"license": "unknown"}


def test_every_column_the_dataset_can_have_is_described():
    from prefloop.cards import COLUMN_DOCS, column_lines

    feats = pairs.features(checks=True)
    assert list(COLUMN_DOCS) == list(feats)
    lines = column_lines(feats)
    assert lines[-3:] == [f"- `{c}`: {COLUMN_DOCS[c]}" for c in
                          ("constraints", "candidate_checks", "candidate_hollow")]


def test_no_system_prompt_card_says_what_prompt_text_holds():
    card = cards.dataset_card(Recipe(), {"pairs": 1}, {}, pairs.features(), [],
                              sizes={"num_bytes": 1, "download_size": 1},
                              first_prompt="<|im_start|>system\nYou are SmolLM<|im_end|>\n")
    assert "no system prompt" not in card
    assert ("no system message sent (the template adds its own default system turn if it has "
            "one: see `prompt_text`)") in card
    assert "```text\n<|im_start|>system\nYou are SmolLM<|im_end|>\n```" in card


# -- PairRM through the rank stage (fake model) ------------------------------------------------


class FakePairRM:
    candidate_max_tokens = 4

    def __init__(self):
        self.calls = []

    def rank(self, sources, candidates):
        from prefloop.rankers.pairrm import result_from_matrix

        self.calls.append((list(sources), [list(c) for c in candidates]))
        out = []
        for cands in candidates:  # logit(i, j) = len_i - len_j: longer wins
            m = [[0.0 if i == j else float(len(a) - len(b)) for j, b in enumerate(cands)]
                 for i, a in enumerate(cands)]
            out.append(result_from_matrix(m))
        return out

    def compare(self, sources, a, b):
        return [float(2 * (len(x) - len(y))) for x, y in zip(a, b, strict=True)]

    def count_candidate_tokens(self, text):
        return len(text.split()) + 3


def test_rank_with_pairrm(tmp_path, monkeypatch, capsys):
    from prefloop.rankers import pairrm

    fake = FakePairRM()
    seen = {}

    def load(model, revision=None, device=None, dtype="auto", batch_size=32):
        seen.update(model=model, revision=revision, batch_size=batch_size)
        return fake

    monkeypatch.setattr(pairrm.PairRM, "load", staticmethod(load))
    run_dir = tmp_path / "run"
    write_generations(run_dir, [gen("q0", 0, "aa"), gen("q0", 1, "a b c"), gen("q0", 2, "aa"),
                                gen("q1", 0, "x")])
    r = replace(Recipe(), rank=replace(RankConfig(), ranker="pairrm"))
    out = rank.run(r, run_dir)
    assert seen == {"model": "llm-blender/PairRM", "revision": pairrm.PAIRRM_REVISION,
                    "batch_size": 32}
    assert fake.calls == [([INSTRUCTIONS["q0"], INSTRUCTIONS["q1"]], [["aa", "a b c"], ["x"]])]
    scores = read_jsonl_lines(out / "scores.jsonl")
    name = f"pairrm:llm-blender/PairRM@{pairrm.PAIRRM_REVISION}"
    assert scores[1] == {"id": "q0", "sample": 1, "ranker": name, "finish_reason": "eos",
                         "response_tokens": 4, "duplicate_of": None, "score": 3.0,
                         "n_valid": 1, "scores": [], "over_budget": True}
    # score_i = (1/n) Σ_j (M_ij − M_ji): "aa" vs "a b c" -> (2 (2 − 5)) / 2 = −3
    assert [(s["score"], s["duplicate_of"], s["over_budget"]) for s in scores] == [
        (-3.0, None, False), (3.0, None, True), (-3.0, 0, False), (0.0, None, False)]
    counts = read_manifest(out)["counts"]
    assert counts["over_candidate_budget"] == 1 and counts["duplicates"] == 1
    assert read_manifest(out)["summary"] == (
        "4/4 responses scored by PairRM; 1 exceed PairRM's 4-token candidate budget, so it "
        "judged only their beginning")
    assert capsys.readouterr().out == ""  # the command line prints the stage's summary line
    ranker = PairRMRanker(lambda: fake, "pairrm:fake")
    assert ranker.compare(["p"], ["aaa"], ["a"]) == [4.0]


# -- done when: TRL's DPOTrainer takes the folder unchanged ------------------------------------


def test_dataset_trains_one_dpo_step_unchanged(tmp_path):
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from tiny import tiny_tokenizer
    from trl import DPOConfig, DPOTrainer

    run_dir = tmp_path / "run"
    write_scores(run_dir, [gen("q0", 0, "the sea is blue ."), gen("q0", 1, "no ."),
                           gen("q1", 0, "sleep at night ."), gen("q1", 1, "fire .")],
                 [5.0, 1.0, 4.0, 2.0])
    pairs.run(Recipe(), run_dir)
    ds = load_dataset(str(run_dir / "pairs" / "dataset"), split="train",
                      cache_dir=str(tmp_path / "hf-cache"))
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    before = {k: v.clone() for k, v in model.named_parameters()}
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), bf16=False, use_cpu=True, max_steps=1,
                     report_to=[], per_device_train_batch_size=2, max_length=64,
                     logging_steps=1, save_strategy="no", learning_rate=1e-2,
                     activation_checkpointing=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj",
                                                                                   "v_proj"]))
    result = trainer.train()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))
    lora = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().sum() > 0 for p in lora)  # the step moved the adapter
    base = dict(trainer.model.get_base_model().named_parameters())
    assert torch.equal(base["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
