"""Several processes: the round-robin split and its inverse, per-process files and their merge,
and (slow) real `accelerate launch` runs with two CPU processes over gloo: the generate stage
equals a single-process run exactly, and DPO training runs under DDP."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import (
    one_thread,
    read_jsonl_lines,
    save_model_folder,
    tiny_llama,
    tiny_tokenizer,
    write_instructions,
    write_pairs,
)

from prefloop import distributed
from prefloop.artifacts import write_jsonl
from prefloop.distributed import Topology, merge, shard, shard_path, shard_paths, shard_sizes
from prefloop.engine import Sampling
from prefloop.engine.backend import LocalBackend
from prefloop.errors import PrefloopError
from prefloop.stages.generate import finished_groups, generate_responses, merge_shard_files

REPO = Path(__file__).resolve().parents[1]
CPU2 = REPO / "configs" / "accelerate" / "cpu2.yaml"
LAUNCH_TIMEOUT = 900  # seconds; two processes importing torch + transformers on a busy 2-core box

# --- the split and its inverse ------------------------------------------------------------------


def test_shard_is_round_robin():
    items = list("abcdefghij")
    assert [shard(items, r, 3) for r in range(3)] == [
        ["a", "d", "g", "j"], ["b", "e", "h"], ["c", "f", "i"]]
    assert shard(items, 0, 1) == items
    assert [shard(items[:2], r, 4) for r in range(4)] == [["a"], ["b"], [], []]


def test_merge_inverts_shard_for_every_size():
    for n in range(13):
        items = [f"item-{i}" for i in range(n)]
        for world in range(1, 6):
            shards = [shard(items, r, world) for r in range(world)]
            assert [len(s) for s in shards] == shard_sizes(n, world)
            assert merge(shards) == items
            # nothing lost, nothing duplicated
            assert sorted(x for s in shards for x in s) == sorted(items)


def test_shard_sizes_differ_by_at_most_one():
    assert shard_sizes(10, 3) == [4, 3, 3]
    assert shard_sizes(2, 4) == [1, 1, 0, 0]
    assert shard_sizes(0, 2) == [0, 0]


def test_merge_rejects_shards_that_are_not_a_split():
    with pytest.raises(ValueError, match=r"shard sizes \[1, 3\]"):
        merge([["a"], ["b", "c", "d"]])
    assert merge([]) == []


def test_shard_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 2 / world_size 2"):
        shard([1, 2, 3], 2, 2)
    with pytest.raises(ValueError, match="rank 0 / world_size 0"):
        shard([1], 0, 0)


# --- single process: nothing is initialised ----------------------------------------------------


def test_single_process_topology_initialises_nothing(monkeypatch):
    import torch.distributed as dist
    from accelerate import PartialState

    for key in distributed.WORLD_SIZE_VARS:
        monkeypatch.delenv(key, raising=False)
    before = dict(PartialState._shared_state)
    assert distributed.topology() == Topology(rank=0, world_size=1, local_rank=0)
    assert distributed.is_main()
    distributed.barrier()
    with distributed.main_first():
        ran = True
    assert ran
    assert PartialState._shared_state == before
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.topology().world_size == 1


def test_bad_world_size_variable_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(PrefloopError, match="WORLD_SIZE='two' is not an integer"):
        distributed.topology()


# --- per-process files --------------------------------------------------------------------------


def test_shard_paths_are_found_by_rank(tmp_path):
    out = tmp_path / "generations.jsonl"
    assert shard_path(out, 3) == tmp_path / "generations.rank3.jsonl"
    for name in ["generations.rank10.jsonl", "generations.rank2.jsonl", "generations.rank0.jsonl",
                 "generations.rankx.jsonl", "other.rank1.jsonl", "generations.rank1.json",
                 "generations.jsonl"]:
        (tmp_path / name).write_text("")
    assert [p.name for p in shard_paths(out)] == [
        "generations.rank0.jsonl", "generations.rank2.jsonl", "generations.rank10.jsonl"]


def _recs(item_id: str, k: int, text: str = "r") -> list[dict]:
    return [{"id": item_id, "sample": j, "response": f"{text}-{item_id}-{j}"} for j in range(k)]


ITEMS = [{"id": f"i{n}", "instruction": f"instruction {n}"} for n in range(5)]


def test_merge_shard_files_orders_by_item_and_keeps_each_group_once(tmp_path):
    out = tmp_path / "g.jsonl"
    write_jsonl(out, _recs("i3", 2, "merged"))  # already merged by an earlier run
    write_jsonl(shard_path(out, 0), _recs("i2", 2) + _recs("i0", 2) + _recs("i3", 2, "again"))
    # rank 1: i4 complete (samples out of order), i1 cut short, then a half-written line
    shard_path(out, 1).write_text(
        "".join(json.dumps(r) + "\n" for r in [_recs("i4", 2)[1], _recs("i4", 2)[0]])
        + json.dumps(_recs("i1", 2)[0]) + "\n" + '{"id": "i1", "sam')
    with pytest.raises(PrefloopError, match=r"g.jsonl: 1 instruction\(s\) .* \(first: 'i1'\)"):
        merge_shard_files(out, ITEMS, 2, require_all=True)
    assert len(shard_paths(out)) == 2  # nothing deleted on error

    write_jsonl(shard_path(out, 2), _recs("i1", 2))  # e.g. left by a 3-process run
    assert merge_shard_files(out, ITEMS, 2, require_all=True) == 5
    expected = (_recs("i0", 2) + _recs("i1", 2) + _recs("i2", 2) + _recs("i3", 2, "merged")
                + _recs("i4", 2))
    assert read_jsonl_lines(out) == expected
    assert shard_paths(out) == []


def test_finished_groups_is_read_only_and_first_file_wins(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, _recs("i0", 2, "a") + [_recs("i1", 2)[0]])
    text_b = "".join(json.dumps(r) + "\n" for r in _recs("i0", 2, "b") + _recs("i1", 2, "b"))
    b.write_text(text_b + '{"half')
    got = finished_groups([a, b, tmp_path / "missing.jsonl"], 2)
    assert got == {"i0": _recs("i0", 2, "a"), "i1": _recs("i1", 2, "b")}
    assert b.read_text() == text_b + '{"half'  # untouched: another process may own it


# --- the generation helper with one process and files left by several ------------------------


@pytest.fixture(scope="module")
def tiny():
    with one_thread():
        tok = tiny_tokenizer()
        yield tiny_llama(tok), tok


GREEDY = Sampling(temperature=0.0, max_new_tokens=4)
PROMPTS = [{"id": f"tr-{i}", "instruction": t} for i, t in enumerate(
    ["write a short poem about the sea", "give three tips to sleep", "name a big river",
     "what is the capital of france ?", "hello world"])]


def test_single_process_reuses_files_left_by_a_multi_process_run(tmp_path, tiny):
    model, tok = tiny
    with one_thread():
        ref = generate_responses(LocalBackend(model, tok), PROMPTS, tmp_path / "ref.jsonl", k=2,
                                 sampling=GREEDY)
    assert [(r["id"], r["sample"]) for r in ref] == [(p["id"], j) for p in PROMPTS
                                                     for j in range(2)]
    by_id = {p["id"]: [r for r in ref if r["id"] == p["id"]] for p in PROMPTS}
    planted = [dict(r, response="PLANTED") for r in by_id["tr-0"]]  # proves it is reused
    out = tmp_path / "run" / "generations.jsonl"
    write_jsonl(shard_path(out, 0), planted + [by_id["tr-3"][0]])  # tr-3 cut short
    write_jsonl(shard_path(out, 3), by_id["tr-2"])
    with one_thread():
        got = generate_responses(LocalBackend(model, tok), PROMPTS, out, k=2, sampling=GREEDY)
    assert got == planted + [r for r in ref if r["id"] != "tr-0"]
    assert shard_paths(out) == []
    lines = read_jsonl_lines(out)
    assert lines[:4] == planted + by_id["tr-2"]  # folded first, in item order
    assert sorted(lines, key=lambda r: (r["id"], r["sample"])) == got  # then the rest, once


# --- real launches: two CPU processes through accelerate ---------------------------------------


def launch_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in distributed.WORLD_SIZE_VARS + ("RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                     "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"))
    return env


def accelerate_launch(tmp_path: Path, *prefloop_args: str) -> str:
    """`accelerate launch --config_file configs/accelerate/cpu2.yaml -m prefloop ...`; output."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU2),
           "-m", "prefloop", *prefloop_args]
    started = time.time()
    proc = subprocess.run(cmd, cwd=tmp_path, env=launch_env(tmp_path), capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode} after {time.time() - started:.0f} s:\n" \
                                 f"{output[-6000:]}"
    return output


