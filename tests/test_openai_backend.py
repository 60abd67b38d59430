"""model.backend=openai against a real llama.cpp server (xllamacpp's prebuilt CPU wheel) serving
the embedded SmolLM2 GGUF on 127.0.0.1; failures through a small local proxy."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx2 as httpx
import pytest

from prefloop.artifacts import read_jsonl
from prefloop.chat import render_prompt
from prefloop.config import ModelConfig, apply_overrides, recipe_from_dict
from prefloop.engine import Sampling
from prefloop.engine.openai import OpenAIBackend
from prefloop.errors import PrefloopError
from prefloop.stages import generate, instructions, pairs, rank

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 120  # s: loading a 98 MB GGUF on a busy 2-core machine


# -- the server and a proxy in front of it ---------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    """http://127.0.0.1:PORT/v1 of a llama.cpp server with 2 slots; killed at the end."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "llamacpp_server.py"), "--slots", "2",
         "--threads", "2", "--ctx", "1024"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    try:
        url = _wait_listening(proc)
        yield url + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_listening(proc: subprocess.Popen) -> str:
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(START_TIMEOUT)
    if not line or not line[0].startswith("listening "):
        raise RuntimeError(f"llama.cpp server did not start (exit {proc.poll()}): {line}")
    url = line[0].split()[1]
    deadline = time.time() + START_TIMEOUT
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}/health never answered 200")


class Proxy:
    """Forwards to the server, counting /v1/completions requests; `fail` (500) the next n,
    `fail_after` lets that many through then fails all, `delay` sleeps before answering."""

    def __init__(self, upstream: str):
        self.upstream = upstream.removesuffix("/v1")
        self.fail = 0
        self.fail_after: int | None = None
        self.delay = 0.0
        self.completions = 0
        self.bodies: list[tuple[dict, dict]] = []  # (request, response) of completions
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _decide(self, path: str) -> int | None:
        """The status to fake for this request, or None to forward it."""
        with self.lock:
            if not path.endswith("/completions"):
                return None
            self.completions += 1
            if self.fail > 0:
                self.fail -= 1
                return 500
            if self.fail_after is not None:
                if self.fail_after == 0:
                    return 500
                self.fail_after -= 1
        return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                self._forward(self.rfile.read(int(self.headers.get("content-length", 0))))

            def _forward(self, body: bytes | None):
                status = proxy._decide(self.path)
                if proxy.delay:
                    time.sleep(proxy.delay)
                if status is not None:
                    return self._send(status, b'{"error":{"message":"injected failure"}}')
                r = httpx.request(self.command, proxy.upstream + self.path, content=body,
                                  headers={"content-type": "application/json"}, timeout=300)
                if body and self.path.endswith("/completions"):
                    with proxy.lock:
                        proxy.bodies.append((json.loads(body), r.json()))
                self._send(r.status_code, r.content, r.headers.get("server"))

            def _send(self, status: int, content: bytes, server: str | None = None):
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(content)))
                    self.end_headers()
                    self.wfile.write(content)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out
                    pass

        return Handler


@pytest.fixture
def proxy(server):
    p = Proxy(server)
    yield p
    p.close()


def model_cfg(url: str, **kw) -> ModelConfig:
    return ModelConfig(backend="openai", base_url=url, request_timeout=120.0, max_retries=2,
                       max_concurrency=4, **kw)


def tiny_recipe(url: str, *more: str):
    r = recipe_from_dict({"model": {"backend": "openai", "base_url": url, "max_retries": 2,
                                    "max_concurrency": 4}})
    return apply_overrides(r, [
        "instructions.n_train=2", "instructions.n_heldout=0", "generate.k=2",
        "generate.max_new_tokens=8", "rank.judge_samples=1", "rank.judge_max_new_tokens=8",
        *more])


