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
import shlex
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

from prefloop import distributed
from prefloop.errors import PrefloopError, redact_url

STAGES = ("instructions", "generate", "rank", "pairs", "train", "compare")


class RunDir:
    """Every artifact of a run directory by name: the one place that spells the layout.

    A round of the iterate loop (rounds/<t>/) is a run directory of its own.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def __fspath__(self) -> str:
        return str(self.root)

    def stage(self, name: str) -> Path:
        return self.root / name

    def upstream(self, stage: str) -> str:
        """The config hash a finished stage recorded (chains invalidation downstream)."""
        return upstream_hash(self.root, stage)

    def pushed_dataset_id(self) -> str | None:
        """The Hub repository the pairs dataset was pushed to, if it was."""
        if not self.pushed_dataset.exists():
            return None
        return json.loads(self.pushed_dataset.read_text(encoding="utf-8")).get("repo_id")

    def round(self, t: int) -> RunDir:
        return RunDir(self.root / "rounds" / str(t))

    recipe = property(lambda self: self.root / "recipe.yaml")
    train_instructions = property(lambda self: self.root / "instructions" / "train.jsonl")
    heldout_instructions = property(lambda self: self.root / "instructions" / "heldout.jsonl")
    generations = property(lambda self: self.root / "generate" / "generations.jsonl")
    scores = property(lambda self: self.root / "rank" / "scores.jsonl")
    dropped = property(lambda self: self.root / "pairs" / "dropped.jsonl")
    dataset = property(lambda self: self.root / "pairs" / "dataset")
    pushed_dataset = property(lambda self: self.root / "pairs" / "push.json")
    adapter = property(lambda self: self.root / "train" / "adapter")
    train_log = property(lambda self: self.root / "train" / "log.jsonl")
    curves = property(lambda self: self.root / "train" / "curves.png")
    trainer_scratch = property(lambda self: self.root / "train" / "trainer")
    merged_model = property(lambda self: self.root / "model")  # iterate: M_{t+1} of round t
    report = property(lambda self: self.root / "report.md")


class Stage:
    """One stage folder's lifecycle: `begin` (skip when finished, resume a partial run of the
    same config, start afresh with force), `finish` (the manifest), `abandon` (no manifest and no
    partial marker: the next run starts afresh).

    Several processes (`accelerate launch`): the main process begins first and alone deletes
    or writes; the others wait for it at each step.
    """

    def __init__(self, folder: Path, name: str, config: Any, inputs: Iterable[Path] = ()):
        """`inputs`: the finished stage folders this stage reads (`Upstream.folders`); the
        manifest records their finish ids, so a later redo of one makes this stage stale
        (`redone_inputs`)."""
        self.folder, self.name = Path(folder), name
        self.hash = config_hash(config)
        self.inputs = [Path(p) for p in inputs]
        self.started = time.time()
        self._undo: dict | None = None  # how to put the folder back if this run fails

    def begin(self, *, force: bool = False, restart=None) -> bool:
        """True when the stage already finished with this config (skip it). `restart()` runs in
        the main process when the stage (re)starts, e.g. to drop what a killed run left.

        With `force` the finished stage is not deleted but renamed to a hidden sibling
        (`.<name>.previous`) until the new one finishes; inside `transaction()` a failure puts
        it back."""
        with distributed.main_first():
            main = distributed.is_main()
            before = _folder_state(self.folder) if main else None
            if begin_stage(self.folder, self.name, self.hash, force=force and main):
                return True
            if main:
                before["forced"] = force
                self._undo = before
                _OPEN.append(self)
            if restart is not None and main:
                restart()
        self.started = time.time()
        return False

    def finish(self, counts: dict | None = None, extra: dict | None = None) -> Path:
        if distributed.is_main():
            test_point(self.name, "finish")
            write_manifest(self.folder, self.name, self.hash, started=self.started,
                           counts=counts, extra=extra,
                           inputs=input_ids(self.folder, self.inputs))
            shutil.rmtree(aside_path(self.folder), ignore_errors=True)
            self._close()
        distributed.barrier()  # the next stage reads this manifest in every process
        return self.folder

    def abandon(self) -> None:
        """Nothing here is worth resuming (e.g. pairs found no pair): the partial marker says so
        (no config hash), so the folder stays prefloop's and the next run starts it afresh."""
        atomic_write_json(self.folder / "in_progress.json",
                          {"stage": self.name, "config_hash": None, "abandoned": True})
        self._close()

    def _close(self) -> None:
        self._undo = None
        if self in _OPEN:
            _OPEN.remove(self)

    def rollback(self) -> None:
        """Undo a failed (re)start: restore a finished stage a `force` put aside, or drop the
        marker (and the folder) of a start that computed nothing; work done is kept to resume."""
        before, self._undo = self._undo, None
        self._close()
        if before is None:
            return
        aside = aside_path(self.folder)
        if before["forced"] and aside.exists():
            shutil.rmtree(self.folder, ignore_errors=True)
            os.replace(aside, self.folder)
            return
        marker = self.folder / "in_progress.json"
        if before["marker"] or not self.folder.exists():
            return
        now = {p.name for p in self.folder.iterdir()} - {marker.name}
        if now <= before["entries"]:  # nothing new was computed
            marker.unlink(missing_ok=True)
            if not before["existed"] and not now:
                self.folder.rmdir()


