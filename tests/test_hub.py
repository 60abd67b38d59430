"""Hub push: what would be sent (checked at huggingface_hub's HTTP client), and clear failures."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import httpx2
import pytest
from huggingface_hub.utils import _http

from prefloop import hub
from prefloop.artifacts import write_manifest
from prefloop.config import PushConfig, Recipe
from prefloop.errors import PrefloopError

TOKEN = "hf_TESTtokenNeverToBePrinted123"


class FakeHub:
    """An httpx2 transport that answers like the Hub (or fails as told) and records requests."""

    def __init__(self, fail: int | None = None, connect_error: bool = False,
                 bad_yaml: bool = False):
        self.fail, self.connect_error, self.bad_yaml = fail, connect_error, bad_yaml
        self.requests = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        url = str(request.url)
        self.requests.append({"method": request.method, "url": url,
                              "auth": request.headers.get("authorization"),
                              "body": request.content.decode()})
        if self.connect_error:
            raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")
        if self.fail and url.endswith("/api/repos/create"):
            return httpx2.Response(self.fail, json={"error": "denied"},
                                   headers={"X-Error-Message": "denied"})
        if url.endswith("/api/repos/create"):
            body = json.loads(request.content)
            kind = "datasets/" if body.get("type") == "dataset" else ""
            return httpx2.Response(200, json={
                "url": f"https://huggingface.co/{kind}{body['organization']}/{body['name']}"})
        if url.endswith("/api/validate-yaml") and self.bad_yaml:
            return httpx2.Response(400, json={"errors": [{"message": "license: bad value"}]})
        if url.endswith("/api/validate-yaml"):
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in url:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                for f in files]})
        if "/commit/" in url:
            page = url.replace("/api/models/", "/").replace("/api/", "/")
            return httpx2.Response(200, json={"commitUrl": page.replace("/commit/main",
                                                                        "/commit/" + "0" * 40),
                                              "commitOid": "0" * 40,
                                              "pullRequestUrl": None})
        return httpx2.Response(404, json={"error": "not here"})

    def of(self, suffix: str) -> list[dict]:
        return [r for r in self.requests if r["url"].endswith(suffix) or suffix in r["url"]]

    def committed_files(self, index: int = 0) -> dict[str, bytes]:
        commit = self.of("/commit/")[index]
        lines = [json.loads(line) for line in commit["body"].splitlines() if line.strip()]
        return {x["value"]["path"]: base64.b64decode(x["value"]["content"])
                for x in lines if x["key"] == "file"}


@pytest.fixture
def fake_hub(monkeypatch):
    """Route huggingface_hub's shared client through FakeHub; restore the default after."""
    def install(**kw) -> FakeHub:
        fake = FakeHub(**kw)
        _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake)))
        return fake

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    yield install
    _http.set_client_factory(_http.default_client_factory)


