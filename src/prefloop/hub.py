"""Push the preference dataset or the LoRA adapter to the Hugging Face Hub; every Hub request's
time limit and retries.

The token comes from huggingface_hub's usual sources (HF_TOKEN, `hf auth login`); prefloop never
reads, prints or stores it. A failed push leaves the local folder exactly as it was: the adapter
card's dataset link and base model are patched in memory (no staged copy on disk, so a killed
push leaves nothing behind).

Every Hub request (model, dataset and PairRM downloads, push) waits at most
PREFLOOP_HUB_TIMEOUT seconds (default 60) for an answer, and is tried PREFLOOP_HUB_RETRIES more
times (default 2) after a timeout or a connection error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from prefloop.artifacts import RunDir, atomic_write_json, read_manifest
from prefloop.config import Recipe
from prefloop.errors import PrefloopError

DATASET_LINK = "DATASET_LINK"  # placeholder the adapter card may hold
HUB = "https://huggingface.co"
TIMEOUT_ENV, RETRIES_ENV = "PREFLOOP_HUB_TIMEOUT", "PREFLOOP_HUB_RETRIES"


def _env_number(name: str, default: float, low: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= low or value == float("inf"):
        raise PrefloopError(f"{name}={raw[:40]!r}: expected a finite number >= {low:g}; unset "
                            "it or give e.g. 60")
    return value


def hub_timeout() -> float:
    """Seconds any Hub request waits for an answer (PREFLOOP_HUB_TIMEOUT, default 60)."""
    return _env_number(TIMEOUT_ENV, 60.0, 0.001)


def hub_retries() -> int:
    return int(_env_number(RETRIES_ENV, 2, 0))


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def configure_network() -> None:
    """Bound every Hub request: huggingface_hub's own download timeouts (read from the
    environment when it is first imported) and its HTTP client, which otherwise waits forever
    for a server that accepts and never answers. Call before anything imports huggingface_hub."""
    seconds = hub_timeout()
    hub_retries()  # a bad value is refused now, not when a push starts
    whole = str(max(1, round(seconds)))  # huggingface_hub reads these two as integers
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", whole)
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", whole)
    import httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import hf_request_event_hook

    class Bounded(httpx2.HTTPTransport):
        """Some huggingface_hub calls pass timeout=None (which overrides a client's default)
        or retry with a longer one: ours caps every part of every request's timeout."""

        def handle_request(self, request):
            limits = dict(request.extensions.get("timeout") or {})
            for part in ("connect", "read", "write", "pool"):
                given = limits.get(part)
                limits[part] = seconds if given is None else min(given, seconds)
            request.extensions["timeout"] = limits
            return super().handle_request(request)

    def bounded() -> httpx2.Client:  # huggingface_hub's default client, bounded
        return httpx2.Client(event_hooks={"request": [hf_request_event_hook]},
                             follow_redirects=True, timeout=seconds, transport=Bounded())

    set_client_factory(bounded)
    # huggingface_hub retries a failed download 5 times (sleeping up to 8 s between tries) and
    # has no setting for it: its two retrying helpers take ours as their default
    from huggingface_hub.utils import _http

    for helper in (_http.http_backoff, _http.http_stream_backoff):
        if "max_retries" in (helper.__kwdefaults__ or {}):
            helper.__kwdefaults__["max_retries"] = hub_retries()


def is_timeout(err: BaseException) -> bool:
    import httpx2

    return isinstance(err, (httpx2.TimeoutException, TimeoutError)) or "timed out" in str(err)


def dataset_url(repo_id: str) -> str:
    return f"{HUB}/datasets/{repo_id}"


def _folder(what: str, run_dir: Path) -> Path:
    """The local folder to upload; an error naming the stage to run when it is not there."""
    run = RunDir(run_dir)
    if what == "dataset":
        folder, stage, marker = run.dataset, "pairs", "README.md"
    else:
        folder, stage, marker = run.adapter, "train", "adapter_config.json"
    manifest = read_manifest(run_dir / stage)
    if manifest is None or manifest.get("status") != "done" or not (folder / marker).is_file():
        raise PrefloopError(f"{folder}: no finished {what} to push; run `prefloop {stage} "
                            f"--output-dir {run_dir}` first")
    return folder


def _repo_id(what: str, recipe: Recipe, repo_id: str | None) -> str:
    rid = repo_id or getattr(recipe.push, f"{what}_repo_id")
    if not rid:
        raise PrefloopError(f"push {what}: no repository id; pass --repo-id USER/NAME or set "
                            f"push.{what}_repo_id in the recipe")
    if rid.count("/") != 1 or rid.startswith("/") or rid.endswith("/"):
        raise PrefloopError(f"push {what}: repository id '{rid}' must look like USER/NAME")
    return rid


def push_error(what: str, repo_id: str, folder: Path, err: Exception) -> PrefloopError:
    """One line saying what failed, the likely fix, and that nothing local changed."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    status = getattr(getattr(err, "response", None), "status_code", None)
    if is_timeout(err):
        why = (f"no answer from {endpoint()} within {TIMEOUT_ENV}={hub_timeout():g} s, "
               f"{hub_retries() + 1} tries; check your network, proxy or HF_ENDPOINT, or raise "
               f"{TIMEOUT_ENV}")
    elif isinstance(err, OfflineModeIsEnabled):
        why = "offline mode is on (HF_HUB_OFFLINE=1); unset it on a machine with network"
    elif isinstance(err, LocalTokenNotFoundError) or status == 401:
        why = "not logged in (401); run `hf auth login` with a token that has write access"
    elif status == 403:
        why = ("forbidden (403); your token needs write access to the namespace "
               f"'{repo_id.split('/')[0]}' (`hf auth login` with a write token)")
    elif isinstance(err, HfHubHTTPError):
        why = f"the Hub answered HTTP {status}; check the repository id and try again"
    else:
        why = (f"cannot reach the Hub at {endpoint()} ({type(err).__name__}); check your "
               "network, proxy or HF_ENDPOINT, then `hf auth login`")
    return PrefloopError(f"push {what} to {repo_id} failed: {why}; the local folder {folder} "
                         "is unchanged")


def _is_hub_failure(err: Exception) -> bool:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    return isinstance(err, (HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled,
                            httpx2.HTTPError, ConnectionError, TimeoutError))


def adapter_card(text: str, dataset_repo_id: str) -> str:
    """The adapter README with its dataset linked: in the YAML's `datasets` (when the card has
    front matter) and in the text (fill DATASET_LINK, else append a line)."""
    text = with_dataset_meta(text, dataset_repo_id)
    url = dataset_url(dataset_repo_id)
    if DATASET_LINK in text:
        return text.replace(DATASET_LINK, url)
    if url in text:
        return text
    return text.rstrip("\n") + f"\n\nDataset: {url}\n"


def with_dataset_meta(text: str, dataset_repo_id: str) -> str:
    """`dataset_repo_id` added to the card's YAML `datasets` (huggingface_hub's own card parser)."""
    if not text.startswith("---\n"):
        return text
    from huggingface_hub import ModelCard

    card = ModelCard(text)
    have = list(card.data.datasets or [])
    if dataset_repo_id in have:
        return text
    card.data.datasets = [*have, dataset_repo_id]
    return str(card)


def adapter_patches(folder: Path, dataset_repo_id: str | None,
                    base_id: str | None) -> dict[str, bytes]:
    """What the Hub gets instead of two adapter files: a README linking the pushed dataset, an
    adapter_config.json naming the base model by Hub id rather than by this machine's path."""
    out = {}
    if dataset_repo_id:
        readme = folder / "README.md"
        text = readme.read_text(encoding="utf-8") if readme.exists() else ""
        out["README.md"] = adapter_card(text, dataset_repo_id).encode("utf-8")
    config = folder / "adapter_config.json"
    if base_id and config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        data["base_model_name_or_path"] = base_id
        out["adapter_config.json"] = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    return out


