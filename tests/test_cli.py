import argparse
import json
import re
from pathlib import Path

import pytest

from prefloop.cli import main


def test_instructions_subcommand_writes_the_run_dir(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["instructions", "--output-dir", str(out), "--set", "instructions.n_train=7",
                 "--set", "instructions.n_heldout=3"])
    assert code == 0
    assert len((out / "instructions" / "train.jsonl").read_text().splitlines()) == 7
    assert len((out / "instructions" / "heldout.jsonl").read_text().splitlines()) == 3
    assert "n_train: 7" in (out / "recipe.yaml").read_text()
    # the run directory's recipe is reused when no --recipe is given
    assert main(["instructions", "--output-dir", str(out)]) == 0
    manifest = json.loads((out / "instructions" / "manifest.json").read_text())
    assert manifest["counts"]["train"] == 7


@pytest.mark.parametrize("argv,message", [
    (["instructions", "--set", "instructions.n_trian=3"],
     "prefloop: error: --set: instructions: unknown key 'n_trian' (did you mean 'n_train'?)\n"),
    (["instructions", "--set", "instructions.n_train=200", "--set", "instructions.source=builtin",
      "--set", "instructions.n_heldout=10", "--set", "instructions.kinds=null"],
     "prefloop: error: instructions: 210 instructions requested (n_train 200 + n_heldout 10) but "
     "only 100 remain after de-duplication and filtering; lower n_train or n_heldout, or give a "
     "larger source\n"),
    (["instructions", "--set", "instructions.n_train=600"],
     "prefloop: error: instructions: instructions.n_train is 600 but the source has only 579 "
     "training instructions after de-duplication and filtering; lower instructions.n_train or "
     "widen instructions.kinds\n"),
    (["instructions", "--set", "instructions.source=missing.jsonl"],
     "prefloop: error: missing.jsonl: instructions file not found; check instructions.source\n"),
    (["generate"],
     "prefloop: error: {out}/instructions: stage 'instructions' has not finished; run "
     "`prefloop instructions` --output-dir {out} first (or `prefloop run`)\n"),
])
def test_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    code = main([*argv, "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines()[-1] + "\n" == message.format(out=out)


def test_unknown_model_name_fails_before_loading(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["instructions", "--output-dir", str(out)]) == 0
    assert main(["generate", "--output-dir", str(out), "--set", "model.name=nonsense"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "prefloop: error: model.name: unknown model 'nonsense'")
    # before anything runs: a typo of the embedded name is refused with the right name
    assert main(["instructions", "--output-dir", str(tmp_path / "new"),
                 "--set", "model.name=smollm2-135m-instruc"]) == 2
    assert "did you mean the embedded 'smollm2-135m-instruct'?" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_out_of_memory_is_one_line_naming_the_setting(tmp_path, monkeypatch, capsys):
    import torch

    from prefloop.stages import generate

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    monkeypatch.setattr(generate, "run", oom)
    assert main(["generate", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("prefloop: error: generate: out of memory (CUDA out of memory. Tried to "
                   "allocate 2.00 GiB); lower generate.batch_size (e.g. --set "
                   "generate.batch_size=64) or generate.max_new_tokens, then run the same "
                   "command again to resume")


def test_other_runtime_errors_are_not_taken_for_out_of_memory(tmp_path, monkeypatch):
    from prefloop.stages import generate

    def broken(*a, **k):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(generate, "run", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["generate", "--output-dir", str(tmp_path / "run")])


def _subparsers():
    from prefloop.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, sub.choices


def test_help_is_for_users_every_option_says_something_and_recipes_are_all_listed(capsys):
    from prefloop.config import SHIPPED_RECIPES

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "prefloop makes preference data from a model's own answers" in out
    assert "examples:\n  prefloop run " in out and "prefloop plan " in out
    assert "call stage.run" not in out  # not the module's developer docstring
    parser, commands = _subparsers()
    assert set(commands) == {"run", "instructions", "generate", "rank", "pairs", "train",
                             "compare", "iterate", "plan", "show", "push"}
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, (name, action.dest)  # every option and argument is explained
        recipe = [a for a in sub._actions if a.dest == "recipe"]
        if recipe and name != "show":
            assert f"a shipped recipe ({', '.join(SHIPPED_RECIPES)}) or a YAML" in recipe[0].help
    assert "constraints-loop" in SHIPPED_RECIPES
    # push does not run stages: no --force there
    assert "force" not in {a.dest for a in commands["push"]._actions}
    assert "dry_run" in {a.dest for a in commands["run"]._actions}


def test_version_names_the_package_and_the_checkout_commit(tmp_path, capsys):
    import subprocess

    from prefloop import __version__
    from prefloop.version import git_commit

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert capsys.readouterr().out.startswith(f"prefloop {__version__} (git {head}")
    assert git_commit(tmp_path) is None  # installed, not a checkout
    repo = tmp_path / "repo"
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "a.txt").write_text("1")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    short = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, check=True).stdout.strip()
    assert git_commit(repo) == short
    (repo / "a.txt").write_text("2")
    assert git_commit(repo) == f"{short}, uncommitted changes"


def _plan_lines(out: str) -> list[str]:
    return out.split("\nstages:\n")[1].splitlines()


def test_plan_shows_the_recipe_each_stage_and_the_time_and_writes_nothing(tmp_path, capsys):
    from prefloop.config import dump_recipe, load_recipe

    run = tmp_path / "run"
    argv = ["--output-dir", str(run), "--set", "model.device=cpu"]
    assert main(["plan", *argv]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"plan: prefloop run --output-dir {run}\n\nresolved recipe:\n")
    recipe = dump_recipe(load_recipe("default", ["model.device=cpu"]))
    assert "\n".join("  " + line for line in recipe.rstrip().splitlines()) in out
    # the default's sizes at the measured rates: 48 x 6 x 128 tokens, 29 pairs x 2 epochs, 60
    # held-out instructions, and 48 x 2 transfer answers at generate's rate (plan.EMBEDDED_CPU)
    assert _plan_lines(out) == [
        "  instructions  to run; estimate 0.0s (measured rates)",
        "  generate      to run; estimate 1m56s (measured rates)",
        "  rank          to run; estimate 0.0s (measured rates)",
        "  pairs         to run; estimate 0.4s (measured rates)",
        "  train         to run; estimate 1m40s (measured rates)",
        "  compare       to run; estimate 2m46s (measured rates)",
        "",
        "estimated time: 6m22s (rates: BENCHMARKS.md, embedded model on 2 idle CPU cores, "
        "2026-12-03; several times that when other jobs share the cores, less on more cores)"]
    assert not run.exists()
    assert main(["run", "--dry-run", *argv]) == 0  # the same plan
    assert capsys.readouterr().out == out


def test_plan_of_finished_changed_and_refused_stages(tmp_path, capsys):
    run = tmp_path / "run"
    small = ["--set", "instructions.n_train=7", "--set", "instructions.n_heldout=3"]
    assert main(["instructions", "--output-dir", str(run), *small]) == 0
    capsys.readouterr()
    before = sorted(p.stat().st_mtime_ns for p in run.rglob("*"))
    assert main(["plan", "instructions", "--output-dir", str(run)]) == 0
    lines = _plan_lines(capsys.readouterr().out)
    assert re.fullmatch(r"  instructions  done \(took \d+\.\ds\)", lines[0]), lines
    assert lines[1:] == ["", "nothing to do: every stage finished with this configuration"]

    changed = ["--output-dir", str(run), "--set", "instructions.n_train=5"]
    assert main(["plan", *changed]) == 2
    got = capsys.readouterr()
    assert _plan_lines(got.out)[0] == ("  instructions  to redo: finished with another "
                                       "configuration; estimate 0.0s (measured rates)")
    assert got.err == (
        f"prefloop: error: the command would be refused: {run / 'instructions'}: stage "
        "'instructions' finished with a different configuration (instructions.n_train: 7 -> 5); "
        "to redo instructions and the stages after it run: prefloop run --output-dir "
        f"{run} --set instructions.n_train=5 --force (or use a new --output-dir)\n")
    assert main(["plan", *changed, "--force"]) == 0
    assert _plan_lines(capsys.readouterr().out)[0] == (
        "  instructions  to redo: finished with another configuration; estimate 0.0s "
        "(measured rates)")
    assert main(["generate", "--dry-run", "--output-dir", str(run)]) == 0
    assert _plan_lines(capsys.readouterr().out)[0].startswith("  generate  to run; estimate ")
    assert main(["plan", "train", "--output-dir", str(run)]) == 2  # pairs has not run
    got = capsys.readouterr()
    assert _plan_lines(got.out)[0] == "  train  refused: a stage before it has not finished"
    assert got.err == (f"prefloop: error: the command would be refused: {run / 'pairs'}: stage "
                       f"'pairs' has not finished; run `prefloop pairs` --output-dir {run} first "
                       "(or `prefloop run`)\n")
    assert sorted(p.stat().st_mtime_ns for p in run.rglob("*")) == before  # nothing written


def test_plan_of_iterate_lists_each_rounds_steps(tmp_path, capsys):
    run = tmp_path / "loop"
    assert main(["plan", "iterate", "--recipe", "constraints-loop", "--set", "iterate.rounds=2",
                 "--output-dir",
                 str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"plan: prefloop iterate --output-dir {run}\n")
    assert out.split("\nrounds:\n")[1].splitlines()[:4] == [
        "  0 (M1 on the held-out prompts): eval todo",
        "  1: instructions todo, generate todo, rank todo, pairs todo, train todo, model todo, "
        "eval todo",
        "  2: instructions todo, generate todo, rank todo, pairs todo, train todo, model todo, "
        "eval todo", ""]
    assert not run.exists()


@pytest.mark.parametrize("sets", [["instructions.n_heldout=0"], ["train.beta=-1"],
                                  ["model.name=no-such-model"]])
def test_a_refused_setting_never_imports_torch(tmp_path, sets):
    """A command that refuses its settings answers in about a second: torch, transformers and
    the engine load only with a model (the suite runs dozens of such commands)."""
    import subprocess
    import sys

    source = tmp_path / "src.jsonl"
    source.write_text("".join(json.dumps({"id": f"i{i}", "instruction": f"say {i} things"}) + "\n"
                              for i in range(12)))
    args = ["run", "--output-dir", str(tmp_path / "run"), "--set", f"instructions.source={source}",
            "--set", "instructions.kinds=null", "--set", "rank.ranker=judge"]
    args += [a for s in sets for a in ("--set", s)]
    code = ("import sys\nfrom prefloop.cli import main\ncode = main(sys.argv[1:])\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'prefloop.engine') "
            "if m in sys.modules)\nprint(code, heavy)")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env={"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
                              "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert out.stdout.strip().splitlines()[-1] == "2 []", (out.stdout, out.stderr)
    assert out.stderr.startswith("prefloop: error: ") and len(out.stderr.splitlines()) == 1


def test_plan_marks_every_stage_after_a_forced_redo_as_redone(tmp_path, monkeypatch):
    """A forced redo of rank makes pairs stale (it read rank's earlier output), and train and
    compare after it: they read what will be redone in turn. Stages before rank stay done."""
    from types import SimpleNamespace

    from prefloop import plan as plan_module
    from prefloop.artifacts import STAGES, RunDir, Stage, Upstream
    from prefloop.config import Recipe

    def module(stage):
        before = STAGES[STAGES.index(stage) - 1] if stage != STAGES[0] else None
        return SimpleNamespace(stage_config=lambda recipe, up: {"stage": stage,
                                                                "up": up(before) if before else None})

    monkeypatch.setattr(plan_module, "stage_module", module)
    run = RunDir(tmp_path)

    def finish(stage, force=False):
        up = Upstream(run)
        s = Stage(run.stage(stage), stage, module(stage).stage_config(None, up), inputs=up.folders)
        assert s.begin(force=force) is False
        s.finish()

    for stage in STAGES:
        finish(stage)
    assert [p.state for p in plan_module.plan(Recipe(), tmp_path, STAGES)] == ["done"] * 6
    finish("rank", force=True)
    assert [(p.name, p.state) for p in plan_module.plan(Recipe(), tmp_path, STAGES)] == [
        ("instructions", "done"), ("generate", "done"), ("rank", "done"), ("pairs", "redone"),
        ("train", "redone"), ("compare", "redone")]
    assert [p.state for p in plan_module.plan(Recipe(), tmp_path, ["train", "compare"])] == [
        "done", "done"]  # pairs is not part of this command: train reads its finished output
