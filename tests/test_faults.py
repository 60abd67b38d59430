"""A run directory that nothing can corrupt (issue #16): each failure class drives the CLI in a
subprocess (`python -m prefloop`) on a tiny random-weight model and checks the exit code, the
one-line message, and that the run directory is unchanged (checksums) or its resumed result
complete and equal to an uninterrupted run's.

Faults are injected through the one test hook in prefloop.artifacts.test_point
(PREFLOOP_TEST_KILL_AT=<stage>:<point>[:<n>], PREFLOOP_TEST_WAIT_AT=<stage>:<point>=<file>), a
read-only bind mount in a private mount namespace (tests run as root, which chmod cannot stop),
and RLIMIT_FSIZE with SIGXFSZ ignored (the kernel's "file too large" at a chosen size).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny import read_jsonl_lines, save_model_folder, write_pairs

from prefloop.errors import PrefloopError

SRC = Path(__file__).resolve().parents[1] / "src"
INSTRUCTIONS = ["write a short poem about the sea", "give three tips to sleep",
                "what is the capital of france ?", "explain data in simple words",
                "name a big river", "how do i learn python ?", "what is the sun ?",
                "list three green things", "why is the sea blue ?", "tell a story about a cat"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, model_dir) -> Path:
    """A recipe on the tiny model and a local instruction file: 6 train x 2 sampled responses.
    Tests only read it (a finished run copied from another test's must name the same files)."""
    tmp_path = tmp_path_factory.mktemp("recipe")
    source = tmp_path / "src.jsonl"
    source.write_text("".join(json.dumps({"id": f"i{i}", "instruction": t}) + "\n"
                              for i, t in enumerate(INSTRUCTIONS)), encoding="utf-8")
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""name: tiny
model: {{name: {json.dumps(str(model_dir))}, device: cpu}}
instructions: {{source: {json.dumps(str(source))}, n_train: 6, n_heldout: 2}}
generate: {{k: 2, temperature: 0.9, top_p: 0.95, max_new_tokens: 8, batch_size: 4}}
""", encoding="utf-8")
    return path


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("PREFLOOP_TEST_")}
    e.update({"PYTHONPATH": str(SRC), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
              "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    e.update(extra)
    return e


def cli(*args, extra_env: dict | None = None, prefix: list[str] | None = None, preexec=None,
        timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [*(prefix or []), sys.executable, "-m", "prefloop", *map(str, args)]
    return subprocess.run(cmd, env=env(**(extra_env or {})), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec)


def _default_sigint() -> None:
    """A command started from a background job inherits SIGINT ignored, and Python then never
    raises KeyboardInterrupt: give the child the default, as a terminal's Ctrl-C finds it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args, extra_env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prefloop", *map(str, args)],
                            env=env(**(extra_env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def one_error(proc, *parts: str) -> str:
    """The process failed with exit 2 and exactly one `prefloop: error:` line (its last), no
    traceback; every part is in that line."""
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("prefloop: error:")]
    assert len(lines) == 1 and err.rstrip("\n").splitlines()[-1] == lines[0], err
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def ok(proc) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr
    return proc


def checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (the lock file aside), and every folder, by path."""
    out = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.name == ".prefloop.lock":
            continue
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def generations(run: Path) -> list[dict]:
    return read_jsonl_lines(run / "generate" / "generations.jsonl")


def manifest(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "manifest.json").read_text())


@pytest.fixture(scope="module")
def finished_once(tmp_path_factory, recipe) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    ok(cli("run", "--recipe", recipe, "--output-dir", run, "--until", "generate"))
    return run


@pytest.fixture
def finished(tmp_path, finished_once) -> Path:
    """A run directory with instructions and generate finished: the test's own copy of one run
    (a run directory holds no path of its own, so a copy is the same run)."""
    return Path(shutil.copytree(finished_once, tmp_path / "run", symlinks=True))


# --- 1. one writer at a time -------------------------------------------------------------------


@pytest.mark.slow(together=False)  # stage commands in subprocesses
def test_second_run_is_refused_naming_the_holder_and_the_first_completes(tmp_path, recipe):
    run, go = tmp_path / "run", tmp_path / "go"
    first = start("run", "--recipe", recipe, "--output-dir", run, "--until", "generate",
                  extra_env={"PREFLOOP_TEST_WAIT_AT": f"generate:append={go}"})
    try:
        deadline = time.time() + 240
        while not (run / "generate" / "generations.jsonl").exists():  # paused after 1 group
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.2)
        before = checksums(run)
        second = cli("run", "--recipe", recipe, "--output-dir", run, "--until", "generate")
        one_error(second, f"{run}: another prefloop command is writing this run directory",
                  f"pid {first.pid} on {socket.gethostname()}")
        assert checksums(run) == before
    finally:
        go.touch()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert len(generations(run)) == 12 and manifest(run, "generate")["counts"]["responses"] == 12
    assert not (run / ".prefloop.lock").exists()


@pytest.mark.slow(together=False)  # stage commands in subprocesses
def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, recipe):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".prefloop.lock").write_text(json.dumps({"pid": 2**22 + 7, "host": "gone"}))
    ok(cli("instructions", "--recipe", recipe, "--output-dir", run))
    assert manifest(run, "instructions")["status"] == "done"


# --- 2. kill -9 at a chosen point, then resume --------------------------------------------------


@pytest.mark.slow(together=False)  # three or four generate runs
def test_kill9_mid_generate_resumes_to_the_uninterrupted_result(tmp_path, recipe):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    ok(cli("run", "--recipe", recipe, "--output-dir", whole, "--until", "generate"))
    proc = cli("run", "--recipe", recipe, "--output-dir", killed, "--until", "generate",
               extra_env={"PREFLOOP_TEST_KILL_AT": "generate:append:3"})
    assert proc.returncode == -signal.SIGKILL
    assert len(generations(killed)) == 3 * 2 and not (killed / "generate" / "manifest.json").exists()
    ok(cli("run", "--recipe", recipe, "--output-dir", killed, "--until", "generate"))
    # every instruction draws its own random stream (seed, its index in the full list, sample,
    # token), so the resumed run samples exactly what the uninterrupted one did
    assert generations(killed) == generations(whole)


@pytest.mark.slow(together=False)  # stage commands in subprocesses
def test_kill9_before_the_manifest_redoes_nothing_kept(tmp_path, recipe):
    run = tmp_path / "run"
    proc = cli("run", "--recipe", recipe, "--output-dir", run, "--until", "generate",
               extra_env={"PREFLOOP_TEST_KILL_AT": "generate:finish"})
    assert proc.returncode == -signal.SIGKILL
    kept = generations(run)
    assert len(kept) == 12 and (run / "generate" / "in_progress.json").exists()
    ok(cli("run", "--recipe", recipe, "--output-dir", run, "--until", "generate"))
    assert generations(run) == kept and manifest(run, "generate")["status"] == "done"


@pytest.mark.slow(together=False)  # stage commands in subprocesses
def test_a_killed_forced_redo_then_the_old_command_gets_the_finished_stage_back(finished, recipe):
    before = checksums(finished)
    proc = cli("generate", "--output-dir", finished, "--force", "--set", "generate.k=3",
               extra_env={"PREFLOOP_TEST_KILL_AT": "generate:append:2"})
    assert proc.returncode == -signal.SIGKILL
    # the old stage waits aside: the old command puts it back (it is not a no-op that reports
    # "finished earlier" over the killed redo's partial files)
    ok(cli("run", "--recipe", recipe, "--output-dir", finished, "--until", "generate"))
    assert checksums(finished) == before


def test_resumed_rank_judges_with_the_draws_of_an_uninterrupted_one(tmp_path, model_dir):
    """In-process: the judge samples each response's judgments on the stream of its position
    in the stage's records, not in what a killed run left to judge."""
    from tiny import one_thread

    from prefloop.config import ModelConfig, RankConfig
    from prefloop.engine.backends import load_backend
    from prefloop.rankers.judge import JudgeRanker

    records = [{"id": f"i{i}", "sample": s, "instruction": t, "response": f"the {s} answer"}
               for i, t in enumerate(INSTRUCTIONS[:3]) for s in range(2)]
    whole, part = tmp_path / "whole", tmp_path / "part"
    part.mkdir()
    with one_thread():
        backend = load_backend(ModelConfig(name=str(model_dir), device="cpu"))
        judge = JudgeRanker(backend, RankConfig(judge_samples=2, judge_max_new_tokens=6),
                            name="judge:tiny")
        judge.score(records, whole)
        lines = (whole / "judgments.jsonl").read_text().splitlines(keepends=True)
        (part / "judgments.jsonl").write_text("".join(lines[:4]))  # killed after 2 responses
        judge.score(records, part)
    resumed = (part / "judgments.jsonl").read_text().splitlines(keepends=True)
    assert sorted(resumed) == sorted(lines) and len(lines) == 12
    assert all(json.loads(line)["text"] for line in lines)


# --- 3. refused runs change nothing; a changed setting redoes only what it changes --------------


def test_changed_setting_is_refused_with_the_command_and_nothing_changes(finished, recipe):
    before = checksums(finished)
    proc = cli("run", "--recipe", recipe, "--output-dir", finished, "--until", "generate",
               "--set", "generate.k=3")
    line = one_error(proc, f"{finished / 'generate'}: stage 'generate' finished with a different "
                           "configuration (generate.k: 2 -> 3)",
                     "to redo generate and the stages after it run: prefloop run --recipe")
    assert line.endswith("--set generate.k=3 --force (or use a new --output-dir)")
    assert checksums(finished) == before  # recipe.yaml included


@pytest.mark.slow(together=False)  # stage commands in subprocesses
def test_force_redoes_only_from_the_first_changed_stage(finished, recipe):
    instructions = (finished / "instructions" / "manifest.json").read_bytes()
    ok(cli("run", "--recipe", recipe, "--output-dir", finished, "--until", "generate",
           "--set", "generate.k=3", "--force"))
    assert (finished / "instructions" / "manifest.json").read_bytes() == instructions
    assert len(generations(finished)) == 18 and "k: 3" in (finished / "recipe.yaml").read_text()
    assert not (finished / ".generate.previous").exists()
    # a setting of a stage after --until changes nothing and writes nothing
    before = checksums(finished)
    proc = ok(cli("run", "--output-dir", finished, "--until", "generate",
                  "--set", "generate.k=3", "--set", "train.beta=0.05"))
    assert "[prefloop] generate: " in proc.stdout and "finished earlier" in proc.stdout
    assert checksums(finished) == before


@pytest.mark.slow(together=False)  # stage commands in subprocesses
def test_a_forced_redo_makes_the_stages_built_on_it_stale(finished, recipe):
    """A stage redone with --force (the same configuration) finishes again: the stages built
    on its earlier output no longer count as finished. Without --force the command is refused
    in one line naming the redone stage, and nothing changes; with it, only the stages from the
    first stale one are redone."""
    gen = manifest(finished, "generate")
    assert gen["inputs"] == {"instructions": manifest(finished, "instructions")["finish_id"]}
    ok(cli("instructions", "--output-dir", finished, "--force"))
    instructions = (finished / "instructions" / "manifest.json").read_bytes()
    before = checksums(finished)
    proc = cli("run", "--output-dir", finished, "--until", "generate")
    line = one_error(proc)
    assert line == (
        f"prefloop: error: {finished / 'generate'}: stage 'generate' was built on the output of "
        "'instructions' before 'instructions' was redone; to redo generate and the stages after "
        f"it run: prefloop run --output-dir {finished} --until generate --force (or use a new "
        "--output-dir)")
    assert checksums(finished) == before
    plan = cli("plan", "--output-dir", finished, "--until", "generate")
    assert plan.returncode == 2 and "\n  instructions  done (took " in plan.stdout
    assert "\n  generate      to redo: built on a stage redone since; " in plan.stdout
    ok(cli("run", "--output-dir", finished, "--until", "generate", "--force"))
    assert (finished / "instructions" / "manifest.json").read_bytes() == instructions
    redone = manifest(finished, "generate")
    assert redone["config_hash"] == gen["config_hash"] and redone["finish_id"] != gen["finish_id"]
    assert redone["inputs"] == {"instructions": manifest(finished, "instructions")["finish_id"]}
    assert len(generations(finished)) == 12
    proc = ok(cli("run", "--output-dir", finished, "--until", "generate"))
    assert "finished earlier" in proc.stdout


def test_force_with_a_bad_model_name_is_refused_before_touching_the_stage(finished, recipe):
    before = checksums(finished)
    proc = cli("generate", "--output-dir", finished, "--force", "--set",
               "model.name=smollm2-135m-instruc")
    one_error(proc, "model.name: unknown model 'smollm2-135m-instruc'",
              "did you mean the embedded 'smollm2-135m-instruct'?")
    assert checksums(finished) == before


@pytest.mark.slow(together=False)  # stage commands in subprocesses
def test_force_failing_inside_the_stage_restores_the_finished_one(finished, recipe):
    before = checksums(finished)
    proc = cli("generate", "--output-dir", finished, "--force",
               "--set", "generate.max_new_tokens=600")  # the tiny model's context is 512
    one_error(proc, "exceeds the model's context of 512")
    assert checksums(finished) == before  # old stage back, no marker, recipe.yaml as it was
    # the corrected command runs (no partial marker of the failed config blocks it)
    ok(cli("generate", "--output-dir", finished, "--force", "--set", "generate.max_new_tokens=4"))
    assert all(r["response_tokens"] <= 4 for r in generations(finished))


@pytest.mark.slow(together=False)  # stage commands in subprocesses
def test_failed_first_start_leaves_no_marker(tmp_path, recipe):
    run = tmp_path / "run"
    ok(cli("instructions", "--recipe", recipe, "--output-dir", run))
    before = checksums(run)
    proc = cli("generate", "--output-dir", run, "--set", "generate.max_new_tokens=600")
    one_error(proc, "exceeds the model's context of 512")
    assert checksums(run) == before
    ok(cli("generate", "--output-dir", run, "--set", "generate.max_new_tokens=4"))


# --- 4. validation before anything runs ----------------------------------------------------------


@pytest.mark.parametrize("sets,parts", [
    (["instructions.n_heldout=0"], ["instructions.n_heldout: is 0, but compare runs on held-out",
                                    "--until train"]),
    (["instructions.n_train=20"], ["22 instructions requested (n_train 20 + n_heldout 2) but "
                                   "only 10 remain"]),
    (["model.name=no-such-model"], ["model.name: unknown model 'no-such-model' (no such folder)"]),
    (["model.name=some user/model"], ["model.name: 'some user/model' is not a valid Hub id"]),
    (["push.dataset_repo_id=me/my data"], ["push.dataset_repo_id: 'me/my data' is not a valid "
                                           "Hub repository id"]),
    (["instructions.source=my data/set"], ["instructions.source: 'my data/set' is neither a local "
                                           "file nor a valid Hub dataset id"]),
    (["rank.ranker=pairrm", "rank.pairrm_model=not a/model"], ["rank.pairrm_model:"]),
])
def test_invalid_settings_are_refused_before_anything_is_written(tmp_path, recipe, sets, parts):
    run = tmp_path / "run"
    args = [a for s in sets for a in ("--set", s)]
    one_error(cli("run", "--recipe", recipe, "--output-dir", run, *args), *parts)
    assert not run.exists()


def test_a_manifest_cut_by_hand_is_one_line_and_nothing_changes(finished):
    m = finished / "generate" / "manifest.json"
    m.write_bytes(m.read_bytes()[:40])
    before = checksums(finished)
    one_error(cli("run", "--output-dir", finished, "--until", "generate"),
              f"{m}: not a manifest (Unterminated string", "delete it, then run the same command")
    assert checksums(finished) == before


def test_a_recipe_that_is_not_utf8(tmp_path, recipe):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(recipe.read_bytes().replace(b"name: tiny", b"name: caf\xe9"))
    one_error(cli("run", "--recipe", bad, "--output-dir", tmp_path / "run"),
              f"{bad}:1: not UTF-8 text (byte 0xe9", "re-save the file as UTF-8")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow(together=False)  # stage commands in subprocesses
def test_lora_target_modules_the_model_lacks(tmp_path, recipe):
    run = tmp_path / "run"
    write_pairs(run)
    before = checksums(run)
    one_error(cli("train", "--recipe", recipe, "--output-dir", run, "--set",
                  "train.target_modules=qkv_proj"),
              "train.target_modules: 'qkv_proj' matches no layer of the model", "q_proj")
    assert checksums(run) == before


def test_a_model_path_that_is_not_a_model_folder(tmp_path, recipe):
    (tmp_path / "empty").mkdir()
    one_error(cli("instructions", "--recipe", recipe, "--output-dir", tmp_path / "run",
                  "--set", f"model.name={tmp_path / 'empty'}"), "is a folder without config.json")


# --- 5. OS-level failures as one line --------------------------------------------------------------


def test_output_dir_that_is_a_file_or_under_a_file(tmp_path, recipe):
    f = tmp_path / "file"
    f.write_text("x")
    one_error(cli("instructions", "--recipe", recipe, "--output-dir", f),
              f"--output-dir {f}: is a file, not a folder")
    one_error(cli("instructions", "--recipe", recipe, "--output-dir", f / "run"),
              f"--output-dir {f / 'run'}: lies under {f}, which is a file")
    assert f.read_text() == "x"


def _read_only(path: Path) -> list[str]:
    """A command prefix that runs in a private mount namespace where `path` is read-only."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare not available")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c",
                            f"mount --bind {path} {path} && mount -o remount,bind,ro {path} {path}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no read-only bind mount here: {probe.stderr.decode().strip()}")
    return ["unshare", "-rm", "sh", "-c",
            'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"',
            str(path)]


@pytest.mark.slow(together=False)  # stage commands in subprocesses
def test_read_only_run_directory(finished, recipe):
    ro = _read_only(finished)
    before = checksums(finished)
    ok(cli("run", "--output-dir", finished, "--until", "generate", prefix=ro))  # a no-op
    proc = cli("generate", "--output-dir", finished, "--force", prefix=ro)
    one_error(proc, f"--output-dir {finished}: cannot write the run directory",
              "Read-only file system")
    proc = cli("run", "--output-dir", finished, "--until", "generate", "--set", "generate.k=3",
               "--force", prefix=ro)
    one_error(proc, "Read-only file system")
    assert checksums(finished) == before


def _file_size_limit(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killing signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.slow(together=False)  # three or four generate runs
def test_file_too_large_while_appending_keeps_whole_records_and_resumes(tmp_path, recipe):
    whole, run = tmp_path / "whole", tmp_path / "run"
    ok(cli("run", "--recipe", recipe, "--output-dir", whole, "--until", "generate"))
    ok(cli("instructions", "--recipe", recipe, "--output-dir", run))
    size = (whole / "generate" / "generations.jsonl").stat().st_size
    proc = cli("generate", "--output-dir", run, preexec=_file_size_limit(size // 2))
    one_error(proc, f"{run / 'generate' / 'generations.jsonl'}: File too large",
              "run the same command again")
    kept = generations(run)  # whole lines only, complete groups, each as the whole run has it
    assert 0 < len(kept) < 12 and len(kept) % 2 == 0
    assert all(r in generations(whole) for r in kept)
    assert not (run / "generate" / "manifest.json").exists()
    ok(cli("generate", "--output-dir", run))
    assert generations(run) == generations(whole)


def interrupt_once_written(proc: subprocess.Popen, path: Path) -> None:
    """Ctrl-C `proc` once `path` exists: exit 130, no traceback, the one line last."""
    deadline = time.time() + 240
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == "prefloop: interrupted; run the same command again to resume"


@pytest.mark.slow(together=False)  # stage commands in subprocesses
def test_interrupt_is_one_line_and_resumes(tmp_path, recipe):
    run, go = tmp_path / "run", tmp_path / "never"
    proc = start("run", "--recipe", recipe, "--output-dir", run, "--until", "generate",
                 extra_env={"PREFLOOP_TEST_WAIT_AT": f"generate:append={go}"})
    interrupt_once_written(proc, run / "generate" / "generations.jsonl")
    ok(cli("run", "--recipe", recipe, "--output-dir", run, "--until", "generate"))
    assert len(generations(run)) == 12


@pytest.mark.slow(together=False)  # stage commands in subprocesses
@pytest.mark.parametrize("stage", ["rank", "train"])
def test_interrupt_under_a_progress_bar_ends_with_the_one_line(tmp_path, recipe, stage):
    """The stage's bar is closed before the message, not redrawn after it at exit."""
    run, never = tmp_path / "run", tmp_path / "never"
    if stage == "rank":
        ok(cli("run", "--recipe", recipe, "--output-dir", run, "--until", "generate"))
    else:
        write_pairs(run)
    proc = start(stage, "--recipe", recipe, "--output-dir", run,
                 extra_env={"PREFLOOP_TEST_WAIT_AT": f"{stage}:append={never}"})
    log = run / stage / ("judgments.jsonl" if stage == "rank" else "log.jsonl")
    interrupt_once_written(proc, log)


# --- 5b. sources: encodings, BOM, folders, column names -------------------------------------------


def _instructions(tmp_path, recipe, source: Path, *sets: str):
    args = [a for s in (f"instructions.source={source}", *sets) for a in ("--set", s)]
    return cli("instructions", "--recipe", recipe, "--output-dir", tmp_path / "run", *args)


@pytest.mark.slow(together=False)  # stage commands in subprocesses
def test_source_that_is_not_utf8(tmp_path, recipe):
    src = tmp_path / "latin1.jsonl"
    src.write_bytes(b'{"instruction": "hello"}\n{"instruction": "caf\xe9 au lait"}\n')
    one_error(_instructions(tmp_path, recipe, src), f"{src}:2: not UTF-8 text (byte 0xe9",
              "re-save the file as UTF-8")
    csv = tmp_path / "latin1.csv"
    csv.write_bytes(b"instruction\nhello\ncaf\xe9\n")
    one_error(_instructions(tmp_path, recipe, csv), f"{csv}:3: not UTF-8 text")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow(together=False)  # stage commands in subprocesses
def test_bom_and_column_case_are_accepted(tmp_path, recipe):
    src = tmp_path / "bom.csv"
    src.write_bytes("\ufeffInstruction,Topic\n".encode()
                    + "".join(f"{t},x\n" for t in INSTRUCTIONS).encode("utf-8"))
    ok(_instructions(tmp_path, recipe, src))
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"PROMPT": t}) + "\n"
                                               for t in INSTRUCTIONS).encode())
    shutil.rmtree(tmp_path / "run")
    ok(_instructions(tmp_path, recipe, jsonl, "instructions.field=prompt"))