_OPEN: list[Stage] = []  # stages begun in this process and not finished (main process only)


def _folder_state(folder: Path) -> dict:
    folder = Path(folder)
    existed = folder.is_dir()
    return {"existed": existed,
            "entries": {p.name for p in folder.iterdir()} if existed else set(),
            "marker": (folder / "in_progress.json").exists(),
            "aside": aside_path(folder).exists()}


class transaction:  # noqa: N801 (used as a context manager)
    """Stages begun inside the block and not finished are rolled back when it raises an
    Exception (`Stage.rollback`); an interrupt (Ctrl-C, kill) keeps them as they are, to resume."""

    def __enter__(self):
        self.mark = len(_OPEN)
        return self

    def __exit__(self, kind, err, tb):
        opened = _OPEN[self.mark:]
        if kind is not None and issubclass(kind, Exception):
            for stage in reversed(opened):
                stage.rollback()
        return False


def aside_path(stage_dir: Path) -> Path:
    """Where `--force` keeps a finished stage until its replacement finishes."""
    stage_dir = Path(stage_dir)
    return stage_dir.parent / f".{stage_dir.name}.previous"


# --- test hook ---------------------------------------------------------------------------------

_HITS: dict[tuple[str, str], int] = {}


def test_point(stage: str, point: str) -> None:
    """Fault-injection hook for tests/test_faults.py, the one place it is checked:
    PREFLOOP_TEST_KILL_AT=<stage>:<point>[:<n>] kills this process (SIGKILL) the n-th time
    (default 1) `point` is reached in `stage` (points: append, finish);
    PREFLOOP_TEST_WAIT_AT=<stage>:<point>=<file> waits there until <file> exists (600 s max:
    long enough that a test on a loaded machine interrupts it while it waits)."""
    kill, wait = os.environ.get("PREFLOOP_TEST_KILL_AT"), os.environ.get("PREFLOOP_TEST_WAIT_AT")
    if not kill and not wait:
        return
    n = _HITS[stage, point] = _HITS.get((stage, point), 0) + 1
    if kill:
        parts = kill.split(":")
        if parts[:2] == [stage, point] and n == (int(parts[2]) if len(parts) > 2 else 1):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
    if wait:
        where, _, file = wait.partition("=")
        if where == f"{stage}:{point}" and n == 1:
            deadline = time.time() + 600
            while not Path(file).exists() and time.time() < deadline:
                time.sleep(0.05)


# --- ownership: prefloop writes only into a run directory it made ------------------------------

