"""Does preference data + DPO move a model the way the pairs say? (slow)

One small constraints run with fixed seeds: every instruction asks for one verifiable thing
(no comma); candidates are sampled once and ranked by the constraints; then three trainings
from the same candidates, each evaluated on held-out instructions by the objective checks:
- the pairs as built: held-out satisfaction must rise by at least MARGIN;
- chosen and rejected swapped: it must not rise (a label swap, a wrong loss sign or a wrong
  reference would make the first test look like this one);
- a hacked ranker that rewards the shortest answer: the guards must call the result hollow.

The model is a tiny random-weight llama (tests/tiny.py, seed 3: it writes a comma in 30 % of its
held-out greedy answers), so the whole module takes seconds; until issue #25 it was the embedded
SmolLM2 with a postscript constraint, which took 38 minutes of one core (three TRL trainings at
~30 s a step). What the embedded model gains from its own pairs is measured by the main job and
the GPU loop (docs/findings.md, BENCHMARKS.md), not here. Seed, sizes and learning rate were set
once (2026-12-07: as built +0.30, swapped -0.70, hacked: median words 42 -> 23).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from tiny import one_thread, tiny_llama, tiny_tokenizer, write_word_instructions

from prefloop.config import Recipe, recipe_from_dict
from prefloop.stages import compare, generate, instructions, pairs, rank, train

pytestmark = pytest.mark.slow

CONSTRAINT = {"kind": "punctuation:no_comma", "args": {}}
MARGIN = 0.25  # held-out strict accuracy: DPO minus original, at least
N_TRAIN, N_HELDOUT = 120, 40


def recipe_for(source: Path, model: Path):
    return recipe_from_dict({
        "model": {"name": str(model)},
        "instructions": {"source": str(source), "n_train": N_TRAIN, "n_heldout": N_HELDOUT},
        "generate": {"k": 6, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 48, "seed": 0},
        "rank": {"ranker": "constraints"},
        "pairs": {"require_eos": False, "length_match": 0.5},
        "train": {"learning_rate": 1e-3, "epochs": 3, "batch_size": 4, "warmup_ratio": 0.0,
                  "max_length": 256, "save_steps": 0},
        "compare": {"max_new_tokens": 48, "verdict": False}})


@pytest.fixture(scope="module")
def candidates(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    tok = tiny_tokenizer()
    tiny_llama(tok, seed=3).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    recipe = recipe_for(write_word_instructions(root / "no_comma.jsonl", N_TRAIN, N_HELDOUT,
                                                CONSTRAINT), root / "model")
    run_dir = root / "base"
    with one_thread():
        for stage in (instructions, generate, rank, pairs):
            stage.run(recipe, run_dir)
    return recipe, run_dir


def train_and_compare(candidates, name: str, edit=None) -> dict:
    """Copy the candidate run, let `edit(recipe, run_dir)` change its pairs, train, compare."""
    recipe, base = candidates
    run_dir = base.parent / name
    shutil.copytree(base, run_dir)
    with one_thread():
        if edit is not None:
            edit(recipe, run_dir)
        train.run(recipe, run_dir)
        compare.run(recipe, run_dir)
    return json.loads((run_dir / "compare" / "objective.json").read_text())


def swap_chosen_rejected(recipe: Recipe, run_dir: Path) -> None:
    rows = [dict(r) for r in pairs.read_dataset(run_dir / "pairs" / "dataset")]
    for r in rows:
        r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
        r["chosen_score"], r["rejected_score"] = r["rejected_score"], r["chosen_score"]
    pairs.write_dataset(rows, run_dir / "pairs" / "dataset")


class ShortestWins:
    """A deliberately hacked reward: the fewer words, the better."""

    name, pointwise, compares, programmatic = "hack:shortest", True, False, True

    def score(self, records, workdir):
        return [{"score": -float(len(r["response"].split())), "n_valid": 1, "scores": []}
                for r in records], {}

    def summary(self, counts):
        return None


def rerank_shortest(recipe: Recipe, run_dir: Path) -> None:
    hacked = replace(recipe, pairs=replace(recipe.pairs, length_match=0.0))
    rank.run(hacked, run_dir, force=True, ranker=ShortestWins())
    pairs.run(hacked, run_dir, force=True)


def test_dpo_on_constraint_pairs_raises_heldout_satisfaction(candidates):
    o = train_and_compare(candidates, "as-built")
    assert o["difference"]["prompt_strict"] >= MARGIN, o["difference"]


def test_swapped_pairs_do_not_raise_it(candidates):
    o = train_and_compare(candidates, "swapped", swap_chosen_rejected)
    assert o["difference"]["prompt_strict"] <= 0.0, o["difference"]


def test_a_hacked_ranker_is_flagged_by_the_guards(candidates):
    o = train_and_compare(candidates, "hacked", rerank_shortest)
    assert any(g.startswith("answers collapsed in length") for g in o["guards_fired"]), o
    assert not compare.reading(o).startswith("Verdict: the DPO model follows the held-out "
                                             "instructions' constraints better")
