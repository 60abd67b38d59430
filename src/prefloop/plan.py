"""What a command will do to a run directory, known before it touches anything.

Each stage's manifest records the hash of its resolved configuration, chained to its upstream
stage's hash (`stage_config` in each stage module), and the finish ids of the stages it read
(`artifacts.redone_inputs`: a stage whose input finished again since is "redone"). `plan`
predicts those hashes for a recipe and compares them with the manifests on disk, so the CLI can
say, before any model loads or any file changes, which stages are finished, which must be
(re)done and which finished with another configuration: a changed setting redoes only the stages
from the first changed one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from prefloop.artifacts import STAGES, aside_path, config_hash, read_manifest, redone_inputs
from prefloop.config import Recipe, recipe_to_dict

# done: finished with this config; changed: finished with another one; redone: finished with
# this config on an input that a forced redo has replaced since; aside: finished with
# this config but kept aside by a killed --force redo (the stage puts it back); partial: an
# interrupted run of this config (resumes); stale: an interrupted run of another config; todo:
# not started; unknown: its upstream is neither finished nor part of this command (the stage
# will say so)
STATES = ("done", "changed", "redone", "aside", "partial", "stale", "todo", "unknown")


@dataclass(frozen=True)
class StagePlan:
    name: str
    state: str
    hash: str | None

    @property
    def needs_force(self) -> bool:
        return self.state in ("changed", "redone", "stale")

    @property
    def work(self) -> bool:
        return self.state != "done"


def stage_module(stage: str):
    return importlib.import_module(f"prefloop.stages.{stage}")


def _state(folder: Path, cfg_hash: str) -> str:
    m = read_manifest(folder)
    if m is not None and m.get("status") == "done":
        if m.get("config_hash") != cfg_hash:
            return "changed"
        return "redone" if redone_inputs(folder) else "done"
    old = read_manifest(aside_path(folder))
    if old is not None and old.get("status") == "done" and old.get("config_hash") == cfg_hash:
        return "aside"  # begin puts the finished stage back (a write, no computing)
    marker = Path(folder) / "in_progress.json"
    if marker.exists():
        import json

        try:
            started = json.loads(marker.read_text(encoding="utf-8")).get("config_hash")
        except ValueError:
            started = None
        return "partial" if started == cfg_hash else "stale"
    return "todo"


def plan(recipe: Recipe, run_dir: Path, stages: list[str] | tuple[str, ...]) -> list[StagePlan]:
    """The state of each of `stages` (in pipeline order) for `recipe` in `run_dir`."""
    run_dir = Path(run_dir)
    predicted: dict[str, str | None] = {}
    reads: list[str] = []  # the stages the current stage's configuration read

    def upstream(name: str) -> str:
        reads.append(name)
        if name in predicted:
            h = predicted[name]
        else:
            m = read_manifest(run_dir / name)
            h = m.get("config_hash") if m and m.get("status") == "done" else None
        if h is None:
            raise LookupError(name)
        return h

    out: list[StagePlan] = []
    for stage in stages:
        reads.clear()
        try:
            h = config_hash(stage_module(stage).stage_config(recipe, upstream))
        except LookupError:
            predicted[stage] = None
            out.append(StagePlan(stage, "unknown", None))
            continue
        predicted[stage] = h
        state = _state(run_dir / stage, h)
        if state == "done" and any(p.state == "redone" for p in out if p.name in reads):
            state = "redone"  # its input will be redone in turn
        out.append(StagePlan(stage, state, h))
    return out


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`section.key: old -> new` for every value that differs between two recipe dicts."""
    out = []
    for key in sorted(set(old) | set(new), key=lambda k: (list(new).index(k) if k in new else 99)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def recorded_recipe(run_dir: Path) -> dict | None:
    """The run directory's recipe.yaml as a dict (None when absent or unreadable)."""
    import yaml

    path = Path(run_dir) / "recipe.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def describe_change(run_dir: Path, recipe: Recipe) -> str:
    old = recorded_recipe(run_dir)
    if old is None:
        return ""
    keys = changed_keys(old, recipe_to_dict(recipe))
    if not keys:
        return ""
    more = f", and {len(keys) - 3} more" if len(keys) > 3 else ""
    return f" ({'; '.join(keys[:3])}{more})"


__all__ = ["STAGES", "StagePlan", "plan", "changed_keys", "describe_change", "stage_module"]


# --- what `prefloop plan` / `--dry-run` prints ----------------------------------------------

# Measured rates of the embedded model on a CPU (BENCHMARKS.md, "CPU: the main job on the
# embedded default": 2026-12-03, commit de1388e, this project's 2-core machine, idle, fp32).
# A stage of another model or device gets no estimate from these: only from its own manifests.
EMBEDDED_CPU = {
    "source": "BENCHMARKS.md, embedded model on 2 idle CPU cores, 2026-12-03",
    # generate: 116 s for 288 responses of at most 128 new tokens -> s per token of budget
    "generate_s_per_token": 116 / (288 * 128),
    # rank: the constraints ranker 0.1 s (no model); the judge 0.96 s per judged response with
    # the forced score (BENCHMARKS.md, "Rank time per judged response", 2026-12-01)
    "rank_s_per_judgment": {"constraints": 0.0, "judge": 0.96},
    "pairs_s": 0.4,
    # train (engine fast, batch 4, max_length 384): 100 s for 29 pairs x 2 epochs
    "train_s_per_pair_epoch": 100 / (29 * 2),
    "pairs_per_instruction": 29 / 48,  # what that run kept (used before pairs has run)
    # compare: 127 s for 60 held-out x 2 greedy answers of <= 128 tokens + 120 judge prompts
    "compare_s_per_item_token": 127 / (60 * 128),
}


def embedded_on_cpu(recipe: Recipe) -> bool:
    """The recipe runs the embedded model on the CPU (what EMBEDDED_CPU was measured on)."""
    from prefloop.models import EMBEDDED_GGUF

    if recipe.model.name not in EMBEDDED_GGUF or recipe.model.backend != "local":
        return False
    if recipe.model.device is not None:
        return recipe.model.device == "cpu"
    import torch

    return not torch.cuda.is_available()


def _pairs_count(recipe: Recipe, run_dir: Path) -> float:
    m = read_manifest(Path(run_dir) / "pairs")
    if m and m.get("status") == "done":
        return m.get("counts", {}).get("pairs", 0)
    return recipe.instructions.n_train * EMBEDDED_CPU["pairs_per_instruction"]


def rate_estimate(recipe: Recipe, run_dir: Path, stage: str) -> float | None:
    """Seconds `stage` takes by EMBEDDED_CPU's rates; None without a measured rate."""
    r, n = EMBEDDED_CPU, recipe.instructions.n_train
    if stage == "instructions":
        return 0.0
    if stage == "generate":
        return n * recipe.generate.k * recipe.generate.max_new_tokens * r["generate_s_per_token"]
    if stage == "rank":
        from prefloop.rankers import ranker_class

        per = r["rank_s_per_judgment"].get(recipe.rank.ranker)
        samples = ranker_class(recipe.rank.ranker).judgments(recipe.rank)
        return None if per is None else n * recipe.generate.k * samples * per
    if stage == "pairs":
        return r["pairs_s"]
    if stage == "train":
        return (_pairs_count(recipe, run_dir) * recipe.train.epochs
                * r["train_s_per_pair_epoch"])
    if stage == "compare":  # + the transfer check's 2 answers each, at generate's rate (no judge)
        c = recipe.compare
        return (recipe.instructions.n_heldout * c.max_new_tokens * r["compare_s_per_item_token"]
                + 2 * c.transfer_n * c.max_new_tokens * r["generate_s_per_token"])
    return None


def previous_seconds(run_dir: Path, stage: str) -> float | None:
    """How long the stage's last finished run in this directory took (any configuration)."""
    for folder in (Path(run_dir) / stage, aside_path(Path(run_dir) / stage)):
        m = read_manifest(folder)
        if m and m.get("status") == "done" and m.get("seconds") is not None:
            return float(m["seconds"])
    return None


STATE_TEXT = {"done": "done", "changed": "to redo: finished with another configuration",
              "redone": "to redo: built on a stage redone since",
              "aside": "done (kept aside by a killed --force; put back, no computing)",
              "partial": "to run: resumes an interrupted run", "stale":
              "to redo: an interrupted run of another configuration", "todo": "to run",
              "unknown": "refused: a stage before it has not finished"}


def check_upstream(recipe: Recipe, run_dir: Path, steps: list[StagePlan]) -> None:
    """Raise the error the first stage whose upstream has not finished would raise when run
    (a plan says so before running; the command itself finds out when it gets there)."""
    from prefloop.artifacts import RunDir

    for step in steps:
        if step.state == "unknown":
            stage_module(step.name).stage_config(recipe, RunDir(run_dir).upstream)


def stage_row(recipe: Recipe, run_dir: Path, step: StagePlan, forced: bool,
              on_cpu: bool) -> tuple[str, float | None]:
    """One stage's line of the plan and its estimated seconds (None: done or not known)."""
    from prefloop.summary import duration

    if step.state in ("done", "aside") and not forced:
        took = previous_seconds(run_dir, step.name)
        return (STATE_TEXT[step.state] + (f" (took {duration(took)})" if took else ""), None)
    if step.state == "unknown":
        return STATE_TEXT["unknown"], None
    what = "to redo (--force)" if forced and step.state == "done" else STATE_TEXT[step.state]
    est = rate_estimate(recipe, run_dir, step.name) if on_cpu else None
    last = previous_seconds(run_dir, step.name)
    if est is not None:
        return f"{what}; estimate {duration(est)} (measured rates)", est
    if last is not None:
        return f"{what}; estimate {duration(last)} (its last run here)", last
    return f"{what}; no estimate (no measured rate for this model and device)", None


def describe(recipe: Recipe, run_dir: Path, command: str, steps: list[StagePlan],
             forced: set[str]) -> str:
    """The plan as printed: the resolved recipe, each stage's state and estimate, the total."""
    from prefloop.config import dump_recipe
    from prefloop.summary import duration

    on_cpu = embedded_on_cpu(recipe)
    lines = [f"plan: prefloop {command} --output-dir {run_dir}", "", "resolved recipe:",
             *["  " + line for line in dump_recipe(recipe).rstrip().splitlines()], "", "stages:"]
    total, unknown = 0.0, []
    width = max((len(s.name) for s in steps), default=0)
    for step in steps:
        text, est = stage_row(recipe, run_dir, step, step.name in forced, on_cpu)
        lines.append(f"  {step.name:<{width}}  {text}")
        if est is not None:
            total += est
        elif step.work or step.name in forced:
            unknown.append(step.name)
    todo = [s for s in steps if s.work or s.name in forced]
    if not todo:
        lines += ["", "nothing to do: every stage finished with this configuration"]
        return "\n".join(lines)
    where = (f"rates: {EMBEDDED_CPU['source']}; several times that when other jobs share the "
             "cores, less on more cores" if on_cpu else "from this directory's earlier runs")
    note = f"; not counted: {', '.join(unknown)} (no estimate)" if unknown else ""
    lines += ["", f"estimated time: {duration(total)} ({where}){note}"]
    return "\n".join(lines)


ROUND_STEPS = ("instructions", "generate", "rank", "pairs", "train", "model", "eval")


def _folder_state(folder: Path) -> str:
    m = read_manifest(folder)
    if m is not None and m.get("status") == "done":
        return "done"
    return "partial" if (Path(folder) / "in_progress.json").exists() else "todo"


def describe_iterate(recipe: Recipe, run_dir: Path) -> str:
    """The iterate loop's plan: the resolved recipe and each round's steps, done or to run."""
    from prefloop.config import dump_recipe

    lines = [f"plan: prefloop iterate --output-dir {run_dir}", "", "resolved recipe:",
             *["  " + line for line in dump_recipe(recipe).rstrip().splitlines()], "", "rounds:"]
    rounds = Path(run_dir) / "rounds"
    lines.append(f"  0 (M1 on the held-out prompts): eval {_folder_state(rounds / '0' / 'eval')}")
    for t in range(1, recipe.iterate.rounds + 1):
        states = [f"{s} {_folder_state(rounds / str(t) / s)}" for s in ROUND_STEPS]
        lines.append(f"  {t}: " + ", ".join(states))
    lines += ["", "estimated time: no estimate (no measured rate for the loop on this model and "
              "device; BENCHMARKS.md times one round of the self-reward recipe on a GPU)"]
    return "\n".join(lines)
