import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIMA = REPO.parent / "shared" / "data" / "lima_prompts.jsonl"
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ... under `pytest -n N`


def pytest_configure(config):
    """Under xdist each worker gets one torch thread (and so do the CLIs it starts): `make test`
    runs one worker per core, and two threads per worker would fight for the same cores."""
    if config.pluginmanager.hasplugin("xdist") and not WORKER:
        config.pluginmanager.register(SlowModulesTogether(), "prefloop-slow-modules-together")
    if WORKER:
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def _slow_list(basetemp: Path) -> Path:
    return basetemp / "slow-tests.txt"


def pytest_collection_modifyitems(config, items):
    """Under xdist: slow tests first, so that no worker is left with a long one at the end, and
    their ids in a file beside the workers' temp folders for the scheduler below."""
    if not WORKER:
        return
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    out = _slow_list(Path(config.option.basetemp).parent)
    tmp = out.with_name(f"{out.name}.{WORKER}")
    tmp.write_text("".join(f"{i.nodeid}\n" for i in items if _together(i)))
    os.replace(tmp, out)  # every worker writes the same list


def _together(item) -> bool:
    """A slow test that shares its module's expensive fixtures: `@pytest.mark.slow`. One that
    only runs long commands of its own is `@pytest.mark.slow(together=False)` and is scheduled
    on its own, like a fast test."""
    mark = item.get_closest_marker("slow")
    return mark is not None and mark.kwargs.get("together", True)


class SlowModulesTogether:
    """`--dist loadgroup`: a module's slow tests share its expensive module fixtures (an
    embedded-model run, a server, a trained loop), so they go to one worker as one unit; the fast
    tests go one by one. (xdist 3.8's own xdist_group marks do nothing on pytest 9.2, which no
    longer reads the node id xdist rewrites.) Registered only where xdist is active."""

    def pytest_xdist_make_scheduler(self, config, log):
        from xdist.scheduler import LoadScopeScheduling

        if config.getvalue("dist") != "loadgroup":
            return None
        slow = _slow_list(config._tmp_path_factory.getbasetemp())  # what xdist gives workers

        class Scheduling(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                if not hasattr(self, "_slow"):  # the workers wrote it before their collections
                    self._slow = set(slow.read_text().splitlines()) if slow.exists() else set()
                return nodeid.partition("::")[0] if nodeid in self._slow else nodeid

        return Scheduling(config, log)


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
