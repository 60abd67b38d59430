"""prefloop's generation engine: n samples per prompt from any transformers causal LM, fast.

What makes it fast, compared with `model.generate(num_return_sequences=n)`:
- each prompt is prefilled once and its K/V copied to its n sample rows; a prefix common to all
  prompts (a judge's rubric, a system prompt) is prefilled once for the whole call;
- prompts are sorted by length and batched with left padding, in preallocated K/V buffers
  (no per-step concatenation);
- attention reads the grouped K/V heads directly (no `repeat_kv` copies);
- finished rows leave the batch (CPU: at once; CUDA: in halving buckets);
- on CUDA the whole decode step (forward, top-p, sampling, bookkeeping) is a CUDA graph,
  one per 64-column block of attended keys; inside it, decode attention is compiled
  FlexAttention on the grouped K/V, and RMSNorm and rotary embeddings are compiled kernels
  (compiling is paid once per process and shape, in the first call's capture time);
  a `Session` keeps the buffers and graphs for later calls with the same settings;
- top-p is exact without sorting the vocabulary on CPU (top-64 first, bisection for the rare
  wider rows); inside CUDA graphs one sort per row was the fastest exact way (measured), and
  it sorts the bf16 logits (16-bit keys) rather than the float32 probabilities they rank.
Figures: bench/results_gen.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch

from prefloop.engine.fused import fused_kernels
from prefloop.engine.kv import grouped_attention, sliding_window
from prefloop.engine.loop import DecodeLoop, Finished, LoopOptions, options_for

__all__ = ["Completion", "Sampling", "Session", "generate", "GenerationStats", "last_logits"]


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7  # 0 => greedy
    top_p: float = 0.9
    max_new_tokens: int = 256
    min_new_tokens: int = 0  # EOS is banned until this many tokens exist
    seed: int = 0


@dataclass
class Completion:
    token_ids: list[int]  # generated ids without the prompt; ends with the EOS id if it stopped
    finish_reason: str  # "eos" or "length"

    @property
    def content_ids(self) -> list[int]:
        """The generated ids without the closing EOS."""
        return self.token_ids[:-1] if self.finish_reason == "eos" else list(self.token_ids)


@dataclass
class GenerationStats:
    """Filled in by `generate(..., stats=...)`: where the time went."""

    rows_per_batch: int = 0
    batches: int = 0
    capture_seconds: float = 0.0  # CUDA-graph warm-up and capture (paid once per shape)
    seconds: float = 0.0
    graphs: list[tuple[int, int]] = field(default_factory=list)


CPU_ROWS = 64  # sequences decoded together on CPU when batch_size is None
SESSION_COLUMNS = 64  # with a Session, K/V columns are rounded up to this (more calls match)


class Session:
    """Keeps the decode loop of a `generate` call (its K/V buffers and captured CUDA graphs)
    for the next call with the same settings on the same model, which then allocates and
    captures nothing: a judge or a benchmark calling `generate` many times pays capture once.

    Graphs replay the kernels they captured, so keep one Session per model *state*: turning
    an adapter on or off, or merging weights, between calls needs another Session (or none).
    Holds the K/V memory until `close()` or until it is dropped."""

    def __init__(self) -> None:
        self.loop: DecodeLoop | None = None
        self.key: tuple | None = None
        self.fit = 0  # rows the loop's call could have used (a larger call needs a new loop)

    def close(self) -> None:
        self.loop = self.key = None


def generate(model, prompts: Sequence[Sequence[int]], n: int, sampling: Sampling, *,
             eos_token_ids: Collection[int], pad_token_id: int, batch_size: int | None = None,
             on_prompt_done: Callable[[int, list[Completion]], None] | None = None,
             stats: GenerationStats | None = None, options: LoopOptions | None = None,
             stream_ids: Sequence[int] | None = None,
             session: Session | None = None) -> list[list[Completion]]:
    """n completions for each tokenized prompt (no BOS is added), in sample order.

    batch_size: sequences decoded together, rounded down to a multiple of n (at least n);
    None picks 64 on CPU and what free GPU memory holds on CUDA. `on_prompt_done(i, comps)`
    runs once per prompt as soon as its n samples are finished. `stats`, if given, is filled
    with timings; `options` overrides the per-device loop settings (tests, benchmarks).
    `stream_ids[i]` replaces i in prompt i's random stream (so a caller that splits its work
    into several calls can keep every prompt's draws as one call would give them).
    `session`: reuse the buffers and CUDA graphs of an earlier call (see `Session`).

    Determinism: the random draw of token t of sample s of prompt i is a hash of
    (seed, i, s, t), so outputs are a fixed function of the inputs and do not depend on batch
    composition or batch_size except through floating-point rounding of the logits (padding
    width and batch shape change the order of sums); that can flip a token only when two
    choices are within rounding of each other, which happens in low precision (bf16) now and
    then and almost never in fp32.
    """
    _validate(prompts, n, sampling, pad_token_id, batch_size)
    if stream_ids is not None and len(stream_ids) != len(prompts):
        raise ValueError(f"stream_ids: {len(stream_ids)} ids for {len(prompts)} prompts")
    if len(prompts) == 0:
        return []
    started = time.perf_counter()
    device = next(model.parameters()).device
    opt = options or options_for(device)
    columns = max(len(p) for p in prompts) + sampling.max_new_tokens - 1
    if session is not None:
        columns = -(-columns // SESSION_COLUMNS) * SESSION_COLUMNS
    window = sliding_window(model.config, columns)
    prefix = _prefix_length(prompts, opt, window)
    key = (id(model), str(next(model.parameters()).dtype), columns, n, sampling.temperature,
           sampling.top_p, sampling.max_new_tokens, sampling.min_new_tokens,
           tuple(sorted(set(eos_token_ids))), pad_token_id, window, prefix, opt, batch_size)
    loop = None
    if (session is not None and session.key == key
            and session.loop.capacity >= min(session.fit, len(prompts) * n)):
        loop = session.loop
        rows = loop.capacity
    else:
        if session is not None:
            session.close()  # frees its memory before sizing the batch
        rows = _rows_per_batch(model, batch_size, n, len(prompts), columns, device)
        if session is not None:
            session.fit = rows
    groups = _length_groups(prompts, rows // n)
    results: list[list[Completion | None]] = [[None] * n for _ in prompts]
    pending = [n] * len(prompts)

    def report(f: Finished) -> None:
        results[f.prompt][f.sample] = Completion(f.token_ids, f.finish_reason)
        pending[f.prompt] -= 1
        if pending[f.prompt] == 0 and on_prompt_done is not None:
            on_prompt_done(f.prompt, results[f.prompt])

    with (torch.inference_mode(), grouped_attention(model, opt.flex_decode, opt.flex_kernel),
          fused_kernels(model, opt.fused)):
        if loop is None:
            loop = _open_loop(model, n, sampling, rows=min(rows, len(prompts) * n),
                              columns=columns, eos_token_ids=list(eos_token_ids),
                              pad_token_id=pad_token_id, options=opt, window=window)
            if session is not None:
                session.loop, session.key = loop, key
        loop.seed = sampling.seed
        if prefix:
            loop.set_prefix(list(prompts[0][:prefix]))
        captured = loop.capture_seconds
        loop.stream_ids = stream_ids
        for group in groups:
            loop.run_group(group, report)
        loop.stream_ids = None
    if stats is not None:
        stats.rows_per_batch, stats.batches = min(rows, len(prompts) * n), len(groups)
        stats.capture_seconds = loop.capture_seconds - captured
        stats.graphs = sorted(loop.graphs)
        stats.seconds = time.perf_counter() - started
    return results  # type: ignore[return-value]  # every slot was filled by `report`


def last_logits(model, prompts: Sequence[Sequence[int]], token_ids: Sequence[int], *,
                pad_token_id: int, batch_size: int | None = None,
                options: LoopOptions | None = None) -> torch.Tensor:
    """Next-token logits after each prompt, for the vocabulary entries `token_ids` only:
    (len(prompts), len(token_ids)) float32 on the CPU. Prefills like `generate` (prompts
    batched by length, a prefix common to all of them computed once) and decodes nothing."""
    _validate(prompts, 1, Sampling(max_new_tokens=1), pad_token_id, batch_size)
    out = torch.zeros(len(prompts), len(token_ids))
    if len(prompts) == 0:
        return out
    device = next(model.parameters()).device
    opt = options or options_for(device)
    columns = max(len(p) for p in prompts)
    rows = _rows_per_batch(model, batch_size, 1, len(prompts), columns, device)
    select = torch.tensor(list(token_ids), dtype=torch.long, device=device)

    def sink(indices: list[int], logits: torch.Tensor) -> None:
        out[indices] = logits[:, select].float().cpu()

    window = sliding_window(model.config, columns)
    prefix = _prefix_length(prompts, opt, window)
    with torch.inference_mode(), grouped_attention(model):
        loop = _open_loop(model, 1, Sampling(temperature=0.0, max_new_tokens=1),
                          rows=min(rows, len(prompts)), columns=columns,
                          eos_token_ids=[pad_token_id], pad_token_id=pad_token_id, options=opt,
                          window=window)
        if prefix:
            loop.set_prefix(list(prompts[0][:prefix]))
        loop.logit_sink = sink
        for group in _length_groups(prompts, rows):
            loop.start_group(group)
    return out


def _length_groups(prompts: Sequence[Sequence[int]], size: int) -> list[list[tuple[int, list[int]]]]:
    """(index, prompt) pairs sorted by length (then index), in groups of `size`."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    return [[(i, list(prompts[i])) for i in order[g: g + size]]
            for g in range(0, len(order), size)]


