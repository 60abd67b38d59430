"""What the stages need from a model that writes text: one small interface, one class per
backend. Prompts are rendered and tokenized by prefloop (token-exact chat templates), so every
backend takes token ids and returns `Completion`s; the stages never see the model itself.

The in-process engine (`LocalBackend`) is the reference implementation; a backend for another
runtime (a server, another library) is one new class with the same methods, added to
`prefloop.engine.backends.BACKENDS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from prefloop import engine
from prefloop.engine import Completion, Sampling, Session

OnPromptDone = Callable[[int, list[Completion]], None]


class Backend(Protocol):
    name: str  # recorded with every response ("local", or the server and model it used)
    tokenizer: Any  # renders chat prompts and decodes completions
    eos_ids: frozenset[int]  # every id that ends a turn
    context_length: int  # prompt + new tokens the model accepts

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: Sampling, *,
                 batch_size: int | None = None, on_prompt_done: OnPromptDone | None = None,
                 stream_ids: Sequence[int] | None = None,
                 session: Session | None = None) -> list[list[Completion]]:
        """n completions per prompt; see `prefloop.engine.generate` for the contract."""

    def last_logits(self, prompts: Sequence[Sequence[int]],
                    token_ids: Sequence[int]) -> torch.Tensor:
        """(len(prompts), len(token_ids)) float32 next-token logits (log-probs do too: callers
        only take softmaxes over `token_ids`)."""

    def session(self) -> Session:
        """A handle that lets repeated `generate` calls share what they can (buffers, graphs)."""


def eos_ids(model, tokenizer) -> frozenset[int]:
    """Every id that ends a turn: the tokenizer's EOS plus the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model.generation_config, "eos_token_id", None)
    ids.update(gen if isinstance(gen, list) else [gen])
    return frozenset(i for i in ids if i is not None)


def decode(tokenizer, completion: Completion) -> str:
    """The completion's text without its closing EOS, stripped."""
    return tokenizer.decode(completion.content_ids, skip_special_tokens=True).strip()


class LocalBackend:
    """prefloop's in-process engine on a transformers causal LM (a PeftModel too)."""

    name = "local"

    def __init__(self, model, tokenizer):
        from prefloop.models import context_length

        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = eos_ids(model, tokenizer)
        self.context_length = context_length(model)

    @classmethod
    def load(cls, cfg) -> LocalBackend:
        """Load the recipe's model section (`prefloop.config.ModelConfig`) in this process."""
        from prefloop.models import load_model

        return cls(*load_model(cfg))

    def generate(self, prompts, n, sampling, *, batch_size=None, on_prompt_done=None,
                 stream_ids=None, session=None):
        return engine.generate(self.model, prompts, n, sampling, eos_token_ids=self.eos_ids,
                               pad_token_id=self.tokenizer.pad_token_id, batch_size=batch_size,
                               on_prompt_done=on_prompt_done, stream_ids=stream_ids,
                               session=session)

    def last_logits(self, prompts, token_ids):
        return engine.last_logits(self.model, prompts, token_ids,
                                  pad_token_id=self.tokenizer.pad_token_id or 0)

    def session(self) -> Session:
        return Session()
