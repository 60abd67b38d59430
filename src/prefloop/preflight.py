"""Checks that need no model, run before a command changes anything: model names and paths,
Hub ids, sizes against the source, settings a later stage of the same command needs, and the
output directory itself. Each failure is one PrefloopError naming the key and the fix."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from prefloop.config import Recipe
from prefloop.errors import PrefloopError


def check_output_dir(run_dir: Path) -> None:
    """The run directory is a folder or can be made: not a file, not under a file."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise PrefloopError(f"--output-dir {run_dir}: is a file, not a folder; give a folder "
                            "path (existing or new)")
    for parent in run_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise PrefloopError(f"--output-dir {run_dir}: lies under {parent}, which is a "
                                    "file; give a folder path that is not inside a file")
            break


def check_ownership(run_dir: Path, stages: list[str], command: str,
                    recipe_file: Path | None = None, recipe: Recipe | None = None) -> None:
    """prefloop writes only into a run directory it made (or a new or empty folder), replaces
    only stage folders it wrote, and never writes over an input it reads."""
    from prefloop.artifacts import is_run_part, ownership_problem, stage_folder_problem

    run_dir = Path(run_dir)
    problem = ownership_problem(run_dir)
    if problem:
        raise PrefloopError(f"--output-dir {run_dir}: {problem}")
    for stage in stages:
        problem = stage_folder_problem(run_dir / stage)
        if problem:
            raise PrefloopError(problem)
    for key, value in _inputs(recipe, recipe_file):
        path = Path(value).expanduser()
        if not path.exists():
            continue
        try:
            rel = path.resolve().relative_to(run_dir.resolve())
        except (ValueError, OSError):
            continue
        own_record = key == "--recipe" and rel == Path("recipe.yaml")
        if not rel.parts or (is_run_part(rel.parts[0]) and not own_record):
            raise PrefloopError(f"{key}: {value} lies inside the run directory {run_dir}, where "
                                "prefloop writes its own files; move it out of --output-dir "
                                "(or choose another --output-dir)")


def _inputs(recipe: Recipe | None, recipe_file: Path | None) -> list[tuple[str, str]]:
    """The local paths a command reads: the recipe file, the source, the models."""
    out = [("--recipe", str(recipe_file))] if recipe_file is not None else []
    if recipe is not None:
        out += [("instructions.source", recipe.instructions.source),
                ("model.name", recipe.model.name), ("rank.judge_model", recipe.rank.judge_model),
                ("rank.pairrm_model", recipe.rank.pairrm_model),
                ("iterate.prompt_model", recipe.iterate.prompt_model)]
    return [(k, v) for k, v in out if v and v != "builtin"]


def check_models(recipe: Recipe, stages: list[str], command: str) -> None:
    """Every model name the command will load is a known name, a folder or a valid Hub id; the
    ranker says which of its rank.* keys name models."""
    from prefloop.models import check_model_name
    from prefloop.rankers import ranker_class

    check_model_name(recipe.model.name, "model.name")
    rank, used = recipe.rank, []
    if {"rank", "compare"} & set(stages) or command == "iterate":
        used.append(rank.ranker)
    if ("rank" in stages or command == "iterate") and rank.quality != "none":
        used.append(rank.quality)
    if "compare" in stages and recipe.compare.verdict and recipe.compare.ranker:
        used.append(recipe.compare.ranker)
    for name in dict.fromkeys(used):
        for key, model in ranker_class(name).models(rank).items():
            check_model_name(model, key)
    if command == "iterate" and recipe.iterate.prompt_model:
        check_model_name(recipe.iterate.prompt_model, "iterate.prompt_model")


def check_hub_ids(recipe: Recipe, command: str, repo_id: str | None = None) -> None:
    from prefloop.models import hub_id_problem

    ids = [("push.dataset_repo_id", recipe.push.dataset_repo_id),
           ("push.adapter_repo_id", recipe.push.adapter_repo_id), ("--repo-id", repo_id)]
    for key, value in ids:
        if value is None:
            continue
        reason = hub_id_problem(value) if "/" in value else "expected user/name"
        if reason:
            raise PrefloopError(f"{key}: '{value}' is not a valid Hub repository id ({reason}); "
                                "give user/name")


def is_local_source(source: str) -> bool:
    from prefloop.stages.instructions import LOCAL_SUFFIXES

    path = Path(source).expanduser()
    return source == "builtin" or path.exists() or path.suffix.lower() in LOCAL_SUFFIXES