# -- generation, judge, pairs through the server -------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("force", [True, False])
def test_generate_rank_pairs_through_the_server(server, proxy, tmp_path, force):
    r = tiny_recipe(proxy.url, f"rank.judge_force_score={str(force).lower()}")
    instructions.run(r, tmp_path)
    generate.run(r, tmp_path)
    gens = read_jsonl(tmp_path / "generate" / "generations.jsonl")
    assert len(gens) == 4 and {g["sample"] for g in gens} == {0, 1}
    assert all(g["backend"].startswith(f"openai:{proxy.url} model=smollm2 (llama.cpp")
               for g in gens)
    assert {g["finish_reason"] for g in gens} <= {"eos", "length"}
    rank.run(r, tmp_path)
    scores = read_jsonl(tmp_path / "rank" / "scores.jsonl")
    assert len(scores) == 4
    judged = read_jsonl(tmp_path / "rank" / "judgments.jsonl")
    assert all(j["text"] is not None for j in judged)
    if force:  # every judgment ends up with a score, forced from the server's log-probs
        assert all(s["score"] is not None and 0 <= s["score"] <= 5 for s in scores)
    try:
        pairs.run(r, tmp_path)
    except PrefloopError as e:  # 2 prompts x 2 samples can tie everywhere unforced
        assert "no preference pairs" in str(e) and not force
        return
    card = (tmp_path / "pairs" / "dataset" / "README.md").read_text()
    assert f"generated through `openai:{proxy.url} model=smollm2 (llama.cpp" in card


@pytest.mark.slow
def test_server_sees_prefloops_rendered_ids(server, proxy, tmp_path):
    backend = OpenAIBackend.load(model_cfg(proxy.url))
    rp = render_prompt(backend.tokenizer, "Name three colours.")
    out = backend.generate([rp.ids], 1, Sampling(temperature=0.0, max_new_tokens=4))
    request, response = proxy.bodies[-1]
    assert request["prompt"] == rp.ids  # sent as ids, never through the server's template
    assert response["usage"]["prompt_tokens"] == len(rp.ids)
    # the server's own tokenizer agrees with prefloop's rendering, special tokens included
    tok = httpx.post(server.removesuffix("/v1") + "/tokenize",
                     json={"content": rp.text, "add_special": False, "parse_special": True})
    assert tok.json()["tokens"] == rp.ids
    assert len(out[0][0].token_ids) <= 4


@pytest.mark.slow
def test_samples_are_seeded_per_stream_and_sample(server, tmp_path):
    backend = OpenAIBackend.load(model_cfg(server))
    ids = render_prompt(backend.tokenizer, "Say something.").ids
    s = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=3)
    a = backend.generate([ids, ids], 2, s)
    b = backend.generate([ids], 2, s, stream_ids=[1])
    assert [c.token_ids for c in a[1]] == [c.token_ids for c in b[0]]  # rerun draws the same
    assert a[0][0].token_ids != a[0][1].token_ids or a[0][0].token_ids != a[1][0].token_ids
    eos = [c for p in a for c in p if c.finish_reason == "eos"]
    assert all(c.token_ids[-1] in backend.eos_ids for c in eos)


@pytest.mark.slow
def test_last_logits_are_the_servers_log_probs(server):
    backend = OpenAIBackend.load(model_cfg(server))
    ids = render_prompt(backend.tokenizer, "What is 2+2? Answer with a digit.").ids
    digits = [backend.tokenizer(str(d), add_special_tokens=False)["input_ids"][0]
              for d in range(6)]
    out = backend.last_logits([ids, ids], digits + [backend.tokenizer.eos_token_id])
    assert out.shape == (2, 7) and out.dtype.is_floating_point
    assert (out[0] == out[1]).all()
    finite = out[0][out[0] > -math.inf]
    assert len(finite) >= 6 and (finite <= 0).all()  # log-probs of a top-1000 list


# -- failures: one line, nothing lost ------------------------------------------------------------


def test_server_down_is_one_clear_line(tmp_path):
    with pytest.raises(PrefloopError) as e:
        OpenAIBackend.load(replace(model_cfg("http://127.0.0.1:9/v1"), max_retries=1))
    msg = str(e.value)
    assert msg == ("cannot reach http://127.0.0.1:9/v1 (connection refused); start the server "
                   "or fix model.base_url")


