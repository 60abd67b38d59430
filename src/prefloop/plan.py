"""What a command will do to a run directory, known before it touches anything.

Each stage's manifest records the hash of its resolved configuration, chained to its upstream
stage's hash (`stage_config` in each stage module). `plan` predicts those hashes for a recipe
and compares them with the manifests on disk, so the CLI can say, before any model loads or any
file changes, which stages are finished, which must be (re)done and which finished with another
configuration: a changed setting redoes only the stages from the first changed one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from prefloop.artifacts import STAGES, aside_path, config_hash, read_manifest
from prefloop.config import Recipe, recipe_to_dict

# done: finished with this config; changed: finished with another one; aside: finished with
# this config but kept aside by a killed --force redo (the stage puts it back); partial: an
# interrupted run of this config (resumes); stale: an interrupted run of another config; todo:
# not started; unknown: its upstream is neither finished nor part of this command (the stage
# will say so)
STATES = ("done", "changed", "aside", "partial", "stale", "todo", "unknown")


@dataclass(frozen=True)
class StagePlan:
    name: str
    state: str
    hash: str | None

    @property
    def needs_force(self) -> bool:
        return self.state in ("changed", "stale")

    @property
    def work(self) -> bool:
        return self.state != "done"


def stage_module(stage: str):
    return importlib.import_module(f"prefloop.stages.{stage}")


def _state(folder: Path, cfg_hash: str) -> str:
    m = read_manifest(folder)
    if m is not None and m.get("status") == "done":
        return "done" if m.get("config_hash") == cfg_hash else "changed"
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

    def upstream(name: str) -> str:
        if name in predicted:
            h = predicted[name]
        else:
            m = read_manifest(run_dir / name)
            h = m.get("config_hash") if m and m.get("status") == "done" else None
        if h is None:
            raise LookupError(name)
        return h

    out = []
    for stage in stages:
        try:
            h = config_hash(stage_module(stage).stage_config(recipe, upstream))
        except LookupError:
            predicted[stage] = None
            out.append(StagePlan(stage, "unknown", None))
            continue
        predicted[stage] = h
        out.append(StagePlan(stage, _state(run_dir / stage, h), h))
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
