"""Packing: B preference pairs in one padding-free row, and the batches that carry them.

TRL 1.16 lays a batch of B pairs out as 2B right-padded rows, ``[prompt + chosen]`` and
``[prompt + rejected]``: every prompt runs twice and every row is padded to the longest of the 2B.
Here each pair becomes ``[prompt, chosen, p_last, rejected]`` in one row, no padding: the prompt runs
once; ``p_last`` is a copy of the prompt's last token at the same position, so that it can predict
the first rejected token. The pair is two attention sequences: ``prompt + chosen`` (causal) and
``p_last + rejected``, whose keys are ``prompt[:-1] + p_last + rejected`` (causal, bottom-right
aligned); `attention.py` runs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Kinds of token in a packed row: which keys a query may see depends on them.
PROMPT_BODY, PROMPT_LAST, CHOSEN, REJECTED = 0, 1, 2, 3


@dataclass
class PairPack:
    """B pairs packed into one row of T tokens (layout: the module docstring).

    input_ids, position_ids, shift_labels: (1, T); shift_labels[t] is the token position t
    predicts, -100 where nothing is scored. pair_id, label_side: (T,), the pair of each position and
    1 (predicts a chosen token) or 2 (a rejected one), 0 where nothing is scored. kind: (T,), the
    token kind (prompt body, last prompt token, chosen, rejected side), for the mask path.
    cu_q (2B+1,), cu_k (2B+1,) int32: cumulative query / key lengths of the 2B attention sequences;
    k_index (T_k,): row position of each key. n_chosen, n_rejected: (B,) completion lengths.
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
