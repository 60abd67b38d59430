"""Command line: parse arguments, resolve the recipe, call stage.run, map errors to exit codes."""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from prefloop import distributed
from prefloop.artifacts import (
    RUN_MARKER,
    STAGES,
    RunDir,
    RunLock,
    atomic_write_text,
    claim_run_dir,
    read_manifest,
    redone_inputs,
    transaction,
)
from prefloop.config import (
    SHIPPED_RECIPES,
    Recipe,
    apply_overrides,
    dump_recipe,
    load_recipe,
    redact_url,
)
from prefloop.errors import PrefloopError
from prefloop.summary import stage_line

DESCRIPTION = """\
prefloop makes preference data from a model's own answers and tunes the model on it with DPO
and LoRA, then shows whether it got better:

  instructions -> generate (k answers each) -> rank (a program, a judge or PairRM scores them)
  -> pairs (best vs worst: a Hugging Face dataset) -> train (DPO + LoRA: an adapter)
  -> compare (the original vs the tuned model on held-out instructions)

Each stage writes its files to the run directory (default runs/<recipe name>); a finished
stage is kept and not redone, an interrupted one resumes. `iterate` repeats the loop with the
tuned model (self-rewarding, Yuan et al. 2024)."""

EPILOG = """\
examples:
  prefloop run                   the embedded default: offline, on a CPU (6-7.5 min on 2 idle
                                 cores, BENCHMARKS.md), into runs/default
  prefloop plan                  what `prefloop run` would do, and how long it would take
  prefloop show                  print the result of runs/default again
  prefloop run --recipe seed --set train.beta=0.05 --output-dir runs/seed-b005

`prefloop COMMAND --help` lists a command's options."""


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help=f"a shipped recipe ({', '.join(SHIPPED_RECIPES)}) or a YAML "
                   "file; default: the run directory's recipe.yaml, else 'default'")
    p.add_argument("--output-dir", type=Path, help="run directory (default: runs/<recipe name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one recipe value, e.g. --set train.beta=0.05 (repeatable)")


def _common(p: argparse.ArgumentParser, dry_run: bool = True) -> None:
    _recipe_args(p)
    p.add_argument("--force", action="store_true",
                   help="redo this command's stages even when they finished (with `run`: from "
                        "the first whose configuration changed; the finished work is kept aside "
                        "until the redo finishes)")
    if dry_run:
        p.add_argument("--dry-run", action="store_true",
                       help="print the plan (the resolved recipe, each stage's state, an "
                            "estimated time) and change nothing; the same as `prefloop plan`")