def test_ambiguous_column_names_are_named(tmp_path, recipe):
    src = tmp_path / "two.csv"
    src.write_text("Instruction,INSTRUCTION\n" + "".join(f"{t},{t}\n" for t in INSTRUCTIONS))
    one_error(_instructions(tmp_path, recipe, src),
              "columns 'Instruction', 'INSTRUCTION' all match 'instruction' ignoring case")


def test_folder_named_like_a_data_file(tmp_path, recipe):
    (tmp_path / "data.jsonl").mkdir()
    one_error(_instructions(tmp_path, recipe, tmp_path / "data.jsonl"), "is a folder, not a file")


def test_hub_loader_failure_keeps_its_cause(monkeypatch):
    import datasets

    from prefloop.config import InstructionsConfig
    from prefloop.stages.instructions import load_hub

    def bad_split(*a, **k):
        raise ValueError('Unknown split "tset". Should be one of [\'train\'].')

    monkeypatch.setattr(datasets, "load_dataset", bad_split)
    with pytest.raises(PrefloopError) as e:
        load_hub(InstructionsConfig(source="GAIR/lima", split="tset"))
    assert 'ValueError: Unknown split "tset"' in str(e.value)
    assert "instructions.split ('tset')" in str(e.value) and "gated" not in str(e.value)