def _open_loop(model, n: int, sampling: Sampling, *, rows: int, columns: int,
               eos_token_ids: list[int], pad_token_id: int, options: LoopOptions,
               window: int | None) -> DecodeLoop:
    """A DecodeLoop with `sampling`'s settings (its caller prefills any shared prefix)."""
    return DecodeLoop(model, n=n, rows=rows, columns=columns,
                      temperature=sampling.temperature, top_p=sampling.top_p,
                      max_new_tokens=sampling.max_new_tokens,
                      min_new_tokens=sampling.min_new_tokens, seed=sampling.seed,
                      eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, window=window,
                      options=options)


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix shared by every prompt, leaving each at least one token."""
    first, shortest = prompts[0], min(len(p) for p in prompts)
    length = 0
    while length < shortest - 1 and all(p[length] == first[length] for p in prompts):
        length += 1
    return length


def _prefix_length(prompts, opt: LoopOptions, window: int | None) -> int:
    """Tokens of the prompts' common prefix to prefill once: 0 unless long enough to be worth
    it (the column layout of a shared prefix is not position-contiguous, so not with a sliding
    window)."""
    if len(prompts) < 2 or not opt.shared_prefix or window is not None:
        return 0
    length = common_prefix(prompts)
    return length if length >= opt.shared_prefix else 0


def _validate(prompts, n, sampling: Sampling, pad_token_id, batch_size) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: must be a positive integer, got {n!r}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}]: empty; every prompt needs at least one token")
    if sampling.temperature < 0:
        raise ValueError(f"sampling.temperature: must be >= 0 (0 = greedy), got {sampling.temperature}")
    if not 0 < sampling.top_p <= 1:
        raise ValueError(f"sampling.top_p: must be in (0, 1], got {sampling.top_p}")
    if sampling.max_new_tokens < 1:
        raise ValueError(f"sampling.max_new_tokens: must be >= 1, got {sampling.max_new_tokens}")
    if not 0 <= sampling.min_new_tokens <= sampling.max_new_tokens:
        raise ValueError(f"sampling.min_new_tokens: must be in [0, max_new_tokens="
                         f"{sampling.max_new_tokens}], got {sampling.min_new_tokens}")
    if pad_token_id is None:
        raise ValueError("pad_token_id: required (use the tokenizer's pad id, or its EOS id)")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1 or None (automatic), got {batch_size}")


def _rows_per_batch(model, batch_size: int | None, n: int, prompts: int, columns: int,
                    device: torch.device) -> int:
    """Sequences per batch, a multiple of n: given, 64 on CPU, or what GPU memory holds."""
    if batch_size is not None:
        return max(n, batch_size // n * n)
    if device.type != "cuda":
        return max(n, CPU_ROWS // n * n)
    free, _ = torch.cuda.mem_get_info(device)
    # plus what torch's allocator holds unused (an earlier call's buffers), which it will reuse
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    per_row = _kv_bytes_per_row(model, columns) + 64 * model.config.get_text_config().vocab_size
    budget = 0.9 * free - 3 * 2**30  # room for prefill activations and graph temporaries
    fit = max(n, int(budget // per_row) // n * n)
    return min(fit, prompts * n)


def _kv_bytes_per_row(model, columns: int) -> int:
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    item = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * columns * item
