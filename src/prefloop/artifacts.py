"""Run-directory layout, atomic writes, append-only JSONL, and per-stage manifests.

Every artifact is written so that a crash at any moment leaves either the old file or the new one
(`os.replace`), and JSONL logs are appended in whole batches with a repairable tail, which is what
makes each stage resumable.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from prefloop.errors import PrefloopError

STAGES = ("instructions", "generate", "rank", "pairs", "train", "compare")


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False) + "\n")


def to_jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def repair_jsonl_tail(path: Path) -> None:
    """Drop a half-written last line (no trailing newline) left by a killed process."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())


def append_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Append whole records in one write + fsync; a crash can only cut the last line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_jsonl_tail(path)
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not payload:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def iter_jsonl(path: Path, *, allow_partial_tail: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object); malformed JSON raises a PrefloopError naming file and line."""
    path = Path(path)
    if not path.exists():
        raise PrefloopError(f"{path}: file not found; run the stage that writes it first")
    lines = path.read_text(encoding="utf-8").split("\n")
    last = len(lines) - 1  # the text after the final newline ("" when the file ends cleanly)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if allow_partial_tail and i == last:
                return
            raise PrefloopError(
                f"{path}:{i + 1}: malformed JSON ({e.msg}); fix or delete that line"
            ) from None
        if not isinstance(obj, dict):
            raise PrefloopError(f"{path}:{i + 1}: expected a JSON object per line")
        yield i + 1, obj


def read_jsonl(path: Path, *, allow_partial_tail: bool = False) -> list[dict]:
    return [obj for _, obj in iter_jsonl(path, allow_partial_tail=allow_partial_tail)]


def config_hash(obj: Any) -> str:
    blob = json.dumps(to_jsonable(obj), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["prefloop", "torch", "transformers", "trl", "peft", "datasets", "huggingface_hub",
             "accelerate"]
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def manifest_path(stage_dir: Path) -> Path:
    return Path(stage_dir) / "manifest.json"


def read_manifest(stage_dir: Path) -> dict | None:
    path = manifest_path(stage_dir)
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def stage_is_done(stage_dir: Path, cfg_hash: str) -> bool:
    """True when the stage finished with this config; a finished stage with another config is an error."""
    m = read_manifest(stage_dir)
    if m is None or m.get("status") != "done":
        return False
    if m.get("config_hash") != cfg_hash:
        raise PrefloopError(
            f"{manifest_path(stage_dir)}: stage '{m.get('stage')}' finished with a different "
            "config; re-run with --force to redo it (and the stages after it) or use a new --output-dir"
        )
    return True


def write_manifest(stage_dir: Path, stage: str, cfg_hash: str, *, started: float,
                   counts: dict | None = None, extra: dict | None = None) -> None:
    atomic_write_json(manifest_path(stage_dir), {
        "stage": stage,
        "status": "done",
        "config_hash": cfg_hash,
        "counts": counts or {},
        "seconds": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": package_versions(),
        **(extra or {}),
    })
    (Path(stage_dir) / "in_progress.json").unlink(missing_ok=True)


def begin_stage(stage_dir: Path, stage: str, cfg_hash: str, *, force: bool = False) -> bool:
    """Prepare a stage folder; return True when the stage is already finished (skip it).

    A partial folder from an interrupted run with the same config is kept so the stage resumes;
    one from another config is an error unless `force`, which starts the stage afresh.
    """
    import shutil

    stage_dir = Path(stage_dir)
    if force and stage_dir.exists():
        shutil.rmtree(stage_dir)
    if stage_is_done(stage_dir, cfg_hash):
        return True
    marker = stage_dir / "in_progress.json"
    if marker.exists():
        started = json.loads(marker.read_text(encoding="utf-8")).get("config_hash")
        if started != cfg_hash:
            raise PrefloopError(
                f"{stage_dir}: holds a partial '{stage}' stage from a different config; "
                "re-run with --force to discard it or use a new --output-dir"
            )
    else:
        atomic_write_json(marker, {"stage": stage, "config_hash": cfg_hash})
    return False


def upstream_hash(run_dir: Path, stage: str) -> str:
    """The config hash a finished upstream stage recorded; chains invalidation downstream."""
    m = read_manifest(Path(run_dir) / stage)
    if m is None or m.get("status") != "done":
        raise PrefloopError(
            f"{Path(run_dir) / stage}: stage '{stage}' has not finished; run `prefloop {stage}` "
            f"--output-dir {run_dir} first (or `prefloop run`)"
        )
    return m["config_hash"]
