"""The decode loop: prefill each prompt once into its n rows, then step all rows together.

Per-row state lives in fixed tensors (capacity rows) so that, on CUDA, one decode step
(forward, token choice, bookkeeping) can be captured once per shape as a CUDA graph and
replayed. Finished rows are swapped out of the active prefix [0, active): on CPU at every step,
on CUDA when the live rows fit a bucket of half the size (so few graphs are needed).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from prefloop.engine.kv import SlotKVCache, decode_mask, prefill_mask
from prefloop.engine.sampling import choose_tokens, row_key


@dataclass(frozen=True)
class LoopOptions:
    """How the loop runs on a device (see `options_for`)."""

    cuda_graphs: bool        # capture the decode step (CUDA only)
    prefilter: int | None    # top-k before top-p; None: sort every row (graph-safe)
    sync_every: int          # steps between host reads of the finished flags
    kv_block: int            # attention reads columns up to the next multiple of this
    bucket_rows: bool        # keep row counts at group/2^k (few graph shapes) or exact
    prefill_tokens: int      # padded prompt tokens per prefill forward
    shared_prefix: int = 16  # prefill a prefix common to all prompts once if this long (0: never)
    fused: bool = False      # CUDA: compiled RMSNorm and rotary kernels (engine/fused.py)
    flex_decode: bool = False  # CUDA: decode attention through compiled FlexAttention
    flex_kernel: tuple | None = None  # its Triton options ((name, value), ...); None: torch's


CUDA_FLEX_KERNEL = (("BLOCK_N", 64), ("num_stages", 1), ("num_warps", 4))


def options_for(device: torch.device) -> LoopOptions:
    if device.type == "cuda":
        # flex_kernel: 4 warps, 1 stage, 64-key blocks: +2-3 % end to end on an H200 against
        # torch's 2 warps, with the same key blocks (so the same rounding; bench/results_gen.md)
        return LoopOptions(cuda_graphs=True, prefilter=None, sync_every=16, kv_block=64,
                           bucket_rows=True, prefill_tokens=16384, fused=True, flex_decode=True,
                           flex_kernel=CUDA_FLEX_KERNEL)
    return LoopOptions(cuda_graphs=False, prefilter=64, sync_every=1, kv_block=1,
                       bucket_rows=False, prefill_tokens=2048)


@dataclass
class Finished:
    """One finished sequence, as the loop reports it."""

    prompt: int
    sample: int
    token_ids: list[int]
    finish_reason: str


def _forward_kwargs(model, cache) -> dict:
    """The cache argument under its name (transformers renamed `past_key_values` to `cache`),
    and `logits_to_keep=1` where the model takes it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    kwargs = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    return kwargs


