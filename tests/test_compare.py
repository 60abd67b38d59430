"""The compare stage: original vs DPO on held-out instructions, tables, and the verdict."""

import json
import math
import time

import pandas as pd
import pytest
import torch
from tiny import (
    PAIRS,
    one_thread,
    read_jsonl_lines,
    save_model_folder,
    write_instructions,
    write_pairs,
)

from prefloop.artifacts import write_manifest
from prefloop.config import Recipe, apply_overrides, load_recipe
from prefloop.errors import PrefloopError
from prefloop.stages import compare

HELDOUT = ["write a poem about the moon", "give two tips to learn code",
           "what is the capital city ?", "explain the sun in simple words",
           "name a small tree"]
TRAIN = [p[0] for p in PAIRS]


def make_adapter(model_dir, run_dir, seed: int = 1):
    """A LoRA adapter with large random B weights (so it changes greedy outputs) + manifest."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = run_dir / "train"
    model.save_pretrained(out / "adapter")
    write_manifest(out, "train", "train-hash", started=time.time())


class FakeRanker:
    """Returns preset margins in order; records what it was asked and the adapter state."""

    name = "fake:ranker"

    def __init__(self, margins, model_ref=None):
        self.margins = list(margins)
        self.calls = []
        self.model_ref = model_ref

    def compare(self, instructions, a, b):
        self.calls.append((list(instructions), list(a), list(b)))
        return self.margins[: len(a)]


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    model_dir = save_model_folder(tmp_path / "model")
    run = tmp_path / "run"
    write_instructions(run, TRAIN, HELDOUT)
    write_pairs(run)
    make_adapter(model_dir, run)
    with one_thread():
        yield run


def _decoded(tok, completions) -> list[str]:
    """What generate_responses stores as `response` for each prompt's first completion."""
    out = []
    for c in completions:
        ids = c[0].token_ids[:-1] if c[0].finish_reason == "eos" else c[0].token_ids
        out.append(tok.decode(ids, skip_special_tokens=True).strip())
    return out


def _recipe(run_dir, *extra):
    return apply_overrides(Recipe(), [f"model.name={run_dir.parent / 'model'}",
                                      "compare.max_new_tokens=6", *extra])


def test_compare_tables_and_verdict(run_dir, capsys):
    from prefloop.engine import Sampling, generate
    from prefloop.engine.backend import eos_ids
    from prefloop.models import load_model

    ranker = FakeRanker([2.0, -1.0, 0.0, math.nan, 0.5])
    out = compare.run(_recipe(run_dir, "compare.view=blocks"), run_dir, ranker=ranker)
    def in_item_order(name):  # the file is in completion order; one record per id
        by_id = {r["id"]: r for r in read_jsonl_lines(out / name)}
        return [by_id[f"ho-{i}"] for i in range(len(HELDOUT))]

    original, dpo = in_item_order("original.jsonl"), in_item_order("dpo.jsonl")
    assert len(read_jsonl_lines(out / "dpo.jsonl")) == 5
    assert [r["instruction"] for r in original] == HELDOUT == [r["instruction"] for r in dpo]
    assert [r["model"] for r in original + dpo] == ["original"] * 5 + ["dpo"] * 5
    assert all(a["response"] != b["response"] for a, b in zip(original, dpo, strict=True))

    # The "original" side is exactly the base model (adapter disabled), same greedy settings.
    base, tok = load_model(str(run_dir.parent / "model"))
    ids = [r["prompt_text"] for r in original]
    assert ids[0].startswith("<s><|user|> write a poem")
    from prefloop.chat import render_prompt

    prompts = [render_prompt(tok, h).ids for h in HELDOUT]
    ref = generate(base, prompts, 1, Sampling(temperature=0.0, top_p=1.0, max_new_tokens=6),
                   eos_token_ids=eos_ids(base, tok), pad_token_id=tok.pad_token_id)
    assert [r["response_tokens"] for r in original] == [len(c[0].token_ids) for c in ref]
    assert [r["response"] for r in original] == _decoded(tok, ref)

    df = pd.read_csv(out / "comparison.csv", keep_default_na=False)
    assert list(df.columns) == ["instruction", "original", "dpo"]
    assert df["instruction"].tolist() == HELDOUT
    assert df["original"].tolist() == [r["response"] for r in original]
    assert df["dpo"].tolist() == [r["response"] for r in dpo]
    md = (out / "comparison.md").read_text().splitlines()
    assert md[0] == "| instruction | original | dpo |" and md[1] == "|---|---|---|"
    assert len(md) == 2 + 5 and all(line.startswith("| ") for line in md[2:])

    assert ranker.calls == [(HELDOUT, [r["response"] for r in dpo],
                             [r["response"] for r in original])]
    v = json.loads((out / "verdict.json").read_text())
    assert {k: v[k] for k in ("ranker", "n", "wins", "ties", "losses", "invalid", "identical",
                              "win_rate", "ci_method")} == {
        "ranker": "fake:ranker", "n": 4, "wins": 2, "ties": 1, "losses": 1, "invalid": 1,
        "identical": 0, "win_rate": 0.625, "ci_method": "wilson"}
    assert v["ci95"] == pytest.approx(list(compare.wilson_interval(2.5, 4)))
    assert [i["outcome"] for i in v["items"]] == ["win", "loss", "tie", "invalid", "win"]
    assert [i["margin"] for i in v["items"]] == [2.0, -1.0, 0.0, None, 0.5]
    assert v["mean_tokens"]["original"] == pytest.approx(
        sum(r["response_tokens"] - (r["finish_reason"] == "eos") for r in original) / 5)
    assert v["mean_words"]["dpo"] == pytest.approx(
        sum(len(r["response"].split()) for r in dpo) / 5)

    printed = capsys.readouterr().out
    for i, h in enumerate(HELDOUT, start=1):
        assert f"━━ {i}/5 " in printed and h in printed
    assert printed.count("── original ──") == 5 and printed.count("── dpo ──") == 5
    assert "Verdict (fake:ranker): on 4 held-out instructions the DPO model wins 2, ties 1 " \
           "(0 identical responses) and loses 1 against the original, 1 left out" in printed
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"] == {"heldout": 5, "identical": 0, "original_from_cache": 0, "wins": 2,
                           "ties": 1, "losses": 1, "invalid": 1, "win_rate": 0.625,
                           "win_rate_ci95": v["ci95"], "ranker": "fake:ranker"}

    # Run again: the original's greedy answers come from the answer cache, the same ones.
    compare.run(_recipe(run_dir), run_dir, ranker=FakeRanker([0.0] * 5), force=True)
    assert json.loads((out / "manifest.json").read_text())["counts"]["original_from_cache"] == 5
    assert in_item_order("original.jsonl") == original
    # compare.transfer_n 0 (the default): no transfer check, nothing of it written
    assert not [p.name for p in out.iterdir() if p.name.startswith("transfer")]