TRAIN_PROMPTS = [p["instruction"] for p in PROMPTS] + [
    "how do i learn python ?", "explain data in simple words", "list three tips for code"]


def _generate_args(run_dir: Path, model_dir: Path) -> list[str]:
    return ["generate", "--output-dir", str(run_dir), "--set", f"model.name={model_dir}",
            "--set", "generate.k=3", "--set", "generate.temperature=0",
            "--set", "generate.max_new_tokens=6"]


def _partial_marker(run_dir: Path, model_dir: Path) -> None:
    """The in_progress.json a generate run of `_generate_args` writes before anything else."""
    from prefloop.artifacts import RunDir, atomic_write_json, config_hash
    from prefloop.config import load_recipe
    from prefloop.stages import generate

    args = _generate_args(run_dir, model_dir)
    recipe = load_recipe(None, [a for a in args[3:] if a != "--set"])
    cfg = generate.stage_config(recipe, RunDir(run_dir).upstream)
    atomic_write_json(run_dir / "generate" / "in_progress.json",
                      {"stage": "generate", "config_hash": config_hash(cfg)})


def _key(r: dict) -> tuple[str, int]:
    return r["id"], r["sample"]


@pytest.fixture(scope="module")
def generate_runs(tmp_path_factory):
    """One model folder; a single-process generate run as the reference."""
    from prefloop.cli import main

    root = tmp_path_factory.mktemp("dist-generate")
    model_dir = save_model_folder(root / "model")
    single = root / "single"
    write_instructions(single, TRAIN_PROMPTS, ["what is the sun ?"])
    with one_thread():
        assert main(_generate_args(single, model_dir)) == 0
    return {"root": root, "model_dir": model_dir,
            "single": read_jsonl_lines(single / "generate" / "generations.jsonl")}


