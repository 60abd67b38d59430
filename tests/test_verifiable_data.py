"""Checks on the shipped verifiable instruction set (src/prefloop/data/verifiable_instructions.jsonl)."""

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from prefloop.artifacts import RunDir, iter_jsonl, read_manifest
from prefloop.config import load_recipe
from prefloop.constraints import check, describe, parse_constraints
from prefloop.constraints.guards import shared_run
from prefloop.stages import instructions

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src/prefloop/data/verifiable_instructions.jsonl"
SCRIPT = ROOT / "scripts/make_verifiable_instructions.py"
# sha256 of lines 1-800 (vi-000 to vi-799) as committed before the third block (issue #23)
FIRST_800_SHA256 = "cc6610cabec028aa8e35d923a9537df788f150cbcd9c5168c3d2984214d92943"
# Training instructions per kind that the default recipe's instructions.kinds selects
DEFAULT_TRAIN_PER_KIND = {
    "detectable_content:postscript": 126,
    "keywords:existence": 124,
    "keywords:forbidden_words": 125,
    "keywords:frequency": 129,
    "length_constraints:number_sentences": 125,
    "length_constraints:number_words": 123,
    "punctuation:no_comma": 124,
    "startend:end_checker": 126,
}
DEFAULT_HELDOUT_PER_KIND = {
    "detectable_content:postscript": 64,
    "keywords:existence": 61,
    "keywords:forbidden_words": 62,
    "keywords:frequency": 57,
    "length_constraints:number_sentences": 58,
    "length_constraints:number_words": 62,
    "punctuation:no_comma": 65,
    "startend:end_checker": 62,
}
HELDOUT_TOPICS = {"gardening", "music", "pets", "home", "school", "weather", "art", "holidays",
                  "languages"}
FORMAT_KINDS = {
    "detectable_format:title",
    "startend:quotation",
    "detectable_content:postscript",
    "detectable_format:number_bullet_lists",
    "detectable_format:multiple_sections",
    "detectable_format:json_format",
    "startend:end_checker",
    "detectable_content:number_placeholders",
    "detectable_format:number_highlighted_sections",
    "detectable_format:constrained_response",
    "length_constraints:number_paragraphs",
    "length_constraints:nth_paragraph_first_word",
    "change_case:english_lowercase",
    "change_case:english_capital",
    "keywords:forbidden_words",
}


@pytest.fixture(scope="module")
def items() -> list[dict]:
    lines = DATA.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def parsed(items) -> list[tuple]:
    return [
        parse_constraints(i["constraints"], f"{DATA.name}:{n + 1}") for n, i in enumerate(items)
    ]


def test_size_fields_and_unique_ids(items):
    assert len(items) >= 300
    assert len({i["id"] for i in items}) == len(items)
    keys = {"id", "topic", "split", "task", "constraints", "instruction"}
    assert all(set(i) == keys for i in items)
    assert {i["split"] for i in items} == {"train", "heldout"}


def test_every_item_has_one_to_three_constraints_that_parse(items, parsed):
    assert all(1 <= len(p) <= 3 for p in parsed)
    assert len(parsed) == len(items)


def test_kind_coverage(parsed):
    counts = Counter(c.kind for p in parsed for c in p)
    assert len(counts) >= 15
    assert min(counts.values()) >= 10, counts


def test_heldout_share_and_topics_disjoint(items):
    heldout = [i for i in items if i["split"] == "heldout"]
    assert len(heldout) >= 100
    assert 0.3 <= len(heldout) / len(items) <= 0.4
    train_topics = {i["topic"] for i in items if i["split"] == "train"}
    assert train_topics.isdisjoint({i["topic"] for i in heldout})


def test_no_repeated_task_and_no_shared_wording_across_splits(items):
    norm = [" ".join(i["task"].casefold().split()) for i in items]
    assert len(set(norm)) == len(norm)
    train = [i["task"] for i in items if i["split"] == "train"]
    heldout = [i["task"] for i in items if i["split"] == "heldout"]
    assert max(shared_run(h, t) for h in heldout for t in train) < 5


