"""The self-rewarding loop: per-round recipes, win rates, the report, and (slow) two real rounds
on a tiny random Llama with real DPO, the round-2 reference check, and resume after a kill."""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_judge import judge_tokenizer
from tiny import WORDS, one_thread, read_jsonl_lines, tiny_llama

from prefloop.artifacts import read_manifest, write_jsonl
from prefloop.config import (
    CompareConfig,
    InstructionsConfig,
    IterateConfig,
    ModelConfig,
    RankConfig,
    Recipe,
    TrainConfig,
    load_recipe,
    shipped_recipe_path,
)
from prefloop.constraints import Constraint, check
from prefloop.errors import PrefloopError
from prefloop.stages import compare, instructions, iterate, report, train
from prefloop.stages.compare import wilson_interval

# -- fast: pure pieces -----------------------------------------------------------------------------


def test_round_recipe_points_round_t_at_M_t_and_self_judging(tmp_path):
    recipe = Recipe(model=ModelConfig(name="start", revision="abc"),
                    rank=RankConfig(ranker="pairrm", judge_model="ext", judge_samples=1),
                    iterate=IterateConfig(n_candidates=4, temperature=0.7, top_p=0.9,
                                          max_new_tokens=99, judge_samples=3, seed=5))
    r1, r2 = (iterate.round_recipe(recipe, tmp_path, t) for t in (1, 2))
    assert (r1.model.name, r1.model.revision) == ("start", "abc")
    assert (r2.model.name, r2.model.revision) == (str((tmp_path / "rounds/1/model").resolve()),
                                                  None)
    for t, r in ((1, r1), (2, r2)):
        assert (r.generate.k, r.generate.temperature, r.generate.top_p,
                r.generate.max_new_tokens, r.generate.seed) == (4, 0.7, 0.9, 99, 5 + t)
        assert (r.rank.ranker, r.rank.judge_model, r.rank.judge_samples) == ("judge", None, 3)
        assert r.train == recipe.train and r.name == f"default-round{t}"
    # the run-level split: the eval set size comes from iterate.eval_prompts
    assert iterate.seed_recipe(replace(recipe, iterate=IterateConfig(eval_prompts=7))
                               ).instructions.n_heldout == 7


@pytest.mark.parametrize("margins,expected", [
    ([1.0, 0.5, -2.0, 0.0, None, float("nan")],
     {"n": 4, "wins": 2, "ties": 1, "losses": 1, "invalid": 2, "win_rate": 0.625}),
    ([], {"n": 0, "wins": 0, "ties": 0, "losses": 0, "invalid": 0, "win_rate": None}),
    ([None], {"n": 0, "wins": 0, "ties": 0, "losses": 0, "invalid": 1, "win_rate": None}),
    ([-1.0, -0.1, 0.0], {"n": 3, "wins": 0, "ties": 1, "losses": 2, "invalid": 0,
                         "win_rate": 1 / 6}),
])
def test_win_rate(margins, expected):
    """The eval's win-rate is compare's, Wilson interval included."""
    got = iterate.win_rate(margins)
    assert {k: v for k, v in got.items() if k != "ci95"} == expected
    n = expected["n"]
    assert got["ci95"] == (list(wilson_interval(expected["wins"] + expected["ties"] / 2, n))
                           if n else None)


@pytest.mark.parametrize("sets,message", [
    (["iterate.prompt_source=seed", "instructions.n_train=5", "iterate.prompts_per_round=3"],
     "instructions.n_train: 5 seed prompts cannot give 2 disjoint rounds of "
     "iterate.prompts_per_round 3; raise instructions.n_train to 6"),
    (["iterate.min_words=9", "iterate.max_words=8"],
     "--set: iterate.min_words: 9 is larger than max_words (8); lower min_words or raise "
     "max_words"),
    (["iterate.n_candidates=1"],
     "iterate.n_candidates: a pair needs at least 2 candidates (the paper uses 4)"),
    (["iterate.rouge_threshold=1.5"],
     "--set: iterate.rouge_threshold: must be in (0, 1], got 1.5"),
    (["rank.ranker=constraints"],
     "rank.ranker constraints: Self-Instruct prompts carry no constraints; set "
     "iterate.prompt_source=seed (and an instructions source with constraints, e.g. "
     "instructions.source=verifiable)"),
])
def test_bad_settings_fail_before_any_model_loads(tmp_path, sets, message):
    from prefloop.config import apply_overrides

    with pytest.raises(PrefloopError) as e:
        iterate.run(apply_overrides(Recipe(), sets), tmp_path / "run")
    assert str(e.value) == message
    assert not (tmp_path / "run").exists()