def test_unknown_token_text_in_a_prompt_stays_text():
    """transformers refuses to sanitize "<unk>" typed in a message when the tokenizer also gives
    it from plain text (a word-level vocabulary): the prompt is then segmented as plain text."""
    from tiny import tiny_tokenizer

    from prefloop.chat import render_prompt

    tok = tiny_tokenizer()
    rp = render_prompt(tok, "what do <unk> and </s> mean ?")
    tokens = tok.convert_ids_to_tokens(rp.ids)
    assert tokens[:3] == ["<s>", "<|user|>", "what"] and tokens[-2:] == ["</s>", "<|assistant|>"]
    assert tokens.count("</s>") == 1  # the template's own; the typed one is text


# --- 5c. interrupted model conversions leave no temporary folder -----------------------------------


def test_stale_conversion_folders_are_removed(tmp_path, monkeypatch):
    from prefloop import models

    name = "smollm2-135m-instruct"
    root = tmp_path / "cache" / "models"
    dead, alive, old, young = (root / f".{name}.{s}" for s in ("dead", "alive", "old", "young"))
    for d in (dead, alive, old, young):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x" * 1000)
    host = socket.gethostname()
    (dead / models.OWNER_FILE).write_text(f"{2**22 + 7} {host}\n")
    (alive / models.OWNER_FILE).write_text(f"{os.getpid()} {host}\n")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    monkeypatch.setenv("PREFLOOP_CACHE_DIR", str(tmp_path / "cache"))

    def fake_convert(gguf, out):
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"w")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    monkeypatch.setattr(models, "embedded_gguf_path", lambda n: tmp_path / "x.gguf")
    target = models.embedded_model_dir(name)
    left = sorted(p.name for p in root.iterdir())
    assert left == sorted([name, alive.name, young.name])
    assert not (target / models.OWNER_FILE).exists()


