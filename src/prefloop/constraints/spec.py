"""The Constraint value and the validation of constraint fields read from user files.

Every problem raises PrefloopError with one line: location, field, what is wrong, and the fix.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefloop.constraints.kinds import KINDS, RELATIONS, UNSUPPORTED, Arg, Kind
from prefloop.errors import PrefloopError

_EXAMPLES = {"int": "40", "str": '"some text"', "words": '["ocean", "salt"]', "letter": '"z"'}


@dataclass(frozen=True)
class Constraint:
    """One verifiable constraint: an IFEval instruction id and its keyword arguments."""

    kind: str
    args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A private copy, so later edits to the caller's dict cannot change a frozen value.
        object.__setattr__(self, "args", dict(self.args))

    def __hash__(self) -> int:
        return hash((self.kind, json.dumps(self.args, sort_keys=True, default=str)))

    def to_json(self) -> dict:
        """The {"kind", "args"} object that parse_constraints reads back."""
        return {"kind": self.kind, "args": dict(self.args)}


def _fail(where: str, fld: str, problem: str, fix: str) -> PrefloopError:
    return PrefloopError(f"{where}: {fld}: {problem}; fix: {fix}")


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _closest(name: str, options: Sequence[str]) -> str:
    return difflib.get_close_matches(name, options, n=1, cutoff=0.0)[0]


def lookup_kind(kind: Any, where: str, fld: str) -> Kind:
    """The registered kind for an id; unknown ids name the closest valid one."""
    if not isinstance(kind, str) or not kind.strip():
        raise _fail(
            where,
            fld,
            f"must be a constraint kind id, got {_show(kind)}",
            'write an IFEval id such as "punctuation:no_comma"',
        )
    if kind in UNSUPPORTED:
        raise _fail(
            where,
            fld,
            f"constraint kind {kind!r} is not supported: {UNSUPPORTED[kind]}",
            "remove this constraint",
        )
    if kind not in KINDS:
        by_suffix = [k for k in KINDS if k.split(":", 1)[1] == kind.split(":")[-1]]
        guess = by_suffix[0] if len(by_suffix) == 1 else _closest(kind, list(KINDS))
        raise _fail(
            where,
            fld,
            f"unknown constraint kind {kind!r}",
            f"did you mean {guess!r}? (docs/constraints.md lists all kinds)",
        )
    return KINDS[kind]


def _check_value(arg: Arg, value: Any, where: str, fld: str) -> Any:
    kind_of_value = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "str": isinstance(value, str) and bool(value.strip()),
        "words": isinstance(value, list)
        and bool(value)
        and all(isinstance(w, str) and w.strip() for w in value),
        "relation": value in RELATIONS,
        "letter": isinstance(value, str) and len(value) == 1 and value.isalpha(),
    }[arg.type]
    if not kind_of_value:
        wanted = {
            "int": "a whole number",
            "str": "a non-empty string",
            "words": "a non-empty list of strings",
            "letter": "a single letter",
            "relation": 'either "less than" or "at least"',
        }[arg.type]
        fix = (
            'use "less than" or "at least"'
            if arg.type == "relation"
            else f"write it as {wanted}, e.g. {_EXAMPLES[arg.type]}"
        )
        raise _fail(where, fld, f"must be {wanted}, got {_show(value)}", fix)
    if arg.type == "int" and value < arg.minimum:
        raise _fail(
            where,
            fld,
            f"must be at least {arg.minimum}, got {value}",
            f"use a number >= {arg.minimum}",
        )
    return value


def validate_args(kind: Kind, args: Any, where: str, fld: str) -> dict:
    """Check a kind's arguments: no unknown names, none missing, each of the right type."""
    if not isinstance(args, Mapping):
        raise _fail(
            where,
            fld,
            f"must be a JSON object of arguments, got {_show(args)}",
            'write e.g. {"num_words": 40, "relation": "less than"}',
        )
    names = [a.name for a in kind.args]
    for name in args:
        if name not in names:
            fix = (
                f"use {_closest(name, names)!r}"
                if names
                else f"{kind.id} takes no arguments: use {{}}"
            )
            raise _fail(where, f"{fld}.{name}", f"unknown argument for {kind.id}", fix)
    for arg in kind.args:
        if arg.name not in args:
            if arg.required:
                raise _fail(
                    where,
                    f"{fld}.{arg.name}",
                    f"missing; {kind.id} needs it",
                    f'add "{arg.name}": {_EXAMPLES.get(arg.type, _EXAMPLES["str"])}'
                    if arg.type != "relation"
                    else f'add "{arg.name}": "less than"',
                )
            continue
        _check_value(arg, args[arg.name], where, f"{fld}.{arg.name}")
    if "nth_paragraph" in args and args["nth_paragraph"] > args["num_paragraphs"]:
        raise _fail(
            where,
            f"{fld}.nth_paragraph",
            f"is {args['nth_paragraph']} but num_paragraphs is {args['num_paragraphs']}",
            "use a paragraph number no larger than num_paragraphs",
        )
    return dict(args)