TEXT_SUFFIXES = (".md", ".json", ".yaml", ".yml", ".txt", ".jsonl", ".csv")


def upload_operations(folder: Path, patches: dict[str, bytes]):
    """One CommitOperationAdd per file of `folder` (hidden folders aside, as upload_folder
    does); patched files and text files holding a URL's credentials go up from memory."""
    from huggingface_hub import CommitOperationAdd

    from prefloop.errors import redact_url

    ops = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in rel.split("/")[:-1]):
            continue
        data = patches.get(rel)
        if data is None and path.suffix in TEXT_SUFFIXES:
            text = path.read_text(encoding="utf-8", errors="surrogateescape")
            if redact_url(text) != text:
                data = redact_url(text).encode("utf-8", errors="surrogateescape")
        ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=data if data is not None
                                      else str(path)))
    return ops


def _with_retries(call):
    """`call()`, tried again after a timeout or a connection error (PREFLOOP_HUB_RETRIES)."""
    import time

    import httpx2

    tries = hub_retries() + 1
    for attempt in range(tries):
        try:
            return call()
        except (httpx2.TransportError, TimeoutError, ConnectionError):
            if attempt + 1 == tries:
                raise
            time.sleep(min(0.5 * 2.0 ** attempt, 10.0))
    raise AssertionError("unreachable")


