"""A faster DPO trainer: TRL's `DPOTrainer` with each pair packed into one row.

TRL 1.16 lays a batch of B pairs out as 2B right-padded rows, ``[prompt + chosen]`` and
``[prompt + rejected]``: every prompt runs twice and every row is padded to the longest of the 2B.
`FastDPOTrainer` keeps TRL's dataset preparation, truncation rule, fused LM head, reference handling,
optimizer loop and metric names, and changes only how a batch is computed:

* Packing, no padding. Each pair becomes ``[prompt, chosen, p_last, rejected]`` in one row: the
  prompt runs once; ``p_last`` is a copy of the prompt's last token at the same position, so that
  it can predict the first rejected token. Attention is variable-length flash attention over two
  sequences per pair: ``prompt + chosen`` (causal) and ``p_last + rejected``, whose keys are
  ``prompt[:-1] + p_last + rejected`` (causal, bottom-right aligned). On CPU or in fp32 the same
  pattern is an explicit boolean mask for SDPA, pair by pair, which gives the same numbers.
* Chunks with a memory budget. The reference log-probs come from one no-grad forward over the batch
  (adapters off, or precomputed by TRL's ``precompute_ref_log_probs``). The policy then runs in
  chunks of pairs (at least ``fast_min_chunk_tokens`` tokens: smaller chunks leave a 7B GPU waiting
  on Python), each forward and backward at once, and a chunk checkpoints only as many decoder layers
  as its activation budget requires: by default the activation memory TRL's own layout needs for
  this batch size and the data's longest sequence, measured once on the model.
* Leaner saved activations: RMSNorm saves its input and 1/rms instead of two fp32 copies, SwiGLU
  saves gate and up instead of silu(gate) too, and under autocast PEFT's fp32 copies of LoRA inputs
  are skipped (autocast casts them back to bf16 exactly). Together: 146 instead of 224 KB per token
  and layer on Mistral-7B.

The DPO loss of a batch is a mean of per-pair terms that depend only on the pair's summed log-probs
(and completion lengths), so summing per-chunk losses scaled by ``|chunk| / B`` gives TRL's loss and
gradient. Configurations outside that (``aot`` losses, WPO weighting, LD-DPO, f-divergences, MoE aux
loss, vision data, ``keep_end`` truncation, sliding-window or soft-capped attention, prompt-learning
PEFT, a custom collator) fall back to TRL's own computation; `fast_fallback_reason` says why.
Measurements: bench/results_dpo.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from transformers import AttentionInterface
from transformers.activations import SiLUActivation
from transformers.modeling_layers import GradientCheckpointingLayer
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import use_adapter

logger = logging.getLogger(__name__)

ATTN_NAME = "prefloop_pairs"
PACK_KWARG = "prefloop_pack"
# Loss types whose batch loss is a mean of per-pair terms (or, for "sft", a token mean whose
# denominator is known before the batch runs), so chunking leaves the loss and gradient unchanged.
SUPPORTED_LOSSES = frozenset({
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft",
})
# Kinds of token in a packed row: which keys a query may see depends on them.
PROMPT_BODY, PROMPT_LAST, CHOSEN, REJECTED = 0, 1, 2, 3


@dataclass
class FastDPOConfig(DPOConfig):
    """`DPOConfig` plus the fast engine's knobs (a plain `DPOConfig` gets these defaults)."""

    fast_activation_budget_gb: float | None = field(
        default=None,
        metadata={"help": "Activation memory a batch chunk may hold, in GiB. None: what TRL's "
                  "padded layout would need for this batch size and the data's longest sequence."},
    )
    fast_min_chunk_tokens: int = field(
        default=8192,
        metadata={"help": "Smallest chunk worth a forward/backward of its own: below a few thousand "
                  "tokens a 7B step is bound by Python and kernel launches, so pairs are grouped up to "
                  "this size even if more layers must then be checkpointed (within the budget)."},
    )
    fast_lean_activations: bool = field(
        default=True,
        metadata={"help": "Save less for the backward of RMSNorm and SwiGLU (Llama, Mistral, Qwen2/3 "
                  "modules): the input and 1/rms instead of fp32 copies; gate and up, not silu(gate)."},
    )


# --------------------------------------------------------------------------------------------
# Packing