def test_pairwise_eval_judge_margins_are_compared_once_and_cached(tmp_path):
    """With PairRM as the fixed judge, margins come from its compare(new, other), not scores."""
    other = tmp_path / "rounds/0/eval"
    gens = [{"id": f"p{i}", "instruction": f"q{i}", "response": f"new {i}"} for i in range(3)]
    write_jsonl(other / "generations.jsonl", [dict(g, response=f"old {i}")
                                              for i, g in enumerate(gens)])
    write_jsonl(other / "scores.jsonl", [{"id": g["id"], "ranker": "pairrm:x", "score": None}
                                         for g in gens])
    calls = []

    class FakePairRM:
        name = "pairrm:x"
        pointwise = False

        def compare(self, instructions, a, b):
            calls.append((instructions, a, b))
            return [1.5, float("nan"), -0.25]

    judge = FakePairRM()
    scores = {g["id"]: {"ranker": "pairrm:x", "score": None} for g in gens}
    path = tmp_path / "vs_M1.jsonl"
    assert iterate._margins(judge, gens, scores, other, path) == [1.5, None, -0.25]
    assert calls == [(["q0", "q1", "q2"], ["new 0", "new 1", "new 2"],
                      ["old 0", "old 1", "old 2"])]
    assert iterate._margins(judge, gens, scores, other, path) == [1.5, None, -0.25]
    assert len(calls) == 1  # resumed from vs_M1.jsonl


def test_length_score_corr():
    rows = [{"response_tokens": n, "score": s} for n, s in ((10, 1.0), (20, 2.0), (30, 4.0))]
    assert report.length_score_corr(rows) == 0.982
    assert report.length_score_corr(rows[:2]) is None  # too few points
    assert report.length_score_corr(rows + [{"response_tokens": 5, "score": None}]) == 0.982


def test_summary_table_formats_one_line_per_model():
    rows = [
        {"round": 0, "model": "M1", "eval_score": 2.5, "eval_tokens": 120.0,
         "eval_judge_fail": 0.25, "vs_prev": None, "vs_m1": None},
        {"round": 1, "model": "M2", "eval_score": 3.0, "eval_tokens": 150.5,
         "eval_judge_fail": 0.0, "prompts": {"train": 20}, "pairs": 12,
         "dropped": {"all_tied": 7, "too_few_scored": 1}, "self_judge_fail": 0.125,
         "self_judge_score": 3.25,
         "step0": {"reference_is_base_step0": True, "reference_is_base_end": True},
         "vs_prev": {"wins": 6, "ties": 2, "losses": 2, "win_rate": 0.7}, "vs_m1": None,
         "objective": 0.5,
         "objective_vs_m1": {"difference": 0.25, "ci95": [0.0, 0.5], "mcnemar_p": 0.25,
                             "guards_fired": []}},
        {"round": 2, "model": "M3", "eval_score": 3.0, "eval_tokens": 140.0,
         "eval_judge_fail": 0.0, "prompts": {"train": 20}, "pairs": 10, "dropped": {},
         "step0": {}, "vs_prev": None, "vs_m1": None, "objective": 0.25,
         "objective_vs_m1": {"difference": 0.0, "ci95": [-0.25, 0.25], "mcnemar_p": 1.0,
                             "guards_fired": ["more refusals (2 vs 0)"]},
         "objective_vs_prev": {"difference": -0.25, "ci95": [-0.5, 0.0], "mcnemar_p": 0.25}},
    ]
    assert report.summary_table(rows).splitlines()[2:] == [
        "| M1 | – | – | – | – | – | – | – | – | 2.5 | 120.0 | 25.0% | – | – | – | – |",
        "| M2 | 20 | 12 | 7 / 1 | 12.5% | 3.25 | yes | 70.0% (6/2/2) | – | 3 | 150.5 | 0.0% | 50.0% "
        "| +25.0% (+0.0%, +50.0%), p 0.25 | none | – |",
        "| M3 | 20 | 10 | 0 / 0 | – | – | – | – | – | 3 | 140.0 | 0.0% | 25.0% "
        "| +0.0% (-25.0%, +25.0%), p 1 | 1 fired | -25.0% (-50.0%, +0.0%), p 0.25 |",
    ]


def test_summary_table_adds_the_transfer_check_only_when_there_is_one():
    m1 = {"round": 0, "model": "M1", "eval_score": None, "eval_tokens": 40.0,
          "eval_judge_fail": None, "vs_prev": None, "vs_m1": None, "objective": 0.25,
          "transfer": 0.5}
    m2 = {"round": 1, "model": "M2", "eval_score": None, "eval_tokens": 38.0,
          "eval_judge_fail": None, "vs_prev": None, "vs_m1": None, "objective": 0.3,
          "prompts": {"train": 4}, "pairs": 3, "dropped": {}, "step0": {},
          "transfer": 0.25,
          "transfer_vs_m1": {"difference": -0.25, "ci95": [-0.5, 0.0], "mcnemar_p": 0.5,
                             "words_median": [40, 38], "guards_fired": [],
                             "reading": "inconclusive"}}
    lines = report.summary_table([m1, m2]).splitlines()
    assert lines[0].endswith(" guards vs M1 | objective vs previous (95% CI), McNemar p | "
                             "transfer accuracy | transfer vs M1 (95% CI), McNemar p: reading |")
    assert lines[2].endswith("| 25.0% | – | – | – | 50.0% | – |")
    assert lines[3].endswith("| 30.0% | – | – | – | 25.0% | -25.0% (-50.0%, +0.0%), p 0.5: "
                             "inconclusive; median words 40 → 38 |")
    without = [{k: v for k, v in r.items() if not k.startswith("transfer")} for r in (m1, m2)]
    assert "transfer" not in report.summary_table(without)
    fired = {**m2, "transfer_vs_m1": {**m2["transfer_vs_m1"], "guards_fired": ["more refusals"]}}
    assert report.guard_lines([m1, fired]) == ["- M2 vs M1, transfer check: more refusals"]


