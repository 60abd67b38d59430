import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIMA = REPO.parent / "shared" / "data" / "lima_prompts.jsonl"
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ... under `pytest -n N`


def pytest_configure(config):
    """Under xdist each worker gets one torch thread (and so do the CLIs it starts): `make test`
    runs one worker per core, and two threads per worker would fight for the same cores."""
    if WORKER:
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """For `--dist loadgroup`: a module's slow tests share its expensive module fixtures (an
    embedded-model run, a server, a trained loop), so they go to one worker as a group; slow
    tests come first so that no worker is left with a long one at the end."""
    if not WORKER:
        return
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.partition("::")[0]))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def _cache_root(tmp_path_factory) -> str:
    """One cache for the session, shared by its xdist workers (their base temps are siblings), so
    the embedded model is converted once; prefloop.models locks the conversion."""
    base = tmp_path_factory.getbasetemp()
    return os.environ.get("PREFLOOP_TEST_CACHE") or str((base.parent if WORKER else base) / "cache")


@pytest.fixture(autouse=True)
def _isolated_cache(_cache_root, monkeypatch):
    """Keep the converted embedded model in one per-session cache, never the user's."""
    monkeypatch.setenv("PREFLOOP_CACHE_DIR", _cache_root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def lima_path() -> Path:
    if not LIMA.exists():
        pytest.skip(f"{LIMA} not found (../shared/data beside the repository)")
    return LIMA