# --- 6. streams: a resumed run draws what an uninterrupted one does ---------------------------------


def test_resumed_generation_draws_the_same_numbers(tmp_path, model_dir):
    """In-process: generate half, then the rest, vs all at once (sampled, several batches)."""
    from tiny import one_thread

    from prefloop.config import ModelConfig
    from prefloop.engine import Sampling
    from prefloop.engine.backends import load_backend
    from prefloop.stages.generate import generate_responses

    items = [{"id": f"i{i}", "instruction": t} for i, t in enumerate(INSTRUCTIONS)]
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=3)
    with one_thread():
        backend = load_backend(ModelConfig(name=str(model_dir), device="cpu"))
        whole = generate_responses(backend, items, tmp_path / "a.jsonl", k=2, sampling=sampling,
                                   batch_size=4)
        part = tmp_path / "c.jsonl"
        lines = (tmp_path / "a.jsonl").read_text().splitlines(keepends=True)
        part.write_text("".join(lines[4:10]))  # a killed run finished groups 2-4
        resumed = generate_responses(backend, items, part, k=2, sampling=sampling, batch_size=4)
    assert resumed == whole


# --- 2b. train: kill -9 after a checkpoint, resume to the uninterrupted adapter -----------------

RESUME_SETS = ["train.max_steps=-1", "train.num_train_epochs=2", "train.batch_size=1",
               "train.learning_rate=0.01", "train.warmup_ratio=0", "train.save_steps=3",
               "train.lora_r=2", "train.lora_alpha=4"]