def test_report_of_a_round_that_stopped(tmp_path):
    from prefloop.artifacts import write_manifest

    run_dir = tmp_path / "run"
    write_manifest(run_dir / "rounds/0/eval", "eval", "h", started=0.0, counts={
        "prompts": 2, "score_mean": None, "response_tokens_mean": 99.5, "eos_rate": 0.5,
        "judge_parse_failure_rate": 1.0}, extra={"judge": "judge:m1"})
    write_manifest(run_dir / "rounds/1/instructions", "instructions", "h", started=0.0,
                   counts={"source": "seed", "train": 3})
    write_jsonl(run_dir / "rounds/1/pairs/dropped.jsonl",
                [{"id": str(i), "reason": "too_few_scored"} for i in range(3)])
    report.write_report(Recipe(), run_dir, stopped="no preference pairs")
    text = (run_dir / "report.md").read_text()
    assert text.startswith("# Self-rewarding run: smollm2-135m-instruct, 0 of 2 rounds\n\n"
                           "**Stopped in round 1:** no preference pairs\n")
    rows = [line for line in text.splitlines() if line.startswith("| M")]
    assert rows == [
        "| M1 | – | – | – | – | – | – | – | – | – | 99.5 | 100.0% | – | – | – | – |",
        "| M2 | 3 | 0 | 0 / 3 | – | – | – | – | – | – | – | – | – | – | – | – |"]


def test_shipped_self_reward_recipe():
    r = load_recipe("self-reward", ["instructions.source=/data/lima.jsonl"])
    assert r.name == "self-reward" and r.model.name == "smollm2-135m-instruct"
    assert (r.iterate.rounds, r.iterate.prompt_source, r.iterate.n_candidates,
            r.iterate.judge_samples) == (2, "self-instruct", 4, 3)
    assert (r.iterate.temperature, r.iterate.top_p) == (0.7, 0.9)
    assert (r.iterate.prompt_temperature, r.iterate.prompt_top_p) == (0.6, 0.9)
    assert (r.iterate.fewshot_seed, r.iterate.fewshot_generated) == (6, 2)
    assert r.train.beta == 0.1 and r.rank.ranker == "judge" and r.rank.judge_model is None
    text = shipped_recipe_path("self-reward").read_text()
    assert text.startswith("# ") and "prefloop iterate --recipe self-reward" in text


# -- slow: two real rounds on a tiny model ---------------------------------------------------------


def fake_score(text: str) -> float:
    """The tiny judge writes word salad: derive a 0-5 'score' from its text, deterministically."""
    return float(sum(map(ord, text)) % 6)


def tiny_recipe(model_dir: Path, source: Path) -> Recipe:
    return Recipe(
        name="tiny-sr", model=ModelConfig(name=str(model_dir)),
        instructions=InstructionsConfig(source=str(source), n_train=8),
        rank=RankConfig(judge_max_new_tokens=6, judge_samples=2),
        train=TrainConfig(learning_rate=2e-2, batch_size=2, warmup_ratio=0.0, lora_r=4,
                          lora_alpha=8, max_length=512),
        compare=CompareConfig(max_new_tokens=6),
        iterate=IterateConfig(rounds=2, prompt_source="seed", prompts_per_round=4,
                              n_candidates=4, max_new_tokens=6, judge_samples=3, eval_prompts=3))