def test_default_judge_is_the_original_model(run_dir, monkeypatch):
    """Without an injected ranker, the judge gets the policy and runs with the adapter off."""
    from peft.tuners.lora import LoraLayer

    seen = {}

    class Judge:
        name = "judge:tiny"

        def compare(self, instructions, a, b):
            layers = [m for m in seen["model"].modules() if isinstance(m, LoraLayer)]
            seen["disabled"] = all(m.disable_adapters for m in layers) and bool(layers)
            return [1.0] * len(a)

    def fake_make_ranker(recipe, policy=None):
        seen["model"], seen["tokenizer"] = policy.model, policy.tokenizer
        return Judge()

    monkeypatch.setattr(compare, "make_ranker", fake_make_ranker)
    compare.run(_recipe(run_dir, "compare.max_new_tokens=3"), run_dir)
    assert type(seen["model"]).__name__ == "PeftModelForCausalLM"  # task type from the adapter
    assert seen["disabled"] is True


def test_verdict_is_skipped_when_off(run_dir):
    out = compare.run(_recipe(run_dir, "compare.verdict=false", "compare.max_new_tokens=3"),
                      run_dir, ranker=FakeRanker([]))
    assert not (out / "verdict.json").exists()
    assert (out / "comparison.csv").exists()


def test_heldout_in_training_set_is_refused(run_dir):
    from prefloop.artifacts import write_jsonl

    path = run_dir / "instructions" / "heldout.jsonl"
    write_jsonl(path, [{"id": "ho-0", "instruction": "name a small tree"},
                       {"id": "ho-1", "instruction": "  Write a SHORT poem about the sea "}])
    with pytest.raises(PrefloopError) as e:
        compare.run(_recipe(run_dir), run_dir, ranker=FakeRanker([]))
    train_path = run_dir / "instructions" / "train.jsonl"
    assert str(e.value) == (
        f"{path}: 1 held-out instruction(s) also in {train_path} (first: 'ho-1'); held-out "
        "instructions must be unseen, re-run `prefloop instructions --force` on a "
        "de-duplicated source")
    assert not (run_dir / "compare").exists()


