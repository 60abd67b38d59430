"""Greedy repetition loops after DPO, and the fix at their source (issue #23, item 1).

The mechanism, seen on SmolLM2 (docs/findings.md §2.8): greedy answers loop ("1.1.1.1...", one
sentence again and again), but the sampled candidates almost never do, so no pair ever rejects
a loop; DPO then moves the model without looking at what its greedy decoding writes. The fix:
the policy's own greedy answer is one more candidate (`generate.greedy_candidate`), the
constraints ranker scores a loop 0 (hollow "degenerate"), and pairs keeps a loop cut at the token
limit, so the loop is rejected on-policy.

A tiny random-weight llama (seed 5) reproduces the mechanism in seconds: its greedy answers loop
on 39 of 40 training instructions, none of its 160 samples at temperature 1 does. What the fix
is shown to do here: every one of those loops becomes its instruction's rejected answer, none
is chosen, and DPO lowers the model's log-probability of its own loops far more than the same run
without the fix. What it is not shown to do at this scale: remove the loops from held-out greedy
answers. By the full loop rule (`guards.is_degenerate`, widened on 2026-12-07) they go 19 -> 15
with the fix and 19 -> 14 without; by the narrower rule of tight loops, 10 -> 7 and 10 -> 8
(measured when this test was written). Those numbers are recorded, not asserted as a gain.
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


def recipe_for(source, greedy_candidate: bool):
    model, path = source
    return recipe_from_dict({
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


@pytest.fixture(scope="module")
def runs(source, tmp_path_factory) -> dict[bool, Path]:
    """The same loop with the fix (True) and without it (False)."""
    out = {}
    for fix in (True, False):
        out[fix] = run_dir = tmp_path_factory.mktemp(f"fix-{fix}")
        with one_thread():
            for stage in (instructions, generate, rank, pairs, train, compare):
                stage.run(recipe_for(source, fix), run_dir)
    return out


def loop_logp_shift(source, run_dir: Path, loops: list[dict]) -> float:
    """Mean over `loops` (greedy answers of the original model) of the per-token log-probability
    under the run's DPO model minus under the original."""
    import torch

    model, tok = compare.load_with_adapter(recipe_for(source, False),
                                           compare.adapter_dir(run_dir))
    shifts = []
    with one_thread(), torch.no_grad():
        for g in loops:
            ids = train.rendered_pair_ids({
                "prompt": [{"role": "user", "content": g["instruction"]}],
                "chosen": [{"role": "assistant", "content": g["response"]}],
                "rejected": [{"role": "assistant", "content": g["response"]}]}, tok)
            dpo = train.sequence_logps(model, ids["prompt_ids"], ids["chosen_ids"]).item()
            with model.disable_adapter():
                original = train.sequence_logps(model, ids["prompt_ids"],
                                                ids["chosen_ids"]).item()
            shifts.append((dpo - original) / len(ids["chosen_ids"]))
    return sum(shifts) / len(shifts)


def test_the_greedy_candidate_makes_dpo_reject_its_own_loops(runs, source):
    run = runs[True]
    gens = read_jsonl_lines(run / "generate" / "generations.jsonl")
    greedy = [g for g in gens if g.get("greedy")]
    sampled = [g for g in gens if not g.get("greedy")]
    assert len(greedy) == N_TRAIN and {g["sample"] for g in greedy} == {4}
    assert sum(guards.is_degenerate(g["response"]) for g in sampled) == 0
    looping = [g["id"] for g in greedy if guards.is_degenerate(g["response"])]
    rows = {r["id"]: r for r in pairs.read_dataset(run / "pairs" / "dataset")}
    # the model's own loops on 39 of its 40 training instructions, each the rejected answer of
    # its instruction's pair, never a chosen one
    assert len(looping) == 39
    assert [guards.is_degenerate(rows[i]["rejected"][0]["content"]) for i in looping] == [True] * 39
    assert not any(guards.is_degenerate(r["chosen"][0]["content"]) for r in rows.values())
    o = json.loads((run / "compare" / "objective.json").read_text())
    assert o["dpo"]["empty"] == 0 and not any("collapsed" in g for g in o["guards_fired"])


def test_dpo_unlearns_its_loops_only_with_the_fix(runs, source):
    """The learning test: the loops the original model writes greedily on its training
    instructions lose far more log-probability per token under the DPO model trained with the
    fix than under the one trained without it (whose pairs hold no loop: the control). Fails if
    the greedy candidate or the ranker's loop rule is taken away."""
    without = {r["id"]: r for r in pairs.read_dataset(runs[False] / "pairs" / "dataset")}
    assert not any(guards.is_degenerate(r["rejected"][0]["content"]) for r in without.values())
    greedy = [g for g in read_jsonl_lines(runs[True] / "generate" / "generations.jsonl")
              if g.get("greedy") and guards.is_degenerate(g["response"])]
    items = {it["id"]: it for it in read_jsonl_lines(runs[True] / "instructions" /
                                                     "train.jsonl")}
    loops = [{"instruction": items[g["id"]]["instruction"], "response": g["response"]}
             for g in greedy]
    with_fix = loop_logp_shift(source, runs[True], loops)
    control = loop_logp_shift(source, runs[False], loops)
    print(f"per-token log-probability of the model's own loops, DPO minus original: "
          f"with the fix {with_fix:+.3f}, without {control:+.3f}")
    assert with_fix < -0.3 and with_fix < control - 0.3, (with_fix, control)