def _mtimes(run_dir: Path, parts: list[str]) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns
            for part in parts for p in sorted((run_dir / part).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """Run 2 rounds, killed once at the start of round 2's DPO, then resumed with counters."""
    import datasets

    from prefloop import engine

    root = tmp_path_factory.mktemp("iterate")
    tok = judge_tokenizer()
    m1 = root / "m1"
    tiny_llama(tok).save_pretrained(m1)
    tok.save_pretrained(m1)
    rng = random.Random(0)
    source = root / "prompts.jsonl"
    # every prompt carries one constraint, so each round's eval is also checked by the program;
    # records name their split, and 3 held-out ones carry an untrained kind: the transfer check
    write_jsonl(source, [{"id": f"q{i}", "instruction": " ".join(rng.choices(WORDS[:80], k=6)),
                          "constraints": [{"kind": "punctuation:no_comma"} if i < 14 else
                                          {"kind": "change_case:english_lowercase"}],
                          "split": "train" if i < 10 else "heldout"}
                         for i in range(17)])
    recipe = replace(tiny_recipe(m1, source),
                     instructions=InstructionsConfig(source=str(source), n_train=8,
                                                     kinds="punctuation:no_comma"),
                     compare=CompareConfig(max_new_tokens=6, transfer_n=2))
    run_dir = root / "run"
    real_train, real_generate, real_build = train.run, engine.generate, train.build_trainer
    seen = {"train_calls": 0, "engine_calls": 0, "trainers": 0}

    def train_killed_in_round_2(rr, rdir, **kw):
        seen["train_calls"] += 1
        if rdir.name == "2":
            raise KeyboardInterrupt
        return real_train(rr, rdir, **kw)

    def counting_generate(*a, **kw):
        seen["engine_calls"] += 1
        return real_generate(*a, **kw)

    def counting_build(*a, **kw):
        seen["trainers"] += 1
        return real_build(*a, **kw)

    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf-datasets")
        mp.setattr("prefloop.rankers.judge.parse_score", fake_score)
        mp.setattr(train, "run", train_killed_in_round_2)
        with pytest.raises(KeyboardInterrupt):
            iterate.run(recipe, run_dir)
        done = ["instructions", "rounds/0", "rounds/1", "rounds/2/instructions",
                "rounds/2/generate", "rounds/2/rank", "rounds/2/pairs"]
        before = _mtimes(run_dir, done)
        killed = {"train_calls": seen["train_calls"],
                  "round2_train_started": (run_dir / "rounds/2/train").exists()}
        mp.setattr(train, "run", real_train)
        mp.setattr(engine, "generate", counting_generate)
        mp.setattr(train, "build_trainer", counting_build)
        iterate.run(recipe, run_dir)
        after = _mtimes(run_dir, done)
    return {"root": root, "m1": m1, "run_dir": run_dir, "recipe": recipe, "seen": seen,
            "killed": killed, "before": before, "after": after}


def no_comma(run_dir: Path, t: int) -> dict[str, bool]:
    """id -> whether round t's eval answer has no comma (the loop's one constraint); an empty
    answer satisfies no constraint (docs/constraints.md)."""
    return {r["id"]: bool(r["response"].strip()) and "," not in r["response"]
            for r in read_jsonl_lines(run_dir / f"rounds/{t}/eval/generations.jsonl")}


@pytest.mark.slow
def test_each_step_records_the_finish_ids_of_the_steps_it_read(loop):
    """What a forced redo of a step would make stale (artifacts.redone_inputs): each step's
    manifest names the steps it read, by path from its round, with their finish ids."""
    run_dir = loop["run_dir"]

    def finish_id(rel):
        return json.loads((run_dir / rel / "manifest.json").read_text())["finish_id"]

    def inputs(rel):
        return json.loads((run_dir / rel / "manifest.json").read_text())["inputs"]

    assert inputs("rounds/0/eval") == {"../../instructions": finish_id("instructions")}
    assert inputs("rounds/2/eval") == {"../../instructions": finish_id("instructions"),
                                       "model": finish_id("rounds/2/model"),
                                       "../1/eval": finish_id("rounds/1/eval")}
    assert inputs("rounds/2/instructions") == {"../../instructions": finish_id("instructions"),
                                               "../1/model": finish_id("rounds/1/model")}
    assert inputs("rounds/2/train") == {"pairs": finish_id("rounds/2/pairs")}
    assert inputs("rounds/2/model") == {"train": finish_id("rounds/2/train")}
    assert len({finish_id(f"rounds/{t}/eval") for t in range(3)}) == 3


@pytest.mark.slow
def test_each_round_writes_its_artifacts(loop):
    run_dir, recipe = loop["run_dir"], loop["recipe"]
    heldout = {r["instruction"] for r in read_jsonl_lines(run_dir / "instructions/heldout.jsonl")}
    assert len(heldout) == 3
    trained_prompts = []
    for t in (1, 2):
        rdir = run_dir / "rounds" / str(t)
        for stage in ("instructions", "generate", "rank", "pairs", "train", "model", "eval"):
            assert read_manifest(rdir / stage)["status"] == "done", (t, stage)
            assert not (rdir / stage / "in_progress.json").exists()
        prompts = [r["instruction"] for r in read_jsonl_lines(rdir / "instructions/train.jsonl")]
        assert len(prompts) == 4 and not set(prompts) & heldout
        trained_prompts += prompts
        gens = read_jsonl_lines(rdir / "generate/generations.jsonl")
        m_t = str(recipe.model.name) if t == 1 else str((run_dir / "rounds/1/model").resolve())
        assert len(gens) == 16 and {g["model"] for g in gens} == {m_t}
        assert len(read_jsonl_lines(rdir / "rank/judgments.jsonl")) == 16 * 3
        pm = read_manifest(rdir / "pairs")["counts"]
        assert pm["pairs"] + pm["dropped"] == 4 and pm["pairs"] >= 1
        assert (rdir / "pairs/dataset/data/train-00000-of-00001.parquet").exists()
        assert (rdir / "train/adapter/adapter_model.safetensors").exists()
        assert {p.name for p in (rdir / "model").iterdir()} >= {
            "model.safetensors", "config.json", "tokenizer.json", "manifest.json"}
        assert f"name: {m_t}" in (rdir / "recipe.yaml").read_text()
        ev = read_manifest(rdir / "eval")["counts"]
        assert ev["prompts"] == 3 and ev["judge_samples"] == 3 * recipe.rank.judge_samples
        assert sorted(k for k in ev if k.startswith("vs_")) == (
            ["vs_M1"] if t == 1 else ["vs_M1", "vs_M2"])
        # the program's reading of M_t against M1: no comma is the whole constraint
        new, first = no_comma(run_dir, t), no_comma(run_dir, 0)
        assert ev["objective_strict"] == round(sum(new.values()) / 3, 4)
        vs = ev["objective_vs_M1"]
        assert vs["difference"] == round((sum(new.values()) - sum(first.values())) / 3, 4)
        assert (vs["only_new_right"], vs["only_m1_right"]) == (
            sum(new[i] and not first[i] for i in new), sum(first[i] and not new[i] for i in new))
        assert json.loads((rdir / "eval/objective_vs_M1.json").read_text())["n"] == 3
        if t == 2:  # and M3 against M2, the round before
            prev = ev["objective_vs_previous"]
            before = no_comma(run_dir, 1)
            assert prev["difference"] == round((sum(new.values()) - sum(before.values())) / 3, 4)
            assert prev["only_new_right"] == sum(new[i] and not before[i] for i in new)
            assert json.loads((rdir / "eval/objective_vs_M2.json").read_text())["n"] == 3
        else:
            assert "objective_vs_previous" not in ev
        # the transfer check: the 2 drawn prompts of the untrained kind, M_t against M1
        drawn = [it["id"] for it in instructions.transfer_items(recipe)]
        assert drawn == ["q14", "q16"]  # q14-q16 shuffled by instructions.seed 0
        tgens = read_jsonl_lines(rdir / "eval/transfer_generations.jsonl")
        assert sorted(g["id"] for g in tgens) == sorted(drawn)
        lowercase = Constraint("change_case:english_lowercase", {})
        low = {g["id"]: check(g["response"], lowercase).strict for g in tgens}
        assert ev["transfer_strict"] == round(sum(low.values()) / 2, 4)
        tv = json.loads((rdir / "eval/transfer_vs_M1.json").read_text())
        assert tv["n"] == 2 and set(tv["per_kind"]) == {"change_case:english_lowercase"}
        assert ev["transfer_vs_M1"]["reading"] == tv["reading"] == \
            compare.transfer_reading(tv)
        assert ev["transfer_vs_M1"]["difference"] == round(tv["difference"]["prompt_strict"], 4)
    assert "objective_vs_M1" not in read_manifest(run_dir / "rounds/0/eval")["counts"]
    assert "transfer_vs_M1" not in read_manifest(run_dir / "rounds/0/eval")["counts"]
    assert len(read_jsonl_lines(run_dir / "rounds/0/eval/transfer_generations.jsonl")) == 2
    assert len(set(trained_prompts)) == 8  # seed mode: disjoint rounds
    report = (run_dir / "report.md").read_text()
    assert [line.split(" | ")[0] for line in report.splitlines() if line.startswith("| M")] == [
        "| M1", "| M2", "| M3"]
    assert "| transfer accuracy | transfer vs M1 (95% CI), McNemar p: reading |" in report
    assert "- Transfer check: 2 held-out-topic prompts whose constraint kinds no round trained" \
        in report
    assert {p.name for p in (run_dir / "plots").iterdir()} == {
        "win_rate.png", "score.png", "length.png", "objective.png", "pairs.png"}
    assert [r["model"] for r in json.loads((run_dir / "report.json").read_text())] == [
        "M1", "M2", "M3"]


@pytest.mark.slow
def test_win_rates_follow_the_fixed_judge_scores(loop):
    run_dir = loop["run_dir"]

    def scores(t):
        return {r["id"]: r["score"] for r in
                read_jsonl_lines(run_dir / f"rounds/{t}/eval/scores.jsonl")}

    for t, other in ((1, 0), (2, 1), (2, 0)):
        new, old = scores(t), scores(other)
        margins = {i: None if new[i] is None or old[i] is None else new[i] - old[i]
                   for i in new}
        rows = read_jsonl_lines(run_dir / f"rounds/{t}/eval/vs_M{other + 1}.jsonl")
        assert {r["id"]: r["margin"] for r in rows} == margins and len(rows) == 3
        counts = read_manifest(run_dir / f"rounds/{t}/eval")["counts"]
        assert counts[f"vs_M{other + 1}"] == iterate.win_rate(list(margins.values()))
    # the evaluation judge is the fixed starting model, in every round
    judges = {read_manifest(run_dir / f"rounds/{t}/eval")["judge"] for t in (0, 1, 2)}
    assert judges == {f"judge:{loop['m1']}"}


@pytest.mark.slow
def test_resume_after_a_kill_recomputes_nothing_saved(loop):
    assert loop["killed"] == {"train_calls": 2, "round2_train_started": False}
    assert loop["before"] == loop["after"]  # round 0/1 and round 2's finished steps untouched
    assert len(loop["before"]) > 40
    # the resumed run trained once (round 2) and generated only M3's eval responses, its
    # transfer-check responses and judgments
    assert loop["seen"]["trainers"] == 1
    assert loop["seen"]["engine_calls"] == 3


@pytest.mark.slow
def test_round_2_reference_is_the_merged_M2_not_M1(loop, tmp_path):
    """Design A: at step 0 of round 2 the policy equals the reference, and the reference's
    log-probs are those of M2 (the merged round-1 model), not M1's."""
    import datasets

    from prefloop.models import load_model

    run_dir, recipe = loop["run_dir"], loop["recipe"]
    for t in (1, 2):
        check = read_manifest(run_dir / f"rounds/{t}/train")["step0_check"]
        assert check["reference_is_base_step0"] is True and check["reference_is_base_end"]
        assert check["reference_logps_step0"] == pytest.approx(check["base_logps"], abs=1e-3)
        assert abs(check["first_logged_step"]["rewards/chosen"]) < 1e-6
    rr2 = iterate.round_recipe(recipe, run_dir, 2)
    m2_path = str((run_dir / "rounds/1/model").resolve())
    assert rr2.model.name == m2_path
    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
        policy, tok = load_model(m2_path)
        trainer = train.build_trainer(policy, tok, train.load_pairs(run_dir / "rounds/2"), rr2,
                                      tmp_path / "trainer", [])
        m2, _ = load_model(m2_path)
        m1, _ = load_model(str(loop["m1"]))
        for ex in (trainer.train_dataset[i] for i in range(len(trainer.train_dataset))):
            for completion in ("chosen_ids", "rejected_ids"):
                args = (ex["prompt_ids"], ex[completion])
                with torch.no_grad():
                    pol = train.sequence_logps(trainer.model, *args).item()
                    with trainer.model.disable_adapter():
                        ref = train.sequence_logps(trainer.model, *args).item()
                    from_m2 = train.sequence_logps(m2, *args).item()
                    from_m1 = train.sequence_logps(m1, *args).item()
                assert pol == pytest.approx(ref, abs=1e-5)
                assert ref == pytest.approx(from_m2, abs=1e-5)
                assert abs(ref - from_m1) > 1e-2


def test_round_recipe_keeps_a_programmatic_reward(tmp_path):
    """rank.ranker=constraints: every round is ranked by the constraints (no self-judge);
    the paper's loop (a model ranker) makes M_t judge itself."""
    from prefloop.config import apply_overrides

    r = apply_overrides(Recipe(), ["rank.ranker=constraints"])
    assert iterate.round_recipe(r, tmp_path, 1).rank == r.rank
    j = iterate.round_recipe(Recipe(), tmp_path, 1).rank
    assert (j.ranker, j.judge_model, j.judge_samples) == ("judge", None, 3)


def test_the_default_recipe_iterates_with_the_programmatic_reward(tmp_path):
    """`prefloop iterate --set rank.ranker=constraints` (issue #12's command) passes every
    check made before a model loads: the default recipe's rounds take its own verifiable
    training instructions, disjoint, and are ranked by the program."""
    from prefloop import preflight
    from prefloop.config import apply_overrides
    from prefloop.stages.instructions import load_source

    r = apply_overrides(load_recipe("default"), ["rank.ranker=constraints"])
    preflight.check(r, ["instructions"], "iterate", tmp_path / "run")
    it = r.iterate
    assert (it.prompt_source, it.rounds * it.prompts_per_round) == ("seed", r.instructions.n_train)
    assert it.eval_prompts == r.instructions.n_heldout == 60
    assert iterate.round_recipe(r, tmp_path, 2).rank.ranker == "constraints"
    assert all(x.get("constraints") for x in load_source(r.instructions))
    self_instruct = apply_overrides(r, ["iterate.prompt_source=self-instruct"])
    with pytest.raises(PrefloopError, match="Self-Instruct prompts carry no constraints"):
        preflight.check(self_instruct, ["instructions"], "iterate", tmp_path / "run")


def test_eval_stats_report_objective_accuracy_of_constrained_prompts():
    no_comma = [{"kind": "punctuation:no_comma", "args": {}}]
    gens = [{"id": str(i), "instruction": "Describe tea. Do not use any commas.",
             "response": text, "response_tokens": 5, "finish_reason": "eos",
             "constraints": no_comma}
            for i, text in enumerate(["Tea is a warm drink.", "Tea, hot, is nice.",
                                      "Green tea is calm.", "I'm sorry."])]
    scores = {g["id"]: {"score": None, "scores": []} for g in gens}
    objective = iterate.objective_reports(gens, list(reversed(gens)))
    assert [r["strict"] for r in objective] == [True, False, True, True]
    assert iterate.eval_stats(gens, scores, objective)["objective_strict"] == 0.75
    plain = [{k: v for k, v in g.items() if k != "constraints"} for g in gens]
    assert iterate.objective_reports(plain, plain) is None
    assert iterate.eval_stats(plain, scores, None)["objective_strict"] is None


def test_objective_vs_start_reads_m_t_against_m1_as_compare_does():
    """M_t against M1 on the same constrained prompts: the paired difference, McNemar p and a
    guard that fires (one more refusal), whatever order the records come in."""
    no_comma = [{"kind": "punctuation:no_comma", "args": {}}]
    items = [{"id": str(i), "instruction": "Describe tea. Do not use any commas.",
              "constraints": no_comma} for i in range(4)]
    m1 = ["Tea is a warm drink that many people enjoy.", "Tea, hot, is nice.",
          "Coffee, black, is strong.", "Green tea is calm and gentle."]
    mt = ["Tea is a warm drink that many people enjoy.", "Tea is hot and nice to drink.",
          "I'm sorry but I cannot help with that.", "Green tea is calm and gentle."]
    start = [{"id": str(i), "response": r} for i, r in enumerate(m1)]
    gens = [{"id": str(i), "response": r} for i, r in reversed(list(enumerate(mt)))]
    vs = iterate.objective_vs_start(items, start, iterate.objective_reports(items, gens))
    s = vs["summary"]
    assert (s["difference"], s["only_new_right"], s["only_m1_right"], s["mcnemar_p"]) == \
        (0.5, 2, 0, 0.5)
    assert s["words_median"] == [5.0, 8.0]  # IFEval counts "I'm" as two words
    assert s["guards_fired"] == ["more refusals (1 vs 0)"]
    assert vs["report"]["original"]["prompt_strict"] == 0.5
    assert vs["report"]["dpo"]["prompt_strict"] == 1.0
    assert iterate.objective_vs_start(items, start, None) is None
    row = {"model": "M2", "objective_vs_m1": s}
    assert report._vs_m1(s) == "+50.0% ({:+.1f}%, {:+.1f}%), p 0.5".format(
        *(100 * x for x in s["ci95"]))
    assert report._guards(s) == "1 fired" and report._guards(None) == "–"
    assert report.guard_lines([{"model": "M1"}, row]) == ["- M2 vs M1: more refusals (1 vs 0)"]


# -- --force as one transaction, and a changed loop refused -----------------------------------------


def _sums(root: Path, parts=("instructions", "rounds")) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for part in parts for p in sorted((root / part).rglob("*")) if p.is_file()}