@dataclass
class PairPack:
    """B pairs packed into one row of T tokens (see the module docstring for the layout).

    input_ids, position_ids, shift_labels: (1, T); shift_labels[t] is the token position t
    predicts, -100 where nothing is scored. pair_id, label_side: (T,), the pair of each position and
    1 (predicts a chosen token) or 2 (a rejected one), 0 where nothing is scored. kind: (T,), the
    token kind (prompt body, last prompt token, chosen, rejected side), for the mask path. cu_q (2B+1,), cu_k (2B+1,) int32: cumulative query / key lengths of the 2B attention
    sequences; k_index (T_k,): row position of each key. n_chosen, n_rejected: (B,) completion lengths.
    row_starts: the B+1 row offsets where each pair starts (and the row ends).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    shift_labels: torch.Tensor
    label_side: torch.Tensor
    pair_id: torch.Tensor
    kind: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    k_index: torch.Tensor
    max_q: int
    max_k: int
    n_chosen: torch.Tensor
    n_rejected: torch.Tensor
    row_starts: list[int]

    @property
    def n_pairs(self) -> int:
        return int(self.n_chosen.numel())

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def to(self, device: torch.device | str) -> PairPack:
        # Pinned host memory makes the copies asynchronous: a pageable copy would wait for the GPU
        # to finish the previous chunk before the CPU can queue the next one.
        pin = torch.device(device).type == "cuda"
        moved = {name: ((value.pin_memory() if pin else value).to(device, non_blocking=True)
                        if torch.is_tensor(value) else value)
                 for name, value in vars(self).items()}
        return PairPack(**moved)


Pair = tuple[Sequence[int], Sequence[int], Sequence[int]]


def truncate_pair(prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int],
                  max_length: int | None) -> Pair:
    """TRL's ``keep_start`` rule: ``prompt + completion`` is cut to ``max_length`` tokens."""
    if max_length is None:
        return list(prompt), list(chosen), list(rejected)
    room = max(max_length - len(prompt), 0)
    return list(prompt[:max_length]), list(chosen[:room]), list(rejected[:room])


def pack_pairs(pairs: Sequence[Pair]) -> PairPack:
    """Pack pairs (already truncated) into one row: per pair ``[prompt, chosen, p_last, rejected]``.

    Positions restart at 0 for each pair; ``p_last`` sits at the prompt's last position and the
    rejected tokens follow it, so both completions see the same positions as in TRL's two rows.
    """
    ids: list[int] = []
    pos: list[int] = []
    labels: list[int] = []
    side: list[int] = []
    pair_id: list[int] = []
    kind: list[int] = []
    k_index: list[int] = []
    cu_q, cu_k = [0], [0]
    row_starts = [0]
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        n_p, n_c, n_r = len(prompt), len(chosen), len(rejected)
        start = len(ids)
        # Sequence A: prompt + chosen; position t predicts token t+1 when that token is a completion.
        seq_a = list(prompt) + list(chosen)
        ids += seq_a
        pos += range(n_p + n_c)
        for t in range(n_p + n_c):
            scored = n_p <= t + 1 < n_p + n_c
            labels.append(seq_a[t + 1] if scored else -100)
            side.append(1 if scored else 0)
            kind.append(PROMPT_BODY if t < n_p - 1 else PROMPT_LAST if t == n_p - 1 else CHOSEN)
        # Sequence B: p_last (a copy of the prompt's last token, absent for an empty prompt) + rejected.
        lead = [prompt[-1]] if n_p else []
        seq_b = lead + list(rejected)
        ids += seq_b
        pos += range(n_p - len(lead), n_p + n_r)
        for t in range(len(seq_b)):
            scored = t + 1 < len(seq_b)
            labels.append(seq_b[t + 1] if scored else -100)
            side.append(2 if scored else 0)
            kind.append(REJECTED)
        n_b = len(seq_b)
        pair_id += [i] * (n_p + n_c + n_b)
        # Keys: A sees itself; B sees the prompt body (all but the last prompt token) and itself.
        k_index += range(start, start + n_p + n_c)
        k_index += range(start, start + n_p - len(lead))
        k_index += range(start + n_p + n_c, start + n_p + n_c + n_b)
        cu_q += [cu_q[-1] + n_p + n_c, cu_q[-1] + n_p + n_c + n_b]
        cu_k += [cu_k[-1] + n_p + n_c, cu_k[-1] + n_p + n_c + n_b + n_p - len(lead)]
        row_starts.append(len(ids))
    q_lens = [b - a for a, b in zip(cu_q, cu_q[1:], strict=False)]
    k_lens = [b - a for a, b in zip(cu_k, cu_k[1:], strict=False)]
    long = torch.long
    return PairPack(
        input_ids=torch.tensor([ids], dtype=long),
        position_ids=torch.tensor([pos], dtype=long),
        shift_labels=torch.tensor([labels], dtype=long),
        label_side=torch.tensor(side, dtype=long),
        pair_id=torch.tensor(pair_id, dtype=long),
        kind=torch.tensor(kind, dtype=torch.int8),
        cu_q=torch.tensor(cu_q, dtype=torch.int32),
        cu_k=torch.tensor(cu_k, dtype=torch.int32),
        k_index=torch.tensor(k_index, dtype=long),
        max_q=max(q_lens, default=0),
        max_k=max(k_lens, default=0),
        n_chosen=torch.tensor([len(c) for _, c, _ in pairs], dtype=long),
        n_rejected=torch.tensor([len(r) for _, _, r in pairs], dtype=long),
        row_starts=row_starts,
    )