class DecodeLoop:
    """Generates n samples for groups of prompts, reusing one cache and one set of graphs."""

    def __init__(self, model, *, n: int, rows: int, columns: int, temperature: float,
                 top_p: float, max_new_tokens: int, min_new_tokens: int, seed: int,
                 eos_token_ids: Sequence[int], pad_token_id: int, window: int | None,
                 options: LoopOptions):
        self.model, self.n, self.opt, self.window = model, n, options, window
        self.capacity = rows
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.max_new, self.min_new, self.pad_id = max_new_tokens, min_new_tokens, pad_token_id
        self.device = device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)

        self.tok, self.pos, self.pad, self.key = zeros(rows, 1), zeros(rows, 1), zeros(rows), zeros(rows)
        self.done, self.out = zeros(rows, dtype=torch.bool), zeros(rows, max_new_tokens)
        self.step, self.col = zeros(1), zeros(1)
        self.columns = torch.arange(columns, device=device)
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
        self.cache = SlotKVCache(rows, columns, self.col)
        self.prefix = 0  # shared prefix length (columns [0, prefix) of every row), see set_prefix
        self.logit_sink: Callable[[list[int], torch.Tensor], None] | None = None
        self.stream_ids: Sequence[int] | None = None  # random stream of prompt i (default: i)
        self.owner: list[tuple[int, int] | None] = [None] * rows
        self.active = 0
        self.n_columns = columns
        self.fwd_kwargs = _forward_kwargs(model, self.cache)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if options.cuda_graphs else None
        self.capture_seconds = 0.0

    # ---- shared prefix -----------------------------------------------------------------------

    def set_prefix(self, ids: list[int]) -> None:
        """Prefill `ids`, the first tokens of every prompt to come, once into all rows."""
        length = len(ids)
        self.cache.mode, self.cache.seen, self.cache.prefix = "prefix", 0, 0
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        pad = torch.zeros(1, dtype=torch.long, device=self.device)
        self.model(input_ids=tokens,
                   attention_mask=self.additive_mask(prefill_mask(pad, length, None)),
                   position_ids=torch.arange(length, device=self.device)[None],
                   **self.fwd_kwargs)
        self.prefix = length

    # ---- one group -------------------------------------------------------------------------

    def run_group(self, group: list[tuple[int, list[int]]],
                  report: Callable[[Finished], None]) -> None:
        """Generate n samples for each (prompt index, ids) in `group` (at most rows/n prompts)."""
        width = self.start_group(group)
        self._collect(report, width)
        for step in range(1, self.max_new):
            if not any(o is not None for o in self.owner[: self.active]):
                break
            kv = min(self.n_columns, -(-(width + step) // self.opt.kv_block) * self.opt.kv_block)
            self.cache.seen = width + step - 1
            self.decode_step(self.active, kv)
            if step % self.opt.sync_every == 0 or step == self.max_new - 1:
                self._collect(report, width + step)
        self._collect(report, width + self.max_new - 1, final=True)

    def start_group(self, group: list[tuple[int, list[int]]]) -> int:
        """Prefill the group into rows [0, len(group)·n); return its padded prompt width."""
        width = max(len(ids) for _, ids in group)
        used = len(group) * self.n
        self.active = self._bucket(used, used)
        self._reset(self.active)
        row = 0
        for chunk in self._chunks(group):
            self._prefill(chunk, row, width)
            row += len(chunk) * self.n
        self.step.fill_(1)
        self.col.fill_(width)
        return width

    def _chunks(self, group):
        """Prefill chunks: at most `prefill_tokens` padded tokens, and at most 25 % padding
        (the group is sorted by length, so each new prompt sets the chunk's width)."""
        chunk: list[tuple[int, list[int]]] = []
        real = 0
        for item in group:
            length = len(item[1]) - self.prefix
            padded = (len(chunk) + 1) * length
            if chunk and (padded > self.opt.prefill_tokens or padded > 1.25 * (real + length)):
                yield chunk
                chunk, real = [], 0
            chunk.append(item)
            real += length
        if chunk:
            yield chunk

    def _bucket(self, live: int, full: int) -> int:
        """Rows to compute for `live` sequences: exact, or full/2^k (≥ live, multiple of 8)."""
        if not self.opt.bucket_rows:
            return live
        size = full
        while size > 8 and -(-(size // 2) // 8) * 8 >= live:
            size = -(-(size // 2) // 8) * 8
        return min(size, full)

    def _reset(self, rows: int) -> None:
        self.owner = [None] * len(self.owner)
        self.done[:rows] = True
        self.tok[:rows] = self.pad_id
        self.pos[:rows] = 0
        self.pad[:rows] = 0
        self.out[:rows] = self.pad_id
        self.step.zero_()

    # ---- prefill ---------------------------------------------------------------------------

    def _prefill(self, chunk: list[tuple[int, list[int]]], row0: int, width: int) -> None:
        """Run a chunk of prompts once (after the shared prefix); copy their K/V to n rows each;
        draw token 0."""
        pre = self.prefix
        span = max(len(ids) for _, ids in chunk) - pre
        ids = torch.full((len(chunk), span), self.pad_id, dtype=torch.long)
        for i, (_, prompt) in enumerate(chunk):
            ids[i, span - len(prompt) + pre:] = torch.tensor(prompt[pre:], dtype=torch.long)
        ids = ids.to(self.device)
        lengths = torch.tensor([len(ids) for _, ids in chunk], device=self.device)
        pad = span - (lengths - pre)
        positions = (torch.arange(span, device=self.device) - pad[:, None]).clamp_(min=0) + pre
        mask = prefill_mask(pad, span, self.window)  # (P, 1, span, span)
        if pre:
            mask = torch.cat([mask.new_ones(len(chunk), 1, span, pre), mask], -1)
        self.cache.mode, self.cache.row0, self.cache.copies = "prefill", row0, self.n
        self.cache.col0, self.cache.seen, self.cache.prefix = width - span, pre, pre
        logits = self.model(input_ids=ids, attention_mask=self.additive_mask(mask),
                            position_ids=positions, **self.fwd_kwargs).logits[:, -1]
        if self.logit_sink is not None:
            self.logit_sink([i for i, _ in chunk], logits)
        rows = slice(row0, row0 + len(chunk) * self.n)
        ids_of = self.stream_ids
        keys = [row_key(self.seed, p if ids_of is None else ids_of[p], s)
                for p, _ in chunk for s in range(self.n)]
        self.key[rows] = torch.tensor(keys, dtype=torch.long, device=self.device)
        self.pad[rows] = (width - lengths + pre).repeat_interleave(self.n)
        self.pos[rows, 0] = lengths.repeat_interleave(self.n)
        first = self._choose(logits.repeat_interleave(self.n, 0), self.key[rows])
        self.out[rows, 0] = first
        self.tok[rows, 0] = first
        self.done[rows] = self._is_eos(first)
        for r in range(rows.start, rows.stop):
            self.owner[r] = (chunk[(r - row0) // self.n][0], (r - row0) % self.n)

    # ---- decode ----------------------------------------------------------------------------

    def decode_step(self, rows: int, kv: int) -> None:
        """One token for rows [0, rows): the captured graph's replay on CUDA, else eager_step."""
        if not self.opt.cuda_graphs:
            self.eager_step(rows, kv)
            return
        graph = self.graphs.get((rows, kv))
        if graph is None:
            graph = self._capture(rows, kv)
        graph.replay()

    def eager_step(self, rows: int, kv: int) -> None:
        """One token for rows [0, rows): forward at column `col`, choose, record. Graph-safe."""
        self.cache.mode, self.cache.rows, self.cache.kv_len = "decode", rows, kv
        mask = decode_mask(self.pad[:rows], self.col, self.columns[:kv], self.window, self.prefix)
        logits = self.model(input_ids=self.tok[:rows], attention_mask=self.additive_mask(mask),
                            position_ids=self.pos[:rows], **self.fwd_kwargs).logits[:, -1]
        done = self.done[:rows]
        nxt = torch.where(done, self.pad_id, self._choose(logits, self.key[:rows]))
        self.out[:rows].index_copy_(1, self.step, nxt.unsqueeze(1))
        done |= self._is_eos(nxt)
        self.tok[:rows] = nxt.unsqueeze(1)
        self.pos[:rows] += 1
        self.col += 1
        self.step += 1

    def _capture(self, rows: int, kv: int) -> torch.cuda.CUDAGraph:
        """Capture `eager_step(rows, kv)`. Before each capture, a warm-up run on the same inputs
        does the libraries' lazy set-up and any compiling for this shape (neither is allowed
        during capture); its state changes are undone."""
        started = time.perf_counter()
        state = [self.tok, self.pos, self.done, self.out, self.step, self.col]
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.eager_step(rows, kv)  # writes this step's K/V column; the replay rewrites it
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(state, saved, strict=True):
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            self.eager_step(rows, kv)
        self.graphs[(rows, kv)] = graph
        self.capture_seconds += time.perf_counter() - started
        return graph

    def _choose(self, logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return choose_tokens(logits, keys, self.step, temperature=self.temperature,
                             top_p=self.top_p, prefilter=self.opt.prefilter, eos_ids=self.eos,
                             min_new_tokens=self.min_new)

    def _is_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens.unsqueeze(-1) == self.eos).any(-1)

    def additive_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """The additive form (0 or the dtype's lowest value), which every attention function
        takes (eager ones need it) and SDPA would otherwise build from a boolean mask in every
        layer."""
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(
            ~allowed, torch.finfo(self.dtype).min)

    # ---- harvesting and compaction ---------------------------------------------------------

    def _collect(self, report: Callable[[Finished], None], used_columns: int,
                 final: bool = False) -> None:
        """Report finished rows (all rows if `final`), then shrink the active prefix."""
        done = self.done[: self.active].tolist()
        ready = [r for r in range(self.active) if self.owner[r] is not None and (done[r] or final)]
        if ready:
            tokens = self.out[ready].tolist()
            eos = set(self.eos.tolist())
            for r, toks in zip(ready, tokens, strict=True):
                cut = next((i for i, t in enumerate(toks) if t in eos), None)
                prompt, sample = self.owner[r]
                self.owner[r] = None
                if cut is None:
                    report(Finished(prompt, sample, toks, "length"))
                else:
                    report(Finished(prompt, sample, toks[: cut + 1], "eos"))
        if not final:
            self._compact(used_columns)

    def _compact(self, used_columns: int) -> None:
        live = [r for r in range(self.active) if self.owner[r] is not None]
        target = self._bucket(len(live), self.active) if live else 0
        if target >= self.active:
            return
        movers = [r for r in live if r >= target]
        holes = [r for r in range(target) if self.owner[r] is None][: len(movers)]
        if movers:
            dst = torch.tensor(holes, device=self.device)
            src = torch.tensor(movers, device=self.device)
            for t in (self.tok, self.pos, self.pad, self.key, self.done, self.out):
                t.index_copy_(0, dst, t.index_select(0, src))
            self.cache.move_rows(dst, src, used_columns)
            for h, m in zip(holes, movers, strict=True):
                self.owner[h], self.owner[m] = self.owner[m], None
        self.active = target