RUN_MARKER = ".prefloop-run"  # written first into every run directory prefloop makes
LOCK_NAME = ".prefloop.lock"
# Every name prefloop writes at the top of a run directory (iterate's loop included); a stage's
# or the loop's `--force` keeps the finished one aside as `.<name>.previous`.
RUN_PARTS = ("recipe.yaml", *STAGES, "rounds", "report.md", "report.json", "plots", LOCK_NAME,
             RUN_MARKER)


def is_run_part(name: str) -> bool:
    """True for a top-level name prefloop writes (an artifact, a kept-aside stage, a temp file)."""
    if name in RUN_PARTS or name == ".iterate.previous":
        return True
    if name.startswith(".") and name.endswith(".previous"):
        return name[1:-len(".previous")] in RUN_PARTS
    return name.startswith(".recipe.yaml.") and name.endswith(".tmp")  # atomic_write_text's


def ownership_problem(root: Path) -> str | None:
    """Why prefloop may not write into `root` (None when it may): it is new, empty, marked as
    prefloop's, or a run directory of a prefloop older than the marker (only prefloop's names,
    and a stage's manifest or partial marker among them)."""
    root = Path(root)
    if not root.is_dir():
        return None
    names = sorted(p.name for p in root.iterdir() if p.name != LOCK_NAME)  # a killed run's lock
    if not names or RUN_MARKER in names:
        return None
    foreign = [n for n in names if not is_run_part(n)]
    if not foreign and _has_stage_record(root):
        return None
    shown = ", ".join(repr(n) for n in (foreign or names)[:3])
    more = f" and {len(foreign or names) - 3} more" if len(foreign or names) > 3 else ""
    return (f"holds files prefloop did not write ({shown}{more}) and no {RUN_MARKER} marker; "
            "prefloop writes only into a new or empty folder or a run directory it made: give "
            "another --output-dir (e.g. a new folder inside this one)")


def _has_stage_record(root: Path) -> bool:
    stages = [root / s for s in STAGES] + [root / "rounds"]
    return any((s / "manifest.json").is_file() or (s / "in_progress.json").is_file()
               or (s / "loop.json").is_file() for s in stages)


def stage_folder_problem(folder: Path) -> str | None:
    """Why a stage folder is not prefloop's to replace or delete: it holds files but neither a
    manifest nor a partial marker (prefloop writes one of them before anything else)."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    if (folder / "manifest.json").exists() or (folder / "in_progress.json").exists():
        return None
    return (f"{folder}: holds files prefloop did not write (no manifest.json or in_progress.json);"
            " move them out of the run directory, or use another --output-dir")


def claim_run_dir(root: Path) -> bool:
    """Mark `root` as a prefloop run directory (before anything else is written into it);
    True when the marker was written now."""
    marker = Path(root) / RUN_MARKER
    if marker.exists():
        return False
    from importlib.metadata import PackageNotFoundError, version

    try:
        made_by = version("prefloop")
    except PackageNotFoundError:
        made_by = "unknown"
    atomic_write_json(marker, {"prefloop": made_by, "note": "a run directory prefloop made; it "
                               "writes and deletes only its own files here"})
    return True


# --- the run-directory lock --------------------------------------------------------------------

class RunLock:
    """One writer per run directory: an exclusive `flock` on `<run>/.prefloop.lock`, which also
    records the holder's pid and host for the message a second run gets. The kernel drops the
    lock when its process dies, so a lock left by a killed run is simply taken over."""

    NAME = LOCK_NAME

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / self.NAME
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_fd(fd)
                os.close(fd)
                raise PrefloopError(
                    f"{self.root}: another prefloop command is writing this run directory "
                    f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
                    f"started {holder.get('started', '?')}: {holder.get('command', '?')}); "
                    "wait for it to finish, or use another --output-dir") from None
            except BaseException:
                os.close(fd)
                raise
            try:  # the file we locked may have been unlinked by the holder we waited for
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        import sys

        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join(["prefloop", *sys.argv[1:]])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: a waiter re-checks the inode
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _read_fd(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}


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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, obj: Any) -> None:
    text = json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False) + "\n"
    atomic_write_text(path, redact_url(text))  # manifests never hold a URL's credentials


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
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # disk full, file too large: cut back to the last whole record
        try:
            os.truncate(path, size)
        except OSError:
            pass
        if e.filename is None:
            e.filename = str(path)
        raise
    test_point(path.parent.name, "append")


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def iter_jsonl(path: Path, *, allow_partial_tail: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object); malformed JSON raises a PrefloopError naming file and line."""
    path = Path(path)
    if not path.exists():
        raise PrefloopError(f"{path}: file not found; run the stage that writes it first")
    lines = read_text(path).split("\n")
    last = len(lines) - 1  # the text after the final newline ("" when the file ends cleanly)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except RecursionError:
            raise PrefloopError(f"{path}:{i + 1}: JSON nested too deeply to read; give one "
                                "flat record per line") from None
        except json.JSONDecodeError as e:
            if allow_partial_tail and i == last:
                return
            raise PrefloopError(
                f"{path}:{i + 1}: malformed JSON ({e.msg}); fix or delete that line"
            ) from None
        if not isinstance(obj, dict):
            raise PrefloopError(f"{path}:{i + 1}: expected a JSON object per line")
        yield i + 1, obj


