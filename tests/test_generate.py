"""The generate stage: exact records, resume after a kill, context-length errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tiny import one_thread, read_jsonl_lines, save_model_folder, write_instructions

from prefloop.config import recipe_from_dict
from prefloop.errors import PrefloopError
from prefloop.stages import generate

TRAIN = ["write a short poem about the sea", "give three tips to sleep",
         "what is the capital of france ?", "explain data in simple words", "name a big river",
         "how do i learn python ?"]


def _recipe(model_dir, **gen):
    return recipe_from_dict({"model": {"name": str(model_dir)},
                             "generate": {"k": 3, "temperature": 0.0, "max_new_tokens": 6,
                                          "batch_size": 4, **gen}})


@pytest.fixture
def run_dir(tmp_path):
    model_dir = save_model_folder(tmp_path / "model")
    run = tmp_path / "run"
    write_instructions(run, TRAIN, ["hello world"])
    return model_dir, run


def test_records_are_exact_and_complete(run_dir):
    model_dir, run = run_dir
    with one_thread():
        out = generate.run(_recipe(model_dir), run)
    recs = read_jsonl_lines(out / "generations.jsonl")
    assert [(r["id"], r["sample"]) for r in recs] == [(f"tr-{i}", j) for i in range(6)
                                                      for j in range(3)]
    first = recs[0]
    assert first["prompt_text"] == "<s><|user|> write a short poem about the sea </s> <|assistant|>"
    assert first["prompt_tokens"] == 11
    assert set(first) == {"id", "sample", "instruction", "prompt_text", "prompt_tokens",
                          "response", "response_tokens", "finish_reason", "model"}
    assert all(r["finish_reason"] in ("eos", "length") and 1 <= r["response_tokens"] <= 6
               for r in recs)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["responses"] == 18
    assert manifest["counts"]["eos"] + manifest["counts"]["length"] == 18


def test_interrupted_run_resumes_without_loss_or_duplicates(run_dir, monkeypatch):
    model_dir, run = run_dir
    recipe = _recipe(model_dir)
    with one_thread():
        reference = read_jsonl_lines(generate.run(recipe, _copy(run)) / "generations.jsonl")
    real_append = generate.append_jsonl
    calls = {"n": 0}

    def dying_append(path, records):
        calls["n"] += 1
        if calls["n"] == 3:  # die half-way through writing the third prompt's group
            records = list(records)
            real_append(path, records[:1])
            with open(path, "a") as f:
                f.write('{"id": "tr-x", "sam')
            raise KeyboardInterrupt
        real_append(path, records)

    monkeypatch.setattr(generate, "append_jsonl", dying_append)
    with one_thread(), pytest.raises(KeyboardInterrupt):
        generate.run(recipe, run)
    assert not (run / "generate" / "manifest.json").exists()
    monkeypatch.setattr(generate, "append_jsonl", real_append)
    with one_thread():
        out = generate.run(recipe, run)
    recs = read_jsonl_lines(out / "generations.jsonl")
    keys = [(r["id"], r["sample"]) for r in recs]
    assert len(keys) == len(set(keys)) == 18
    assert sorted(keys) == sorted((r["id"], r["sample"]) for r in reference)
    # greedy: the resumed run gives exactly the uninterrupted responses
    by_key = {(r["id"], r["sample"]): r["response"] for r in reference}
    assert all(by_key[(r["id"], r["sample"])] == r["response"] for r in recs)


def test_greedy_candidate_is_sample_k_and_resumes(run_dir, monkeypatch):
    """generate.greedy_candidate: each instruction's k samples, then its greedy answer as sample
    k (marked greedy), equal to a k=1 greedy run; a kill inside the greedy pass resumes to the
    same file, and the sampled pass is not redone."""
    model_dir, run = run_dir
    recipe = _recipe(model_dir, temperature=1.0, greedy_candidate=True)
    with one_thread():
        reference = read_jsonl_lines(generate.run(recipe, _copy(run)) / "generations.jsonl")
        greedy_only = read_jsonl_lines(generate.run(
            _recipe(model_dir, k=1), _copy(run, "greedy_run")) / "generations.jsonl")
    assert [(r["id"], r["sample"], r.get("greedy", False)) for r in reference] == [
        (f"tr-{i}", j, j == 3) for i in range(6) for j in range(4)]
    assert [r["response"] for r in reference if r.get("greedy")] == [
        r["response"] for r in greedy_only]
    real_append, calls = generate.append_jsonl, {"n": 0}

    def dying_append(path, records):
        calls["n"] += 1
        if calls["n"] == 6 + 3:  # the sampled pass wrote 6 prompts; die in the greedy pass
            raise KeyboardInterrupt
        real_append(path, records)

    monkeypatch.setattr(generate, "append_jsonl", dying_append)
    with one_thread(), pytest.raises(KeyboardInterrupt):
        generate.run(recipe, run)
    assert len(read_jsonl_lines(generate.greedy_path(run / "generate" / "generations.jsonl"))) == 2
    counted = {"n": 0}

    def counting_append(path, records):
        counted["n"] += 1
        real_append(path, records)

    monkeypatch.setattr(generate, "append_jsonl", counting_append)
    with one_thread():
        out = generate.run(recipe, run)
    assert counted["n"] == 4  # only the 4 greedy answers still missing
    assert read_jsonl_lines(out / "generations.jsonl") == reference
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert (counts["responses"], counts["greedy"]) == (24, 6)


def test_a_setting_added_later_keeps_old_hashes_at_its_default():
    """generate.greedy_candidate came after runs were made: at its default (off) the generate
    stage hashes as before the field existed, so an upgrade neither refuses nor redoes them."""
    from dataclasses import asdict

    from prefloop.artifacts import config_hash
    from prefloop.config import GenerateConfig

    before = {k: v for k, v in asdict(GenerateConfig()).items() if k != "greedy_candidate"}
    assert config_hash({"generate": GenerateConfig()}) == config_hash({"generate": before})
    assert (config_hash({"generate": GenerateConfig(greedy_candidate=True)})
            != config_hash({"generate": before}))


def _copy(run, name="ref_run"):
    import shutil

    dst = run.parent / name
    shutil.copytree(run, dst)
    return dst


def test_prompt_longer_than_context_is_refused(run_dir):
    model_dir, run = run_dir
    with pytest.raises(PrefloopError) as e:
        generate.run(_recipe(model_dir, max_new_tokens=510), run)
    assert str(e.value) == (
        f"{run / 'instructions'}: instruction 'tr-0' has 11 prompt tokens; with max_new_tokens 510 "
        "that exceeds the model's context of 512; lower max_new_tokens or set "
        "instructions.max_tokens")


@pytest.mark.slow
def test_kill_9_half_way_then_rerun_gives_every_response_once(tmp_path, lima_path):
    """The real CLI on the embedded model, killed with SIGKILL mid-run, then re-run."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "prefloop", "run", "--until", "generate", "--output-dir",
            str(out), "--set", f"instructions.source={lima_path}", "--set",
            "instructions.n_train=8", "--set", "instructions.n_heldout=2", "--set",
            "instructions.max_tokens=60", "--set", "generate.k=3", "--set",
            "generate.max_new_tokens=24", "--set", "generate.batch_size=2",
            "--set", "instructions.kinds=null"]  # LIMA prompts carry no constraints
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gen = out / "generate" / "generations.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if gen.exists() and len(gen.read_text().splitlines()) >= 6:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(gen.read_text().splitlines())
    assert 6 <= done_before < 24
    assert subprocess.run(args, env=env, capture_output=True).returncode == 0
    recs = read_jsonl_lines(gen)
    keys = [(r["id"], r["sample"]) for r in recs]
    assert len(recs) == len(set(keys)) == 24
    assert json.loads((out / "generate" / "manifest.json").read_text())["counts"]["responses"] == 24