def test_heldout_in_pairs_prompts_is_refused(run_dir):
    from prefloop.artifacts import write_jsonl

    write_jsonl(run_dir / "instructions" / "train.jsonl",
                [{"id": "x", "instruction": "hello world"}])
    write_jsonl(run_dir / "instructions" / "heldout.jsonl",
                [{"id": "ho-7", "instruction": "Name a big river"}])
    with pytest.raises(PrefloopError) as e:
        compare.run(_recipe(run_dir), run_dir, ranker=FakeRanker([]))
    assert str(e.value) == (
        f"{run_dir / 'instructions' / 'heldout.jsonl'}: 1 held-out instruction(s) are prompts "
        f"of the pairs dataset {run_dir / 'pairs' / 'dataset'} (first: 'ho-7'); held-out "
        "instructions must be unseen, re-run `prefloop pairs --force` and `prefloop train --force`")


def test_missing_adapter_names_folder_and_command(tmp_path):
    with pytest.raises(PrefloopError) as e:
        compare.run(Recipe(), tmp_path / "run")
    adapter = tmp_path / "run" / "train" / "adapter"
    assert str(e.value) == (f"{adapter}: no trained adapter found; run `prefloop train "
                            f"--output-dir {tmp_path / 'run'}` first")


def _rec(text, tokens, reason="eos"):
    return {"response": text, "response_tokens": tokens, "finish_reason": reason}


def test_tally_and_identical_responses_are_ties_without_ranking():
    items = [{"id": str(i), "instruction": f"q{i}"} for i in range(4)]
    original = [_rec("same", 2), _rec("a b c", 4), _rec("x", 2), _rec("p q", 3, "length")]
    dpo = [_rec("same", 2), _rec("a b", 3), _rec("y y y y", 5), _rec("r", 2)]
    ranker = FakeRanker([-0.5, 1.5, 0.25])
    margins = compare.judge_margins(ranker, items, original, dpo)
    assert ranker.calls == [(["q1", "q2", "q3"], ["a b", "y y y y", "r"], ["a b c", "x", "p q"])]
    assert margins == [0.0, -0.5, 1.5, 0.25]
    v = compare.tally(items, original, dpo, margins, "fake")
    assert (v["n"], v["wins"], v["ties"], v["losses"], v["invalid"], v["identical"]) == (
        4, 2, 1, 1, 0, 1)
    assert v["win_rate"] == 0.625
    # content tokens: EOS not counted; "length" rows have none
    assert v["mean_tokens"] == {"original": (1 + 3 + 1 + 3) / 4, "dpo": (1 + 2 + 4 + 1) / 4}
    assert v["mean_words"] == {"original": (1 + 3 + 1 + 2) / 4, "dpo": (1 + 2 + 4 + 1) / 4}
    none = compare.tally(items[:1], original[:1], dpo[:1], [math.nan], "fake")
    assert (none["n"], none["invalid"], none["win_rate"], none["ci95"]) == (0, 1, None, None)
    assert compare.verdict_text(none).startswith("Verdict (fake): no valid comparison")


def test_wilson_interval_textbook_values():
    lo, hi = compare.wilson_interval(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = compare.wilson_interval(0, 10)
    assert (lo, round(hi, 4)) == (0.0, 0.2775)
    lo, hi = compare.wilson_interval(10, 10)
    assert (round(lo, 4), round(hi, 12)) == (0.7225, 1.0)


def test_markdown_escapes_pipes_and_newlines():
    df = pd.DataFrame({"instruction": ["a | b"], "original": ["line1\nline2"], "dpo": ["ok"]})
    assert compare.markdown_table(df) == (
        "| instruction | original | dpo |\n|---|---|---|\n| a \\| b | line1<br>line2 | ok |\n")


def test_blocks_wrap_and_truncate_long_cells():
    long = "word " * 400
    df = pd.DataFrame({"instruction": ["short question"], "original": [long], "dpo": ["yes"]})
    text = compare.format_blocks(df, width=60, max_chars=200)
    assert all(len(line) <= 60 for line in text.splitlines())
    assert text.count("word") == 40 and text.count("word…") == 1  # 199 chars + "…"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_original_side_is_the_base_model(run_dir):
    """On CUDA (bf16, CUDA-graph decoding) the adapter-disabled side equals the plain base."""
    from peft import PeftModel

    from prefloop.chat import render_prompt
    from prefloop.engine import Sampling, generate
    from prefloop.engine.backend import eos_ids
    from prefloop.models import load_model

    out = compare.run(_recipe(run_dir), run_dir, ranker=FakeRanker([1.0] * 5))
    by_id = {r["id"]: r for r in read_jsonl_lines(out / "original.jsonl")}
    dpo_by_id = {r["id"]: r for r in read_jsonl_lines(out / "dpo.jsonl")}
    base, tok = load_model(str(run_dir.parent / "model"))
    assert base.dtype == torch.bfloat16 and base.device.type == "cuda"
    prompts = [render_prompt(tok, h).ids for h in HELDOUT]
    sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=6)
    kw = {"eos_token_ids": eos_ids(base, tok), "pad_token_id": tok.pad_token_id}
    plain = generate(base, prompts, 1, sampling, **kw)
    assert [by_id[f"ho-{i}"]["response"] for i in range(5)] == _decoded(tok, plain)
    tuned = PeftModel.from_pretrained(base, str(run_dir / "train" / "adapter")).eval()
    with_adapter = generate(tuned, prompts, 1, sampling, **kw)
    assert [dpo_by_id[f"ho-{i}"]["response"] for i in range(5)] == _decoded(tok, with_adapter)
    assert [c[0].token_ids for c in plain] != [c[0].token_ids for c in with_adapter]


