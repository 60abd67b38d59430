"""The one place that maps a recipe's `model.backend` name to its class."""

from __future__ import annotations

from prefloop.engine.backend import Backend, LocalBackend
from prefloop.engine.openai import OpenAIBackend

BACKENDS = {"local": LocalBackend, "openai": OpenAIBackend}


def load_backend(cfg) -> Backend:
    """The backend of a recipe's model section (`prefloop.config.ModelConfig`), ready to use."""
    return BACKENDS[cfg.backend].load(cfg)
