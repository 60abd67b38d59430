"""Activation memory: leaner saved activations, and how many layers a chunk may keep.

* Lean forwards (`lean_modules`): RMSNorm saves its input and 1/rms instead of two fp32 copies,
  SwiGLU saves gate and up instead of silu(gate) too. With the trainer's skipping of PEFT's fp32 copies
  of LoRA inputs under autocast: 146 instead of 224 KB per token and layer on Mistral-7B.
* Planning (`ActivationCost`, `kept_layers`): a chunk of T tokens holds about
  T · (k·layer + (L − k)·kept + layer) bytes when k of its L decoder layers are not checkpointed;
  the trainer picks the largest k within its activation budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.activations import SiLUActivation

# Modules whose forward is exactly Llama's RMSNorm / gated-SiLU MLP (same code in these families).
LEAN_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
LEAN_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})


class _RMSNormFunction(torch.autograd.Function):
    """y = w · (x / rms(x)) with rms(x) = sqrt(mean(x²) + ε) in fp32 (Zhang & Sennrich 2019).

    Same forward ops as transformers' LlamaRMSNorm; saves x (its dtype) and 1/rms (T,) instead of
    two fp32 copies of x. Backward: dx = (1/rms) · (g − n · mean(g · n)) with n = x/rms, g = dy · w.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        h = x.to(torch.float32)
        inv_rms = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, inv_rms)
        return weight * (h * inv_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, inv_rms = ctx.saved_tensors
        normed = x.to(torch.float32).mul_(inv_rms)
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (grad * normed.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        g = (grad * weight).to(torch.float32)
        dot = (g * normed).mean(-1, keepdim=True)
        # In place: at most three (T, H) fp32 buffers live at once.
        dx = g.sub_(normed.mul_(dot)).mul_(inv_rms)
        return dx.to(x.dtype), dw, None


class _SiluMulFunction(torch.autograd.Function):
    """h = silu(g) · u (SwiGLU, Shazeer 2020); saves g and u, recomputes silu(g) in backward.

    The backward is autograd's own for ``silu(g) * u``: du = dh · silu(g), dg = silu'(g) · dh · u
    (aten's silu_backward), so the gradients are bit-identical; only silu(g) is not kept.
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        d_up = grad * F.silu(gate)
        d_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return d_gate, d_up


def _lean_norm_forward(module: torch.nn.Module):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(hidden_states, module.weight, module.variance_epsilon)
    return forward


def _lean_mlp_forward(module: torch.nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return module.down_proj(_SiluMulFunction.apply(module.gate_proj(x), module.up_proj(x)))
    return forward


def lean_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, Any]]:
    """(module, lean forward) for each RMSNorm and SiLU MLP of the model that has a lean form."""
    found = []
    for module in model.modules():
        name = type(module).__name__
        if name in LEAN_NORMS:
            found.append((module, _lean_norm_forward(module)))
        elif name in LEAN_MLPS and isinstance(module.act_fn, (torch.nn.SiLU, SiLUActivation)):
            found.append((module, _lean_mlp_forward(module)))
    return found


@dataclass(frozen=True)
class ActivationCost:
    """Saved-activation bytes per token: `full` for a whole un-checkpointed forward, `layer` for one
    decoder layer (its share of `full`), `kept` for a checkpointed layer (its input, kept alive).
    `reference_full` is `full` without the lean activations: what the model saves in TRL's hands."""

    full: float
    layer: float
    kept: float
    n_layers: int
    reference_full: float = 0.0

    @property
    def reference_layer(self) -> float:
        return (self.reference_full or self.full) / self.n_layers


def kept_layers(n_tokens: int, budget: float, cost: ActivationCost) -> int:
    """How many decoder layers may skip checkpointing for a chunk of n_tokens within budget bytes.

    Memory ≈ T · (k·layer + (L − k)·kept + layer): k layers keep everything, the others keep their
    input, and one layer is live again while the backward recomputes it.
    """
    if n_tokens <= 0:
        return cost.n_layers
    per_token = budget / n_tokens
    room = per_token - cost.layer - cost.n_layers * cost.kept
    step = max(cost.layer - cost.kept, 1.0)
    return int(max(0, min(cost.n_layers, math.floor(room / step))))
