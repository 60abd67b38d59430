"""The engine's KV cache, attention masks, and a grouped-query attention function.

Layout: one buffer (rows, kv_heads, columns, head_dim) per layer and for K and V. Prompts are
left-padded so that every row of a batch writes the same column at each decode step; row r's
tokens occupy columns [pad_r, col], and its position ids are column - pad_r.

Shared prefix: when every prompt of a call starts with the same P tokens (a judge's rubric, a
system prompt), those are prefilled once into columns [0, P) of every row, and each prompt's
remainder is left-padded after them: row r then reads columns [0, P) ∪ [pad_r, col], and its
position ids count the prefix too.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.cache_utils import Cache

ATTENTION_NAME = "prefloop_gqa_sdpa"
_CUDA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION,
                  SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]


def gqa_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0,
                       scaling: float | None = None, **kwargs):
    """Attention on grouped K/V without copying them up to the query heads (`repeat_kv`).

    Query head h reads K/V head h // G (G = heads / kv_heads). The G heads of a group are
    folded into the query length, so plain SDPA runs on kv_heads heads:
    query (B, H, Lq, D) → (B, Hkv, G·Lq, D); mask (B, 1, Lq, Lk) → (B, 1, G·Lq, Lk);
    returns (B, Lq, H, D) like transformers' own attention functions.
    """
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError("prefloop.engine: attention softcap/sinks are not supported; "
                         "generate with transformers' generate() for this model")
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    q = query.reshape(batch, kv_heads, group * q_len, dim)
    mask = attention_mask
    if mask is not None and q_len > 1 and group > 1:
        mask = mask.unsqueeze(2).expand(batch, mask.shape[1], group, q_len, mask.shape[-1])
        mask = mask.reshape(batch, -1, group * q_len, mask.shape[-1])
    # FlexAttention's Triton kernel needs head_dim >= 16 (inductor: "NYI"); smaller: SDPA
    if (q_len == 1 and mask is not None and _FLEX_DECODE[0] and dim >= FLEX_MIN_HEAD_DIM
            and _flex_shape_ok(key)):
        options = dict(_FLEX_KERNEL[0]) if _FLEX_KERNEL[0] else None
        out = flex_decode_kernel()(query, key, value, mask, scaling, options)  # (B, H, 1, D)
        return out.transpose(1, 2), None
    if q.is_cuda:  # measured on H100 at decode shapes: 17 % faster than the default (cuDNN)
        with sdpa_kernel(_CUDA_BACKENDS, set_priority=True):
            out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    else:
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, q_len, out.shape[-1]).transpose(1, 2), None


AttentionInterface.register(ATTENTION_NAME, gqa_sdpa_attention)

_FLEX_DECODE = [False]  # set by grouped_attention(model, flex_decode=True)


def flex_decode_attention(query, key, value, bias, scale, kernel_options=None):
    """One-token attention on grouped K/V with FlexAttention: the additive mask is read as a
    score modification, so any mask the engine builds works unchanged."""
    from torch.nn.attention.flex_attention import flex_attention

    def add_bias(score, b, h, q_idx, kv_idx):
        return score + bias[b, 0, q_idx, kv_idx]

    return flex_attention(query, key, value, score_mod=add_bias, enable_gqa=True, scale=scale,
                          kernel_options=kernel_options)


# Triton options of the decode kernel (BLOCK_N, num_stages, num_warps), None: torch's defaults.
# Set through LoopOptions.flex_kernel; the benchmark compares settings.
_FLEX_KERNEL: list = [None]
FLEX_COMPILED: list = []
# FlexAttention is compiled per (rows, keys) shape, ~1 s each on an H200. A long run meets many
# shapes (row buckets x 64-column blocks); past this many, new shapes use SDPA (same results,
# a little slower) instead of compiling on, or of torch falling back to eager FlexAttention.
FLEX_MAX_SHAPES = 48
FLEX_MIN_HEAD_DIM = 16
_FLEX_SHAPES: set = set()


def _flex_shape_ok(key: torch.Tensor) -> bool:
    shape = (tuple(key.shape), key.dtype, key.device)
    if shape in _FLEX_SHAPES:
        return True
    if len(_FLEX_SHAPES) >= FLEX_MAX_SHAPES:
        return False
    _FLEX_SHAPES.add(shape)
    return True


def flex_decode_kernel():
    """flex_decode_attention compiled once (FLEX_COMPILED holds it; a benchmark may swap it)."""
    if not FLEX_COMPILED:
        import torch._dynamo

        # one compiled kernel per (rows, attended columns) shape; the engine needs a few dozen
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        FLEX_COMPILED.append(torch.compile(flex_decode_attention, dynamic=False))
    return FLEX_COMPILED[0]


@contextmanager
def grouped_attention(model, flex_decode: bool = False, flex_kernel: tuple | None = None):
    """Run `model` with `gqa_sdpa_attention`, restoring its attention implementation after.
    flex_decode: one-token (decode) attention on CUDA through compiled FlexAttention;
    flex_kernel: its Triton options as ((name, value), ...), None for torch's defaults.

    Yields whether the switch took (models without the attention interface keep their own,
    which receives the same additive masks)."""
    before = model.config._attn_implementation
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, AttributeError):
        pass
    flex_before, kernel_before = _FLEX_DECODE[0], _FLEX_KERNEL[0]
    _FLEX_DECODE[0], _FLEX_KERNEL[0] = flex_decode, flex_kernel
    try:
        yield model.config._attn_implementation == ATTENTION_NAME
    finally:
        _FLEX_DECODE[0], _FLEX_KERNEL[0] = flex_before, kernel_before
        if model.config._attn_implementation != before:
            model.set_attn_implementation(before)


def sliding_window(config, columns: int) -> int | None:
    """The attention window to build into masks, or None when every layer sees everything."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = set(getattr(config, "layer_types", None) or [])
    if types - {"full_attention", "sliding_attention"}:
        raise ValueError(f"prefloop.engine: layer types {sorted(types)} are not supported; "
                         "generate with transformers' generate() for this model")
    window = getattr(config, "sliding_window", None)
    if not window or window >= columns or types == {"full_attention"}:
        return None
    if "full_attention" in types:
        raise ValueError(f"prefloop.engine: mixed full/sliding attention needs sequences under "
                         f"the window ({window} tokens); lower max_new_tokens or the prompts")
    return int(window)