def read_text(path: Path) -> str:
    """A UTF-8 text file (a byte-order mark is accepted); a file that is not UTF-8, or a folder,
    is a PrefloopError naming the path and the fix."""
    path = Path(path)
    if path.is_dir():
        raise PrefloopError(f"{path}: is a folder, not a file; give the path of a file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise PrefloopError(
            f"{path}:{line}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
            "re-save the file as UTF-8") from None


def read_jsonl(path: Path, *, allow_partial_tail: bool = False) -> list[dict]:
    return [obj for _, obj in iter_jsonl(path, allow_partial_tail=allow_partial_tail)]


def hashable(obj: Any) -> Any:
    """to_jsonable, less the dataclass fields marked `field(metadata={"added": version})` that
    hold their default: a setting added in a later version leaves the hash of a stage that ran
    before it unchanged, so an upgrade neither refuses nor redoes finished work."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: hashable(getattr(obj, f.name)) for f in fields(obj)
                if not (f.metadata.get("added") and getattr(obj, f.name) == f.default)}
    if isinstance(obj, dict):
        return {k: hashable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [hashable(v) for v in obj]
    return to_jsonable(obj)


def config_hash(obj: Any) -> str:
    # credentials are not configuration: a recorded (redacted) recipe hashes as the one it records
    blob = redact_url(json.dumps(hashable(obj), sort_keys=True, ensure_ascii=False))
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


def prefloop_source() -> dict:
    """prefloop's version and, from a git checkout, its commit: what reproduces a run besides
    the recipe (`prefloop.version.source`)."""
    from prefloop.version import source

    return source()


def command_line() -> str:
    """The command that is running, as the user would type it."""
    return " ".join(["prefloop", *map(shlex.quote, sys.argv[1:])])


def manifest_path(stage_dir: Path) -> Path:
    return Path(stage_dir) / "manifest.json"


def read_manifest(stage_dir: Path) -> dict | None:
    """A stage's manifest (None when absent); one cut or edited by hand is a PrefloopError."""
    path = manifest_path(stage_dir)
    if not path.exists():
        return None
    try:
        m = json.loads(read_text(path))
    except (ValueError, RecursionError) as e:
        m = e
    if not isinstance(m, dict):
        why = f" ({m.msg})" if isinstance(m, json.JSONDecodeError) else ""
        raise PrefloopError(f"{path}: not a manifest{why}; it was cut or edited by hand: delete "
                            "it, then run the same command again to redo or resume that stage")
    return m


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
                   counts: dict | None = None, extra: dict | None = None,
                   inputs: dict | None = None) -> None:
    atomic_write_json(manifest_path(stage_dir), {
        "stage": stage,
        "status": "done",
        "config_hash": cfg_hash,
        # new at every finish; a stage built on this one records it among its inputs
        "finish_id": uuid.uuid4().hex[:16],
        "inputs": inputs or {},
        "counts": counts or {},
        "seconds": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": package_versions(),
        "command": command_line(),
        "prefloop": prefloop_source(),
        **(extra or {}),
    })
    (Path(stage_dir) / "in_progress.json").unlink(missing_ok=True)