@pytest.fixture
def loop_dir(loop, tmp_path):
    """The finished loop's own directory (its rounds record absolute model paths, so a copy
    elsewhere is another loop), put back as it was after the test."""
    import shutil

    run_dir, backup = loop["run_dir"], tmp_path / "backup"
    shutil.copytree(run_dir, backup)
    yield run_dir
    shutil.rmtree(run_dir)
    shutil.copytree(backup, run_dir)


@pytest.fixture
def redo(loop_dir, tmp_path):
    """What a redo of the finished loop runs under: offline, one thread, the judge's score
    faked; yields the MonkeyPatch for the test's own patches (undone after the test)."""
    import datasets

    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
        mp.setattr("prefloop.rankers.judge.parse_score", fake_score)
        yield mp


@pytest.mark.slow
def test_force_keeps_the_finished_loop_aside_and_restores_it_when_the_redo_fails(loop, loop_dir,
                                                                                 redo):
    run_dir = loop_dir
    before = _sums(run_dir, ("instructions", "rounds", "report.md", "report.json"))
    assert len(before) > 60

    def broken_train(rr, rdir, **kw):
        assert (run_dir / ".iterate.previous" / "rounds" / "2" / "model").is_dir()  # kept aside
        assert not (run_dir / "rounds" / "1" / "train").exists()  # the redo started afresh
        raise PrefloopError("train: out of disk, say")

    redo.setattr(train, "run", broken_train)
    with pytest.raises(PrefloopError, match="out of disk"):
        iterate.run(loop["recipe"], run_dir, force=True)
    assert _sums(run_dir, ("instructions", "rounds", "report.md", "report.json")) == before
    assert not (run_dir / ".iterate.previous").exists()


