"""Compiled element-wise kernels for decoding on CUDA: RMSNorm and rotary embeddings.

In an eager decode step at 7B scale every RMSNorm is ~7 small kernels and every rotary
embedding ~10; at a few microseconds each they add up to milliseconds per step. `fused_kernels`
swaps them, for the duration of a `with` block, for `torch.compile`d versions (one Triton
kernel each) of the same formulas, which the engine's CUDA graphs then replay. Only the
Llama-style RMSNorm (weight · x / rms(x), computed in float32) and transformers'
`apply_rotary_pos_emb` of the model's own module are touched; anything else stays as it is.
(A compiled SiLU·up product of the MLP was tried: 0.59 ms a step against 0.36 eager, dropped.)
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from functools import cache

import torch

# RMSNorm classes whose forward is exactly `_rms_norm` below (checked on first use too).
RMS_NORM_CLASSES = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm",
                    "MixtralRMSNorm", "Phi3RMSNorm"}


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = hidden.dtype
    x = hidden.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


# Round to the model's dtype wherever eager rounds (Inductor otherwise keeps float32 across
# the casts): in bf16 the fused kernels then give the same bits as the eager ones.
_OPTIONS = {"emulate_precision_casts": True}


@cache
def _compiled_rms_norm():
    return torch.compile(_rms_norm, dynamic=True, options=_OPTIONS)


@cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True, options=_OPTIONS)


@contextmanager
def fused_kernels(model, enabled: bool = True):
    """Within the block, `model`'s RMSNorms and rotary embeddings run compiled (the engine
    turns this on for CUDA; on CPU it works too, but compiling costs more than it saves)."""
    if not enabled:
        yield False
        return
    norms = [m for m in model.modules() if type(m).__name__ in RMS_NORM_CLASSES
             and hasattr(m, "variance_epsilon") and isinstance(getattr(m, "weight", None),
                                                               torch.Tensor)]
    if norms and not _same_formula(norms[0]):
        norms = []
    rotary_modules = {sys.modules[type(m).__module__] for m in model.modules()
                      if type(m).__name__.endswith("Attention")}
    rotary_modules = [mod for mod in rotary_modules if hasattr(mod, "apply_rotary_pos_emb")]
    saved_rope = [(mod, mod.apply_rotary_pos_emb) for mod in rotary_modules]
    try:
        for m in norms:
            m.forward = _norm_forward(m)
        for mod, fn in saved_rope:
            mod.apply_rotary_pos_emb = _compiled(fn)
        yield True
    finally:
        for m in norms:
            m.__dict__.pop("forward", None)
        for mod, fn in saved_rope:
            mod.apply_rotary_pos_emb = fn


def _same_formula(module) -> bool:
    """Does the module's own forward compute `_rms_norm` (exactly, uncompiled)?"""
    x = torch.randn(2, 3, module.weight.shape[-1], device=module.weight.device,
                    dtype=module.weight.dtype)
    with torch.no_grad():
        return torch.equal(type(module).forward(module, x),
                           _rms_norm(x, module.weight, float(module.variance_epsilon)))


def _norm_forward(module):
    fn, weight, eps = _compiled_rms_norm(), module.weight, float(module.variance_epsilon)

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return fn(hidden_states, weight, eps)

    return forward