def begin_stage(stage_dir: Path, stage: str, cfg_hash: str, *, force: bool = False) -> bool:
    """Prepare a stage folder; return True when the stage is already finished (skip it).

    A partial folder from an interrupted run with the same config is kept so the stage resumes;
    one from another config is an error unless `force`, which starts the stage afresh.
    """
    stage_dir = Path(stage_dir)
    problem = stage_folder_problem(stage_dir)
    if problem:
        raise PrefloopError(problem)
    aside = aside_path(stage_dir)
    if aside.exists() and not force:  # a forced redo was killed before it finished
        current = read_manifest(stage_dir)
        if current is not None and current.get("status") == "done":
            shutil.rmtree(aside)  # killed between its manifest and the clean-up
        elif _done_with(read_manifest(aside), cfg_hash):  # the old config asked for again
            shutil.rmtree(stage_dir, ignore_errors=True)
            os.replace(aside, stage_dir)
    if force and stage_dir.exists():
        if aside.exists():  # it already holds the last finished stage; drop the partial one
            shutil.rmtree(stage_dir)
        else:
            os.replace(stage_dir, aside)
    if stage_is_done(stage_dir, cfg_hash):
        return True
    marker = stage_dir / "in_progress.json"
    if marker.exists() and json.loads(marker.read_text(encoding="utf-8")).get("abandoned"):
        shutil.rmtree(stage_dir)  # an abandoned start of our own: nothing to resume
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


def _done_with(m: dict | None, cfg_hash: str) -> bool:
    return m is not None and m.get("status") == "done" and m.get("config_hash") == cfg_hash


def upstream_hash(run_dir: Path, stage: str) -> str:
    """The config hash a finished upstream stage recorded; chains invalidation downstream."""
    m = read_manifest(Path(run_dir) / stage)
    if m is None or m.get("status") != "done":
        raise PrefloopError(
            f"{Path(run_dir) / stage}: stage '{stage}' has not finished; run `prefloop {stage}` "
            f"--output-dir {run_dir} first (or `prefloop run`)"
        )
    return m["config_hash"]


class Upstream:
    """`RunDir.upstream` for a stage's configuration, remembering the stage folders it read:
    pass `folders` to the Stage as its inputs."""

    def __init__(self, run: RunDir):
        self.run, self.folders = run, []

    def __call__(self, stage: str) -> str:
        self.folders.append(self.run.stage(stage))
        return self.run.upstream(stage)


def input_ids(stage_dir: Path, inputs: Iterable[Path]) -> dict[str, str | None]:
    """The finish id of each input stage folder, by its path relative to the stage's own run
    directory (`../0/eval` for an earlier round's)."""
    return {os.path.relpath(p, Path(stage_dir).parent): (read_manifest(p) or {}).get("finish_id")
            for p in inputs}


def redone_inputs(stage_dir: Path) -> list[str]:
    """The inputs of a finished stage that finished again after it read them (a forced redo):
    what it was built on is gone, so it is stale. An input recorded before finish ids existed
    is never counted; a redo killed before it finished still has the old one aside."""
    m = read_manifest(stage_dir) or {}
    out = []
    for rel, fid in (m.get("inputs") or {}).items():
        if fid is None:
            continue
        folder = Path(stage_dir).parent / rel
        now = read_manifest(folder)
        if now is None or now.get("status") != "done":
            now = read_manifest(aside_path(folder))
        if (now or {}).get("finish_id") != fid:
            out.append(rel)
    return out


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure as a PNG atomically, readable by everyone (a report), and close
    it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