def pack_mask(pack: PairPack, start: int = 0, end: int | None = None) -> torch.Tensor:
    """The (1, 1, n, n) boolean attention mask of row span [start, end) (default: the whole row).

    Query q may see key k <= q of the same pair, except that rejected-side queries see only the
    prompt body and their own side (not the chosen tokens nor the original last prompt token).
    """
    pair_id = pack.pair_id[start:end]
    kind = pack.kind[start:end]
    idx = torch.arange(pair_id.numel(), device=pair_id.device)
    same_pair = pair_id[:, None] == pair_id[None, :]
    causal = idx[None, :] <= idx[:, None]
    q_rej = (kind == REJECTED)[:, None]
    k_kind = kind[None, :]
    visible = torch.where(q_rej, (k_kind == PROMPT_BODY) | (k_kind == REJECTED), k_kind != REJECTED)
    return (same_pair & causal & visible)[None, None]


# --------------------------------------------------------------------------------------------
# Attention


def _flash_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pack: PairPack,
                  scale: float | None) -> torch.Tensor:
    """Variable-length flash attention over the pack's 2B sequences; returns (1, T, H, D)."""
    q = query[0].transpose(0, 1).contiguous()  # (T, H, D)
    k = key[0].transpose(0, 1).index_select(0, pack.k_index)  # (T_k, H_kv, D)
    v = value[0].transpose(0, 1).index_select(0, pack.k_index)
    out = torch.ops.aten._flash_attention_forward.default(
        q, k, v, pack.cu_q, pack.cu_k, pack.max_q, pack.max_k, 0.0, True, False, scale=scale)[0]
    return out.unsqueeze(0)


def _masked_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pack: PairPack,
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
            return _flash_varlen(query, key, value, pack, scaling), None
        except RuntimeError as error:  # no flash kernel for this GPU or build: stay correct
            _flash_failed = True
            logger.warning(f"flash variable-length attention failed ({error}); using SDPA with "
                           "a mask instead (slower)")
    return _masked_sdpa(query, key, value, pack, scaling), None


_flash_failed = False
AttentionInterface.register(ATTN_NAME, pair_attention)


# --------------------------------------------------------------------------------------------
# Leaner saved activations

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


# --------------------------------------------------------------------------------------------
# Loss


def pair_losses(loss_type: str, beta: float, chosen_logratios: torch.Tensor,
                rejected_logratios: torch.Tensor, n_chosen: torch.Tensor, n_rejected: torch.Tensor,
                label_smoothing: float = 0.0, discopop_tau: float = 0.05) -> torch.Tensor:
    """Per-pair loss terms (B,) from the policy-minus-reference log-ratios c (chosen), r (rejected).

    With Δ = c − r: sigmoid −log σ(βΔ) (DPO, Rafailov et al. 2023, eq. 7); hinge relu(1 − βΔ)
    (SLiC); ipo (c/|y_w| − r/|y_l| − 1/(2β))² (IPO eq. 17, per-token normalised as TRL does);
    robust (−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε) (rDPO); exo_pair KL(σ(βΔ) ‖ 1−ε) (EXO eq. 16);
    nca_pair −log σ(βc) − ½ log σ(−βc) − ½ log σ(−βr); bco_pair −log σ(βc) − log σ(−βr);
    sppo_hard (c − 1/(2β))² + (r + 1/(2β))²; apo_zero 1 − σ(βc) + σ(βr); apo_down σ(βc) + 1 − σ(βΔ)
    (APO eqs. 7, 8); discopop: log-sigmoid and exp(−βΔ) blended by σ(βΔ/τ) (DiscoPOP eq. 5);
    sigmoid_norm −log σ(β(c/|y_w| − r/|y_l|)). "sft" is a batch token mean: see `chunk_loss`.
    """
    delta = chosen_logratios - rejected_logratios
    z = beta * delta
    if loss_type == "sigmoid":
        return -F.logsigmoid(z)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type in ("ipo", "sigmoid_norm"):
        per_token = (chosen_logratios / n_chosen.clamp(min=1)
                     - rejected_logratios / n_rejected.clamp(min=1))
        if loss_type == "ipo":
            return (per_token - 1 / (2 * beta)) ** 2
        return -F.logsigmoid(beta * per_token)
    if loss_type == "robust":
        eps = label_smoothing
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        eps = torch.tensor(label_smoothing, device=z.device, dtype=z.dtype)
        win, lose = torch.sigmoid(z), torch.sigmoid(-z)
        return (win * (F.logsigmoid(z) - torch.log1p(-eps))
                + lose * (F.logsigmoid(-z) - torch.log(eps)))
    c, r = beta * chosen_logratios, beta * rejected_logratios
    if loss_type == "nca_pair":
        return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
    if loss_type == "bco_pair":
        return -F.logsigmoid(c) - F.logsigmoid(-r)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(c) + torch.sigmoid(r)
    if loss_type == "apo_down":
        return torch.sigmoid(c) + 1 - torch.sigmoid(z)
    if loss_type == "discopop":
        blend = torch.sigmoid(z / discopop_tau)
        return -F.logsigmoid(z) * (1 - blend) + torch.exp(-z) * blend
    raise ValueError(f"loss_type '{loss_type}' has no per-pair form; use one of "
                     f"{sorted(SUPPORTED_LOSSES)} or engine 'trl'")