def prefill_mask(pad: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """Causal mask of a left-padded chunk: query j sees key i ≤ j with i ≥ pad (and j - i <
    window). Padding queries see themselves so that no softmax row is empty.
    pad: (P,) → (P, 1, L, L) bool."""
    j = torch.arange(length, device=pad.device)
    allowed = (j[None, :] <= j[:, None]).unsqueeze(0) & (j >= pad[:, None]).unsqueeze(1)
    if window is not None:
        allowed &= (j[:, None] - j[None, :] < window).unsqueeze(0)
    return (allowed | torch.eye(length, dtype=torch.bool, device=pad.device)).unsqueeze(1)


def decode_mask(pad: torch.Tensor, col: torch.Tensor, columns: torch.Tensor,
                window: int | None, prefix: int = 0) -> torch.Tensor:
    """Keys a decode step may read: c < prefix or pad_r ≤ c ≤ col (and col - c < window).
    Graph-safe. pad: (B,); col: (1,); columns: (K,) = arange(K) → (B, 1, 1, K) bool."""
    allowed = (columns >= pad[:, None]) & (columns <= col)
    if prefix:
        allowed |= columns < prefix
    if window is not None:
        allowed &= columns > col - window
    return allowed[:, None, None, :]


class SlotKVCache(Cache):
    """Preallocated K/V for `rows` sequences of up to `columns` tokens, driven by the engine.

    prefix mode: one shared prefix writes its K/V into columns [0, L) of every row.
    prefill mode: a chunk of P prompts writes its K/V into `copies` consecutive rows per prompt
    (rows row0 .. row0 + P·copies), columns col0 .. col0 + L, and attends to the shared prefix
    (columns [0, prefix), none when prefix is 0) and to itself.
    decode mode: rows [0, rows) write one token at column `col` (a (1,) tensor, so a CUDA graph
    can replay the step) and attend to columns [0, kv_len).
    """

    def __init__(self, rows: int, columns: int, col: torch.Tensor):
        super().__init__(layers=[])
        self.capacity, self.columns, self.col = rows, columns, col
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mode, self.row0, self.copies, self.col0, self.prefix = "prefill", 0, 1, 0, 0
        self.rows, self.kv_len, self.seen = 0, 0, 0

    def _buffers(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):  # allocated on first use: shapes come from the model
            shape = (self.capacity, like.shape[1], self.columns, like.shape[3])
            self.keys.append(torch.zeros(shape, dtype=like.dtype, device=like.device))
            self.values.append(torch.zeros(shape, dtype=like.dtype, device=like.device))
        return self.keys[layer_idx], self.values[layer_idx]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._buffers(layer_idx, key_states)
        if self.mode == "prefix":
            length = key_states.shape[2]
            for buf, new in ((keys, key_states), (values, value_states)):
                buf[:, :, :length].copy_(new.expand(buf.shape[0], -1, -1, -1))
            return key_states, value_states
        if self.mode == "prefill":
            prompts, length = key_states.shape[0], key_states.shape[2]
            rows = slice(self.row0, self.row0 + prompts * self.copies)
            cols = slice(self.col0, self.col0 + length)
            for buf, new in ((keys, key_states), (values, value_states)):
                buf[rows].unflatten(0, (prompts, self.copies))[:, :, :, cols].copy_(
                    new.unsqueeze(1))
            if not self.prefix:
                return key_states, value_states
            shared = [buf[:1, :, : self.prefix].expand(prompts, -1, -1, -1)
                      for buf in (keys, values)]  # the prefix columns are the same in every row
            return (torch.cat([shared[0], key_states], 2), torch.cat([shared[1], value_states], 2))
        k, v = keys[: self.rows], values[: self.rows]
        k.index_copy_(2, self.col, key_states)
        v.index_copy_(2, self.col, value_states)
        return k[:, :, : self.kv_len], v[:, :, : self.kv_len]

    def move_rows(self, dst: torch.Tensor, src: torch.Tensor, used_columns: int) -> None:
        """Copy rows src → dst (all layers), over the columns written so far."""
        for buf in self.keys + self.values:
            part = buf[:, :, :used_columns]
            part.index_copy_(0, dst, part.index_select(0, src))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.kv_len, 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * max(len(self.keys), 1)
