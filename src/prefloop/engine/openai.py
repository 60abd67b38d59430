"""`model.backend: openai`: generation and the judge through an OpenAI-compatible server
(vLLM, SGLang, TGI, llama.cpp's llama-server).

prefloop still renders every prompt with its own tokenizer (loaded from `model.name`, as the local
backend does) and sends the TOKEN IDS to `/v1/completions`, so the server's own chat template is
never used and prompts stay token-exact. What comes back is mapped to token ids, in this order of
preference: `choices[i].token_ids` (vLLM with `return_token_ids`), the ids of
`logprobs.content` (llama.cpp), `logprobs.tokens` spelled `token_id:N` (vLLM with
`return_tokens_as_token_ids`); a server that returns only text has its text re-tokenized with
prefloop's tokenizer, which may differ from the ids the server sampled (counted in
`OpenAIBackend.retokenized`).

Sampling: one request per sample (n=1), each with its own seed derived from (sampling.seed,
stream id, sample index), so a rerun draws the same samples and a resumed run re-sends only the
prompts whose samples are missing; `n` would share one seed between a prompt's samples and leave
the per-sample draw to each server's own convention. Servers reproduce seeded samples only as far
as their batching keeps the arithmetic identical (llama.cpp on CPU did in our tests).
Temperature and top-p as given; top-k and min-p are switched off, and on llama.cpp the sampler
order is set to temperature then top-p (as in the local engine; llama.cpp's default applies
top-p before temperature). `finish_reason` "stop" maps to "eos" (the EOS id appended when the
server left it out), "length" to "length".

`last_logits` (the judge's forced score) asks for one token with the largest top-k log-probs the
server allows (llama.cpp: 1,000; vLLM: its `max_logprobs`, 20 by default) and returns the
log-probs of the requested ids, -inf for ids outside that top-k.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch

from prefloop.config import redact_url
from prefloop.engine import Completion, Sampling, Session
from prefloop.errors import PrefloopError

RETRY_STATUS = {408, 429, 500, 502, 503, 504}
LOGPROBS_TRY = (1000, 20, 5)  # top-k log-probs asked for, largest first, until one is accepted
PROBE_TIMEOUT = 10.0  # seconds for the version probes at connect time


def sample_seed(seed: int, stream: int, sample: int) -> int:
    """A 31-bit seed per (run seed, prompt stream, sample): fits every server's seed field."""
    digest = hashlib.blake2b(f"{seed}:{stream}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


@dataclass(frozen=True)
class ServerInfo:
    model: str  # the name requests carry
    kind: str  # "llama.cpp", "vllm", "sglang", "tgi" or "openai" (unknown)
    version: str | None
    context_length: int | None  # per request (llama.cpp: per slot), when the server says


class Client:
    """Bounded retries with exponential backoff; every final failure is one PrefloopError line."""

    def __init__(self, base_url: str, *, api_key: str | None, timeout: float, max_retries: int,
                 max_concurrency: int):
        import httpx2 as httpx

        self.httpx = httpx
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.max_retries = max_retries
        self.abort = threading.Event()  # set after a fatal error: no further retries
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout),
                                 limits=httpx.Limits(max_connections=max_concurrency + 2))

    def close(self) -> None:
        self.http.close()

    def get(self, path: str, *, root: bool = False, timeout: float | None = None,
            tries: int | None = None) -> Any:
        return self.request("GET", path, root=root, timeout=timeout, tries=tries)

    def post(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body=body)

    def request(self, method: str, path: str, *, body: dict | None = None, root: bool = False,
                timeout: float | None = None, tries: int | None = None) -> Any:
        """JSON of one request; `root`: the path is under the server root, not base_url."""
        url = (_root(self.base_url) if root else self.base_url) + path
        tries = self.max_retries + 1 if tries is None else tries
        for attempt in range(tries):
            try:
                r = self.http.request(method, url, json=body, timeout=timeout or self.timeout)
            except self.httpx.TimeoutException as e:
                if isinstance(e, self.httpx.ConnectTimeout) and attempt + 1 < tries:
                    self._backoff(attempt)
                    continue
                # not retried: the server may still be computing it, a retry doubles its load
                raise PrefloopError(
                    f"{url}: no answer within model.request_timeout={timeout or self.timeout:g}s; "
                    "raise model.request_timeout or lower model.max_concurrency") from None
            except self.httpx.TransportError as e:
                if attempt + 1 < tries:
                    self._backoff(attempt)
                    continue
                raise PrefloopError(
                    f"cannot reach {self.base_url} ({_reason(e)}); start the server or fix "
                    "model.base_url") from None
            if r.status_code in RETRY_STATUS and attempt + 1 < tries:
                self._backoff(attempt, r.headers.get("retry-after"))
                continue
            if r.status_code >= 400:
                raise ServerError(url, r.status_code, _message(r), attempt + 1)
            try:
                return r.json()
            except ValueError:
                raise PrefloopError(f"{url}: the answer is not JSON (HTTP {r.status_code}); is "
                                    "model.base_url an OpenAI-compatible /v1 URL?") from None
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, retry_after: str | None = None) -> None:
        if self.abort.is_set():
            raise PrefloopError(f"{self.base_url}: stopped after another request failed")
        delay = min(0.5 * 2**attempt, 16.0)
        if retry_after and retry_after.isdigit():
            delay = min(float(retry_after), 60.0)
        time.sleep(delay)