@pytest.mark.slow
def test_wrong_model_name_lists_the_servers_models(server):
    with pytest.raises(PrefloopError) as e:
        OpenAIBackend.load(model_cfg(server, server_model="mistral-7b"))
    assert str(e.value) == (f"{server} has no model 'mistral-7b' (it serves: smollm2); "
                            "fix model.server_model")


@pytest.mark.slow
def test_500s_are_retried_then_succeed(server, proxy):
    backend = OpenAIBackend.load(model_cfg(proxy.url))
    proxy.fail, proxy.completions = 2, 0
    out = backend.generate([[1, 4093, 198]], 1, Sampling(temperature=0.0, max_new_tokens=2))
    assert len(out[0]) == 1 and proxy.completions == 3


@pytest.mark.slow
def test_500s_past_the_retries_name_the_url(server, proxy):
    backend = OpenAIBackend.load(replace(model_cfg(proxy.url), max_retries=1))
    proxy.fail = 10
    with pytest.raises(PrefloopError) as e:
        backend.generate([[1, 4093, 198]], 1, Sampling(max_new_tokens=2))
    assert str(e.value) == (f"{proxy.url}/completions: HTTP 500 after 2 tries: injected "
                            "failure; see the server's log")


@pytest.mark.slow
def test_slow_server_names_request_timeout(server, proxy):
    backend = OpenAIBackend.load(replace(model_cfg(proxy.url), request_timeout=1.0))
    proxy.delay = 3.0
    with pytest.raises(PrefloopError) as e:
        backend.generate([[1, 4093, 198]], 1, Sampling(max_new_tokens=2))
    assert str(e.value) == (f"{proxy.url}/completions: no answer within "
                            "model.request_timeout=1s; raise model.request_timeout or lower "
                            "model.max_concurrency")
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_interrupted_generate_resends_only_the_missing_prompts(server, proxy, tmp_path):
    r = tiny_recipe(proxy.url, "model.max_retries=0", "model.max_concurrency=1",
                    "instructions.n_train=3", "generate.max_new_tokens=4")
    instructions.run(r, tmp_path)
    proxy.fail_after = 3  # prompt 1 completes (2 samples), prompt 2 gets 1 of 2, then 500s
    with pytest.raises(PrefloopError, match="HTTP 500"):
        generate.run(r, tmp_path)
    gens = tmp_path / "generate" / "generations.jsonl"
    written = read_jsonl(gens)
    assert len(written) == 2 and len({g["id"] for g in written}) == 1
    proxy.fail_after, proxy.completions = None, 0
    generate.run(r, tmp_path)
    assert proxy.completions == 4  # the 2 missing prompts x 2 samples, nothing else
    final = read_jsonl(gens)
    assert len(final) == 6 and final[:2] == written


# -- configuration and records (no server) ---------------------------------------------------------


def test_openai_backend_needs_a_base_url():
    with pytest.raises(PrefloopError, match=r"model.base_url: required with backend openai"):
        apply_overrides(recipe_from_dict({}), ["model.backend=openai"])
    with pytest.raises(PrefloopError, match=r"model.base_url: expected an http"):
        apply_overrides(recipe_from_dict({}), ["model.backend=openai", "model.base_url=localhost"])
    r = apply_overrides(recipe_from_dict({}), ["model.backend=openai",
                                               "model.base_url=http://127.0.0.1:8080/v1"])
    assert r.model.max_concurrency == 8 and r.model.api_key_env == "OPENAI_API_KEY"


def test_local_records_have_no_backend_field():
    from prefloop.engine import Completion

    rp = type("RP", (), {"text": "p", "ids": [1, 2]})
    tok = type("Tok", (), {"decode": lambda self, ids, skip_special_tokens: "x"})()
    item = {"id": "a", "instruction": "i"}
    local = generate._record(tok, item, rp, 0, Completion([5, 2], "eos"), None)
    served = generate._record(tok, item, rp, 0, Completion([5, 2], "eos"), None, "openai:u")
    assert "backend" not in local and served == {**local, "backend": "openai:u"}