@pytest.mark.slow
def test_generate_with_two_processes_equals_one(generate_runs, tmp_path):
    single = generate_runs["single"]
    run_dir = tmp_path / "two"
    write_instructions(run_dir, TRAIN_PROMPTS, ["what is the sun ?"])
    output = accelerate_launch(tmp_path, *_generate_args(run_dir, generate_runs["model_dir"]))

    out = run_dir / "generate"
    merged = read_jsonl_lines(out / "generations.jsonl")
    ids = [f"tr-{i}" for i in range(len(TRAIN_PROMPTS))]
    assert [_key(r) for r in merged] == [(i, j) for i in ids for j in range(3)]  # item order
    assert merged == sorted(single, key=lambda r: (ids.index(r["id"]), r["sample"]))
    assert sorted(p.name for p in out.iterdir()) == ["generations.jsonl", "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["processes"] == 2
    assert manifest["counts"]["responses"] == 3 * len(TRAIN_PROMPTS)
    assert "[process 1/2]" in output  # the main process's bar covers its own shard


@pytest.mark.slow
def test_two_processes_resume_from_files_of_another_process_count(generate_runs, tmp_path):
    """A killed 3-process run left rank files; two processes reuse every complete group."""
    single = generate_runs["single"]
    run_dir = tmp_path / "resume"
    write_instructions(run_dir, TRAIN_PROMPTS, ["what is the sun ?"])
    gens = run_dir / "generate" / "generations.jsonl"
    # (begin_stage keeps a partial stage folder; only --force would delete these files)
    group = {i: [r for r in single if r["id"] == i] for i in {r["id"] for r in single}}
    planted = [dict(r, response="PLANTED") for r in group["tr-1"]]  # proves it is reused
    write_jsonl(shard_path(gens, 2), planted + group["tr-6"][:2])  # tr-6 cut short
    shard_path(gens, 0).write_text(json.dumps(group["tr-4"][0]) + "\n" + '{"id": "tr-4", "s')
    _partial_marker(run_dir, generate_runs["model_dir"])  # the killed run wrote it first
    accelerate_launch(tmp_path, *_generate_args(run_dir, generate_runs["model_dir"]))

    merged = read_jsonl_lines(gens)
    ids = [f"tr-{i}" for i in range(len(TRAIN_PROMPTS))]
    expected = [r for i in ids for r in (planted if i == "tr-1" else group[i])]
    assert merged == expected
    assert shard_paths(gens) == []


TRAIN_SETTINGS = ["train.max_steps=2", "train.learning_rate=0.01", "train.warmup_ratio=0.0",
                  "train.loss_type=sigmoid",  # the same loss in both runs (the default mixes sft)
                  "train.logging_steps=1"]


@pytest.mark.slow
def test_train_under_ddp_with_two_processes(tmp_path, monkeypatch):
    """Batch 1 in each of 2 processes == batch 2 in one: DDP averages the two gradients."""
    import datasets
    from safetensors.torch import load_file

    from prefloop.config import Recipe, apply_overrides
    from prefloop.stages import train

    model_dir = save_model_folder(tmp_path / "model")
    one, two = tmp_path / "one", tmp_path / "two"
    write_pairs(one)
    write_pairs(two)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-1")
    recipe = apply_overrides(Recipe(), [f"model.name={model_dir}", "train.batch_size=2",
                                        *TRAIN_SETTINGS])
    with one_thread():
        train.run(recipe, one)

    # a checkpoint at each step: DDP saves them (the main process marks each complete) and the
    # adapter is the same (save_steps is not in the stage hash and changes no weight)
    sets = [x for s in [f"model.name={model_dir}", "train.batch_size=1", "train.save_steps=1",
                        *TRAIN_SETTINGS] for x in ("--set", s)]
    output = accelerate_launch(tmp_path, "train", "--output-dir", str(two), *sets)

    out = two / "train"
    assert output.count("[prefloop] train: adapter saved to") == 1  # by the main process only
    assert "(2 process(es))" in output
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "curves.png", "log.jsonl",
                                                     "manifest.json"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
        "recipe.yaml", "tokenizer.json", "tokenizer_config.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["processes"] == 2
    assert manifest["counts"] == {"pairs": 6, "pairs_trained": 6, "eval_pairs": 0, "steps": 2,
                                  "log_lines": 2}
    log = read_jsonl_lines(out / "log.jsonl")
    # 2 processes x batch 1 = 2 of the 6 pairs per optimizer step
    assert [(r["step"], round(r["epoch"], 6)) for r in log] == [(1, 0.333333), (2, 0.666667)]
    ref_log = read_jsonl_lines(one / "train" / "log.jsonl")
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref_log], abs=1e-5)
    got = load_file(out / "adapter" / "adapter_model.safetensors")
    ref = load_file(one / "train" / "adapter" / "adapter_model.safetensors")
    assert sorted(got) == sorted(ref)
    worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    moved = max((ref[k]).abs().max().item() for k in ref if "lora_B" in k)
    assert moved > 1e-3 and worst < 1e-4, (moved, worst)


