"""Rankers: what turns responses into scores. One contract, one module per ranker, and
`RANKERS`, the one place that maps a recipe's `rank.ranker` name to its class.

A ranker scores an instruction's responses (`score`) and compares two responses to the same
instruction (`compare`, used by evaluations); class-level methods describe it without loading
anything (its label for manifests, the lines of the dataset card, whether it depends on the
policy model, so the rank stage's config hash can include it).
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from prefloop.errors import PrefloopError


class _Registry(dict):
    """name -> ranker class, each module imported when its class is first asked for (PairRM's
    imports torch and transformers: a command that only checks its settings never loads them).
    A value may also be a class itself (a test or a plugin registering one)."""

    def __getitem__(self, name: str) -> type:
        value = super().__getitem__(name)
        if isinstance(value, str):
            module, _, cls = value.partition(":")
            value = getattr(importlib.import_module(module), cls)
            super().__setitem__(name, value)
        return value

    def get(self, name, default=None):
        return self[name] if name in self else default

    def values(self):
        return [self[k] for k in self]

    def items(self):
        return [(k, self[k]) for k in self]


RANKERS: dict[str, type] = _Registry({"judge": "prefloop.rankers.judge:JudgeRanker",
                                      "pairrm": "prefloop.rankers.pairrm:PairRMRanker",
                                      "constraints": "prefloop.rankers.constraints:ConstraintsRanker"})
JUDGE = "judge"  # the ranker a self-rewarding loop judges with when the recipe's is no program


class Ranker(Protocol):
    name: str  # recorded with every score, e.g. "judge:smollm2-135m-instruct"
    pointwise: bool  # scores are absolute (comparable across instructions), not only in a group
    compares: bool  # compare() works on bare (instruction, response) pairs
    programmatic: bool  # no model (a fixed program): the iterate loop can use it as its reward
    checks_constraints: bool  # it scores by the instructions' constraint checks: compare's
    #                           objective metric, so that metric is not independent of it
    caveat: str  # a sentence compare prints after this ranker's win-rate ("" for none)

    @classmethod
    def models(cls, rank) -> dict[str, str]:
        """The rank.* keys naming a model this ranker loads, with their values (preflight
        checks each name before anything runs)."""

    @classmethod
    def judgments(cls, rank) -> int:
        """Scoring passes per response (the plan's time estimate multiplies by it)."""

    def score(self, records: list[dict], workdir: Path) -> tuple[list[dict], dict]:
        """Score generation records (id, sample, instruction, response, finish_reason, ...).

        Returns one dict of fields per record ("score": float | None first, then the ranker's
        own), and the ranker's own counts for the manifest. `workdir` holds any log the ranker
        keeps so that a killed stage resumes without scoring anything twice.
        """

    def compare(self, instructions: list[str], a: list[str], b: list[str]) -> list[float]:
        """margin(a, b) per instruction: > 0 when a is better; NaN when it cannot tell."""

    def summary(self, counts: dict) -> str | None:
        """One line for the user about how the scores were obtained, without a "rank:" prefix
        (None: the rank stage says "N/M responses scored by <name>")."""


def ranker_class(name: str) -> type:
    """The class behind a recipe's rank.ranker name."""
    if name not in RANKERS:
        raise PrefloopError(f"rank.ranker: unknown ranker '{name}'; use one of "
                            f"{', '.join(RANKERS)}")
    return RANKERS[name]


def self_judging(rank, samples: int):
    """`rank` with the policy model judging its own responses, `samples` judgments each (the
    self-rewarding loop's reward when the recipe's ranker is not a program)."""
    return replace(rank, ranker=JUDGE, judge_model=None, judge_revision=None,
                   judge_samples=samples)


def make_ranker(recipe, policy=None) -> Ranker:
    """The recipe's ranker; `policy` (a generation backend) is the model being trained, which a
    self-judging ranker uses instead of loading the model again."""
    return ranker_class(recipe.rank.ranker).from_recipe(recipe, policy=policy)