def test_constrained_heldout_gets_the_objective_evaluation(run_dir, capsys):
    """Held-out instructions with constraints: both sides are checked by the program, the
    paired difference and guards are reported, and the ranker's line says whether it made
    the training pairs."""
    from prefloop.artifacts import write_jsonl

    no_comma = [{"kind": "punctuation:no_comma", "args": {}}]
    items = [{"id": f"ho-{i}", "instruction": t, "constraints": no_comma}
             for i, t in enumerate(HELDOUT)]
    write_jsonl(run_dir / "instructions" / "heldout.jsonl", items)
    recipe = _recipe(run_dir, "compare.max_new_tokens=4", "rank.ranker=constraints",
                     "compare.ranker=judge")
    out = compare.run(recipe, run_dir, ranker=FakeRanker([1.0] * 5))
    o = json.loads((out / "objective.json").read_text())
    assert o["n"] == 5 and set(o["per_kind"]) == {"punctuation:no_comma"}
    original = read_jsonl_lines(out / "original.jsonl")
    expected = sum("," not in r["response"] and r["response"].strip() != ""
                   for r in original) / 5
    assert o["original"]["prompt_strict"] == expected
    v = json.loads((out / "verdict.json").read_text())
    assert v["independent_of_training_ranker"] is True and v["wins"] == 5
    text = capsys.readouterr().out
    assert "Objective evaluation (program checks of each held-out instruction's constraints; " \
           "the same checks ranked the training pairs" in text
    assert "Ranker (fake:ranker; independent of the training ranker): DPO wins 5" in text
    sound = o["original"]["prompt_sound"]
    assert sound <= expected  # a hollow answer that passes counts wrong here
    assert ("  the same, hollow answers counted wrong (empty, refusal, copy, bare, degenerate): "
            f"original {sound:.3f}, DPO {o['dpo']['prompt_sound']:.3f}; difference") in text
    assert text.rstrip().splitlines()[-1].startswith("Verdict: ")
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["objective_strict"]["original"] == expected