def push(what: Literal["dataset", "adapter"], recipe: Recipe, run_dir: Path, *,
         repo_id: str | None = None, private: bool = False) -> str:
    """Create the repo if needed and upload the dataset or adapter folder; return its URL."""
    if what not in ("dataset", "adapter"):
        raise PrefloopError(f"push: '{what}' is not one of dataset, adapter")
    run_dir = Path(run_dir)
    folder = _folder(what, run_dir)
    rid = _repo_id(what, recipe, repo_id)
    repo_type = "dataset" if what == "dataset" else "model"
    private = private or recipe.push.private
    linked = RunDir(run_dir).pushed_dataset_id() if what == "adapter" else None
    patches = {}
    if what == "adapter":
        from prefloop.models import hub_base_id

        patches = adapter_patches(folder, linked, hub_base_id(recipe.model.name))
    ops = upload_operations(folder, patches)
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        url = _with_retries(lambda: api.create_repo(rid, repo_type=repo_type, private=private,
                                                    exist_ok=True))
        _with_retries(lambda: api.create_commit(repo_id=rid, repo_type=repo_type, operations=ops,
                                                commit_message=f"prefloop: upload {what}"))
    except ValueError as e:  # the Hub's YAML check rejected the card's metadata
        if not str(e).startswith("Invalid metadata"):
            raise
        why = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise PrefloopError(f"push {what} to {rid} failed: {why} ({folder / 'README.md'}); "
                            "the local folder is unchanged") from None
    except Exception as e:  # narrowed just below: only Hub and network failures
        if not _is_hub_failure(e):
            raise
        raise push_error(what, rid, folder, e) from None
    url = str(url)
    if what == "dataset":
        atomic_write_json(RunDir(run_dir).pushed_dataset, {"repo_id": rid, "url": url,
                                                           "private": private})
    print(f"[prefloop] pushed {what}: {url}", flush=True)
    return url


def push_if_configured(recipe: Recipe, run_dir: Path) -> list[str]:
    """Push what recipe.push names (dataset first, so the adapter card can link it)."""
    urls = []
    if recipe.push.dataset_repo_id:
        urls.append(push("dataset", recipe, run_dir))
    adapter_ready = (RunDir(run_dir).adapter / "adapter_config.json").is_file()
    if recipe.push.adapter_repo_id and adapter_ready:
        urls.append(push("adapter", recipe, run_dir))
    return urls
