"""The README and docs/ against the repository: the quick start, make targets, links, the file list."""

import fnmatch
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.search(r"^\.PHONY:(.*)$", text, re.M).group(1).split())


def test_readme_is_short_and_its_quick_start_is_the_two_make_commands():
    assert len(README.splitlines()) < 200
    quick = README.split("## Quick start", 1)[1]
    block = quick.split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in block.splitlines()] == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    # the order a newcomer reads in
    heads = [h for h in re.findall(r"^## (.+)$", README, re.M)]
    assert heads[:4] == ["Quick start", "What you get, and how to read it", "Recipes",
                         "Results so far"]
    assert heads.index("On a GPU") > heads.index("Results so far")


def test_every_make_target_the_docs_name_exists():
    named = set(re.findall(r"\bmake ([a-z][\w-]*)", README + (ROOT / "docs/files.md").read_text()))
    assert named and named <= make_targets(), named - make_targets()


def test_every_relative_link_in_readme_and_docs_index_exists():
    for page in (ROOT / "README.md", ROOT / "docs" / "README.md"):
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text(encoding="utf-8")):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), (page, target)


def test_file_list_names_every_tracked_file():
    """docs/files.md: every file git tracks outside tests/ and fixtures matches one of its lines
    (a path, or a pattern such as bench/results_*.md)."""
    text = (ROOT / "docs" / "files.md").read_text(encoding="utf-8")
    block = text.split("```\n", 1)[1].split("```", 1)[0]
    patterns = [line.split()[0] for line in block.splitlines() if line.strip()]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    wanted = [f for f in tracked if not f.startswith(("tests/", "docs/findings/"))
              and f not in (".gitignore",)]
    missing = [f for f in wanted if not any(fnmatch.fnmatch(f, p) or f.startswith(p.rstrip("*"))
                                            and p.endswith("/") for p in patterns)]
    assert missing == [], missing
