"""Greedy repetition loops after DPO, and the fix at their source (issue #23, item 1).

The mechanism, seen on SmolLM2 (docs/findings.md §2.8): greedy answers loop ("1.1.1.1..."), but
the sampled candidates almost never do, so no pair ever rejects a loop; DPO then moves the model
without looking at what its greedy decoding writes, and the loops grow. The fix: the policy's
own greedy answer is one more candidate (`generate.greedy_candidate`), the constraints ranker
scores a loop 0 (hollow "degenerate"), and pairs keeps a loop cut at the token limit, so the
loop is rejected on-policy.

A tiny random-weight llama reproduces the mechanism in seconds: its greedy answers loop on 10 of
20 held-out instructions while none of its samples at temperature 1 does. The same DPO run
with the fix removes most loops on held-out instructions; without it they stay.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import (
    one_thread,
    read_jsonl_lines,
    tiny_llama,
    tiny_tokenizer,
    write_word_instructions,
)

from prefloop.config import recipe_from_dict
from prefloop.constraints import guards
from prefloop.stages import compare, generate, instructions, pairs, rank, train

NO_COMMA = {"kind": "punctuation:no_comma", "args": {}}
N_TRAIN, N_HELDOUT = 40, 20


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny model (seed 5: its greedy answers often loop) and 60 instructions of five random
    words each asking for no comma, the first 40 for training."""
    root = tmp_path_factory.mktemp("degeneration")
    tok = tiny_tokenizer()
    tiny_llama(tok, seed=5).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    write_word_instructions(root / "source.jsonl", N_TRAIN, N_HELDOUT, NO_COMMA, prefix="d")
    return root / "model", root / "source.jsonl"


def loop(source, run_dir: Path, greedy_candidate: bool) -> dict:
    model, path = source
    recipe = recipe_from_dict({
        "model": {"name": str(model)},
        "instructions": {"source": str(path), "n_train": N_TRAIN, "n_heldout": N_HELDOUT},
        "generate": {"k": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 96,
                     "greedy_candidate": greedy_candidate},
        "rank": {"ranker": "constraints"},
        "pairs": {"require_eos": False},
        "train": {"engine": "fast", "loss_type": "sigmoid,sft", "learning_rate": 1e-3,
                  "epochs": 3, "batch_size": 4, "warmup_ratio": 0.0, "max_length": 256,
                  "save_steps": 0},
        "compare": {"max_new_tokens": 96, "verdict": False}})
    with one_thread():
        for stage in (instructions, generate, rank, pairs, train, compare):
            stage.run(recipe, run_dir)
    return json.loads((run_dir / "compare" / "objective.json").read_text())


def test_the_greedy_candidate_lets_dpo_reject_its_own_loops(source, tmp_path):
    run = tmp_path / "run"
    o = loop(source, run, greedy_candidate=True)
    gens = read_jsonl_lines(run / "generate" / "generations.jsonl")
    greedy = [g for g in gens if g.get("greedy")]
    sampled = [g for g in gens if not g.get("greedy")]
    assert len(greedy) == N_TRAIN and {g["sample"] for g in greedy} == {4}
    assert sum(guards.is_degenerate(g["response"]) for g in sampled) == 0
    looping = [g["id"] for g in greedy if guards.is_degenerate(g["response"])]
    rows = {r["id"]: r for r in pairs.read_dataset(run / "pairs" / "dataset")}
    # the model's own loops on half its training instructions, each the rejected answer of its
    # instruction's pair, never a chosen one
    assert len(looping) == 20
    assert [guards.is_degenerate(rows[i]["rejected"][0]["content"]) for i in looping] == [True] * 20
    assert not any(guards.is_degenerate(r["chosen"][0]["content"]) for r in rows.values())
    original, dpo = o["original"]["degenerate"], o["dpo"]["degenerate"]
    assert original == 10 and dpo <= original // 2, (original, dpo)
    assert o["dpo"]["empty"] == 0 and not any("collapsed" in g for g in o["guards_fired"])


def test_without_it_the_loops_stay(source, tmp_path):
    """The control: the same loop with the fix removed (no greedy candidate) keeps most loops, so
    the test above fails if the greedy candidate or the ranker's loop rule is taken away."""
    o = loop(source, tmp_path / "run", greedy_candidate=False)
    original, dpo = o["original"]["degenerate"], o["dpo"]["degenerate"]
    assert original == 10 and dpo > original // 2, (original, dpo)
