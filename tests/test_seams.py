"""The ranker seam: stages, preflight and reports learn what they need about a ranker from its
class (rankers/), never from its name."""

import ast
from dataclasses import replace
from pathlib import Path

import pytest

from prefloop import preflight
from prefloop.config import Recipe, apply_overrides
from prefloop.constraints.evaluate import evaluate
from prefloop.errors import PrefloopError
from prefloop.rankers import RANKERS
from prefloop.rankers.pairrm import PairRMRanker
from prefloop.stages.compare import objective_text, ranker_line

SRC = Path(__file__).resolve().parents[1] / "src" / "prefloop"


def _recipe(*sets: str) -> Recipe:
    return apply_overrides(Recipe(), ["model.name=smollm2-135m-instruct", *sets])


class NewRanker(PairRMRanker):
    """A ranker the stages have never heard of, loading a model named by rank.judge_model."""

    @classmethod
    def models(cls, rank) -> dict[str, str]:
        return {"rank.judge_model": rank.judge_model}


def test_preflight_checks_the_models_a_new_ranker_names(monkeypatch):
    monkeypatch.setitem(RANKERS, "new", NewRanker)
    recipe = _recipe()
    recipe = replace(recipe, rank=replace(recipe.rank, ranker="new", judge_model="some user/m"))
    with pytest.raises(PrefloopError, match=r"^rank.judge_model: 'some user/m' is not a valid "
                       r"Hub id"):
        preflight.check_models(recipe, ["rank"], "run")
    preflight.check_models(recipe, ["generate", "train"], "run")  # no stage of it ranks


@pytest.mark.parametrize("sets,stages", [
    (["rank.ranker=pairrm", "rank.pairrm_model=./no/such/pairrm"], ["rank"]),
    (["rank.quality=pairrm", "rank.pairrm_model=./no/such/pairrm"], ["rank"]),
    (["compare.ranker=pairrm", "rank.pairrm_model=./no/such/pairrm"], ["compare"]),
])
def test_preflight_checks_every_ranker_the_command_uses(sets, stages):
    """The main ranker, the quality ranker of rank and compare's own ranker alike."""
    with pytest.raises(PrefloopError, match=r"^rank.pairrm_model: unknown model "
                       r"'./no/such/pairrm' \(no such folder\)"):
        preflight.check_models(_recipe(*sets), stages, "run")


def test_preflight_leaves_a_judge_without_its_own_model_alone():
    """The judge with no rank.judge_model is the policy: model.name is its only name."""
    assert RANKERS["judge"].models(_recipe().rank) == {}
    assert RANKERS["judge"].models(_recipe("rank.judge_model=a/b").rank) == {
        "rank.judge_model": "a/b"}
    assert RANKERS["constraints"].models(_recipe().rank) == {}
    preflight.check_models(_recipe("compare.verdict=false", "compare.ranker=pairrm",
                                   "rank.pairrm_model=./no/such"), ["compare"], "run")


def _objective() -> dict:
    items = [{"id": str(i), "instruction": "Describe tea. Do not use any commas.",
              "constraints": [{"kind": "punctuation:no_comma", "args": {}}]} for i in range(2)]
    return evaluate(items, ["Tea, hot.", "Tea is warm."], ["Tea is hot.", "Tea is warm."])


@pytest.mark.parametrize("name,same", [("judge", False), ("pairrm", False),
                                       ("constraints", True)])
def test_objective_text_says_what_the_ranker_says_of_itself(name, same):
    text = objective_text(_objective(), name, RANKERS[name].checks_constraints)
    head = text.splitlines()[0]
    assert head == (
        "Objective evaluation (program checks of each held-out instruction's constraints; "
        + ("the same checks ranked the training pairs (on other instructions): the model was "
           "trained toward exactly this metric" if same
           else f"independent of the training ranker ({name})") + "), 2 instructions:")


def test_ranker_line_ends_with_the_rankers_caveat():
    v = {"n": 4, "ranker": "judge:m", "wins": 3, "ties": 0, "losses": 1, "win_rate": 0.75,
         "ci95": [0.3, 0.95], "independent_of_training_ranker": False}
    line = ("Ranker (judge:m; the ranker that made the training pairs: optimistic): DPO wins 3, "
            "ties 0, loses 1; win-rate 0.750 (95% Wilson 0.300–0.950).")
    assert ranker_line(v, RANKERS["judge"].caveat) == \
        line + " A small model judging is a weak evaluator."
    assert ranker_line(v, RANKERS["pairrm"].caveat) == line


def _ranker_name_tests(tree: ast.AST) -> list[str]:
    """Comparisons with, and .startswith() of, a ranker's name in a module's code."""
    names = set(RANKERS)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and all(isinstance(op, (ast.Eq, ast.NotEq))
                                                 for op in node.ops):  # `in`: a record's field
            values = [node.left, *node.comparators]
            hits = [v.value for v in values if isinstance(v, ast.Constant)
                    and isinstance(v.value, str) and v.value.rstrip(":") in names]
            found += [f"line {node.lineno}: == {h!r}" for h in hits]
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "startswith":
            hits = [a.value for a in node.args if isinstance(a, ast.Constant)
                    and isinstance(a.value, str) and a.value.rstrip(":") in names]
            found += [f"line {node.lineno}: startswith({h!r})" for h in hits]
    return sorted(found)


def test_no_code_outside_rankers_branches_on_a_ranker_name():
    """A new ranker touches no stage, preflight or report code: only rankers/ (and the config's
    list of names) know them."""
    modules = [p for p in SRC.rglob("*.py") if "rankers" not in p.parts and p.name != "config.py"]
    assert len(modules) > 20
    found = {str(p.relative_to(SRC)): hits for p in modules
             if (hits := _ranker_name_tests(ast.parse(p.read_text(encoding="utf-8"))))}
    assert found == {}
    # the check can fail: the old compare code it replaced
    old = ast.parse('same = "x" if training_ranker == "constraints" else "y"\n'
                    'weak = v["ranker"].startswith("judge:")\n')
    assert _ranker_name_tests(old) == ["line 1: == 'constraints'", "line 2: startswith('judge:')"]