class _Version(argparse.Action):
    """--version, computed only when asked (it may run git)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version (and the git commit of a checkout) and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from prefloop.version import version_text

        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefloop", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="run every stage: " + " -> ".join(STAGES))
    _common(p)
    p.add_argument("--until", choices=STAGES, help="stop after this stage")
    for stage in STAGES:
        _common(sub.add_parser(stage, help=f"run the {stage} stage on a run directory"))
    _common(sub.add_parser("iterate", help="self-rewarding iterative DPO (Yuan et al. 2024)"))
    p = sub.add_parser("plan", help="what a command would do, changing nothing: the resolved "
                       "recipe, each stage's state (done / to run / refused and why), the time")
    p.add_argument("what", nargs="?", default="run", choices=["run", *STAGES, "iterate"],
                   help="the command to plan (default: run)")
    _common(p, dry_run=False)
    p.add_argument("--until", choices=STAGES, help="with `run`: stop after this stage")
    p = sub.add_parser("show", help="print a finished run's result again (the table and the "
                       "evaluation compare printed; an iterate run's report)")
    p.add_argument("--recipe", help="without --output-dir: show runs/<this recipe's name> "
                   "(default: runs/default)")
    p.add_argument("--output-dir", type=Path, help="run directory (default: runs/default)")
    p.set_defaults(overrides=[])
    p = sub.add_parser("push", help="push the dataset or the adapter to the Hugging Face Hub")
    p.add_argument("what", choices=["dataset", "adapter"],
                   help="the pairs dataset (pairs/dataset) or the trained adapter (train/adapter)")
    p.add_argument("--repo-id", help="e.g. user/name (default: the recipe's push section)")
    p.add_argument("--private", action="store_true",
                   help="create the Hub repository as private (default: push.private)")
    _recipe_args(p)
    p.set_defaults(force=False)
    return parser


def resolve(args: argparse.Namespace) -> tuple[Recipe, Path]:
    """Recipe precedence: --recipe, else the run directory's recipe.yaml, else 'default'.
    Nothing is written here: the recipe is recorded only when a stage is about to change."""
    if args.output_dir is not None:
        args.output_dir = args.output_dir.expanduser()
    existing = args.output_dir / "recipe.yaml" if args.output_dir else None
    if args.recipe is None and existing is not None and existing.is_file():
        recipe = load_recipe(existing)
        recipe = apply_overrides(recipe, args.overrides)
    else:
        recipe = load_recipe(args.recipe, args.overrides)
    run_dir = args.output_dir or Path("runs") / recipe.name
    return recipe, run_dir


def command_stages(args: argparse.Namespace) -> list[str]:
    if args.command == "run":
        return list(STAGES[: STAGES.index(args.until) + 1] if args.until else STAGES)
    return [args.command] if args.command in STAGES else []


def forced_stages(args: argparse.Namespace, steps: list, run_dir: Path, recipe: Recipe,
                  argv: list[str]) -> set[str]:
    """The stages to redo. `--force` on `run` redoes the stages from the first whose resolved
    configuration changed (every stage when none did); on one stage, that stage. Without
    `--force` a changed stage is refused here, before anything changes, naming the command."""
    from prefloop.plan import describe_change

    first = next((s for s in steps if s.needs_force), None)
    if args.force:
        if args.command == "run" and first is not None:
            names = [s.name for s in steps]
            return set(names[names.index(first.name):])
        return {s.name for s in steps}
    if first is None:
        return set()
    command = shlex.join(["prefloop", *argv, "--force"])
    after = " and the stages after it" if args.command == "run" else ""
    if first.state == "redone":
        redone = redone_inputs(run_dir / first.name)[0]
        what = (f"stage '{first.name}' was built on the output of '{redone}' before "
                f"'{redone}' was redone")
    elif first.state == "changed":
        what = (f"stage '{first.name}' finished with a different configuration"
                f"{describe_change(run_dir, recipe)}")
    else:
        what = f"holds a partial '{first.name}' stage from a different configuration"
    raise PrefloopError(f"{run_dir / first.name}: {what}; to redo {first.name}{after} run: "
                        f"{command} (or use a new --output-dir)")


@contextmanager
def writing(run_dir: Path, recipe: Recipe):
    """Hold the run directory's lock, record the recipe, and undo on failure: stages begun and
    failed are rolled back (`artifacts.transaction`), and when no stage changed, recipe.yaml is
    put back as it was, so a refused or failed command leaves the directory as it found it."""
    from prefloop import distributed
    from prefloop.preflight import os_error_message

    main = distributed.is_main()
    existed = run_dir.exists()
    lock = RunLock(run_dir)
    claimed = False
    if main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            claimed = claim_run_dir(run_dir)  # the marker first: the folder is prefloop's
            lock.acquire()
        except OSError as e:
            raise PrefloopError(f"--output-dir {run_dir}: cannot write the run directory "
                                f"({os_error_message(e)})") from None
    recorded = RunDir(run_dir).recipe
    before = _state_files(run_dir)
    try:
        text = dump_recipe(recipe)
        if main and before.get(recorded) != text.encode("utf-8"):
            atomic_write_text(recorded, text)
        with transaction():
            yield
    except Exception:
        if main:
            _restore_recipe(run_dir, before)
            if claimed and existed:  # a failed command leaves a folder it found as it was
                (run_dir / RUN_MARKER).unlink(missing_ok=True)
        raise
    finally:
        if main:
            lock.release()
            _unclaim_if_unused(run_dir, claimed, existed)


def _unclaim_if_unused(run_dir: Path, claimed: bool, existed: bool) -> None:
    """A command that wrote nothing leaves the folder as it found it: no marker, no new folder."""
    if not run_dir.is_dir() or {p.name for p in run_dir.iterdir()} - {RUN_MARKER}:
        return
    if claimed:
        (run_dir / RUN_MARKER).unlink(missing_ok=True)
    if not existed and not any(run_dir.iterdir()):
        run_dir.rmdir()


def _state_files(run_dir: Path) -> dict[Path, bytes]:
    """recipe.yaml and every manifest and partial marker, by path (what says what is done)."""
    out = {}
    paths = [RunDir(run_dir).recipe, *Path(run_dir).rglob("manifest.json"),
             *Path(run_dir).rglob("in_progress.json")] if Path(run_dir).is_dir() else []
    for path in paths:
        try:
            out[path] = path.read_bytes()
        except OSError:
            pass
    return out


def _restore_recipe(run_dir: Path, before: dict[Path, bytes]) -> None:
    recorded = RunDir(run_dir).recipe
    now = _state_files(run_dir)
    if {k: v for k, v in now.items() if k != recorded} != \
            {k: v for k, v in before.items() if k != recorded}:
        return  # a stage finished or kept work with the new recipe: it describes them
    try:
        if recorded in before:
            if now.get(recorded) != before[recorded]:
                atomic_write_text(recorded, before[recorded].decode("utf-8"))
        else:
            recorded.unlink(missing_ok=True)
    except OSError:
        pass


def run_stage(stage: str, recipe: Recipe, run_dir: Path, force: bool) -> Path:
    if stage not in (*STAGES, "iterate"):
        raise PrefloopError(f"unknown stage '{stage}'")
    module = importlib.import_module(f"prefloop.stages.{stage}")
    where = run_dir if stage == "iterate" else run_dir / stage
    print(f"[prefloop] {stage} -> {where}", file=sys.stderr)
    before, t0 = read_manifest(where), time.time()
    try:
        folder = module.run(recipe, run_dir, force=force)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(e):
            raise
        raise PrefloopError(out_of_memory(stage, e)) from None
    # stdout: one line per stage (what it produced); a stage skipped as finished says so
    skipped = before is not None and before == read_manifest(where)
    line = stage_line(stage, where, None if skipped else time.time() - t0)
    if line and distributed.is_main():
        print(line, flush=True)
    return folder


def is_out_of_memory(err: BaseException) -> bool:
    return (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
            or "out of memory" in str(err).lower())


# What to lower, per stage, when the accelerator (or the host) runs out of memory.
MEMORY_SETTINGS = {
    "generate": "generate.batch_size (e.g. --set generate.batch_size=64) or generate.max_new_tokens",
    "rank": "rank.batch_size (e.g. --set rank.batch_size=8) or, for the judge, "
            "rank.judge_max_new_tokens",
    "train": "train.batch_size with a larger train.grad_accum, train.max_length, or set "
             "train.gradient_checkpointing=true or train.qlora=true",
    "compare": "compare.max_new_tokens or the number of held-out instructions",
    "iterate": "iterate.n_candidates, iterate.max_new_tokens or train.batch_size",
}


def out_of_memory(stage: str, err: BaseException) -> str:
    """One line for an out-of-memory error: where, and which setting to lower; what was
    already written stays (the same command resumes)."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    fix = MEMORY_SETTINGS.get(stage, "the batch sizes of this stage")
    return (f"{stage}: out of memory ({first[:160]}); lower {fix}, then run the same command "
            "again to resume")


