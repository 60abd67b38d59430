"""A cache of a model's greedy answers, so an unchanged model is not asked the same prompt twice:
compare's original side and iterate's M1 evaluation are the same greedy answers in every run and
seed of a recipe (the held-out prompts and decoding do not change with the seed).

Greedy decoding draws nothing at random, so an answer is a function of the model's weights, its
dtype, the prompt's token ids and the decoding settings; the cache file's name hashes all but
the prompt, and each line holds one prompt's answer under the hash of its ids. Sampled decoding
(temperature > 0) is never cached. Files live in `<cache_dir>/answers/`; delete the folder to
drop them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from prefloop.artifacts import append_jsonl, read_jsonl
from prefloop.engine import Completion, Sampling


def prompt_key(ids: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()[:32]


def cache_file(folder: Path, model_fingerprint: str, sampling: Sampling) -> Path:
    settings = json.dumps([model_fingerprint, sampling.top_p, sampling.max_new_tokens,
                           sampling.min_new_tokens])
    return Path(folder) / f"{hashlib.sha256(settings.encode()).hexdigest()[:32]}.jsonl"


class CachedBackend:
    """A backend whose greedy `generate` answers cached prompts from the file and asks the
    wrapped backend only for the rest (with their own random streams), then stores those."""

    def __init__(self, backend, folder: Path, model_fingerprint: str):
        self.inner, self.folder, self.fingerprint = backend, Path(folder), model_fingerprint
        self.name, self.tokenizer = backend.name, backend.tokenizer
        self.eos_ids, self.context_length = backend.eos_ids, backend.context_length
        self.hits = 0

    def generate(self, prompts, n, sampling: Sampling, *, on_prompt_done=None, stream_ids=None,
                 **kwargs) -> list[list[Completion]]:
        if sampling.temperature > 0:
            return self.inner.generate(prompts, n, sampling, on_prompt_done=on_prompt_done,
                                       stream_ids=stream_ids, **kwargs)
        path = cache_file(self.folder, self.fingerprint, sampling)
        known = {r["prompt"]: r for r in read_jsonl(path, allow_partial_tail=True)} \
            if path.exists() else {}
        keys = [prompt_key(p) for p in prompts]
        out: list[list[Completion] | None] = [None] * len(prompts)
        for i, key in enumerate(keys):
            if key in known:
                c = Completion(known[key]["token_ids"], known[key]["finish_reason"])
                out[i] = [c] * n  # greedy: every sample is the same answer
                self.hits += 1
                if on_prompt_done is not None:
                    on_prompt_done(i, out[i])
        todo = [i for i in range(len(prompts)) if out[i] is None]

        def done(j: int, comps: list[Completion]) -> None:
            i = todo[j]
            out[i] = comps
            self.folder.mkdir(parents=True, exist_ok=True)
            append_jsonl(path, [{"prompt": keys[i], "token_ids": comps[0].token_ids,
                                 "finish_reason": comps[0].finish_reason}])
            if on_prompt_done is not None:
                on_prompt_done(i, comps)

        if todo:
            streams = None if stream_ids is None else [stream_ids[i] for i in todo]
            self.inner.generate([prompts[i] for i in todo], n, sampling, on_prompt_done=done,
                                stream_ids=streams, **kwargs)
        return out

    def last_logits(self, prompts, token_ids):
        return self.inner.last_logits(prompts, token_ids)

    def session(self):
        return self.inner.session()


def answer_cache(backend, cfg):
    """`backend` behind the greedy-answer cache of the model section `cfg` loads (the backend
    itself when the model cannot be named exactly, or runs on a server)."""
    from prefloop.models import cache_dir, model_fingerprint

    fingerprint = model_fingerprint(cfg) if backend.name == "local" else None
    if fingerprint is None:
        return backend
    return CachedBackend(backend, cache_dir() / "answers", fingerprint)