def check_instructions(recipe: Recipe, stages: list[str], command: str) -> None:
    """n_heldout >= 1 when compare runs; a Hub source id is valid; a local source is readable
    and holds enough instructions (cheap to know: it is read here, before anything runs)."""
    cfg = recipe.instructions
    if "compare" in stages and command != "iterate" and cfg.n_heldout < 1:
        raise PrefloopError(
            f"instructions.n_heldout: is {cfg.n_heldout}, but compare runs on held-out "
            "instructions; set instructions.n_heldout >= 1 (e.g. --set instructions.n_heldout=10)"
            " or stop before compare with --until train")
    if "instructions" not in stages:
        return
    if not is_local_source(cfg.source):
        from prefloop.models import hub_id_problem

        reason = hub_id_problem(cfg.source)
        if reason:
            raise PrefloopError(f"instructions.source: '{cfg.source}' is neither a local file "
                                f"nor a valid Hub dataset id ({reason}); give a .jsonl/.json/"
                                ".csv/.parquet file, 'builtin' or user/name")
        return
    from prefloop.stages import instructions

    items = instructions.dedupe(instructions.load_source(cfg))
    heldout = recipe.iterate.eval_prompts if command == "iterate" else cfg.n_heldout
    if cfg.min_tokens is None and cfg.max_tokens is None and cfg.n_train + heldout > len(items):
        instructions.split(items, cfg.n_train, heldout, cfg.seed)  # raises its own message


def check_transfer(recipe: Recipe, stages: list[str], command: str) -> None:
    """compare.transfer_n fits the source (instructions.kinds set, records that name their
    split, enough held-out-topic instructions of untrained kinds) when compare or iterate will
    evaluate; checked here when the source is a local file read as it is (no token filter)."""
    cfg = recipe.instructions
    if not recipe.compare.transfer_n or ("compare" not in stages and command != "iterate"):
        return
    readable = cfg.source in ("builtin", "verifiable") or is_local_source(cfg.source)
    if readable and cfg.min_tokens is None and cfg.max_tokens is None:
        from prefloop.stages.instructions import transfer_items

        transfer_items(recipe)  # raises its own one-line message


def check(recipe: Recipe, stages: list[str], command: str, run_dir: Path, *,
          todo: list[str] | None = None, repo_id: str | None = None) -> None:
    """Everything checkable without a model, before the command changes anything; `todo`:
    the stages that will do work (default: all of `stages`)."""
    check_output_dir(run_dir)
    check_instructions(recipe, stages if todo is None else todo, command)
    check_transfer(recipe, stages if todo is None else todo, command)
    if command == "iterate":
        from prefloop.stages.iterate import check_recipe

        check_recipe(recipe)
    check_hub_ids(recipe, command, repo_id)
    check_models(recipe, stages, command)  # last: reading a model folder imports transformers


# --- OS-level failures as one line ----------------------------------------------------------

_FIXES = {
    errno.EACCES: "not writable; fix its permissions or choose another --output-dir",
    errno.EPERM: "not permitted; fix its permissions or choose another --output-dir",
    errno.EROFS: "on a read-only file system; choose a writable --output-dir",
    errno.ENOTDIR: "a part of this path is a file, not a folder; choose another path",
    errno.EISDIR: "is a folder where a file was expected; remove or rename it",
    errno.EEXIST: "already exists and is in the way; remove or rename it",
    errno.ENOSPC: "no space left on the device; free some space, then run the same command "
                  "again (finished work is kept and the stage resumes)",
    errno.EDQUOT: "disk quota exceeded; free some space, then run the same command again "
                  "(finished work is kept and the stage resumes)",
    errno.EFBIG: "over this file system's or the process's file-size limit, ulimit -f; raise "
                 "the limit or use another file system, then run the same command again "
                 "(finished work is kept and the stage resumes)",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter --output-dir",
    errno.EINTR: "interrupted; run the same command again to resume",
}


def os_error_message(e: OSError) -> str:
    """One line for an OSError: the path, what is wrong and the fix."""
    where = e.filename if e.filename is not None else "prefloop"
    if e.filename2 is not None:
        where = f"{e.filename} -> {e.filename2}"
    what = e.strerror or os.strerror(e.errno or 0) or type(e).__name__
    fix = _FIXES.get(e.errno or -1)
    return f"{where}: {what}" + (f" ({fix})" if fix else "")