def _quiet_libraries() -> None:
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # PEFT 0.21 (PeftModel.__init__) and TRL 1.16 (disable_gradient_checkpointing, on every DPO
    # step) read the model's `is_gradient_checkpointing`, which transformers 5.2x deprecated in
    # favour of `is_activation_checkpointing`; prefloop itself never reads it (train.dpo_config
    # already passes activation_checkpointing). Only that message, only from transformers.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                            category=FutureWarning, module="transformers.modeling_utils")


def planned_argv(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """The command line a plan describes: `plan [what] ...` and `--dry-run` taken out."""
    argv = [a for a in argv if a != "--dry-run"]
    if argv[:1] == ["plan"]:
        argv = argv[1:]
        if argv[:1] != [args.command]:
            argv = [args.command, *argv]
    return argv


def dispatch(args: argparse.Namespace, argv: list[str] | None = None) -> None:
    from prefloop import distributed, preflight
    from prefloop.plan import plan

    argv = argv if argv is not None else sys.argv[1:]
    if args.command == "show":
        from prefloop.stages.results import show

        recipe, run_dir = resolve(args)
        if (run_dir / "recipe.yaml").is_file():  # what the run used, whichever --recipe found it
            recipe = load_recipe(run_dir / "recipe.yaml")
        print(show(recipe, run_dir), flush=True)
        return
    if args.command == "plan":
        args.command, args.dry_run = args.what, True
    dry_run = getattr(args, "dry_run", False)
    if dry_run:
        argv = planned_argv(args, argv)
    else:
        distributed.topology()  # under accelerate launch: one GPU per process, before any load
    recipe, run_dir = resolve(args)
    preflight.check_output_dir(run_dir)
    stages = command_stages(args)
    recipe_file = Path(args.recipe) if args.recipe and args.recipe not in SHIPPED_RECIPES else None
    preflight.check_ownership(run_dir, stages, args.command, recipe_file, recipe)
    steps = plan(recipe, run_dir, stages) if stages else []
    try:
        preflight.check(recipe, stages, args.command, run_dir,
                        repo_id=getattr(args, "repo_id", None),
                        todo=[s.name for s in steps if s.work] if stages else None)
        forced = forced_stages(args, steps, run_dir, recipe, argv)
        if args.command == "iterate" and not args.force:
            from prefloop.stages.iterate import check_resume

            check_resume(recipe, run_dir, argv)
        if dry_run:
            from prefloop.plan import check_upstream

            check_upstream(recipe, run_dir, steps)
    except PrefloopError as e:
        if not dry_run:
            raise
        print_plan(args, recipe, run_dir, steps, set())
        raise PrefloopError(f"the command would be refused: {e}") from None
    if dry_run:
        print_plan(args, recipe, run_dir, steps, forced)
        return
    if stages and not forced and not any(s.work for s in steps):  # nothing to do: read only
        finished(args, recipe, run_dir, stages)
        return
    _quiet_libraries()
    with writing(run_dir, recipe):
        if args.command == "push":
            from prefloop import hub

            hub.push(args.what, recipe, run_dir, repo_id=args.repo_id, private=args.private)
            return
        if args.command == "iterate":
            run_stage("iterate", recipe, run_dir, args.force)
            return
        for stage in stages:
            run_stage(stage, recipe, run_dir, stage in forced)
        if args.command == "run":
            if stages == list(STAGES):
                from prefloop import hub

                hub.push_if_configured(recipe, run_dir)
            print(f"[prefloop] done: {run_dir}", file=sys.stderr)


def print_plan(args: argparse.Namespace, recipe: Recipe, run_dir: Path, steps: list,
               forced: set[str]) -> None:
    from prefloop.plan import describe, describe_iterate

    if args.command == "iterate":
        print(describe_iterate(recipe, run_dir), flush=True)
    else:
        print(describe(recipe, run_dir, args.command, steps, forced), flush=True)


def finished(args: argparse.Namespace, recipe: Recipe, run_dir: Path, stages: list[str]) -> None:
    """Every stage of the command finished with this configuration: stdout gets the same one
    line per stage as a run that did the work; `compare` prints its result again first."""
    from prefloop.stages.results import REPORT, show

    if args.command == "compare":
        print(show(recipe, run_dir), flush=True)
    for stage in stages:
        line = stage_line(stage, run_dir / stage, None)
        print(line or f"[prefloop] {stage}: finished with this configuration, kept", flush=True)
    report = run_dir / "compare" / REPORT
    if "compare" in stages and report.exists():  # a run of an older prefloop has none
        print(f"[prefloop] result: {report} (`prefloop show --output-dir {run_dir}` prints it)",
              file=sys.stderr)
    if args.command == "run":
        print(f"[prefloop] done: {run_dir}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from prefloop.hub import configure_network

        configure_network()  # before anything asks the Hub: no request waits forever
        dispatch(args, argv)
    except PrefloopError as e:  # no credentials of a URL in what is printed
        print(f"prefloop: error: {redact_url(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # permissions, not a folder, disk full, file too large, ...
        from prefloop.preflight import os_error_message

        print(f"prefloop: error: {redact_url(os_error_message(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prefloop: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