@pytest.mark.slow
def test_a_killed_forced_redo_keeps_the_old_loop_and_the_old_config_gets_it_back(loop, loop_dir,
                                                                                 redo):
    run_dir = loop_dir
    before = _sums(run_dir)
    recipe = loop["recipe"]
    changed = replace(recipe, train=replace(recipe.train, beta=0.3))
    real_train = train.run

    def killed_train(rr, rdir, **kw):
        raise KeyboardInterrupt

    def no_generation(*a, **kw):
        raise AssertionError("the kept-aside loop must come back without recomputing")

    redo.setattr(train, "run", killed_train)
    with pytest.raises(KeyboardInterrupt):
        iterate.run(changed, run_dir, force=True)
    assert (run_dir / ".iterate.previous" / "rounds" / "2" / "eval").is_dir()
    assert read_manifest(run_dir / "rounds" / "1" / "pairs")["status"] == "done"  # new, partial
    # without --force: the changed loop resumes; a third configuration is refused, naming the
    # command; the old configuration is accepted (its loop is kept aside)
    iterate.check_resume(changed, run_dir)
    third = replace(recipe, train=replace(recipe.train, beta=0.5))
    with pytest.raises(PrefloopError, match=r"rounds: the iterative loop ran with a "
                       r"different configuration.*prefloop iterate --output-dir .* --force"):
        iterate.check_resume(third, run_dir)
    iterate.check_resume(recipe, run_dir)
    redo.setattr(train, "run", real_train)
    redo.setattr("prefloop.engine.generate", no_generation)
    redo.setattr(train, "build_trainer", no_generation)
    iterate.run(recipe, run_dir)
    assert _sums(run_dir) == before
    assert not (run_dir / ".iterate.previous").exists()


