"""Helpers on an instruction's group of sampled responses, shared by the rank stage and the
rankers (which may not import stages)."""

from __future__ import annotations


def duplicate_of(records: list[dict]) -> dict[tuple[str, int], int]:
    """(id, sample) -> the first sample of the same id with a byte-identical response."""
    first: dict[tuple[str, str], int] = {}
    dup = {}
    for r in records:
        key = (r["id"], r["response"])
        if key in first:
            dup[(r["id"], r["sample"])] = first[key]
        else:
            first[key] = r["sample"]
    return dup