class ServerError(PrefloopError):
    def __init__(self, url: str, status: int, message: str, tries: int):
        self.status, self.server_message = status, message
        hint = {401: "set the key in the env var named by model.api_key_env",
                403: "check the key in the env var named by model.api_key_env",
                404: "check model.base_url (it should end in /v1)"}.get(
            status, "see the server's log" if status >= 500 else "see the server's message")
        after = f" after {tries} tries" if tries > 1 else ""
        super().__init__(f"{url}: HTTP {status}{after}: {message}; {hint}")


class OpenAIBackend:
    """The `Backend` of `prefloop.engine.backend` over an OpenAI-compatible HTTP server."""

    def __init__(self, cfg, tokenizer=None, eos_ids: frozenset[int] | None = None,
                 context_length: int | None = None):
        """Connect to `cfg.base_url` first (a server that is down or lacks the model fails
        before any model file is read), then load prefloop's tokenizer from `cfg.name` unless
        given."""
        self.cfg = cfg
        if "://***@" in cfg.base_url:
            raise PrefloopError(
                "model.base_url: its credentials were redacted when recipe.yaml was written (they "
                "are never stored); give the URL again with --set model.base_url=..., or put the "
                f"key in ${cfg.api_key_env} and drop it from the URL")
        api_key = os.environ.get(cfg.api_key_env) or None
        self.client = Client(cfg.base_url, api_key=api_key, timeout=cfg.request_timeout,
                             max_retries=cfg.max_retries, max_concurrency=cfg.max_concurrency)
        self.info = probe(self.client, cfg.server_model)
        if tokenizer is None:
            from prefloop.models import load_tokenizer

            tokenizer = load_tokenizer(cfg.name, cfg.revision)
            eos_ids, context_length = _model_facts(cfg, tokenizer)
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids or {tokenizer.eos_token_id})
        ctx = context_length or 2**31 - 1
        self.context_length = min(ctx, self.info.context_length or ctx)
        version = f" ({self.info.kind} {self.info.version})" if self.info.version else (
            f" ({self.info.kind})" if self.info.kind != "openai" else "")
        self.name = f"openai:{redact_url(self.client.base_url)} model={self.info.model}{version}"
        self.retokenized = 0  # completions whose ids were re-tokenized from text
        self._logprobs_k: int | None = None

    @classmethod
    def load(cls, cfg) -> OpenAIBackend:
        """The backend of a recipe's model section (`prefloop.config.ModelConfig`)."""
        return cls(cfg)

    def session(self) -> Session:
        return Session()  # nothing to keep between calls: the server holds its own caches

    # -- generation ---------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: Sampling, *,
                 batch_size: int | None = None, on_prompt_done=None, stream_ids=None,
                 session: Session | None = None) -> list[list[Completion]]:
        """n completions per prompt, one request each, `max_concurrency` in flight;
        `on_prompt_done(i, comps)` runs in this thread as soon as prompt i's n are back.
        `batch_size` does not apply (the server batches)."""
        if stream_ids is not None and len(stream_ids) != len(prompts):
            raise ValueError(f"stream_ids: {len(stream_ids)} ids for {len(prompts)} prompts")
        streams = list(range(len(prompts))) if stream_ids is None else list(stream_ids)
        jobs = [(i, s) for i in range(len(prompts)) for s in range(n)]
        results: list[list[Completion | None]] = [[None] * n for _ in prompts]
        pending = [n] * len(prompts)

        def done(job, completion: Completion) -> None:
            i, s = job
            results[i][s] = completion
            pending[i] -= 1
            if pending[i] == 0 and on_prompt_done is not None:
                on_prompt_done(i, results[i])

        self._run(jobs, lambda job: self._sample(prompts[job[0]], sampling,
                                                 sample_seed(sampling.seed, streams[job[0]],
                                                             job[1])), done)
        return results  # type: ignore[return-value]

    def _sample(self, prompt: Sequence[int], sampling: Sampling, seed: int) -> Completion:
        body = {"model": self.info.model, "prompt": list(prompt),
                "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "seed": seed, "n": 1, **self._extras()}
        if sampling.min_new_tokens:
            body["min_tokens"] = sampling.min_new_tokens  # vLLM; others may ignore it
        out = self.client.post("/completions", body)
        return self._completion(_choice(out, self.client.base_url))

    def _extras(self) -> dict:
        """Fields that make the server sample like the local engine and return token ids."""
        extras: dict[str, Any] = {"top_k": -1, "min_p": 0.0, "logprobs": 1}
        if self.info.kind == "llama.cpp":
            extras["samplers"] = ["temperature", "top_p"]  # its default: top-p first
        else:  # vLLM names; servers that do not know a field ignore it
            extras.update(return_token_ids=True, return_tokens_as_token_ids=True,
                          stop_token_ids=sorted(self.eos_ids), skip_special_tokens=False)
        return extras

    def _completion(self, choice: dict) -> Completion:
        ids = _choice_ids(choice)
        if ids is None:
            self.retokenized += 1
            ids = self.tokenizer(choice.get("text") or "", add_special_tokens=False)["input_ids"]
        reason = choice.get("finish_reason")
        if reason == "length":
            return Completion(list(ids), "length")
        # "stop": an EOS, or a stop token id; the id ends the list whether or not it was sent
        if not ids or ids[-1] not in self.eos_ids:
            ids = [*ids, self._eos_id()]
        return Completion(list(ids), "eos")

    def _eos_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos in self.eos_ids else min(self.eos_ids)

    # -- the judge's forced score -------------------------------------------------------------

    def last_logits(self, prompts: Sequence[Sequence[int]],
                    token_ids: Sequence[int]) -> torch.Tensor:
        """Next-token log-probs of `token_ids` after each prompt, -inf outside the server's
        top-k (callers take softmaxes over `token_ids`, so log-probs serve as logits)."""
        rows: list[list[float] | None] = [None] * len(prompts)

        def done(i: int, logprobs: dict[int, float]) -> None:
            rows[i] = [logprobs.get(t, -math.inf) for t in token_ids]

        self._run(list(range(len(prompts))), lambda i: self._top_logprobs(prompts[i]), done)
        return torch.tensor(rows, dtype=torch.float32)

    def _top_logprobs(self, prompt: Sequence[int]) -> dict[int, float]:
        for k in ([self._logprobs_k] if self._logprobs_k else LOGPROBS_TRY):
            body = {**self._extras(), "model": self.info.model, "prompt": list(prompt),
                    "max_tokens": 1, "temperature": 0.0, "logprobs": k, "seed": 0}
            try:
                out = self.client.post("/completions", body)
            except ServerError as e:
                if e.status == 400 and k != LOGPROBS_TRY[-1] and self._logprobs_k is None:
                    continue  # more top log-probs than this server allows: ask for fewer
                raise
            self._logprobs_k = k
            return _first_top_logprobs(_choice(out, self.client.base_url), self.tokenizer)
        raise AssertionError("unreachable")

    # -- concurrency --------------------------------------------------------------------------

    def _run(self, jobs: list, work, done) -> None:
        """work(job) on a bounded pool; done(job, result) in this thread as each one finishes.
        The first failure cancels what has not started, stops retries, waits for the requests
        in flight (bounded by the timeout) and is raised; jobs already reported stay reported
        (their prompts are written), and no request outlives the call."""
        if not jobs:
            return
        self.client.abort.clear()
        pool = ThreadPoolExecutor(max_workers=self.cfg.max_concurrency,
                                  thread_name_prefix="prefloop-openai")
        order = {}
        for n, job in enumerate(jobs):  # submitted in order: early prompts finish first
            order[pool.submit(work, job)] = n
        error: BaseException | None = None
        try:
            remaining = set(order)
            while remaining and error is None:
                finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                for f in sorted(finished, key=order.__getitem__):
                    if f.exception() is None:
                        done(jobs[order[f]], f.result())
                    elif error is None:
                        error = f.exception()
        finally:
            self.client.abort.set()
            pool.shutdown(wait=True, cancel_futures=True)
        if error is not None:
            raise error

    def close(self) -> None:
        self.client.close()


# -- connecting --------------------------------------------------------------------------------


def probe(client: Client, wanted: str | None) -> ServerInfo:
    """The model to name in requests, what the server is, and its context per request."""
    listing = client.get("/models")
    models = [m for m in (listing.get("data") or []) if isinstance(m, dict) and "id" in m]
    names = [m["id"] for m in models]
    if not names:
        raise PrefloopError(f"{client.base_url}/models lists no model; is the server still "
                            "loading it?")
    if wanted is None:
        if len(names) > 1:
            raise PrefloopError(f"{client.base_url} serves {len(names)} models "
                                f"({', '.join(names)}); set model.server_model to one of them")
        wanted = names[0]
    entry = next((m for m in models if wanted == m["id"] or wanted in (m.get("aliases") or [])),
                 None)
    if entry is None:
        raise PrefloopError(f"{client.base_url} has no model '{wanted}' (it serves: "
                            f"{', '.join(names)}); fix model.server_model")
    kind, version, ctx = _identify(client, entry)
    return ServerInfo(model=wanted, kind=kind, version=version, context_length=ctx)


def _identify(client: Client, entry: dict) -> tuple[str, str | None, int | None]:
    """(kind, version, context per request) from what each server publishes, best effort."""
    owner = str(entry.get("owned_by", "")).lower()
    ctx = entry.get("max_model_len") or (entry.get("meta") or {}).get("n_ctx")
    if owner == "llamacpp":
        props = _optional(client, "/props")
        build = props.get("build_info") if props else None
        n_ctx = ((props or {}).get("default_generation_settings") or {}).get("n_ctx")
        return "llama.cpp", build, n_ctx or ctx
    if owner in ("vllm", "sglang"):
        info = _optional(client, "/version") or {}
        return owner, info.get("version"), ctx
    info = _optional(client, "/info")  # text-generation-inference
    if info and "max_total_tokens" in info:
        return "tgi", info.get("version"), info.get("max_total_tokens")
    return "openai", None, ctx


def _optional(client: Client, path: str) -> dict | None:
    try:
        out = client.get(path, root=True, timeout=PROBE_TIMEOUT, tries=1)
    except PrefloopError:
        return None
    return out if isinstance(out, dict) else None


def _model_facts(cfg, tokenizer) -> tuple[frozenset[int], int]:
    """EOS ids (tokenizer + generation config) and context length, read from the model's files
    without loading weights."""
    from transformers import AutoConfig, GenerationConfig

    from prefloop.engine.backend import eos_ids
    from prefloop.models import context_length, resolve_model

    path = resolve_model(cfg.name)
    try:
        gen = GenerationConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=False)
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        gen = None
    holder = type("Model", (), {"generation_config": gen,
                                "config": AutoConfig.from_pretrained(path, revision=cfg.revision,
                                                                        trust_remote_code=False)})
    return eos_ids(holder, tokenizer), context_length(holder)