def test_task_length(items):
    lengths = [len(i["task"].split()) for i in items]
    assert min(lengths) >= 4 and max(lengths) <= 25


def test_length_kinds_pull_both_ways(parsed):
    for kind in ("length_constraints:number_words", "length_constraints:number_sentences"):
        relations = Counter(c.args["relation"] for p in parsed for c in p if c.kind == kind)
        assert relations["less than"] >= 15 and relations["at least"] >= 15, (kind, relations)
    counts = [
        c.args["num_paragraphs"]
        for p in parsed
        for c in p
        if c.kind == "length_constraints:number_paragraphs"
    ]
    assert min(counts) <= 2 and max(counts) >= 4


def test_instruction_is_task_plus_descriptions(items, parsed):
    for item, constraints in zip(items, parsed, strict=True):
        text = item["instruction"]
        assert text.startswith(item["task"])
        assert all(describe(c) in text for c in constraints)
        assert text.endswith(describe(constraints[-1]))


def test_copying_the_instruction_never_satisfies_all_constraints(items, parsed):
    for item, constraints in zip(items, parsed, strict=True):
        results = [check(item["instruction"], c) for c in constraints]
        assert not all(r.strict for r in results), item["id"]


def test_copying_the_instruction_fails_every_format_constraint(items, parsed):
    for item, constraints in zip(items, parsed, strict=True):
        for c in constraints:
            if c.kind in FORMAT_KINDS:
                assert not check(item["instruction"], c).loose, (item["id"], c.kind)


def test_no_example_lists_or_titles_in_instructions(items):
    for item in items:
        text = item["instruction"]
        assert "\n" not in text and "<<" not in text and "***" not in text and "[" not in text


def test_first_800_items_unchanged():
    lines = DATA.read_bytes().splitlines(keepends=True)
    assert len(lines) == 1240
    assert hashlib.sha256(b"".join(lines[:800])).hexdigest() == FIRST_800_SHA256
    assert json.loads(lines[800])["id"] == "vi-800"


def test_generator_is_deterministic_and_wrote_the_shipped_file(tmp_path):
    """Two runs under different hash seeds give the shipped file byte for byte."""
    for hash_seed in ("0", "1"):
        out = tmp_path / f"run{hash_seed}.jsonl"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env, check=True,
                       capture_output=True)
        assert out.read_bytes() == DATA.read_bytes()


def test_default_kinds_have_100_plus_training_instructions(tmp_path):
    """The instructions stage, with the default recipe's kinds and every instruction drawn."""
    recipe = load_recipe("default", ["instructions.n_train=579", "instructions.n_heldout=287"])
    instructions.run(recipe, tmp_path)
    run = RunDir(tmp_path)
    train = [r for _, r in iter_jsonl(run.train_instructions)]
    heldout = [r for _, r in iter_jsonl(run.heldout_instructions)]
    assert read_manifest(run.stage("instructions"))["counts"] == {
        "loaded": 1240, "after_dedupe_and_filter": 866, "train": 579, "heldout": 287}

    def per_kind(rows):
        return dict(Counter(c["kind"] for r in rows for c in r["constraints"]))

    assert per_kind(train) == DEFAULT_TRAIN_PER_KIND
    assert per_kind(heldout) == DEFAULT_HELDOUT_PER_KIND
    assert {r["topic"] for r in heldout} == HELDOUT_TOPICS
    assert {r["topic"] for r in train}.isdisjoint(HELDOUT_TOPICS)
    assert len({r["id"] for r in train + heldout}) == 579 + 287
    rest, validation = instructions.validation_split(train, "test")
    assert (len(rest), len(validation)) == (383, 196)
    assert {r["topic"] for r in validation} == {"cooking", "games", "money", "reading", "space",
                                                "travel"}
