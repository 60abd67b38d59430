"""Attention for packed pairs: each pair's two sequences see only their own keys.

Registered with transformers as the attention implementation ``"prefloop_pairs"``; the model gets
the `PairPack` as the keyword argument ``prefloop_pack``. On a GPU in bf16/fp16 it is
variable-length flash attention over the 2B sequences (``cu_q``, ``cu_k``, ``k_index``); on CPU,
in fp32, or where flash fails, SDPA with the explicit mask of `pack_mask`, pair by pair, which gives
the same numbers.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from prefloop.dpo.pack import PairPack, pack_mask

logger = logging.getLogger(__name__)

ATTN_NAME = "prefloop_pairs"
PACK_KWARG = "prefloop_pack"


def flash_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pack: PairPack,
                 scale: float | None) -> torch.Tensor:
    """Variable-length flash attention over the pack's 2B sequences; returns (1, T, H, D)."""
    q = query[0].transpose(0, 1).contiguous()  # (T, H, D)
    k = key[0].transpose(0, 1).index_select(0, pack.k_index)  # (T_k, H_kv, D)
    v = value[0].transpose(0, 1).index_select(0, pack.k_index)
    out = torch.ops.aten._flash_attention_forward.default(
        q, k, v, pack.cu_q, pack.cu_k, pack.max_q, pack.max_k, 0.0, True, False, scale=scale)[0]
    return out.unsqueeze(0)


def masked_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pack: PairPack,
                scale: float | None) -> torch.Tensor:
    """Reference path (CPU, fp32): SDPA with the explicit mask, pair by pair; returns (1, T, H, D).

    One call per pair keeps the work to each pair's own block instead of the whole row's square.
    """
    n_rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)
    value = value.repeat_interleave(n_rep, dim=1)
    outs = []
    for start, end in zip(pack.row_starts, pack.row_starts[1:], strict=False):
        span = slice(start, end)
        outs.append(F.scaled_dot_product_attention(
            query[:, :, span], key[:, :, span], value[:, :, span],
            attn_mask=pack_mask(pack, start, end), scale=scale))
    return torch.cat(outs, dim=2).transpose(1, 2)


def pair_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None = None,
                   dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A transformers attention function for packed pairs: query (1, H, T, D), key (1, H_kv, T, D)."""
    pack = kwargs.get(PACK_KWARG)
    if pack is None:
        raise ValueError(f"attention '{ATTN_NAME}' needs the {PACK_KWARG} keyword argument; call the "
                         "model through FastDPOTrainer")
    global _flash_failed
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and not _flash_failed:
        try:
            return flash_varlen(query, key, value, pack, scaling), None
        except RuntimeError as error:  # no flash kernel for this GPU or build: stay correct
            _flash_failed = True
            logger.warning(f"flash variable-length attention failed ({error}); using SDPA with "
                           "a mask instead (slower)")
    return masked_sdpa(query, key, value, pack, scaling), None


def disable_flash() -> None:
    """Use the masked SDPA path from now on in this process (e.g. after a failed flash check)."""
    global _flash_failed
    _flash_failed = True


_flash_failed = False
AttentionInterface.register(ATTN_NAME, pair_attention)
