"""Does preference data + DPO move the embedded model the way the pairs say? (slow)

One small constraints loop on SmolLM2-135M with fixed seeds: every instruction asks for one
verifiable thing; candidates are sampled once and ranked by the constraints; then three trainings
from the same candidates, each evaluated on held-out instructions (other topics) by the
objective checks:
- the pairs as built: held-out satisfaction must rise by at least MARGIN;
- chosen and rejected swapped: it must not rise (a label swap, a wrong loss sign or a wrong
  reference would make the first test look like this one);
- a hacked ranker that rewards the shortest answer: the guards must call the result hollow.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from prefloop.config import (
    CompareConfig,
    GenerateConfig,
    InstructionsConfig,
    PairsConfig,
    RankConfig,
    Recipe,
    TrainConfig,
)
from prefloop.constraints import Constraint, instruction_text
from prefloop.stages import compare, generate, instructions, pairs, rank, train
from prefloop.stages.instructions import builtin_path

pytestmark = pytest.mark.slow

CONSTRAINT = {"kind": "detectable_content:postscript", "args": {"postscript_marker": "P.S."}}
MARGIN = 0.25  # held-out strict accuracy: DPO minus original, at least
N_TRAIN, N_HELDOUT = 40, 24
FIRST_BLOCK = 320  # scripts/make_verifiable_instructions.py: TASKS, before MORE_TASKS


def write_source(path: Path) -> Path:
    """The built-in tasks of the first block (vi-000 to vi-319, where MARGIN and the seeds were
    set), each with the one constraint; split by the built-in topics."""
    rows = [json.loads(x) for x in builtin_path("verifiable_instructions").read_text().splitlines()]
    rows = [r for r in rows if int(r["id"].removeprefix("vi-")) < FIRST_BLOCK]
    c = Constraint(CONSTRAINT["kind"], CONSTRAINT["args"])
    path.write_text("".join(json.dumps({
        "id": r["id"], "task": r["task"], "topic": r["topic"], "split": r["split"],
        "instruction": instruction_text(r["task"], [c]), "constraints": [CONSTRAINT]}) + "\n"
        for r in rows))
    return path


def recipe_for(source: Path) -> Recipe:
    return Recipe(
        instructions=InstructionsConfig(source=str(source), n_train=N_TRAIN, n_heldout=N_HELDOUT),
        generate=GenerateConfig(k=6, temperature=0.8, top_p=0.95, max_new_tokens=64, seed=0),
        rank=RankConfig(ranker="constraints"),
        pairs=PairsConfig(length_match=0.5),
        train=TrainConfig(learning_rate=2e-4, epochs=3, batch_size=4, warmup_ratio=0.0,
                          max_length=256),
        compare=CompareConfig(max_new_tokens=64, verdict=False))


@pytest.fixture(scope="module")
def candidates(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    recipe = recipe_for(write_source(root / "postscript.jsonl"))
    run_dir = root / "base"
    for stage in (instructions, generate, rank, pairs):
        stage.run(recipe, run_dir)
    return recipe, run_dir


def train_and_compare(candidates, name: str, edit=None) -> dict:
    """Copy the candidate run, let `edit(recipe, run_dir)` change its pairs, train, compare."""
    recipe, base = candidates
    run_dir = base.parent / name
    shutil.copytree(base, run_dir)
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