def test_the_result_is_kept_and_shown_again(run_dir, capsys):
    """compare writes report.md, eval_results.json and per_kind.png; `prefloop show` and
    `prefloop compare` on the finished run print exactly what compare printed."""
    from prefloop import cli
    from prefloop.artifacts import write_jsonl
    from prefloop.config import dump_recipe

    kinds = [[{"kind": "punctuation:no_comma", "args": {}}],
             [{"kind": "punctuation:no_comma", "args": {}},
              {"kind": "detectable_content:postscript", "args": {"postscript_marker": "P.S."}}]]
    write_jsonl(run_dir / "instructions" / "heldout.jsonl",
                [{"id": f"ho-{i}", "instruction": t, "constraints": kinds[i % 2]}
                 for i, t in enumerate(HELDOUT)])
    recipe = _recipe(run_dir, "compare.max_new_tokens=4", "compare.ranker=judge",
                     "rank.ranker=constraints")
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    out = compare.run(recipe, run_dir, ranker=FakeRanker([1.0, 1.0, -1.0, 0.0, 1.0]))
    printed = capsys.readouterr().out
    o = json.loads((out / "objective.json").read_text())
    e = json.loads((out / "eval_results.json").read_text())
    assert e["heldout_instructions"] == 5
    assert e["original_prompt_strict_accuracy"] == o["original"]["prompt_strict"]
    assert e["dpo_constraint_loose_accuracy"] == o["dpo"]["constraint_loose"]
    assert e["prompt_strict_accuracy_difference"] == o["difference"]["prompt_strict"]
    assert e["prompt_strict_accuracy_difference_ci95"] == o["difference"]["ci95"]
    lo, hi = o["difference"]["ci95"]
    assert e["objective_winner"] == ("dpo" if lo > 0 else "original" if hi < 0 else "none")
    assert set(e["per_kind_strict_accuracy"]) == {"detectable_content:postscript",
                                                  "punctuation:no_comma"}
    for kind, row in e["per_kind_strict_accuracy"].items():
        n, acc = o["per_kind"][kind]["n"], o["per_kind"][kind]["original"]
        assert row["n"] == n == {"punctuation:no_comma": 5,
                                 "detectable_content:postscript": 2}[kind]
        assert row["original_ci95"] == list(compare.wilson_interval(round(acc * n), n))
    assert {k: e[k] for k in ("ranker", "ranker_wins", "ranker_ties", "ranker_losses",
                              "ranker_win_rate", "ranker_winner")} == {
        "ranker": "fake:ranker", "ranker_wins": 3, "ranker_ties": 1, "ranker_losses": 1,
        "ranker_win_rate": 0.7, "ranker_winner": "none"}
    assert e["ranker_win_rate_ci95"] == list(compare.wilson_interval(3.5, 5))
    assert e["verdict"] == printed.rstrip().splitlines()[-1]
    assert e["verdict"].startswith("Verdict: ")

    report = (out / "report.md").read_text()
    assert report.startswith(f"# Result: original vs DPO, {run_dir.parent / 'model'}\n")
    assert f"## Verdict\n\n{e['verdict']}\n" in report
    row = e["per_kind_strict_accuracy"]["punctuation:no_comma"]
    assert (f"| punctuation:no_comma | 5 | {row['original_accuracy']:.3f} "
            f"({row['original_ci95'][0]:.2f}–{row['original_ci95'][1]:.2f}) | "
            f"{row['dpo_accuracy']:.3f} ({row['dpo_ci95'][0]:.2f}–{row['dpo_ci95'][1]:.2f}) |"
            ) in report
    assert "![per kind](per_kind.png)" in report
    assert ("`fake:ranker`: DPO wins 3, ties 1, loses 1; win-rate 0.700 (95% Wilson "
            f"{e['ranker_win_rate_ci95'][0]:.3f}–{e['ranker_win_rate_ci95'][1]:.3f}).") in report
    assert report.endswith("## The responses\n\n" + (out / "comparison.md").read_text())
    assert (out / "per_kind.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert cli.main(["show", "--output-dir", str(run_dir)]) == 0
    assert capsys.readouterr().out == printed
    assert cli.main(["compare", "--output-dir", str(run_dir)]) == 0  # finished: shown again
    again = capsys.readouterr()
    assert again.out.startswith(printed)
    assert again.out[len(printed):].startswith("[prefloop] compare: 5 held-out instructions; "
                                               "strict accuracy original ")
    assert again.out.endswith("; finished earlier\n")
    assert f"[prefloop] result: {out / 'report.md'} (`prefloop show --output-dir {run_dir}` " \
           "prints it)" in again.err


def test_show_without_a_result_names_the_command(tmp_path, capsys):
    from prefloop import cli

    assert cli.main(["show", "--output-dir", str(tmp_path / "none")]) == 2
    run = tmp_path / "none"
    assert capsys.readouterr().err == (
        f"prefloop: error: {run}: no finished result (no {run / 'compare' / 'manifest.json'} and "
        f"no {run / 'report.md'}); run `prefloop run --output-dir {run}` (or `prefloop iterate`) "
        "first\n")
    assert not run.exists()


def test_compare_stage_line_leads_with_the_objective_accuracy_and_who_won():
    from prefloop.summary import LINES

    counts = {"heldout": 60, "objective_strict": {"original": 0.25, "dpo": 0.3167},
              "objective_ci95": [-0.0333, 0.1667], "guards_fired": 1, "wins": 28, "ties": 3,
              "losses": 29, "win_rate": 0.4917, "win_rate_ci95": [0.37, 0.615],
              "ranker": "judge:smollm2"}
    assert LINES["compare"](counts, {}) == (
        "60 held-out instructions; strict accuracy original 0.250, DPO 0.317, difference +0.067 "
        "(95% CI -0.033 to +0.167): no detectable difference; judge:smollm2 win-rate 0.492 "
        "(95% CI 0.370-0.615; 28 wins, 3 ties, 29 losses)")
    better = {**counts, "objective_ci95": [0.01, 0.12]}
    assert ": DPO better but hollow (1 guard fired); judge" in LINES["compare"](better, {})
    no_constraints = {k: counts[k] for k in ("heldout", "wins", "ties", "losses", "ranker")}
    no_constraints.update(win_rate=0.2, win_rate_ci95=[0.05, 0.45])
    assert LINES["compare"](no_constraints, {}) == (
        "60 held-out instructions; judge:smollm2 win-rate 0.200 (95% CI 0.050-0.450; 28 wins, "
        "3 ties, 29 losses): original better")
    transfer = {**counts, "transfer": {"n": 48, "strict": {"original": 0.25, "dpo": 0.2},
                                       "ci95": [-0.125, 0.0208], "reading": "inconclusive",
                                       "guards_fired": 1, "original_from_cache": 48}}
    assert LINES["compare"](transfer, {}) == (
        "60 held-out instructions; strict accuracy original 0.250, DPO 0.317, difference +0.067 "
        "(95% CI -0.033 to +0.167): no detectable difference; transfer (48 instructions of "
        "untrained kinds): original 0.250, DPO 0.200, difference -0.050 (95% CI -0.125 to "
        "+0.021): inconclusive, 1 guard fired; judge:smollm2 win-rate 0.492 (95% CI 0.370-0.615; "
        "28 wins, 3 ties, 29 losses)")
    assert LINES["compare"]({"heldout": 3}, {}) == (
        "3 held-out instructions; original vs DPO, not evaluated (no constraints on the held-out "
        "instructions and no ranker verdict)")


def test_error_bars_at_a_rate_of_one_or_zero_are_never_negative():
    """A Wilson interval at 0 or 1 ends at the rate up to rounding; matplotlib refuses a negative
    error bar (the per-kind plot of a kind every answer satisfied crashed compare)."""
    lo, hi = compare.wilson_interval(7, 7)
    assert compare.error_bar(1.0, (lo, hi)) == (pytest.approx(1.0 - lo), 0.0)
    assert compare.error_bar(1.0, (lo, 1.0 - 1.1e-16)) == (pytest.approx(1.0 - lo), 0.0)
    assert compare.error_bar(0.0, (1e-17, 0.35)) == (0.0, 0.35)
    from prefloop.stages.results import plot_per_kind

    kinds = {"detectable_content:postscript": {"n": 7, "original_accuracy": 0.2,
                                               "original_ci95": [0.05, 0.5], "dpo_accuracy": 1.0,
                                               "dpo_ci95": [0.62, 1.0 - 1.1e-16]}}
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        out = plot_per_kind(kinds, Path(d) / "per_kind.png")
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the transfer check: held-out topics, constraint kinds that were not trained ------------

def _trained_kinds() -> str:
    from prefloop.config import load_recipe

    return load_recipe("default").instructions.kinds


def test_transfer_set_holds_only_untrained_kinds_on_heldout_topics_and_is_seeded():
    import random

    from prefloop.config import load_recipe
    from prefloop.stages.instructions import builtin_path, transfer_items

    recipe = load_recipe("default")
    trained = set(recipe.instructions.kinds.split(","))
    source = read_jsonl_lines(builtin_path("verifiable_instructions"))
    train_topics = {r["topic"] for r in source if r["split"] == "train"}
    pool = [r for r in source if r["split"] == "heldout"
            and not {c["kind"] for c in r["constraints"]} & trained]
    assert len(pool) == 54
    items = transfer_items(recipe, 54)
    assert sorted(it["id"] for it in items) == sorted(r["id"] for r in pool)
    assert all(it["split"] == "heldout" and it["topic"] not in train_topics for it in items)
    assert all(c["kind"] not in trained for it in items for c in it["constraints"])
    # seeded by instructions.seed: the same draw every time, a larger one extends a smaller one
    first = [it["id"] for it in transfer_items(recipe, 4)]
    assert first == ["vi-640", "vi-256", "vi-720", "vi-731"]
    assert [it["id"] for it in transfer_items(recipe, 54)][:4] == first
    assert [it["id"] for it in transfer_items(recipe, 4)] == first
    expected = [r["id"] for r in pool]
    random.Random(0).shuffle(expected)
    assert [it["id"] for it in items] == expected
    other = apply_overrides(recipe, ["instructions.seed=1"])
    assert [it["id"] for it in transfer_items(other, 4)] == ["vi-214", "vi-694", "vi-254",
                                                             "vi-620"]
    # the default recipe's own draw: compare.transfer_n of them
    assert len(transfer_items(recipe)) == recipe.compare.transfer_n == 48
    assert transfer_items(apply_overrides(recipe, ["compare.transfer_n=0"])) == []
    # a tuning run (instructions.validation) takes what its validation topics hold, all 26
    tuning = transfer_items(apply_overrides(recipe, ["instructions.validation=true"]))
    assert len(tuning) == 26 and all(it["split"] == "train" for it in tuning)
    assert not {it["topic"] for it in tuning} & {
        it["topic"] for it in transfer_items(recipe)}  # validation topics are training topics


def test_transfer_n_zero_leaves_every_stage_hash_as_it_was():
    """A recipe without the transfer check hashes its compare section as before the setting
    existed; the instructions stage never depends on it."""
    import dataclasses

    from prefloop.artifacts import config_hash
    from prefloop.stages import instructions

    recipe = Recipe()

    def upstream(stage):
        return f"{stage}-hash"

    cfg = compare.stage_config(recipe, upstream)
    before = dataclasses.asdict(recipe.compare)
    del before["transfer_n"]  # the compare section as it was
    assert config_hash(cfg) == config_hash({**cfg, "compare": before})
    on = apply_overrides(recipe, ["compare.transfer_n=3"])
    assert compare.stage_config(on, upstream)["compare"].transfer_n == 3
    assert config_hash(compare.stage_config(on, upstream)) != config_hash(cfg)
    assert (config_hash(instructions.stage_config(on, upstream))
            == config_hash(instructions.stage_config(recipe, upstream)))


@pytest.mark.parametrize("sets, message", [
    (["compare.transfer_n=-1"], "--set: compare.transfer_n: must be >= 0, got -1"),
    (["compare.transfer_n=2.5"], "--set: compare.transfer_n: expected an integer, got 2.5"),
    (["compare.transfer_n=55"],
     "compare.transfer_n: is 55, but the held-out topics of instructions.source verifiable hold "
     "only 54 instructions whose constraints are all of kinds outside instructions.kinds; lower "
     "compare.transfer_n to at most 54 (0: no transfer check)"),
])
def test_a_bad_transfer_n_is_refused_in_one_line(tmp_path, sets, message):
    from prefloop import preflight
    from prefloop.config import load_recipe

    with pytest.raises(PrefloopError) as e:
        recipe = load_recipe("default", sets)
        preflight.check(recipe, ["compare"], "compare", tmp_path / "run")
    assert str(e.value) == message
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kinds", ["punctuation:no_comma", None])
def test_the_transfer_check_is_skipped_with_a_note_where_it_does_not_apply(tmp_path, kinds,
                                                                             lima_path):
    """A source whose records name no split (a user's file, LIMA prompts) or a recipe without
    instructions.kinds runs without the transfer check, saying why; the default's transfer_n
    must not refuse them (it once did: `prefloop run` on LIMA prompts exited 2)."""
    from prefloop import preflight
    from prefloop.artifacts import write_jsonl
    from prefloop.stages import instructions

    path = tmp_path / "mine.jsonl"
    write_jsonl(path, [{"instruction": f"say hi {i}", "constraints": [
        {"kind": "punctuation:no_comma", "args": {}}]} for i in range(3)])
    for source in (path, lima_path):
        sets = [f"instructions.source={source}", f"instructions.kinds={kinds or 'null'}",
                "instructions.n_train=2", "instructions.n_heldout=1"]
        recipe = load_recipe("default", sets)
        assert recipe.compare.transfer_n == 48
        why = ("instructions.kinds is not set, so no kind is left untrained" if kinds is None
               else f"the records of instructions.source {source} do not name their split, "
                    "and the check draws from held-out topics")
        assert instructions.transfer_draw(recipe) == ([], (
            f"no transfer check: {why} (compare.transfer_n applies to a constrained source)"))
        assert instructions.transfer_items(recipe) == []
        preflight.check(recipe, ["instructions", "compare"], "run", tmp_path / source.stem)
    run = tmp_path / "run"
    instructions.run(load_recipe("default", sets[:1] + ["instructions.kinds=null"] + sets[2:]),
                     run)
    assert len((run / "instructions" / "train.jsonl").read_text().splitlines()) == 2
    verifiable = load_recipe("default")
    assert instructions.transfer_draw(verifiable)[1] is None
    assert len(instructions.transfer_draw(verifiable)[0]) == 48
    assert instructions.transfer_draw(apply_overrides(verifiable, ["compare.transfer_n=0"])) \
        == ([], None)


@pytest.mark.parametrize("ci, reading", [
    ([-0.04, 0.10], "no regression"), ([0.01, 0.2], "no regression"),
    ([-0.05, 0.10], "inconclusive"), ([-0.20, 0.0], "inconclusive"),
    ([-0.20, -0.01], "regression"), ([-0.04, -0.01], "regression")])
def test_transfer_reading_rule(ci, reading):
    assert compare.transfer_reading({"difference": {"ci95": ci}}) == reading


def test_a_transfer_set_neither_model_meets_is_read_as_at_the_floor():
    """The default's untrained kinds are ones a 135M model rarely meets: 0 of 26 for both models
    on the validation run of 2026-12-07. An interval of [0, 0] is then no evidence."""
    floor = {"difference": {"ci95": [0.0, 0.0]}, "original": {"prompt_strict": 0.0},
             "dpo": {"prompt_strict": 0.0}}
    assert compare.transfer_reading(floor) == "at the floor"
    one = {**floor, "dpo": {"prompt_strict": 0.04}, "difference": {"ci95": [0.0, 0.12]}}
    assert compare.transfer_reading(one) == "no regression"


def test_compare_runs_the_transfer_check(run_dir, capsys):
    """Both models answer compare.transfer_n instructions of untrained kinds, greedy as on the
    held-out set; transfer.json, the manifest, report.md, eval_results.json, the printed result
    and `prefloop show` carry the check; the ranker sees only the held-out set."""
    from prefloop import cli
    from prefloop.artifacts import write_jsonl
    from prefloop.config import dump_recipe
    from prefloop.stages.instructions import transfer_items

    no_comma = [{"kind": "punctuation:no_comma", "args": {}}]
    write_jsonl(run_dir / "instructions" / "heldout.jsonl",
                [{"id": f"ho-{i}", "instruction": t, "constraints": no_comma}
                 for i, t in enumerate(HELDOUT)])
    recipe = _recipe(run_dir, "compare.max_new_tokens=4", "rank.ranker=constraints",
                     "compare.ranker=judge", "instructions.source=verifiable",
                     f"instructions.kinds={_trained_kinds()}", "compare.transfer_n=4")
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    ranker = FakeRanker([1.0] * 5)
    out = compare.run(recipe, run_dir, ranker=ranker)
    printed = capsys.readouterr().out
    assert [len(c[0]) for c in ranker.calls] == [5]  # the held-out set only

    drawn = transfer_items(recipe)
    ids = ["vi-640", "vi-256", "vi-720", "vi-731"]
    assert [it["id"] for it in drawn] == ids
    assert read_jsonl_lines(out / "transfer_instructions.jsonl") == drawn
    for side in ("original", "dpo"):
        records = read_jsonl_lines(out / f"transfer_{side}.jsonl")
        assert sorted(r["id"] for r in records) == sorted(ids)
        assert {r["model"] for r in records} == {side}
    t = json.loads((out / "transfer.json").read_text())
    assert t["n"] == 4
    assert {k: v["n"] for k, v in t["per_kind"].items()} == {
        "change_case:english_lowercase": 1, "length_constraints:number_paragraphs": 1,
        "startend:quotation": 3}
    original = {r["id"]: r["response"] for r in read_jsonl_lines(out / "transfer_original.jsonl")}
    dpo = {r["id"]: r["response"] for r in read_jsonl_lines(out / "transfer_dpo.jsonl")}
    from prefloop.constraints.evaluate import evaluate

    expected = evaluate(drawn, [original[i] for i in ids], [dpo[i] for i in ids], seed=0)
    assert {k: t[k] for k in expected} == json.loads(json.dumps(expected))
    assert t["reading"] == compare.transfer_reading(t)

    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["transfer"] == {
        "n": 4, "strict": {"original": t["original"]["prompt_strict"],
                           "dpo": t["dpo"]["prompt_strict"]},
        "ci95": t["difference"]["ci95"], "reading": t["reading"],
        "guards_fired": len(t["guards_fired"]), "original_from_cache": 0}
    assert m["counts"]["heldout"] == 5 and m["counts"]["original_from_cache"] == 0

    assert "Transfer check (held-out topics, only constraint kinds that were not trained), 4 " \
           "instructions:" in printed
    assert f"\nTransfer: {t['reading']} (" in printed
    assert "  per kind (strict): english_lowercase " in printed
    assert printed.rstrip().splitlines()[-1].startswith("Verdict: ")
    e = json.loads((out / "eval_results.json").read_text())
    assert e["transfer"]["instructions"] == 4 and e["transfer"]["reading"] == t["reading"]
    assert e["transfer"]["original_words_median"] == t["original"]["words_median"]
    assert e["transfer"]["prompt_sound_accuracy_difference_ci95"] == \
        t["difference_sound"]["ci95"]
    assert set(e["transfer"]["per_kind_strict_accuracy"]) == set(t["per_kind"])
    assert e["original_words_median"] == json.loads(
        (out / "objective.json").read_text())["original"]["words_median"]
    report = (out / "report.md").read_text()
    assert "## Transfer check: constraint kinds that were not trained\n\n" \
           f"**{t['reading'].capitalize()}** (rule: no regression when the 95% interval's " \
           "lower end is above -0.05" in report
    assert "| startend:quotation | 3 |" in report

    assert cli.main(["show", "--output-dir", str(run_dir)]) == 0
    assert capsys.readouterr().out == printed

    # again: the original's transfer answers come from the answer cache, the same ones
    compare.run(recipe, run_dir, ranker=FakeRanker([1.0] * 5), force=True)
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["transfer"]["original_from_cache"] == 4
    assert m["counts"]["original_from_cache"] == 5
    again = {r["id"]: r["response"] for r in read_jsonl_lines(out / "transfer_original.jsonl")}
    assert again == original