def validate(constraint: Constraint, where: str = "constraint") -> Kind:
    """The kind of a constraint built in code, after the same checks parse_constraints makes."""
    kind = lookup_kind(constraint.kind, where, "kind")
    validate_args(kind, constraint.args, where, "args")
    return kind


def parse_constraints(value: Any, where: str, fld: str = "constraints") -> tuple[Constraint, ...]:
    """Read a JSON list of {"kind": ..., "args": {...}} objects into Constraints."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else _show(value)
        raise _fail(
            where,
            fld,
            f'must be a non-empty JSON list of {{"kind", "args"}} objects, got {got}',
            'write e.g. [{"kind": "punctuation:no_comma", "args": {}}]',
        )
    out = []
    for i, item in enumerate(value):
        here = f"{fld}[{i}]"
        if not isinstance(item, Mapping):
            raise _fail(
                where,
                here,
                f'must be an object with "kind" and "args", got {_show(item)}',
                'write e.g. {"kind": "punctuation:no_comma", "args": {}}',
            )
        extra = [k for k in item if k not in ("kind", "args")]
        if extra:
            raise _fail(
                where,
                f"{here}.{extra[0]}",
                "unknown key",
                'a constraint has only "kind" and "args"; put arguments inside "args"',
            )
        if "kind" not in item:
            raise _fail(where, f"{here}.kind", "missing", 'add "kind", e.g. "punctuation:no_comma"')
        kind = lookup_kind(item["kind"], where, f"{here}.kind")
        args = validate_args(kind, item.get("args", {}), where, f"{here}.args")
        out.append(Constraint(kind.id, args))
    return tuple(out)


def parse_ifeval(instruction_id_list: Any, kwargs: Any, where: str) -> tuple[Constraint, ...]:
    """Read an IFEval row's instruction_id_list and kwargs (null-valued kwargs are ignored)."""
    if not isinstance(instruction_id_list, list) or not instruction_id_list:
        raise _fail(
            where,
            "instruction_id_list",
            f"must be a non-empty list of instruction ids, got {_show(instruction_id_list)}",
            'write e.g. ["punctuation:no_comma"]',
        )
    if kwargs is None:
        kwargs = [{} for _ in instruction_id_list]
    if not isinstance(kwargs, list) or len(kwargs) != len(instruction_id_list):
        raise _fail(
            where,
            "kwargs",
            f"must be a list with one object per instruction id "
            f"({len(instruction_id_list)}), got {_show(kwargs)}",
            "give one kwargs object per entry of instruction_id_list, {} when it has none",
        )
    out = []
    for i, (kind_id, raw) in enumerate(zip(instruction_id_list, kwargs, strict=True)):
        kind = lookup_kind(kind_id, where, f"instruction_id_list[{i}]")
        if raw is not None and not isinstance(raw, Mapping):
            validate_args(kind, raw, where, f"kwargs[{i}]")
        # Datasets stored as Arrow tables fill every other instruction's argument with null.
        present = {k: v for k, v in (raw or {}).items() if v is not None}
        out.append(Constraint(kind.id, validate_args(kind, present, where, f"kwargs[{i}]")))
    return tuple(out)