def adapter_tensors(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "train" / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow(together=False)  # stage commands in subprocesses
@pytest.mark.parametrize("engine", ["trl", "fast"])
def test_kill9_mid_train_resumes_from_the_checkpoint_to_the_uninterrupted_adapter(
        tmp_path, recipe, engine):
    """6 pairs x 2 epochs, a checkpoint every 3 steps; killed at step 8's log line (after the
    step-6 checkpoint): the rerun resumes at step 6 and ends with the same adapter and log."""
    import torch

    sets = [a for s in (*RESUME_SETS, f"train.engine={engine}") for a in ("--set", s)]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for run in (whole, killed):
        write_pairs(run)
    ok(cli("train", "--recipe", recipe, "--output-dir", whole, *sets))
    proc = cli("train", "--recipe", recipe, "--output-dir", killed, *sets,
               extra_env={"PREFLOOP_TEST_KILL_AT": "train:append:8"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    scratch = killed / "train" / "trainer"
    assert sorted(p.name for p in scratch.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert [r["step"] for r in read_jsonl_lines(killed / "train" / "log.jsonl")] == list(range(1, 9))
    resumed = ok(cli("train", "--recipe", recipe, "--output-dir", killed, *sets))
    assert f"resuming from {scratch / 'checkpoint-6'} (step 6)" in resumed.stderr
    assert manifest(killed, "train")["resumed_from_step"] == 6
    assert manifest(whole, "train")["resumed_from_step"] is None
    assert manifest(killed, "train")["counts"]["steps"] == 12
    a, b = adapter_tensors(whole), adapter_tensors(killed)
    assert sorted(a) == sorted(b) and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a), {k: (a[k] - b[k]).abs().max() for k in a}
    log_whole = read_jsonl_lines(whole / "train" / "log.jsonl")
    log_killed = read_jsonl_lines(killed / "train" / "log.jsonl")
    assert [r["step"] for r in log_killed] == list(range(1, 13))
    assert [r["loss"] for r in log_killed] == [r["loss"] for r in log_whole]
    assert not list(scratch.glob("checkpoint-*"))  # the finished stage keeps no checkpoint
    # the manifest says what ran: the command line and prefloop's version and commit
    m = manifest(whole, "train")
    assert m["command"] == shlex.join(["prefloop", "train", "--recipe", str(recipe),
                                       "--output-dir", str(whole), *sets])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=SRC, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert (m["prefloop"]["version"], m["prefloop"]["git_commit"]) == ("0.1.0", head)


# --- issue #26: what is not ours, foreign code, nonsense settings, hangs, last tracebacks -------
# Most of these are refused before any model loads, so they run the CLI in this process.


def main_cli(capsys, *args) -> SimpleNamespace:
    """`prefloop ARGS` in this process: its exit code and stderr, like `cli()` gives them."""
    from prefloop.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stderr=captured.err, stdout=captured.out)


def test_a_folder_holding_the_users_files_is_refused_and_untouched(tmp_path, recipe, capsys):
    proj = tmp_path / "proj"
    (proj / "train").mkdir(parents=True)
    (proj / "recipe.yaml").write_text("# my recipe, with my comments\nname: mine\n")
    (proj / "train" / "notes.txt").write_text("mine")
    (proj / "report.md").write_text("my report")
    before = checksums(proj)
    for command in (["instructions", "--recipe", recipe], ["run", "--force"],
                    ["iterate", "--recipe", recipe, "--force"]):
        one_error(main_cli(capsys, *command, "--output-dir", proj),
                  f"--output-dir {proj}: holds files prefloop did not write ('recipe.yaml', "
                  "'report.md', 'train') and no .prefloop-run marker", "give another --output-dir")
    assert checksums(proj) == before


def test_a_run_directory_is_marked_first_and_an_old_one_is_adopted(tmp_path, recipe, capsys):
    run = tmp_path / "run"
    ok(main_cli(capsys, "instructions", "--recipe", recipe, "--output-dir", run))
    marker = json.loads((run / ".prefloop-run").read_text())
    assert sorted(marker) == ["note", "prefloop"]
    (run / ".prefloop-run").unlink()  # a run directory of a prefloop older than the marker
    ok(main_cli(capsys, "instructions", "--force", "--output-dir", run))
    assert (run / ".prefloop-run").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()  # a command that fails writes nothing, not even the marker
    one_error(main_cli(capsys, "generate", "--recipe", recipe, "--output-dir", empty),
              "stage 'instructions' has not finished")
    assert list(empty.iterdir()) == []


def test_force_never_replaces_a_folder_or_an_input_it_did_not_write(tmp_path, recipe, capsys):
    run = tmp_path / "run"
    ok(main_cli(capsys, "instructions", "--recipe", recipe, "--output-dir", run))
    (run / "generate").mkdir()
    (run / "generate" / "mine.txt").write_text("mine")
    before = checksums(run)
    one_error(main_cli(capsys, "generate", "--output-dir", run, "--force"),
              f"{run / 'generate'}: holds files prefloop did not write (no manifest.json or "
              "in_progress.json)")
    source = run / "instructions" / "train.jsonl"
    one_error(main_cli(capsys, "instructions", "--output-dir", run, "--force", "--set",
                       f"instructions.source={source}"),
              f"instructions.source: {source} lies inside the run directory {run}")
    inside = run / "instructions" / "my.yaml"
    inside.write_text(recipe.read_text())
    before[str(inside.relative_to(run))] = hashlib.sha256(inside.read_bytes()).hexdigest()
    one_error(main_cli(capsys, "instructions", "--recipe", inside, "--output-dir", run),
              f"--recipe: {inside} lies inside the run directory")
    assert checksums(run) == before


def test_tilde_expands_and_a_recipe_name_is_a_plain_name(tmp_path, recipe, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    ok(main_cli(capsys, "instructions", "--recipe", recipe, "--output-dir", "~/r"))
    assert (tmp_path / "home" / "r" / "instructions" / "manifest.json").is_file()
    assert not (tmp_path / "~").exists()
    for name in ("../escape", "/abs", "a/b", ".."):
        one_error(main_cli(capsys, "instructions", "--recipe", recipe, "--set", f"name={name}"),
                  f"--set name: {name!r} is not a plain name")
    bad = tmp_path / "abs.yaml"
    bad.write_text(recipe.read_text().replace("name: tiny", f"name: {tmp_path / 'out'}"))
    one_error(main_cli(capsys, "instructions", "--recipe", bad),
              f"{bad}: name: '{tmp_path / 'out'}' is not a plain name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abs.yaml", "home"]  # no 'out'/'r'


def _model_copy(model_dir: Path, dest: Path, edit) -> Path:
    shutil.copytree(model_dir, dest)
    edit(dest)
    return dest


def _set_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit,part", [
    (lambda d: _set_json(d / "config.json", auto_map={"AutoModelForCausalLM": "evil.Evil"}),
     "config.json asks for custom code (auto_map: AutoModelForCausalLM)"),
    (lambda d: _set_json(d / "tokenizer_config.json", auto_map={"AutoTokenizer": ["evil.T", None]}),
     "tokenizer_config.json asks for custom code (auto_map: AutoTokenizer)"),
    (lambda d: _set_json(d / "config.json", model_type="evil_llama"),
     "config.json names model_type 'evil_llama', which transformers does not know"),
    (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
     "holds pickle weights (pytorch_model.bin), which can run code when loaded"),
])
def test_a_model_folder_that_could_run_its_own_code_is_refused(tmp_path, recipe, model_dir,
                                                               capsys, edit, part):
    pwned = tmp_path / "PWNED"
    evil = _model_copy(model_dir, tmp_path / "evil", edit)
    (evil / "evil.py").write_text(f"open({str(pwned)!r}, 'w').write('ran')\n")
    one_error(main_cli(capsys, "generate", "--recipe", recipe, "--output-dir", tmp_path / "run",
                       "--set", f"model.name={evil}"), f"model.name: {evil}", part)
    assert not pwned.exists() and not (tmp_path / "run").exists()


def test_every_from_pretrained_refuses_remote_code_explicitly():
    """A source walk: each from_pretrained call in src/ passes trust_remote_code=False."""
    import ast

    calls = []
    for path in sorted((SRC / "prefloop").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained":
                kw = {k.arg: k.value for k in node.keywords}
                flag = kw.get("trust_remote_code")
                calls.append((path.name, node.lineno,
                              isinstance(flag, ast.Constant) and flag.value is False))
    assert len(calls) >= 7 and [c for c in calls if not c[2]] == [], calls


def test_url_credentials_are_never_printed_or_written(tmp_path, recipe, capsys):
    from prefloop import hub
    from prefloop.artifacts import config_hash
    from prefloop.config import ModelConfig, Recipe, dump_recipe

    run, url = tmp_path / "run", "http://bob:SECRETKEY@127.0.0.1:9/v1"
    proc = main_cli(capsys, "run", "--recipe", recipe, "--output-dir", run, "--until", "generate",
                    "--set", "model.backend=openai", "--set", f"model.base_url={url}",
                    "--set", "model.max_retries=0")
    one_error(proc, "cannot reach http://***@127.0.0.1:9/v1")
    assert "SECRETKEY" not in proc.stderr + proc.stdout
    assert "base_url: http://***@127.0.0.1:9/v1" in (run / "recipe.yaml").read_text()
    assert not [p for p in run.rglob("*") if p.is_file() and b"SECRETKEY" in p.read_bytes()]
    r = Recipe(model=ModelConfig(backend="openai", base_url=url))
    assert "SECRETKEY" not in dump_recipe(r)
    assert config_hash(r.model) == config_hash(ModelConfig(backend="openai",
                                                           base_url="http://***@127.0.0.1:9/v1"))
    card = tmp_path / "dataset"
    card.mkdir()
    (card / "README.md").write_text(f"server: {url}\n")
    (card / "data.parquet").write_bytes(b"PAR1")
    ops = {op.path_in_repo: op.path_or_fileobj for op in hub.upload_operations(card, {})}
    assert ops == {"README.md": b"server: http://***@127.0.0.1:9/v1\n",
                   "data.parquet": str(card / "data.parquet")}
    assert (card / "README.md").read_text() == f"server: {url}\n"  # the local file unchanged


def test_every_numeric_setting_has_a_range_and_non_finite_is_refused():
    import dataclasses
    import typing

    from prefloop.config import RANGES, SECTIONS, apply_overrides
    from prefloop.config import Recipe as R

    numeric = 0
    for section in SECTIONS:
        cls = typing.get_type_hints(R)[section]
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if not ({int, float} & ({hint} | set(typing.get_args(hint)))):
                continue
            numeric += 1
            assert f.name in RANGES, f"{section}.{f.name} has no range"
            for bad in (".nan", ".inf", "-.inf"):
                with pytest.raises(PrefloopError, match=rf"--set: {section}\.{f.name}: "):
                    apply_overrides(R(), [f"{section}.{f.name}={bad}"])
    assert numeric >= 60


REFUSED = [
    ("train.beta=0", "train.beta: must be > 0, got 0.0"),
    ("train.learning_rate=-1", "train.learning_rate: must be in (0, 1], got -1.0"),
    ("train.epochs=0", "train.epochs: must be > 0, got 0.0"),
    ("train.max_steps=0", "train.max_steps: must be > 0 (or -1: train for train.epochs), got 0"),
    ("generate.temperature=-0.5", "generate.temperature: must be >= 0, got -0.5"),
    ("generate.top_p=1.5", "generate.top_p: must be in (0, 1], got 1.5"),
    ("train.beta=nan", "train.beta: must be a finite number, got nan"),
    ("instructions.seed=-3", "instructions.seed: must be >= 0, got -3"),
    ("model.max_retries=1000", "model.max_retries: must be in [0, 100], got 1000"),
    ("instructions.min_tokens=9", "instructions.min_tokens: 9 is larger than max_tokens (5)"),
]


def test_a_refused_setting_leaves_the_run_directory_byte_for_byte(tmp_path, recipe, capsys):
    run = tmp_path / "run"
    ok(main_cli(capsys, "instructions", "--recipe", recipe, "--output-dir", run))
    before = checksums(run)
    for setting, message in REFUSED:
        extra = ["--set", "instructions.max_tokens=5"] if "min_tokens" in setting else []
        one_error(main_cli(capsys, "run", "--output-dir", run, "--set", setting, *extra),
                  f"--set: {message}")
        assert checksums(run) == before, setting


def test_a_duplicate_key_or_section_names_both_lines(tmp_path, recipe, capsys):
    text = recipe.read_text()
    for extra, key, first, second in [("train: {beta: 0.5}\ntrain: {beta: 0.2}\n", "train", 5, 6),
                                      ("rank:\n  seed: 1\n  seed: 2\n", "seed", 6, 7)]:
        bad = tmp_path / "dup.yaml"
        bad.write_text(text + extra)
        one_error(main_cli(capsys, "instructions", "--recipe", bad, "--output-dir",
                           tmp_path / "run"),
                  f"{bad}:{second}: key '{key}' is given twice, on lines {first} and {second}")
    assert not (tmp_path / "run").exists()


def test_text_yaml_cannot_read_goes_through_set_as_a_string(tmp_path, recipe, capsys):
    run = tmp_path / "run"
    ok(main_cli(capsys, "instructions", "--recipe", recipe, "--output-dir", run, "--set",
                "model.system_prompt=[INST] be brief", "--set", "model.server_model=@bot"))
    recorded = (run / "recipe.yaml").read_text()
    assert "system_prompt: '[INST] be brief'" in recorded and "server_model: '@bot'" in recorded
    one_error(main_cli(capsys, "instructions", "--output-dir", run, "--set", "generate.k=%x"),
              "--set: generate.k: expected an integer, got '%x'")


def test_a_yaml_alias_bomb_is_one_short_line(tmp_path, capsys):
    rows = ['  - &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for name, prev in zip("bcdefgh", "abcdefg", strict=True):
        rows.append(f"  - &{name} [{','.join([f'*{prev}'] * 9)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("model:\n  system_prompt:\n" + "\n".join("  " + r for r in rows) + "\n")
    line = one_error(main_cli(capsys, "instructions", "--recipe", bomb, "--output-dir",
                              tmp_path / "run"),
                     f"{bomb}: model.system_prompt: expected a string, got [['lol', 'lol'")
    assert len(line) < 300, line


def test_invisible_only_instructions_and_deeply_nested_json_are_one_line(tmp_path, recipe,
                                                                        capsys):
    invisible = tmp_path / "invisible.jsonl"
    invisible.write_text(json.dumps({"instruction": "ok"}) + "\n"
                         + json.dumps({"instruction": "\u200b\ufeff \u200d\u2060\u00ad"}) + "\n")
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"instruction": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    deep_json = tmp_path / "deep.json"
    deep_json.write_text("[" * 100_000 + "]" * 100_000)
    for source, part in [(invisible, f"{invisible}:2: field 'instruction' is missing or empty "
                                     "(or holds only invisible characters)"),
                         (deep, f"{deep}:1: JSON nested too deeply to read"),
                         (deep_json, f"{deep_json}: JSON nested too deeply to read")]:
        one_error(main_cli(capsys, "instructions", "--recipe", recipe, "--output-dir",
                           tmp_path / "run", "--set", f"instructions.source={source}"), part)
    assert not (tmp_path / "run").exists()


def test_damaged_weights_in_a_model_folder_are_one_line(tmp_path, recipe, model_dir, capsys):
    run = tmp_path / "run"
    ok(main_cli(capsys, "instructions", "--recipe", recipe, "--output-dir", run))
    cut = _model_copy(model_dir, tmp_path / "cut", lambda d: os.truncate(d / "model.safetensors",
                                                                          100))
    before = checksums(run)
    one_error(main_cli(capsys, "generate", "--output-dir", run, "--set", f"model.name={cut}"),
              f"model '{cut}': {cut} cannot be loaded (SafetensorError",
              "its files are damaged or incomplete")
    assert checksums(run) == before


def test_missing_or_damaged_adapter_weights_are_one_line(tmp_path, model_dir):
    from peft import LoraConfig, get_peft_model

    from prefloop.models import load_adapter, load_model

    base, _ = load_model(str(model_dir))
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    os.truncate(weights, 10)
    with pytest.raises(PrefloopError, match=rf"^{weights}: the adapter cannot be loaded "
                                            r"\(SafetensorError: .*; redo it$"):
        load_adapter(load_model(str(model_dir))[0], weights.parent, "redo it")
    weights.unlink()
    with pytest.raises(PrefloopError) as e:
        load_adapter(load_model(str(model_dir))[0], weights.parent, "redo it")
    assert str(e.value) == f"{weights}: the adapter's weights are missing; redo it"


def test_the_converted_cache_is_verified_and_rebuilt(tmp_path, monkeypatch):
    from prefloop import models

    monkeypatch.setenv("PREFLOOP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "embedded_gguf_path", lambda name: tmp_path / "x.gguf")
    built = []

    def convert(gguf, out):  # stands in for the 20 s dequantisation
        built.append(out)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights" * 100)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    target = models.embedded_model_dir("smollm2-135m-instruct")
    assert len(built) == 1 and models.embedded_model_dir("smollm2-135m-instruct") == target
    assert len(built) == 1  # intact: not rebuilt
    with open(target / "model.safetensors", "r+b") as f:  # same size, other bytes
        f.write(b"W")
    assert not models.cache_is_intact(target)
    models.embedded_model_dir("smollm2-135m-instruct")
    assert len(built) == 2 and (target / "model.safetensors").read_bytes() == b"weights" * 100
    os.truncate(target / "model.safetensors", 3)
    models.embedded_model_dir("smollm2-135m-instruct")
    assert len(built) == 3 and models.cache_is_intact(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["smollm2-135m-instruct"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("PREFLOOP_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(PrefloopError, match=rf"^the model cache {blocker}/cache/models/"
                                            r"smollm2-135m-instruct cannot be written \(.*"
                                            "set PREFLOOP_CACHE_DIR to a writable folder$"):
        models.embedded_model_dir("smollm2-135m-instruct")


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port, self.accepted, self.conns = self.sock.getsockname()[1], 0, []
        import threading

        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.accepted += 1

    def close(self):
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.fixture
def silent():
    server = SilentServer()
    yield server
    server.close()


def test_a_server_that_never_answers_is_one_line_in_seconds(tmp_path, recipe, silent, capsys):
    run = tmp_path / "run"
    t0 = time.time()
    one_error(main_cli(capsys, "run", "--recipe", recipe, "--output-dir", run, "--until",
                       "generate", "--set", "model.backend=openai", "--set",
                       f"model.base_url=http://127.0.0.1:{silent.port}/v1", "--set",
                       "model.request_timeout=1", "--set", "model.max_retries=0"),
              f"http://127.0.0.1:{silent.port}/v1/models: no answer within "
              "model.request_timeout=1s")
    assert time.time() - t0 < 60 and silent.accepted >= 1


def _fake_finished_pairs(run: Path, recipe: Path) -> None:
    """A run directory whose pairs stage finished (what push reads), without computing it."""
    from prefloop.artifacts import claim_run_dir, write_manifest
    from prefloop.config import dump_recipe, load_recipe

    (run / "pairs" / "dataset").mkdir(parents=True)
    claim_run_dir(run)
    (run / "recipe.yaml").write_text(dump_recipe(load_recipe(recipe)))
    (run / "pairs" / "dataset" / "README.md").write_text("# pairs\n")
    write_manifest(run / "pairs", "pairs", "h", started=time.time())


@pytest.fixture
def silent_hub(silent, monkeypatch):
    """huggingface_hub in this process pointed at the silent server, 1 s timeout, 1 retry."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    from prefloop.hub import configure_network

    endpoint = f"http://127.0.0.1:{silent.port}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_SECRET")
    monkeypatch.setenv("PREFLOOP_HUB_TIMEOUT", "1")
    monkeypatch.setenv("PREFLOOP_HUB_RETRIES", "1")
    saved = dict(_http.http_backoff.__kwdefaults__)
    configure_network()
    yield endpoint
    _http.set_client_factory(_http.default_client_factory)
    _http.http_backoff.__kwdefaults__.update(saved)


def test_hub_requests_to_a_silent_endpoint_are_one_line_in_seconds(tmp_path, recipe, silent,
                                                                   silent_hub, capsys):
    run = tmp_path / "run"
    _fake_finished_pairs(run, recipe)
    t0 = time.time()
    proc = main_cli(capsys, "push", "dataset", "--output-dir", run, "--repo-id", "me/data")
    one_error(proc, f"push dataset to me/data failed: no answer from {silent_hub} within "
                    "PREFLOOP_HUB_TIMEOUT=1 s, 2 tries", "or raise PREFLOOP_HUB_TIMEOUT")
    assert "hf_fake_SECRET" not in proc.stderr and silent.accepted >= 2
    proc = main_cli(capsys, "run", "--recipe", recipe, "--output-dir", tmp_path / "run2",
                    "--until", "generate", "--set", "model.name=someone/model")
    one_error(proc, f"model 'someone/model': cannot be loaded from the Hugging Face Hub at "
                    f"{silent_hub}", "PREFLOOP_HUB_TIMEOUT=1 s")
    assert time.time() - t0 < 60


@pytest.mark.slow(together=False)  # a real push process, killed -9 while it waits for the Hub
def test_a_killed_push_leaves_no_staged_copy(tmp_path, recipe, silent):
    run, tmp = tmp_path / "run", tmp_path / "tmp"
    tmp.mkdir()
    _fake_finished_pairs(run, recipe)
    push = start("push", "dataset", "--output-dir", run, "--repo-id", "me/data", extra_env={
        "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{silent.port}",
        "HF_TOKEN": "hf_fake_SECRET", "TMPDIR": str(tmp), "PREFLOOP_HUB_TIMEOUT": "600"})
    deadline = time.time() + 120
    while silent.accepted == 0 and time.time() < deadline and push.poll() is None:
        time.sleep(0.1)
    push.kill()
    push.communicate()
    assert silent.accepted >= 1 and [p for p in tmp.rglob("*") if p.is_file()] == []