# --------------------------------------------------------------------------------------------
# Memory planning


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


def plan_chunks(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group pair indices into chunks of at most max_tokens tokens (first fit, longest first).

    A pair longer than max_tokens gets a chunk of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks: list[list[int]] = []
    sizes: list[int] = []
    for i in order:
        for j, size in enumerate(sizes):
            if size + lengths[i] <= max_tokens:
                chunks[j].append(i)
                sizes[j] += lengths[i]
                break
        else:
            chunks.append([i])
            sizes.append(lengths[i])
    return chunks


def packed_length(pair: Pair) -> int:
    """Tokens a pair takes in a packed row: prompt + chosen + p_last + rejected."""
    prompt, chosen, rejected = pair
    return len(prompt) + len(chosen) + len(rejected) + (1 if len(prompt) else 0)


# --------------------------------------------------------------------------------------------
# Collator


@dataclass
class PairCollator:
    """Keeps the tokenised pairs as lists; FastDPOTrainer packs them into chunks itself."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            # First: Trainer and accelerate read the batch size from the first tensor.
            "pair_lengths": torch.tensor(
                [[len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"])] for e in examples]),
            "prompt_ids": [list(e["prompt_ids"]) for e in examples],
            "chosen_ids": [list(e["chosen_ids"]) for e in examples],
            "rejected_ids": [list(e["rejected_ids"]) for e in examples],
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples])
        return batch


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    """A small index tensor on device, copied from pinned memory so the CPU need not wait."""
    index = torch.tensor(values, dtype=torch.long)
    if torch.device(device).type == "cuda":
        index = index.pin_memory()
    return index.to(device, non_blocking=True)


def _is_pair_batch(inputs: dict[str, Any]) -> bool:
    return "pair_lengths" in inputs and "prompt_ids" in inputs


# --------------------------------------------------------------------------------------------
# Trainer


@dataclass
class _StepStats:
    """Per-pair and per-token sums of one batch, gathered over its chunks."""

    chosen_logps: list[torch.Tensor] = field(default_factory=list)
    rejected_logps: list[torch.Tensor] = field(default_factory=list)
    ref_chosen: list[torch.Tensor] = field(default_factory=list)
    ref_rejected: list[torch.Tensor] = field(default_factory=list)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0) + value.detach().float()


class FastDPOTrainer(DPOTrainer):
    """`trl.DPOTrainer` with the same constructor and metrics, computing batches as packed pairs.

    See the module docstring. `args` may be a `DPOConfig` or a `FastDPOConfig`.
    """

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, compute_metrics=None,
                 callbacks=None, optimizers=(None, None), quantization_config=None, peft_config=None):
        reason = self._args_unsupported(args, data_collator, train_dataset)
        if reason is None and not isinstance(model, str):
            reason = self._model_unsupported(model, peft_config)
        self.fast_fallback_reason = reason
        if reason is None:
            data_collator = PairCollator()
        self._cost: ActivationCost | None = None
        self._layers: list[GradientCheckpointingLayer] | None = None
        self.last_plan: list[tuple[int, int]] = []
        self._data_max_len: int | None = None
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, compute_metrics=compute_metrics,
                         callbacks=callbacks, optimizers=optimizers,
                         quantization_config=quantization_config, peft_config=peft_config)
        if self.fast_fallback_reason is None:
            self.fast_fallback_reason = self._model_unsupported(self.model, None)
        if self.fast_fallback_reason is not None:
            logger.warning(f"FastDPOTrainer: {self.fast_fallback_reason}; using TRL's computation")

    # ---- what the fast path covers

    @staticmethod
    def _args_unsupported(args, data_collator, train_dataset) -> str | None:
        if args is None:
            return None
        if data_collator is not None:
            return "a custom data_collator was given"
        unsupported = set(args.loss_type) - SUPPORTED_LOSSES
        if unsupported:
            return f"loss_type {sorted(unsupported)} is not a per-pair loss"
        if args.ld_alpha is not None or args.use_weighting or args.f_divergence_type != "reverse_kl":
            return "ld_alpha, use_weighting and f-divergences are computed by TRL only"
        if args.max_length is not None and args.truncation_mode != "keep_start":
            return "truncation_mode 'keep_end' cuts prompts differently for chosen and rejected"
        if train_dataset is not None:
            first = next(iter(train_dataset))
            if "image" in first or "images" in first:
                return "vision datasets are computed by TRL only"
        return None

    @staticmethod
    def _model_unsupported(model, peft_config) -> str | None:
        text = model.config.get_text_config()
        window = getattr(text, "sliding_window", None)
        if window is not None and getattr(text, "use_sliding_window", True):
            return "sliding-window attention"
        if getattr(text, "attn_logit_softcapping", None) is not None:
            return "soft-capped attention logits"
        if getattr(text, "output_router_logits", False):
            return "MoE router auxiliary loss"
        configs = [peft_config] if peft_config is not None else []
        if is_peft_model(model):
            configs += list(model.peft_config.values())
        if any(getattr(c, "is_prompt_learning", False) for c in configs):
            return "prompt-learning PEFT adds virtual tokens"
        return None

    @property
    def fast(self) -> bool:
        return self.fast_fallback_reason is None

    # ---- overrides

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.fast or not _is_pair_batch(inputs):
            return super().training_step(model, self._as_trl_batch(inputs), num_items_in_batch)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        with self.maybe_activation_offload_context:
            return self._fast_batch(model, inputs, backward=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.fast and _is_pair_batch(inputs) and not return_outputs:
            return self._fast_batch(model, inputs, backward=False)
        return super().compute_loss(model, self._as_trl_batch(inputs), return_outputs,
                                    num_items_in_batch)

    def compute_ref_log_probs(self, model, inputs):
        if not (self.fast and _is_pair_batch(inputs)):
            return super().compute_ref_log_probs(model, self._as_trl_batch(inputs))
        with self._packed_forward_context():
            return self._reference_for_pairs(self._pairs(inputs), model)

    def _reference_for_pairs(self, pairs: list[Pair], model=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs (B,), (B,) of the pairs, in as few no-grad forwards as TRL's batch."""
        chosen, rejected = [], []
        for chunk in plan_chunks([packed_length(p) for p in pairs], self._ref_chunk_tokens()):
            pack = pack_pairs([pairs[i] for i in chunk]).to(self.accelerator.device)
            c, r = self._reference_logps(pack, model)
            chosen.append((chunk, c))
            rejected.append((chunk, r))
        return self._unchunk(chosen, len(pairs)), self._unchunk(rejected, len(pairs))

    # ---- batch conversion

    def _pairs(self, inputs: dict[str, Any]) -> list[Pair]:
        return [truncate_pair(p, c, r, self.args.max_length) for p, c, r in
                zip(inputs["prompt_ids"], inputs["chosen_ids"], inputs["rejected_ids"], strict=True)]

    def _as_trl_batch(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """TRL's padded layout of a pair batch, for the computations the fast path leaves to TRL."""
        if not _is_pair_batch(inputs):
            return inputs
        keys = [k for k in ("ref_chosen_logps", "ref_rejected_logps") if k in inputs]
        examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r,
                     **{k: inputs[k][i].item() for k in keys}}
                    for i, (p, c, r) in enumerate(zip(inputs["prompt_ids"], inputs["chosen_ids"],
                                                      inputs["rejected_ids"], strict=True))]
        collator = DataCollatorForPreference(
            pad_token_id=self._tokenizer.pad_token_id, max_length=self.args.max_length,
            truncation_mode=self.args.truncation_mode, pad_to_multiple_of=self.args.pad_to_multiple_of)
        return self._prepare_inputs(collator(examples))

    @staticmethod
    def _unchunk(parts: list[tuple[list[int], torch.Tensor]], n: int) -> torch.Tensor:
        out = torch.empty(n, device=parts[0][1].device, dtype=parts[0][1].dtype)
        for idx, values in parts:
            out[_index(idx, out.device)] = values
        return out

    # ---- the packed forward

    def _all_models(self) -> list[torch.nn.Module]:
        models = [self.accelerator.unwrap_model(self.model)]
        if self.ref_model is not None:
            models.append(self.accelerator.unwrap_model(self.ref_model))
        return models

    @contextlib.contextmanager
    def _packed_forward_context(self, lean: bool | None = None) -> Iterator[None]:
        """Route attention to `pair_attention`; with lean activations, also use the lean RMSNorm and
        MLP forwards and, under autocast, skip PEFT's fp32 copies of LoRA inputs.

        It must cover the backward too: checkpointed layers run their forward again there.
        """
        if lean is None:
            lean = getattr(self.args, "fast_lean_activations", True)
        configs = [m.config.get_text_config() for m in self._all_models()]
        saved_attn = [c._attn_implementation for c in configs]
        tuners, patched = [], []
        if lean:
            patched = [item for m in self._all_models() for item in lean_modules(m)]
            if self.accelerator.mixed_precision in ("bf16", "fp16"):
                tuners = [m for m in self._all_models()[0].modules()
                          if hasattr(m, "cast_input_dtype_enabled")]
        saved_cast = [m.cast_input_dtype_enabled for m in tuners]
        saved_forward = [module.__dict__.get("forward") for module, _ in patched]
        try:
            for c in configs:
                c._attn_implementation = ATTN_NAME
            for m in tuners:
                m.cast_input_dtype_enabled = False
            for module, forward in patched:
                module.forward = forward
            yield
        finally:
            for c, name in zip(configs, saved_attn, strict=True):
                c._attn_implementation = name
            for m, value in zip(tuners, saved_cast, strict=True):
                m.cast_input_dtype_enabled = value
            for (module, _), previous in zip(patched, saved_forward, strict=True):
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous

    def _run(self, model, pack: PairPack):
        # Autocast here, not only in accelerate's forward wrapper: `_packed_forward_context` turns
        # PEFT's input casting off, which is only exact when autocast casts the inputs instead.
        with self.accelerator.autocast():
            return model(input_ids=pack.input_ids, position_ids=pack.position_ids,
                         shift_labels=pack.shift_labels, fused_lm_head=True, use_cache=False,
                         **{PACK_KWARG: pack})

    @staticmethod
    def _side_sums(values: torch.Tensor, pack: PairPack) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum a per-position tensor (1, T) over each pair's chosen and rejected labels: (B,), (B,)."""
        n = pack.n_pairs
        bins = torch.where(pack.label_side > 0, pack.pair_id * 2 + pack.label_side - 1, 2 * n)
        # A one-hot product rather than index_add: CUDA's index_add sums in a varying order.
        sums = F.one_hot(bins, 2 * n + 1).to(values.dtype).T @ values[0]
        return sums[0:2 * n:2], sums[1:2 * n:2]

    def _reference_logps(self, pack: PairPack, model=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs (B,), (B,): the reference model, or the policy with adapters off."""
        self._set_checkpointed_layers(0)
        adapter = contextlib.nullcontext()
        target = self.ref_model
        if target is None:
            target = model if model is not None else self.model
            unwrapped = self.accelerator.unwrap_model(self.model)
            if is_peft_model(unwrapped):
                name = "ref" if "ref" in unwrapped.peft_config else None
                adapter = use_adapter(unwrapped, adapter_name=name)
        with torch.no_grad(), adapter:
            log_probs = self._run(target, pack).log_probs
        return self._side_sums(log_probs.float(), pack)

    # ---- memory

    def _gc_layers(self) -> list[GradientCheckpointingLayer]:
        if self._layers is None:
            self._layers = [m for m in self.accelerator.unwrap_model(self.model).modules()
                            if isinstance(m, GradientCheckpointingLayer)]
        return self._layers

    def _set_checkpointed_layers(self, n: int) -> None:
        """Checkpoint the first n decoder layers only (all of them when n >= L)."""
        if not self.args.gradient_checkpointing:
            return
        for i, layer in enumerate(self._gc_layers()):
            layer.gradient_checkpointing = i < n

    def _activation_cost(self, model) -> ActivationCost:
        """Measure saved-activation bytes per token once, on a dummy pair, no layer checkpointed.

        Measured twice: as this trainer runs the model, and without the lean activations (what TRL's
        own run saves per layer, which sets the default budget).
        """
        if self._cost is not None:
            return self._cost
        unwrapped = self.accelerator.unwrap_model(self.model)
        frozen = {t.untyped_storage().data_ptr() for t in
                  list(unwrapped.parameters()) + list(unwrapped.buffers())}
        token = self._tokenizer.eos_token_id or 0
        pack = pack_pairs([([token] * 128, [token] * 192, [token] * 192)]).to(self.accelerator.device)

        def saved_per_token(lean: bool) -> float:
            seen: dict[int, int] = {}

            alive: list[torch.Tensor] = []

            def keep(t: torch.Tensor) -> None:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in frozen:
                    seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
                # Hold the tensor here, not in the graph: returned to autograd it could keep its own
                # graph alive (a cycle Python's collector cannot see); dropped at once, its memory
                # would be reused and two tensors would share an address.
                alive.append(t)

            def no_backward(_: None) -> torch.Tensor:
                raise RuntimeError("the activation probe's graph has no backward")

            with self._packed_forward_context(lean=lean), \
                    torch.autograd.graph.saved_tensors_hooks(keep, no_backward), \
                    self.compute_loss_context_manager():
                out = self._run(model, pack)
            del out
            alive.clear()
            return sum(seen.values()) / pack.n_tokens

        self._set_checkpointed_layers(0)
        lean = getattr(self.args, "fast_lean_activations", True)
        full = saved_per_token(lean)
        reference = saved_per_token(False) if lean else full
        n_layers = max(len(self._gc_layers()), 1)
        kept = unwrapped.get_input_embeddings().weight.element_size() * \
            unwrapped.config.get_text_config().hidden_size
        self._cost = ActivationCost(full=full, layer=full / n_layers, kept=float(kept),
                                    n_layers=n_layers, reference_full=reference)
        return self._cost

    def _budget(self, cost: ActivationCost, batch_size: int) -> float:
        """Activation bytes a chunk may hold (see FastDPOConfig.fast_activation_budget_gb)."""
        gb = getattr(self.args, "fast_activation_budget_gb", None)
        if gb is not None:
            return gb * 2**30
        # TRL's layout: 2B rows of the longest sequence, checkpointed or not as the config says.
        rows = 2 * batch_size * self._longest_sequence()
        if self.args.gradient_checkpointing:
            return rows * (cost.n_layers * cost.kept + cost.reference_layer)
        return rows * (cost.reference_full or cost.full)

    def _longest_sequence(self) -> int:
        """The longest prompt + completion TRL would pad to in this dataset (after truncation)."""
        if self._data_max_len is None:
            cap = self.args.max_length
            try:
                columns = self.train_dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
                longest = max(len(p) + max(len(c), len(r)) for p, c, r in
                              zip(columns["prompt_ids"], columns["chosen_ids"],
                                  columns["rejected_ids"], strict=True))
                self._data_max_len = min(longest, cap) if cap else longest
            except (AttributeError, TypeError, ValueError):  # streaming data: use the cap
                self._data_max_len = cap or 4096
        return self._data_max_len

    def _chunk_tokens(self, cost: ActivationCost, budget: float) -> int:
        """Largest chunk to plan for: no checkpointing if that allows fast_min_chunk_tokens, else
        fast_min_chunk_tokens as long as the budget holds it with every layer checkpointed."""
        no_checkpointing = int(budget // (cost.full + cost.layer))
        all_checkpointed = int(budget // (cost.n_layers * cost.kept + cost.layer))
        wanted = getattr(self.args, "fast_min_chunk_tokens", FastDPOConfig.fast_min_chunk_tokens)
        return max(no_checkpointing, min(wanted, all_checkpointed), 1)

    def _ref_chunk_tokens(self) -> int:
        """Tokens per no-grad reference forward: as many as TRL's padded batch would hold."""
        batch = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        return 2 * batch * (self.args.max_length or 2048)

    # ---- one batch

    def _fast_batch(self, model, inputs: dict[str, Any], backward: bool) -> torch.Tensor:
        """Loss of one batch, chunk by chunk; with backward=True each chunk's gradient is added."""
        mode = "train" if self.model.training else "eval"
        pairs = self._pairs(inputs)
        n_pairs = len(pairs)
        lengths = [packed_length(p) for p in pairs]
        # The "sft" term is a mean over all chosen tokens of the batch: fix its denominator now.
        n_chosen_total = max(sum(len(c) for _, c, _ in pairs), 1)
        precomputed = self.precompute_ref_logps
        device = self.accelerator.device
        stats = _StepStats()
        plan: list[tuple[int, int]] = []
        total = torch.zeros((), device=device)
        if backward:
            self._activation_cost(model)
        with self._packed_forward_context():
            if precomputed:
                ref_chosen = inputs["ref_chosen_logps"].to(device).float()
                ref_rejected = inputs["ref_rejected_logps"].to(device).float()
            else:  # before the policy chunks, so its transient memory never meets their activations
                ref_chosen, ref_rejected = self._reference_for_pairs(pairs)
            if backward:
                cost = self._activation_cost(model)
                budget = self._budget(cost, n_pairs)
                chunks = plan_chunks(lengths, self._chunk_tokens(cost, budget))
            else:
                cost, budget = None, 0.0
                chunks = plan_chunks(lengths, self._ref_chunk_tokens())
            for i, chunk in enumerate(chunks):
                pack = pack_pairs([pairs[j] for j in chunk]).to(device)
                index = _index(chunk, device)
                ref_c, ref_r = ref_chosen[index], ref_rejected[index]
                if backward:
                    n_checkpointed = cost.n_layers - kept_layers(pack.n_tokens, budget, cost)
                    self._set_checkpointed_layers(n_checkpointed)
                    plan.append((pack.n_tokens, n_checkpointed))
                # Several GPUs: gradients are all-reduced once, after the batch's last chunk.
                last = i == len(chunks) - 1
                sync = contextlib.nullcontext() if last or not backward else self.accelerator.no_sync(model)
                with sync:
                    with self.compute_loss_context_manager():
                        loss = self._chunk_loss(model, pack, ref_c, ref_r, n_pairs, n_chosen_total,
                                                stats)
                    if backward:
                        loss = loss / getattr(self, "current_gradient_accumulation_steps", 1)
                        self.accelerator.backward(loss)
                total = total + loss.detach()
        self._set_checkpointed_layers(10**9)
        if backward:
            self.last_plan = plan  # (tokens, checkpointed layers) per chunk, for inspection
        self._log_batch(stats, pairs, mode)
        return total

    def _chunk_loss(self, model, pack: PairPack, ref_c: torch.Tensor, ref_r: torch.Tensor,
                    n_pairs: int, n_chosen_total: int, stats: _StepStats) -> torch.Tensor:
        """This chunk's share of the batch loss: Σ_types w · Σ_{pairs in chunk} ℓ / B."""
        out = self._run(model, pack)
        chosen, rejected = self._side_sums(out.log_probs.float(), pack)
        chosen_ratio, rejected_ratio = chosen - ref_c, rejected - ref_r
        loss = torch.zeros((), device=chosen.device)
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sft":
                term = -chosen.sum() / n_chosen_total
            else:
                term = pair_losses(loss_type, self.beta, chosen_ratio, rejected_ratio,
                                   pack.n_chosen, pack.n_rejected, self.label_smoothing,
                                   self.args.discopop_tau).sum() / n_pairs
            loss = loss + weight * term
        stats.chosen_logps.append(chosen.detach())
        stats.rejected_logps.append(rejected.detach())
        stats.ref_chosen.append(ref_c.detach())
        stats.ref_rejected.append(ref_r.detach())
        scored = pack.label_side > 0
        is_chosen = (pack.label_side == 1).float()
        is_rejected = (pack.label_side == 2).float()
        stats.add("entropy", (out.entropy[0].detach() * scored).sum())
        stats.add("scored", scored.sum())
        stats.add("chosen_tokens", is_chosen.sum())
        stats.add("rejected_tokens", is_rejected.sum())
        stats.add("chosen_logits", (out.mean_logits[0] * is_chosen).sum())
        stats.add("rejected_logits", (out.mean_logits[0] * is_rejected).sum())
        stats.add("chosen_top1", (out.is_top1[0].float() * is_chosen).sum())
        return loss

    def _log_batch(self, stats: _StepStats, pairs: list[Pair], mode: str) -> None:
        """TRL's metrics, under TRL's names, from the batch's per-pair sums."""
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        sums = {k: gather(v).sum().item() for k, v in stats.sums.items()}
        metrics["entropy"].append(sums["entropy"] / sums["scored"] if sums["scored"] else 0.0)
        if mode == "train":
            # As TRL counts them: both rows of a pair, the prompt twice.
            seen = sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs)
            tokens = gather(torch.tensor(seen, device=self.accelerator.device)).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        for side in ("chosen", "rejected"):
            count = sums[f"{side}_tokens"]
            metrics[f"logits/{side}"].append(sums[f"{side}_logits"] / count if count else 0.0)
        chosen_count = sums["chosen_tokens"]
        metrics["mean_token_accuracy"].append(sums["chosen_top1"] / chosen_count if chosen_count else 0.0)
        chosen = torch.cat(stats.chosen_logps)
        rejected = torch.cat(stats.rejected_logps)
        chosen_rewards = self.beta * (chosen - torch.cat(stats.ref_chosen))
        rejected_rewards = self.beta * (rejected - torch.cat(stats.ref_rejected))
        metrics["rewards/chosen"].append(self.accelerator.gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(self.accelerator.gather(rejected_rewards).mean().item())
        accuracies = (chosen_rewards > rejected_rewards).float()
        metrics["rewards/accuracies"].append(self.accelerator.gather(accuracies).mean().item())
        margins = chosen_rewards - rejected_rewards
        metrics["rewards/margins"].append(self.accelerator.gather(margins).mean().item())
        metrics["logps/chosen"].append(self.accelerator.gather(chosen).mean().item())
        metrics["logps/rejected"].append(self.accelerator.gather(rejected).mean().item())
