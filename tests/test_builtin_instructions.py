"""Checks on the shipped built-in instruction set (src/prefloop/data/builtin_instructions.jsonl)."""

import json
from collections import Counter
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "src/prefloop/data/builtin_instructions.jsonl"
CATEGORIES = {"writing", "coding", "reasoning", "advice", "knowledge", "math", "planning"}


def _normalise(text: str) -> str:
    # casefold + collapse whitespace, so near-identical prompts count as duplicates
    return " ".join(text.casefold().split())


@pytest.fixture(scope="module")
def raw_bytes() -> bytes:
    return DATA.read_bytes()


@pytest.fixture(scope="module")
def records(raw_bytes: bytes) -> list[dict]:
    lines = raw_bytes.decode("utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_valid_utf8_and_newline_terminated(raw_bytes: bytes) -> None:
    raw_bytes.decode("utf-8", errors="strict")
    assert raw_bytes.endswith(b"\n")
    assert b"\r" not in raw_bytes


def test_exactly_100_records_with_exact_keys(records: list[dict]) -> None:
    assert len(records) == 100
    for rec in records:
        assert set(rec) == {"id", "category", "instruction"}, rec


def test_ids_exact_and_in_order(records: list[dict]) -> None:
    ids = [rec["id"] for rec in records]
    assert ids == [f"builtin-{i:03d}" for i in range(100)]
    assert len(set(ids)) == 100


def test_categories_known_and_balanced(records: list[dict]) -> None:
    counts = Counter(rec["category"] for rec in records)
    assert set(counts) == CATEGORIES
    assert min(counts.values()) >= 12


def test_instructions_nonempty_and_short(records: list[dict]) -> None:
    for rec in records:
        text = rec["instruction"]
        assert isinstance(text, str)
        assert text.strip(), rec["id"]
        assert len(text) < 600, rec["id"]


def test_instructions_unique_after_normalisation(records: list[dict]) -> None:
    normed = Counter(_normalise(rec["instruction"]) for rec in records)
    dupes = [text for text, n in normed.items() if n > 1]
    assert dupes == []


def test_some_non_ascii_text(records: list[dict]) -> None:
    non_ascii = [rec["id"] for rec in records if not rec["instruction"].isascii()]
    assert len(non_ascii) >= 2