def test_train_refuses_fsdp1_before_loading_anything(monkeypatch):
    from prefloop.stages.train import check_fsdp

    for key in ("ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        monkeypatch.delenv(key, raising=False)
    check_fsdp()  # no FSDP: nothing to check
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(PrefloopError, match="fsdp_version 1 cannot save a LoRA adapter; set "
                                            "fsdp_version: 2"):
        check_fsdp()  # accelerate's default version is 1
    monkeypatch.setenv("FSDP_VERSION", "2")
    check_fsdp()


def test_shipped_accelerate_configs():
    import yaml

    cfgs = {p.stem: yaml.safe_load(p.read_text()) for p in CPU2.parent.glob("*.yaml")}
    assert sorted(cfgs) == ["cpu2", "ddp", "fsdp"]
    assert cfgs["cpu2"]["distributed_type"] == "MULTI_GPU"  # torchrun: really 2 processes
    assert (cfgs["cpu2"]["num_processes"], cfgs["cpu2"]["use_cpu"]) == (2, True)
    assert cfgs["cpu2"]["gpu_ids"] == "-1,-1"  # hides GPUs: gloo on CPU everywhere
    assert cfgs["ddp"]["distributed_type"] == "MULTI_GPU" and not cfgs["ddp"]["use_cpu"]
    fsdp = cfgs["fsdp"]["fsdp_config"]
    assert cfgs["fsdp"]["distributed_type"] == "FSDP"
    assert (fsdp["fsdp_version"], fsdp["fsdp_state_dict_type"]) == (2, "FULL_STATE_DICT")
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert cfgs["fsdp"]["mixed_precision"] == "bf16"
