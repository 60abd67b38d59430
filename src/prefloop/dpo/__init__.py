"""A faster DPO trainer: TRL's `DPOTrainer`, same loss, with each pair packed into one row.

DPO (Rafailov et al. 2023, eq. 7), per pair (x, y_w, y_l), with π_ref the base model:

    L = −log σ(β [log πθ(y_w|x)/π_ref(y_w|x) − log πθ(y_l|x)/π_ref(y_l|x)])

`FastDPOTrainer` computes the same loss, metrics and gradients as TRL 1.16 (tests compare), faster:

* no padding, prompt once: each pair is one row ``[prompt, chosen, p_last, rejected]`` with
  variable-length flash attention over its two sequences (`pack`, `attention`);
* memory-bounded chunks: the policy runs forward and backward on chunks of pairs, checkpointing only
  as many layers as the activation budget needs (`trainer`, `memory`);
* leaner saved activations for RMSNorm and SwiGLU (`memory`).

Modules: `pack` (packing and batches), `attention`, `memory`, `loss` (the per-pair losses),
`trainer` (FastDPOConfig, FastDPOTrainer, and `TRLInternals`, the one place that touches TRL's
private attributes). Measurements: bench/results_dpo.md.
"""

from prefloop.dpo.attention import ATTN_NAME, disable_flash, flash_varlen, masked_sdpa
from prefloop.dpo.loss import PAIR_LOSSES, SUPPORTED_LOSSES, pair_losses, sft_loss
from prefloop.dpo.memory import ActivationCost, kept_layers, lean_modules
from prefloop.dpo.pack import (
    PairCollator,
    PairPack,
    pack_mask,
    pack_pairs,
    packed_length,
    plan_chunks,
    truncate_pair,
)
from prefloop.dpo.trainer import FastDPOConfig, FastDPOTrainer, TRLInternals

__all__ = [
    "ATTN_NAME", "PAIR_LOSSES", "SUPPORTED_LOSSES", "ActivationCost", "FastDPOConfig",
    "FastDPOTrainer", "PairCollator", "PairPack", "TRLInternals", "disable_flash", "flash_varlen",
    "kept_layers", "lean_modules", "masked_sdpa", "pack_mask", "pack_pairs", "packed_length",
    "pair_losses", "plan_chunks", "sft_loss", "truncate_pair",
]