def test_more_rounds_extend_a_loop_and_other_settings_are_refused_by_the_cli(tmp_path, capsys):
    from prefloop import cli
    from prefloop.artifacts import atomic_write_json, config_hash
    from prefloop.config import apply_overrides, dump_recipe

    recipe = load_recipe("constraints-loop")
    run_dir = tmp_path / "run"
    (run_dir / "rounds").mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    atomic_write_json(run_dir / "rounds" / "loop.json",
                      {"config_hash": config_hash(iterate.loop_config(recipe))})
    iterate.check_resume(apply_overrides(recipe, ["iterate.rounds=5"]), run_dir)  # extends
    before = _sums(run_dir, ("rounds", "recipe.yaml"))
    argv = ["iterate", "--output-dir", str(run_dir), "--set", "train.beta=0.2"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"prefloop: error: {run_dir / 'rounds'}: the iterative loop ran with a "
                   "different configuration (train.beta: 0.1 -> 0.2); to redo it run: prefloop "
                   f"iterate --output-dir {run_dir} --set train.beta=0.2 --force (or use a new "
                   "--output-dir)"]
    assert _sums(run_dir, ("rounds", "recipe.yaml")) == before


def test_each_round_prints_its_rank_and_pairs_lines_before_an_empty_pairs_error(tmp_path,
                                                                                   monkeypatch,
                                                                                   capsys):
    """A round prints the same stage lines as `prefloop run` (stdout), so the judge's parse
    failures are in view when its pairs stage finds no pair; the error names iterate's keys."""
    from prefloop.artifacts import write_manifest
    from prefloop.stages import generate, pairs, rank, selfinstruct

    run_dir = tmp_path / "run"
    rdir = run_dir / "rounds" / "1"

    def finished(stage, counts, **extra):
        return lambda *a, **k: write_manifest(rdir / stage, stage, "h", started=0.0,
                                              counts=counts, extra=extra)

    monkeypatch.setattr(selfinstruct, "run_round", lambda *a, **k: None)
    monkeypatch.setattr(generate, "run", finished("generate", {
        "responses": 8, "instructions": 2, "length": 0, "response_tokens": 80}))
    monkeypatch.setattr(rank, "run", finished("rank", {"responses": 8, "scored": 0}, summary=(
        "0/8 responses scored from 8 judge samples: 0 parsed 'Score: X' from the judge's text, "
        "8 without a score")))
    counts = {"instructions": 2, "responses": 8, "dropped_too_few_scored": 2,
              "removed_unscored": 8, "removed_not_eos": 0, "removed_duplicate": 0}

    def empty(rr, rdir_, keys=None):
        raise pairs.empty_error(rdir_ / "pairs", counts, rr,
                                {"judge_samples": 8, "parse_failures": 8}, keys)

    monkeypatch.setattr(pairs, "run", empty)
    with pytest.raises(PrefloopError) as e:
        iterate.run_round(Recipe(), run_dir, 1)
    out = capsys.readouterr().out
    assert re.sub(r"; took \d+\.\ds$", "; took T", out, flags=re.M).splitlines() == [
        "[prefloop] round 1 generate: 8 responses to 2 instructions (0 cut at max_new_tokens, "
        "80 tokens); took T",
        "[prefloop] round 1 rank: 0/8 responses scored from 8 judge samples: 0 parsed 'Score: X' "
        "from the judge's text, 8 without a score; took T"]
    assert str(e.value).split("the largest cause: ")[1] == (
        "8 of 8 responses got no score from the ranker; 0 of 8 judgments parsable; set "
        "rank.judge_force_score=true (the score read from the self-judge's digit probabilities) "
        f"or raise iterate.judge_samples; see {rdir / 'pairs' / 'dropped.jsonl'}")