# -- reading answers -------------------------------------------------------------------------


def _choice(out: dict, where: str) -> dict:
    choices = out.get("choices") if isinstance(out, dict) else None
    if not choices:
        raise PrefloopError(f"{where}/completions: an answer without choices: {str(out)[:200]}")
    return choices[0]


def _choice_ids(choice: dict) -> list[int] | None:
    """The sampled ids, when the server says them (see the module docstring)."""
    if isinstance(choice.get("token_ids"), list):
        return [int(t) for t in choice["token_ids"]]
    lp = choice.get("logprobs") or {}
    content = lp.get("content")
    if isinstance(content, list) and all(isinstance(c, dict) and "id" in c for c in content):
        return [int(c["id"]) for c in content]
    tokens = lp.get("tokens")
    if isinstance(tokens, list) and all(str(t).startswith("token_id:") for t in tokens):
        return [int(str(t)[9:]) for t in tokens]
    return None


def _first_top_logprobs(choice: dict, tokenizer) -> dict[int, float]:
    """id -> log-prob of the first generated position's top-k."""
    lp = choice.get("logprobs") or {}
    if isinstance(lp.get("content"), list) and lp["content"]:  # llama.cpp, chat-style
        return {int(t["id"]): float(t["logprob"]) for t in lp["content"][0]["top_logprobs"]}
    top = (lp.get("top_logprobs") or [None])[0]  # legacy: {token: logprob}
    if not isinstance(top, dict):
        raise PrefloopError("the server returned no top log-probs; the judge's forced score "
                            "(rank.judge_force_score) needs them: turn it off for this server")
    out: dict[int, float] = {}
    for token, logprob in top.items():
        tid = _token_id(str(token), tokenizer)
        if tid is not None:
            out[tid] = max(out.get(tid, -math.inf), float(logprob))
    return out


def _token_id(token: str, tokenizer) -> int | None:
    if token.startswith("token_id:"):
        return int(token[9:])
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def _root(base_url: str) -> str:
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


def _reason(e: Exception) -> str:
    text = str(e).lower()
    if "refused" in text:
        return "connection refused"
    if "name or service" in text or "nodename" in text or "resolve" in text:
        return "unknown host"
    return type(e).__name__ + (f": {e}" if str(e) else "")


def _message(r) -> str:
    try:
        body = r.json()
    except ValueError:
        return (r.text or "").strip().replace("\n", " ")[:200]
    err = body.get("error", body) if isinstance(body, dict) else body
    msg = err.get("message", err) if isinstance(err, dict) else err
    return str(msg).replace("\n", " ")[:200]
