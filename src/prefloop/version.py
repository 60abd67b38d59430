"""The version a command reports: the package's, and the git commit when run from a checkout."""

from __future__ import annotations

import subprocess
from pathlib import Path

from prefloop import __version__


def git_commit(root: Path | None = None) -> str | None:
    """The short commit of the checkout holding this package (+ ", uncommitted changes" when
    its tree differs); None when installed outside a git checkout or git is missing."""
    root = root or Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():  # a folder in a clone, a file in a worktree
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (", uncommitted changes" if dirty.stdout.strip() else "")


def version_text() -> str:
    """`prefloop 0.1.0` or `prefloop 0.1.0 (git 0f5780d)`."""
    commit = git_commit()
    return f"prefloop {__version__}" + (f" (git {commit})" if commit else "")
