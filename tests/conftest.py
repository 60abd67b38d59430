import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIMA = REPO.parent / "shared" / "data" / "lima_prompts.jsonl"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep the converted embedded model in one per-session cache, never the user's."""
    cache = os.environ.get("PREFLOOP_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "cache")
    monkeypatch.setenv("PREFLOOP_CACHE_DIR", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def lima_path() -> Path:
    if not LIMA.exists():
        pytest.skip(f"{LIMA} not found (../shared/data beside the repository)")
    return LIMA