def test_win_rate_plot_has_the_wilson_intervals(tmp_path):
    lo, hi = wilson_interval(7, 10)
    trained = [{"round": 1, "model": "M2", "vs_prev": {"win_rate": 0.7, "ci95": [lo, hi]},
                "vs_m1": None},
               {"round": 2, "model": "M3", "vs_prev": {"win_rate": None, "ci95": None},
                "vs_m1": {"win_rate": 0.25, "ci95": [0.1, 0.5]}}]
    below, above = report.win_rate_errors(trained, "vs_prev")
    assert below[0] == pytest.approx(0.7 - lo) and above[0] == pytest.approx(hi - 0.7)
    assert math.isnan(below[1]) and math.isnan(above[1])
    below, above = report.win_rate_errors(trained, "vs_m1")
    assert math.isnan(below[0]) and below[1] == pytest.approx(0.15) and above[1] == 0.25
    rows = [{"round": 0, "model": "M1", "eval_score": 2.0, "eval_tokens": 40.0},
            *[{**r, "eval_score": 2.5, "eval_tokens": 41.0, "self_judge_score": 3.0, "pairs": 4,
               "dropped": {}, "pair_stats": {}} for r in trained]]
    paths = report.plot_rounds(rows, tmp_path)
    assert [p.name for p in paths] == ["win_rate.png", "score.png", "length.png", "pairs.png"]
    assert (tmp_path / "win_rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_gpu_recipe_uses_every_training_instruction_of_its_kinds_once(tmp_path):
    """constraints-gpu: 3 disjoint rounds of 193 cover the 579 training instructions of the
    default's 8 kinds, every M_t is read on all 287 held-out and 54 transfer instructions, and
    each round's candidates include the policy's greedy answer."""
    from prefloop.config import load_recipe
    from prefloop.stages import instructions

    recipe = load_recipe("constraints-gpu")
    it = recipe.iterate
    assert it.rounds * it.prompts_per_round == recipe.instructions.n_train == 579
    assert recipe.generate.greedy_candidate and recipe.rank.ranker == "constraints"
    iterate.check_recipe(recipe)
    instructions.run(iterate.seed_recipe(recipe), tmp_path)
    train = read_jsonl_lines(tmp_path / "instructions" / "train.jsonl")
    heldout = read_jsonl_lines(tmp_path / "instructions" / "heldout.jsonl")
    assert (len(train), len(heldout)) == (579, it.eval_prompts) == (579, 287)
    assert len(instructions.transfer_items(recipe)) == recipe.compare.transfer_n == 54
