"""The version a command reports and a manifest records: the package's, and the git commit when
prefloop runs from a checkout."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from prefloop import __version__


def git_state(root: Path | None = None) -> tuple[str, bool] | None:
    """(full commit, whether tracked files differ from it) of the checkout holding this package;
    None when installed outside a git checkout or git is missing."""
    root = root or Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():  # a folder in a clone, a file in a worktree
        return None

    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None

    head = git("rev-parse", "HEAD")
    if head is None or head.returncode != 0:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head.stdout.strip(), bool(dirty and dirty.stdout.strip())


def git_commit(root: Path | None = None) -> str | None:
    """The short commit (+ ", uncommitted changes" when the tree differs), or None."""
    state = git_state(root)
    if state is None:
        return None
    short = subprocess.run(["git", "-C", str(root or Path(__file__).resolve().parents[2]),
                            "rev-parse", "--short", state[0]], capture_output=True, text=True,
                           timeout=10).stdout.strip()
    return short + (", uncommitted changes" if state[1] else "")


@functools.cache
def source() -> dict:
    """What a manifest records of prefloop itself: version, commit and dirty flag."""
    state = git_state()
    out: dict = {"version": __version__, "git_commit": state[0] if state else None}
    if state:
        out["git_dirty"] = state[1]
    return out


def version_text() -> str:
    """`prefloop 0.1.0` or `prefloop 0.1.0 (git 0f5780d)`."""
    commit = git_commit()
    return f"prefloop {__version__}" + (f" (git {commit})" if commit else "")
