"""Push the preference dataset or the LoRA adapter to the Hugging Face Hub.

The token comes from huggingface_hub's usual sources (HF_TOKEN, `hf auth login`); prefloop never
reads, prints or stores it. A failed push leaves the local folder exactly as it was: the adapter
card's dataset link is patched into a temporary copy, never into run_dir.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from prefloop.artifacts import RunDir, atomic_write_json, read_manifest
from prefloop.config import Recipe
from prefloop.errors import PrefloopError

DATASET_LINK = "DATASET_LINK"  # placeholder the adapter card may hold
HUB = "https://huggingface.co"


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
    if isinstance(err, OfflineModeIsEnabled):
        why = "offline mode is on (HF_HUB_OFFLINE=1); unset it on a machine with network"
    elif isinstance(err, LocalTokenNotFoundError) or status == 401:
        why = "not logged in (401); run `hf auth login` with a token that has write access"
    elif status == 403:
        why = ("forbidden (403); your token needs write access to the namespace "
               f"'{repo_id.split('/')[0]}' (`hf auth login` with a write token)")
    elif isinstance(err, HfHubHTTPError):
        why = f"the Hub answered HTTP {status}; check the repository id and try again"
    else:
        why = (f"cannot reach the Hub ({type(err).__name__}); check your network or proxy, "
               "then `hf auth login`")
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


def _staged_adapter(folder: Path, dataset_repo_id: str | None, base_id: str | None,
                    tmp: Path) -> Path:
    """A copy of the adapter folder for the Hub: its README links the pushed dataset, and its
    adapter_config.json names the base model by Hub id rather than by this machine's path."""
    staged = tmp / "adapter"
    shutil.copytree(folder, staged)
    if dataset_repo_id:
        readme = folder / "README.md"
        text = readme.read_text(encoding="utf-8") if readme.exists() else ""
        (staged / "README.md").write_text(adapter_card(text, dataset_repo_id), encoding="utf-8")
    config = staged / "adapter_config.json"
    if base_id and config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        data["base_model_name_or_path"] = base_id
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return staged


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
    with tempfile.TemporaryDirectory(prefix="prefloop-push-") as tmp:
        upload = folder
        if what == "adapter":
            from prefloop.models import hub_base_id

            upload = _staged_adapter(folder, linked, hub_base_id(recipe.model.name), Path(tmp))
        try:
            from huggingface_hub import HfApi

            api = HfApi()
            url = api.create_repo(rid, repo_type=repo_type, private=private, exist_ok=True)
            api.upload_folder(repo_id=rid, repo_type=repo_type, folder_path=str(upload),
                              commit_message=f"prefloop: upload {what}")
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
