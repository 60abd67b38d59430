"""Verifiable (IFEval-style) constraints: checkers, parsing of constraint fields, and guards.

Pure Python, no torch: ``check`` a response against a ``Constraint``, ``score`` it against all
of an instruction's constraints, ``describe`` a constraint as the sentence that asks for it.
"""

from prefloop.constraints.check import (
    CheckResult,
    Score,
    answer_body,
    check,
    check_all,
    describe,
    instruction_text,
    loose_variants,
    required_phrases,
    score,
)
from prefloop.constraints.kinds import KINDS, UNSUPPORTED
from prefloop.constraints.spec import Constraint, parse_constraints, parse_ifeval, validate

__all__ = [
    "KINDS",
    "UNSUPPORTED",
    "CheckResult",
    "Constraint",
    "Score",
    "answer_body",
    "check",
    "check_all",
    "describe",
    "instruction_text",
    "loose_variants",
    "parse_constraints",
    "parse_ifeval",
    "required_phrases",
    "score",
    "validate",
]
