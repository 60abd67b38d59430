"""Checking responses against constraints: strict and loose results, and per-response scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prefloop.constraints.kinds import CONSTRAINED_OPTIONS, Kind, find_postscript
from prefloop.constraints.spec import Constraint, validate
from prefloop.errors import PrefloopError


@dataclass(frozen=True)
class CheckResult:
    """Whether a response satisfies one constraint as written (strict) or loosely read (loose)."""

    strict: bool
    loose: bool


@dataclass(frozen=True)
class Score:
    """Fractions of an instruction's constraints satisfied, and whether all of them were."""

    strict: float
    loose: float
    all_strict: bool
    all_loose: bool


def loose_variants(response: str) -> list[str]:
    """The response, without its first line, last line, or both; each also with "*" removed.

    IFEval's loose reading forgives a chatty first line ("Sure, here it is:"), a closing remark,
    and markdown emphasis.
    """
    lines = response.split("\n")
    trimmed = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return trimmed + [t.replace("*", "") for t in trimmed]


def _holds(kind: Kind, text: str, args: dict, prompt: str | None) -> bool:
    # An empty answer satisfies nothing, not even "no commas" or "fewer than 40 words".
    return bool(text.strip()) and kind.check(text, args, prompt)


def check(response: str, constraint: Constraint, prompt: str | None = None) -> CheckResult:
    """Check one constraint; prompt is only used by combination:repeat_prompt."""
    kind = validate(constraint)
    strict = _holds(kind, response, constraint.args, prompt)
    loose = strict or any(
        _holds(kind, v, constraint.args, prompt) for v in loose_variants(response)[1:]
    )
    return CheckResult(strict, loose)


def check_all(
    response: str, constraints: Sequence[Constraint], prompt: str | None = None
) -> list[CheckResult]:
    return [check(response, c, prompt) for c in constraints]


def score(response: str, constraints: Sequence[Constraint], prompt: str | None = None) -> Score:
    """Fraction of the constraints satisfied strictly and loosely (IFEval's instruction level)."""
    if not constraints:
        raise PrefloopError("score: no constraints given; fix: pass at least one Constraint")
    results = check_all(response, constraints, prompt)
    strict = sum(r.strict for r in results)
    loose = sum(r.loose for r in results)
    n = len(results)
    return Score(strict / n, loose / n, strict == n, loose == n)


def describe(constraint: Constraint) -> str:
    """The English sentence that asks for the constraint, e.g. "Answer in fewer than 40 words."."""
    return validate(constraint).describe(constraint.args)


def instruction_text(task: str, constraints: Sequence[Constraint]) -> str:
    """The task followed by one sentence per constraint, the way the built-in set is written."""
    return " ".join([task.strip(), *(describe(c) for c in constraints)])


def answer_body(response: str, constraints: Sequence[Constraint]) -> str | None:
    """The response without what its constraints add around an answer: everything from the first
    line that starts with a postscript marker, and a demanded closing phrase at the very end.
    None when no constraint adds such a part (then there is nothing to take away)."""
    markers = [c.args["postscript_marker"] for c in constraints
               if c.kind == "detectable_content:postscript"]
    endings = [c.args["end_phrase"] for c in constraints if c.kind == "startend:end_checker"]
    if not markers and not endings:
        return None
    body = response
    for marker in markers:
        found = find_postscript(body, marker)
        if found:
            body = body[:found.start()]
    for phrase in endings:
        stripped = body.strip().strip('"')
        if phrase.strip() and stripped.lower().endswith(phrase.strip().lower()):
            body = stripped[: len(stripped) - len(phrase.strip())]
    return body


def required_phrases(constraints: Sequence[Constraint]) -> tuple[str, ...]:
    """Text the constraints make a response repeat from its instruction (see copies_example)."""
    phrases: list[str] = []
    for c in constraints:
        a = c.args
        phrases += a.get("keywords", []) + [a.get("keyword", ""), a.get("end_phrase", "")]
        phrases += [a.get("postscript_marker", ""), a.get("first_word", "")]
        phrases += [a.get("prompt_to_repeat", ""), a.get("section_spliter", "")]
        if c.kind == "detectable_format:constrained_response":
            phrases += list(CONSTRAINED_OPTIONS)
    return tuple(p for p in phrases if p)