def make_run(tmp_path: Path, adapter_card: str | None = None) -> Path:
    run_dir = tmp_path / "run"
    ds = run_dir / "pairs" / "dataset"
    (ds / "data").mkdir(parents=True)
    (ds / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1 fake parquet PAR1")
    (ds / "README.md").write_text("---\nlicense: apache-2.0\n---\n# pairs\n")
    (ds / "recipe.yaml").write_text("name: default\n")
    write_manifest(run_dir / "pairs", "pairs", "h", started=time.time())
    if adapter_card is not None:
        ad = run_dir / "train" / "adapter"
        ad.mkdir(parents=True)
        (ad / "adapter_config.json").write_text('{"r": 4}')
        (ad / "adapter_model.safetensors").write_bytes(b"weights")
        (ad / "README.md").write_text(adapter_card)
        write_manifest(run_dir / "train", "train", "h", started=time.time())
    return run_dir


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_dataset_sends_the_folder(tmp_path, fake_hub, capsys, caplog):
    caplog.set_level("DEBUG")
    fake = fake_hub()
    run_dir = make_run(tmp_path)
    before = snapshot(run_dir / "pairs" / "dataset")
    url = hub.push("dataset", Recipe(), run_dir, repo_id="alice/pairs", private=True)
    assert url == "https://huggingface.co/datasets/alice/pairs"
    (create,) = fake.of("/api/repos/create")
    assert json.loads(create["body"]) == {"name": "pairs", "organization": "alice",
                                          "visibility": "private", "type": "dataset"}
    assert create["auth"] == f"Bearer {TOKEN}"  # the token from HF_TOKEN, used by the library
    assert fake.of("/commit/")[0]["url"] == (
        "https://huggingface.co/api/datasets/alice/pairs/commit/main")
    folder = run_dir / "pairs" / "dataset"
    assert fake.committed_files() == {p: (folder / p).read_bytes() for p in before}
    assert sorted(before) == ["README.md", "data/train-00000-of-00001.parquet", "recipe.yaml"]
    assert snapshot(folder) == before
    assert json.loads((run_dir / "pairs" / "push.json").read_text()) == {
        "repo_id": "alice/pairs", "url": url, "private": True}
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err + caplog.text
    assert TOKEN not in (run_dir / "pairs" / "push.json").read_text()
    assert out.out == f"[prefloop] pushed dataset: {url}\n"


def test_push_adapter_links_the_pushed_dataset(tmp_path, fake_hub):
    fake = fake_hub()
    run_dir = make_run(tmp_path, adapter_card="# adapter\n\n- Dataset: DATASET_LINK\n")
    recipe = replace(Recipe(), push=PushConfig(dataset_repo_id="alice/pairs",
                                               adapter_repo_id="alice/lora"))
    adapter = run_dir / "train" / "adapter"
    before = snapshot(adapter)
    urls = hub.push_if_configured(recipe, run_dir)
    assert urls == ["https://huggingface.co/datasets/alice/pairs",
                    "https://huggingface.co/alice/lora"]
    creates = [json.loads(r["body"]) for r in fake.of("/api/repos/create")]
    assert creates == [{"name": "pairs", "organization": "alice", "visibility": "public",
                        "type": "dataset"},
                       {"name": "lora", "organization": "alice", "visibility": "public",
                        "type": "model"}]
    commits = fake.of("/commit/")
    assert commits[1]["url"] == "https://huggingface.co/api/models/alice/lora/commit/main"
    files = fake.committed_files(1)
    assert files["README.md"].decode() == (
        "# adapter\n\n- Dataset: https://huggingface.co/datasets/alice/pairs\n")
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    # the base model by Hub id (the embedded model's source), not this machine's cache path
    assert json.loads(files["adapter_config.json"]) == {
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "r": 4}
    assert snapshot(adapter) == before  # the link went into a temporary copy only


def test_hub_base_id_of_each_kind_of_model_name(tmp_path):
    from prefloop.models import hub_base_id

    assert hub_base_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_base_id("mistralai/Mistral-7B-Instruct-v0.2") == "mistralai/Mistral-7B-Instruct-v0.2"
    local = tmp_path / "org" / "model"
    local.mkdir(parents=True)
    assert hub_base_id(str(local)) is None


def test_adapter_card_link_rules():
    url = "https://huggingface.co/datasets/a/b"
    assert hub.adapter_card("x DATASET_LINK y", "a/b") == f"x {url} y"
    assert hub.adapter_card("# card\n", "a/b") == f"# card\n\nDataset: {url}\n"
    assert hub.adapter_card(f"see {url}\n", "a/b") == f"see {url}\n"


@pytest.mark.parametrize("status, needle", [
    (401, "not logged in (401); run `hf auth login` with a token that has write access"),
    (403, "forbidden (403); your token needs write access to the namespace 'alice'"),
    (500, "the Hub answered HTTP 500"),
])
def test_http_errors_are_one_clear_line(tmp_path, fake_hub, status, needle):
    fake_hub(fail=status)
    run_dir = make_run(tmp_path)
    before = snapshot(run_dir)
    with pytest.raises(PrefloopError) as e:
        hub.push("dataset", Recipe(), run_dir, repo_id="alice/pairs")
    msg = str(e.value)
    assert msg.startswith("push dataset to alice/pairs failed: ") and needle in msg
    assert msg.endswith(f"the local folder {run_dir / 'pairs' / 'dataset'} is unchanged")
    assert "\n" not in msg and TOKEN not in msg
    assert snapshot(run_dir) == before  # no push.json either


def test_network_down_and_offline(tmp_path, fake_hub, monkeypatch):
    fake = fake_hub(connect_error=True)
    monkeypatch.setenv("PREFLOOP_HUB_RETRIES", "1")
    run_dir = make_run(tmp_path)
    with pytest.raises(PrefloopError, match=r"cannot reach the Hub at https://huggingface.co "
                                            r"\(ConnectError\); check your network, proxy or "
                                            "HF_ENDPOINT, then `hf auth login`"):
        hub.push("dataset", Recipe(), run_dir, repo_id="alice/pairs")
    assert len(fake.of("/api/repos/create")) == 2  # one retry, then the one line
    _http.set_client_factory(_http.default_client_factory)  # the real client refuses offline
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(PrefloopError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\)"):
        hub.push("dataset", Recipe(), run_dir, repo_id="alice/pairs")
    assert not (run_dir / "pairs" / "push.json").exists()


def test_bad_requests_fail_before_the_network(tmp_path, fake_hub):
    fake = fake_hub()
    run_dir = make_run(tmp_path)
    with pytest.raises(PrefloopError, match="push dataset: no repository id; pass --repo-id "
                                            "USER/NAME or set push.dataset_repo_id"):
        hub.push("dataset", Recipe(), run_dir)
    with pytest.raises(PrefloopError, match="repository id 'pairs' must look like USER/NAME"):
        hub.push("dataset", Recipe(), run_dir, repo_id="pairs")
    with pytest.raises(PrefloopError, match="no finished adapter to push; run `prefloop train"):
        hub.push("adapter", Recipe(), run_dir, repo_id="alice/lora")
    assert fake.requests == []
    assert hub.push_if_configured(Recipe(), run_dir) == []


def test_card_metadata_rejected_by_the_hub(tmp_path, fake_hub):
    fake_hub(bad_yaml=True)
    run_dir = make_run(tmp_path)
    with pytest.raises(PrefloopError) as e:
        hub.push("dataset", Recipe(), run_dir, repo_id="alice/pairs")
    folder = run_dir / "pairs" / "dataset"
    assert str(e.value) == (
        "push dataset to alice/pairs failed: Invalid metadata in README.md. - license: bad value "
        f"({folder / 'README.md'}); the local folder is unchanged")


def test_pushed_adapter_card_names_the_dataset_in_its_yaml(tmp_path):
    from huggingface_hub import ModelCard

    from prefloop.cards import adapter_card as make_card

    text = make_card(Recipe(), tmp_path, hyper={}, final={}, last_n=0, mean_last={},
                     dataset_repo_id=None, timing={})
    assert ModelCard(text).data.datasets is None  # nothing pushed, nothing planned
    pushed = ModelCard(hub.adapter_card(text, "alice/pairs"))
    assert pushed.data.datasets == ["alice/pairs"]
    assert pushed.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert pushed.text.rstrip().endswith("Dataset: https://huggingface.co/datasets/alice/pairs")
    assert hub.adapter_card(str(pushed), "alice/pairs") == str(pushed)  # once is enough
