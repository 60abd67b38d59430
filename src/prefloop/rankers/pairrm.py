"""PairRM (llm-blender/PairRM) reimplemented natively on transformers v5.

PairRM is a DeBERTa-v3-large cross-encoder that reads one pair
``[CLS] <|source|> x [SEP] [CLS] <|candidate1|> a [SEP] [CLS] <|candidate2|> b [SEP]``
and returns logit(a, b) = head([h_src; h_1]) - head([h_src; h_2]), where h_* are the last-layer
states at the three marker tokens and head = Linear(2H -> H) -> tanh -> Linear(H -> 1).
sigma(logit(a, b)) is the Bradley-Terry probability that a is better than b.

Differences from llm-blender 0.0.2 (docs/pairrm.md §6), all deliberate:
- Candidate budget per example, Cb = C + (S - Lsrc) // 2, so a ranking never depends on which
  prompts share a batch; llm-blender uses the longest source of its batch
  (``reference_batch_size=`` reproduces that, for parity tests only).
- Marker strings inside a text ("<|source|>", "<|candidate|>", ...) would add marker ids and
  break the gather; they are neutralised: any marker id inside a text is encoded as [UNK].
- Candidate counts may differ between prompts, and the n(n-1) ordered pairs of all prompts are
  scored together, sorted by length; identical pair inputs are scored once, so candidates that
  are equal after truncation always tie exactly.
- The head runs in float32 on top of a float16/bfloat16 backbone on GPU.
Long candidates are judged on their beginning only: see PAIRRM_MAX_CANDIDATE_TOKENS.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from tokenizers import Tokenizer
from torch import nn
from transformers import DebertaV2Config, DebertaV2Model

from prefloop.errors import PrefloopError
from prefloop.rankers.groups import duplicate_of

PAIRRM_REPO = "llm-blender/PairRM"
# A README-only commit on top of 5e3cb95 ("Create config.json"); weights, config and tokenizer
# are those of 5e3cb95.
PAIRRM_REVISION = "c8459070a0c43a860e95afcff245c139d3995783"
PAIRRM_MAX_SOURCE_TOKENS = 1224  # S: [CLS] <|source|> ... [SEP], cut from the end
PAIRRM_MAX_CANDIDATE_TOKENS = 412  # C: [CLS] <|candidate|> ... [SEP] (+ half the unused S)
PAIRRM_FILES = ("config.json", "tokenizer.json", "model.safetensors")

# microsoft/deberta-v3-large, the backbone of PairRM, with the 4 marker tokens added.
DEBERTA_V3_LARGE: dict = {
    "vocab_size": 128005,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-7,
    "relative_attention": True,
    "max_relative_positions": -1,
    "position_buckets": 256,
    "pad_token_id": 0,
    "position_biased_input": False,
    "pos_att_type": ["p2c", "c2p"],
    "share_att_key": True,
    "norm_rel_ebd": "layer_norm",
}

SPECIAL_TOKENS = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3}
SOURCE_MARKER = "<|source|>"
LEFT_MARKER = "<|candidate1|>"
RIGHT_MARKER = "<|candidate2|>"
CANDIDATE_MARKER = "<|candidate|>"
MARKERS = (SOURCE_MARKER, LEFT_MARKER, RIGHT_MARKER, CANDIDATE_MARKER)
HEAD_KEYS = ("head_layer.1.weight", "head_layer.1.bias", "head_layer.4.weight", "head_layer.4.bias")
BACKBONE_PREFIX = "pretrained_model."


class PairRMUnavailable(PrefloopError, RuntimeError):
    """PairRM's weights cannot be had here (offline, or not on the Hub at that revision)."""


# ---------------------------------------------------------------------------------------------
# Aggregation: pure functions on the pairwise matrix
# ---------------------------------------------------------------------------------------------


def scores_from_matrix(matrix: np.ndarray) -> np.ndarray:
    """Per-candidate scores from the pairwise logits, llm-blender's "max_logits" rule.

    score_i = (1/n) * sum_j (M_ij - M_ji), with M_ii = 0 counted in the n.
    matrix: [n, n] with M_ij = logit(c_i, c_j). Returns [n] float32; higher is better.
    """
    m = np.asarray(matrix, dtype=np.float32)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"matrix: expected a square [n, n] array, got shape {m.shape}")
    return (m - m.T).mean(axis=-1)


def competition_ranks(scores: Sequence[float]) -> list[int]:
    """1-based competition ranks: rank_i = 1 + #{j : s_j > s_i}; exact ties share the best rank.

    Equals llm-blender's "1 + index of the first equal value in the descending sort",
    e.g. scores (0.5, 0.5, -1) -> ranks (1, 1, 3).
    """
    s = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores: PairRM produced non-finite scores {s.tolist()}; use float32")
    return [1 + int(np.sum(s > v)) for v in s]


def stable_order(ranks: Sequence[int]) -> list[int]:
    """Candidate indices best first: a stable argsort of the ranks (ties keep input order).

    Never index candidates by ``ranks - 1``: ranks are not a permutation.
    """
    return np.argsort(np.asarray(ranks), kind="stable").tolist()


def preference_probabilities(matrix: np.ndarray, temperature: float = 2.0) -> np.ndarray:
    """Position-debiased soft preferences p(i > j) = sigma((M_ij - M_ji) / T).

    T = 2 gives sigma of the mean of both orders; the diagonal is 0.5. Returns [n, n] float64.
    """
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    m = np.asarray(matrix, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-(m - m.T) / temperature))


@dataclass(frozen=True)
class PairRMResult:
    """PairRM's judgement of one prompt's n candidates."""

    matrix: np.ndarray  # [n, n] float32, M_ij = logit(c_i, c_j), zero diagonal
    scores: list[float]  # (1/n) * sum_j (M_ij - M_ji); higher is better
    ranks: list[int]  # 1-based competition ranks, ties share the best rank

    @property
    def order(self) -> list[int]:
        """Candidate indices, best first (stable on ties)."""
        return stable_order(self.ranks)

    def preferences(self, temperature: float = 2.0) -> np.ndarray:
        """[n, n] soft preferences p(i > j); see ``preference_probabilities``."""
        return preference_probabilities(self.matrix, temperature)


def result_from_matrix(matrix: np.ndarray) -> PairRMResult:
    m = np.asarray(matrix, dtype=np.float32)
    scores = scores_from_matrix(m)
    return PairRMResult(matrix=m, scores=scores.tolist(), ranks=competition_ranks(scores))


# ---------------------------------------------------------------------------------------------
# Tokenizer and input construction
# ---------------------------------------------------------------------------------------------


class PairRMTokenizer:
    """The hub ``tokenizer.json`` read with ``tokenizers`` (v4-exact ids; v5 AutoTokenizer is not).

    transformers v5's DebertaV2Tokenizer rebuilds the normaliser without the NFKC charsmap, so
    "…", "ﬁ", full-width letters, NBSP and "²" would get other ids than PairRM was trained on.
    """

    def __init__(self, tokenizer: Tokenizer):
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        for token, expected in SPECIAL_TOKENS.items():
            _expect_id(tokenizer, token, expected)
        self.pad_id, self.cls_id, self.sep_id, self.unk_id = SPECIAL_TOKENS.values()
        ids = [tokenizer.token_to_id(m) for m in MARKERS]
        if None in ids:
            raise ValueError(f"tokenizer.json: missing PairRM markers {MARKERS}, got ids {ids}")
        self.source_id, self.left_id, self.right_id, self.candidate_id = ids
        self.marker_ids = frozenset(ids)
        if self.source_id != tokenizer.get_vocab_size() - 4:
            warnings.warn(f"tokenizer.json: unexpected marker ids {ids}", stacklevel=2)
        if "Precompiled" not in json.dumps(json.loads(tokenizer.to_str()).get("normalizer")):
            warnings.warn("tokenizer.json has no Precompiled (NFKC) normaliser", stacklevel=2)

    @classmethod
    def from_file(cls, path: str | Path) -> PairRMTokenizer:
        return cls(Tokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens and no truncation."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def segment(self, marker: str, text: str, max_tokens: int) -> list[int]:
        """``[CLS] marker text… [SEP]`` cut from the end to ``max_tokens`` ids.

        As llm-blender: "[SEP]" in the text becomes " " (keeps one [SEP] per segment) and the
        marker is prefixed as text. Unlike it, a marker id inside the text becomes [UNK].
        """
        if max_tokens < 3:
            raise ValueError(
                f"max_tokens: need at least 3 for [CLS] marker [SEP], got {max_tokens}"
            )
        body = self.encode((marker + text).replace("[SEP]", " "))
        marker_id = self._tok.token_to_id(marker)
        if not body or body[0] != marker_id:
            raise ValueError(f"text: the {marker} marker did not encode first in {text[:40]!r}")
        body = [marker_id] + [self.unk_id if t in self.marker_ids else t for t in body[1:]]
        return [self.cls_id] + body[: max_tokens - 2] + [self.sep_id]


def _expect_id(tokenizer: Tokenizer, token: str, expected: int) -> None:
    got = tokenizer.token_to_id(token)
    if got != expected:
        raise ValueError(f"tokenizer.json: {token} has id {got}, PairRM needs {expected}")


def candidate_budget(source_len: int, source_max: int, candidate_max: int) -> int:
    """Cb = C + (S - Lsrc) // 2: a short source lends half its unused budget to each candidate."""
    return candidate_max + (source_max - source_len) // 2


def reference_batch_widths(source_lens: Sequence[int], batch_size: int) -> list[int]:
    """Per prompt, the longest source in its llm-blender batch (consecutive chunks of batch_size)."""
    if batch_size < 1:
        raise ValueError(f"reference_batch_size: must be >= 1, got {batch_size}")
    widths = []
    for start in range(0, len(source_lens), batch_size):
        chunk = source_lens[start : start + batch_size]
        widths.extend([max(chunk)] * len(chunk))
    return widths


@dataclass(frozen=True)
class PairInput:
    """One ordered pair as the backbone reads it; the source marker is always at position 1."""

    ids: tuple[int, ...]
    left_pos: int  # position of <|candidate1|>
    right_pos: int  # position of <|candidate2|>


def build_pair(
    source: Sequence[int], left: Sequence[int], right: Sequence[int], tok: PairRMTokenizer
) -> PairInput:
    """Concatenate [CLS]<src>…[SEP] [CLS]<c1>…[SEP] [CLS]<c2>…[SEP]; left gets <|candidate1|>.

    source, left, right: segments from ``PairRMTokenizer.segment`` (candidates carry
    <|candidate|> at position 1, rewritten here).
    """
    left = [left[0], tok.left_id, *left[2:]]
    right = [right[0], tok.right_id, *right[2:]]
    ids = (*source, *left, *right)
    return PairInput(ids=ids, left_pos=len(source) + 1, right_pos=len(source) + len(left) + 1)


def count_candidate_tokens(tok: PairRMTokenizer, text: str) -> int:
    """Length of the candidate segment [CLS] <|candidate|> text [SEP], uncut.

    Compare with PAIRRM_MAX_CANDIDATE_TOKENS: beyond it PairRM may judge only the beginning
    (it gets a little more when the prompt is shorter than PAIRRM_MAX_SOURCE_TOKENS).
    """
    return len(tok.segment(CANDIDATE_MARKER, text, max_tokens=1 << 30))


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class PairRMHead(nn.Module):
    """head(x) = W2 tanh(W1 x + b1) + b2, x = [h_src; h_cand] of size 2H. Dropouts are eval-off."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(2 * hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 2H] -> [B]
        return self.out(torch.tanh(self.dense(x))).squeeze(-1)

    def load_pairrm_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load llm-blender's head_layer.{1,4}.* (indices 0 and 3 are Dropout, 2 is Tanh)."""
        names = ("dense.weight", "dense.bias", "out.weight", "out.bias")
        state = {name: tensors[key] for name, key in zip(names, HEAD_KEYS, strict=True)}
        self.load_state_dict(state, strict=True)


def backbone_config(overrides: dict | None = None) -> DebertaV2Config:
    """DebertaV2Config of PairRM's backbone (DeBERTa-v3-large + 4 markers), with overrides."""
    values = {**DEBERTA_V3_LARGE, **(overrides or {})}
    values.pop("model_type", None)
    return DebertaV2Config(**values)


def expected_tensor_count(config: DebertaV2Config) -> int:
    """394 for PairRM: 3 embedding + 3 encoder (rel_embeddings, LayerNorm) + 16/layer + 4 head."""
    return 3 + 3 + 16 * config.num_hidden_layers + len(HEAD_KEYS)


def check_state_dict(tensors: dict[str, torch.Tensor], backbone: DebertaV2Model) -> None:
    """Strict check of every key and shape of a llm-blender ``CrossCompareReranker`` state dict."""
    expected = {BACKBONE_PREFIX + k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    hidden = backbone.config.hidden_size
    expected |= dict(
        zip(HEAD_KEYS, [(hidden, 2 * hidden), (hidden,), (1, hidden), (1,)], strict=True)
    )
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"model.safetensors: not a PairRM state dict: missing {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    wrong = [
        (k, tuple(tensors[k].shape), s) for k, s in expected.items() if tuple(tensors[k].shape) != s
    ]
    if wrong:
        raise ValueError(f"model.safetensors: shape mismatch (key, got, expected): {wrong[:5]}")
    if len(tensors) != expected_tensor_count(backbone.config):
        raise ValueError(
            f"model.safetensors: {len(tensors)} tensors, expected "
            f"{expected_tensor_count(backbone.config)}"
        )


def build_modules(
    config: DebertaV2Config, tensors: dict[str, torch.Tensor] | None = None
) -> tuple[DebertaV2Model, PairRMHead]:
    """Backbone + head; with ``tensors`` (a PairRM state dict) loaded strictly, else random."""
    if tensors is None:
        backbone, head = DebertaV2Model(config), PairRMHead(config.hidden_size)
        return backbone.eval(), head.eval()
    # Build on the meta device: random init of 435M parameters is wasted work before a load.
    with torch.device("meta"):
        backbone = DebertaV2Model(config)
    head = PairRMHead(config.hidden_size)
    check_state_dict(tensors, backbone)
    n = len(BACKBONE_PREFIX)
    backbone_state = {k[n:]: v for k, v in tensors.items() if k.startswith(BACKBONE_PREFIX)}
    backbone.load_state_dict(backbone_state, strict=True, assign=True)
    positions = torch.arange(config.max_position_embeddings).expand((1, -1))
    backbone.embeddings.position_ids = positions  # the only (non-persistent) buffer
    head.load_pairrm_tensors(tensors)
    on_meta = [k for k, v in backbone.state_dict(keep_vars=True).items() if v.is_meta]
    if on_meta:
        raise RuntimeError(f"PairRM backbone tensors left unloaded: {on_meta[:5]}")
    return backbone.eval(), head.eval()


def resolve_device_dtype(device: str | None, dtype: str) -> tuple[torch.device, torch.dtype]:
    """device None: cuda if available. dtype "auto": float16 on cuda (as llm-blender), else fp32."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype == "auto":
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    if dtype not in names:
        raise ValueError(f"dtype: expected 'auto' or one of {sorted(names)}, got {dtype!r}")
    return dev, names[dtype]


def fetch_pairrm_files(model: str, revision: str | None) -> dict[str, Path]:
    """Paths of PAIRRM_FILES, from a local folder or the Hub cache (downloading if allowed)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        paths = {name: folder / name for name in PAIRRM_FILES}
        absent = [name for name, p in paths.items() if not p.is_file()]
        if absent:
            raise ValueError(f"rank.pairrm_model: folder {folder} lacks {absent}")
        return paths
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ValueError(f"rank.pairrm_model: {model!r} is neither a folder nor a Hub repo id")
    revision = revision or PAIRRM_REVISION
    try:
        return {name: _hub_file(model, name, revision) for name in PAIRRM_FILES}
    except (OSError, EntryNotFoundError) as err:  # offline, connection, not found, gated
        raise PairRMUnavailable(
            f"PairRM weights {model}@{revision[:12]} are unavailable here "
            f"({type(err).__name__}); on a machine with Hub access run `hf download {model} "
            f"--revision {revision} --local-dir <folder>` (huggingface-cli download on older "
            "huggingface_hub), copy the folder here and set rank.pairrm_model to it; "
            "or use the `judge` ranker, which works offline."
        ) from err


def _hub_file(model: str, name: str, revision: str) -> Path:
    try:
        return Path(hf_hub_download(model, name, revision=revision))
    except EntryNotFoundError as err:
        # config.json arrived in 5e3cb95; earlier revisions hold the same ranker_config.json.
        if name != "config.json" or isinstance(err, LocalEntryNotFoundError):
            raise
        return Path(hf_hub_download(model, "ranker_config.json", revision=revision))


def read_ranker_config(path: Path) -> tuple[int, int]:
    """(S, C) = (source_maxlength, candidate_maxlength) from llm-blender's ranker config.json."""
    cfg = json.loads(Path(path).read_text())
    if cfg.get("ranker_type", "pairranker") != "pairranker" or cfg.get("n_tasks", 1) != 1:
        raise ValueError(f"{path}: not a PairRM ranker config (ranker_type/n_tasks): {cfg}")
    return int(cfg["source_maxlength"]), int(cfg["candidate_maxlength"])


class PairRM:
    """Native PairRM: ``rank`` orders candidates per prompt, ``compare`` judges pairs."""

    def __init__(
        self,
        backbone: DebertaV2Model,
        head: PairRMHead,
        tokenizer: PairRMTokenizer,
        *,
        source_max_tokens: int = PAIRRM_MAX_SOURCE_TOKENS,
        candidate_max_tokens: int = PAIRRM_MAX_CANDIDATE_TOKENS,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 32,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        if tokenizer.vocab_size != backbone.config.vocab_size:
            raise ValueError(
                f"tokenizer.json has {tokenizer.vocab_size} tokens, the model "
                f"{backbone.config.vocab_size}: they are not from the same PairRM"
            )
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.backbone = backbone.to(device=self.device, dtype=self.dtype).eval()
        self.head = head.to(device=self.device, dtype=torch.float32).eval()
        self.tokenizer = tokenizer
        self.source_max_tokens = source_max_tokens
        self.candidate_max_tokens = candidate_max_tokens
        self.batch_size = batch_size

    @classmethod
    def load(
        cls,
        model: str = PAIRRM_REPO,
        revision: str | None = PAIRRM_REVISION,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 32,
        backbone_overrides: dict | None = None,
    ) -> PairRM:
        """Load PairRM from a Hub repo at a pinned revision (None: PAIRRM_REVISION) or a folder.

        The folder holds llm-blender's config.json, tokenizer.json and model.safetensors.
        ``backbone_overrides`` changes the DeBERTa-v3-large config (for tiny test models).
        Raises PairRMUnavailable when the files cannot be had (e.g. offline).
        """
        from safetensors.torch import load_file

        paths = fetch_pairrm_files(model, revision)
        source_max, candidate_max = read_ranker_config(paths["config.json"])
        tokenizer = PairRMTokenizer.from_file(paths["tokenizer.json"])
        config = backbone_config(backbone_overrides)
        backbone, head = build_modules(config, load_file(str(paths["model.safetensors"])))
        return cls(
            backbone,
            head,
            tokenizer,
            source_max_tokens=source_max,
            candidate_max_tokens=candidate_max,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
        )

    # -- public API ----------------------------------------------------------------------------

    def rank(
        self,
        sources: list[str],
        candidates: list[list[str]],
        *,
        reference_batch_size: int | None = None,
    ) -> list[PairRMResult]:
        """Judge every ordered pair of each prompt's candidates; one PairRMResult per prompt.

        sources[i] is the prompt (instruction + input, no separator); candidates[i] its n_i >= 1
        responses (n_i may differ). All n_i(n_i - 1) ordered pairs of all prompts are scored in
        one batched pass. ``reference_batch_size`` reproduces llm-blender's batch-dependent
        candidate budget (parity tests only).
        """
        _check_texts("sources", sources)
        if len(candidates) != len(sources):
            raise ValueError(
                f"candidates: {len(candidates)} lists for {len(sources)} sources; need one each"
            )
        for i, cands in enumerate(candidates):
            _check_texts(f"candidates[{i}]", cands)
            if not cands:
                raise ValueError(f"candidates[{i}]: empty; PairRM needs at least one candidate")
        segments = self._segments(sources, candidates, reference_batch_size)
        index = [
            (p, i, j)
            for p, (_, cands) in enumerate(segments)
            for i in range(len(cands))
            for j in range(len(cands))
            if i != j
        ]
        pairs = [
            build_pair(segments[p][0], segments[p][1][i], segments[p][1][j], self.tokenizer)
            for p, i, j in index
        ]
        logits = self.score_pairs(pairs)
        matrices = [np.zeros((len(c), len(c)), dtype=np.float32) for c in candidates]
        for (p, i, j), value in zip(index, logits, strict=True):
            matrices[p][i, j] = value
        return [result_from_matrix(m) for m in matrices]

    def compare(self, sources: list[str], a: list[str], b: list[str]) -> list[float]:
        """logit(a, b) - logit(b, a) per prompt: > 0 means a is better (llm-blender's default).

        sigma(value / 2) is the debiased probability that a is better.
        """
        ab = self.pair_logits(sources, a, b)
        ba = self.pair_logits(sources, b, a)
        return [float(np.float32(x) - np.float32(y)) for x, y in zip(ab, ba, strict=True)]

    def pair_logits(self, sources: list[str], left: list[str], right: list[str]) -> list[float]:
        """logit(left, right) per prompt, one order only (position-biased)."""
        for name, texts in (("sources", sources), ("left", left), ("right", right)):
            _check_texts(name, texts)
        if not len(sources) == len(left) == len(right):
            raise ValueError(
                f"sources/left/right: lengths {len(sources)}/{len(left)}/{len(right)} differ"
            )
        segments = self._segments(sources, [[x, y] for x, y in zip(left, right, strict=True)])
        pairs = [build_pair(src, c[0], c[1], self.tokenizer) for src, c in segments]
        return self.score_pairs(pairs).tolist()

    def count_candidate_tokens(self, text: str) -> int:
        """Candidate segment length; above PAIRRM_MAX_CANDIDATE_TOKENS only the start may count."""
        return count_candidate_tokens(self.tokenizer, text)

    # -- internals -----------------------------------------------------------------------------

    def _segments(
        self,
        sources: Sequence[str],
        candidates: Sequence[Sequence[str]],
        reference_batch_size: int | None = None,
    ) -> list[tuple[list[int], list[list[int]]]]:
        """Per prompt: the source segment and its candidate segments, cut to their budgets."""
        tok = self.tokenizer
        srcs = [tok.segment(SOURCE_MARKER, s, self.source_max_tokens) for s in sources]
        widths = [len(s) for s in srcs]
        if reference_batch_size is not None:
            widths = reference_batch_widths(widths, reference_batch_size)
        out = []
        for src, width, cands in zip(srcs, widths, candidates, strict=True):
            budget = candidate_budget(width, self.source_max_tokens, self.candidate_max_tokens)
            out.append((src, [tok.segment(CANDIDATE_MARKER, c, budget) for c in cands]))
        return out

    @torch.inference_mode()
    def score_pairs(self, pairs: Sequence[PairInput]) -> np.ndarray:
        """logit(left, right) for each pair: [len(pairs)] float32.

        Identical inputs are scored once (exact ties); batches are sorted by length, longest
        first, so padding stays small and an out-of-memory error shows up at once.
        """
        from tqdm.auto import tqdm

        unique = list(dict.fromkeys(pairs))
        order = sorted(range(len(unique)), key=lambda k: -len(unique[k].ids))
        values = np.zeros(len(unique), dtype=np.float32)
        with tqdm(total=len(order), desc="pairrm", unit="pair", disable=len(order) < 256) as bar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                values[chunk] = self._forward([unique[k] for k in chunk])
                bar.update(len(chunk))
        position = {pair: k for k, pair in enumerate(unique)}
        return np.array([values[position[p]] for p in pairs], dtype=np.float32)

    def _forward(self, batch: Sequence[PairInput]) -> np.ndarray:
        """One padded batch through backbone + head: [B] logits s_1 - s_2."""
        width = max(len(p.ids) for p in batch)
        ids = torch.full((len(batch), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, pair in enumerate(batch):
            ids[r, : len(pair.ids)] = torch.tensor(pair.ids)
            mask[r, : len(pair.ids)] = 1
        hidden = self.backbone(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
        ).last_hidden_state  # [B, L, H]
        rows = torch.arange(len(batch), device=self.device)
        left = torch.tensor([p.left_pos for p in batch], device=self.device)
        right = torch.tensor([p.right_pos for p in batch], device=self.device)
        h_src, h_left, h_right = (hidden[rows, pos].float() for pos in (1, left, right))
        s_left = self.head(torch.cat([h_src, h_left], dim=-1))
        s_right = self.head(torch.cat([h_src, h_right], dim=-1))
        return (s_left - s_right).cpu().numpy()


def _check_texts(name: str, texts: Sequence[str]) -> None:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name}: expected a list of strings")


class PairRMRanker:
    """PairRM behind the ranker contract: an instruction's distinct responses are ranked
    together, score_i = (1/n) Σ_j (M_ij − M_ji); duplicates copy their first's score."""

    pointwise = False  # a score means something only within its instruction's group
    programmatic = False  # a model scores: the iterate loop makes M_t judge itself instead
    compares = True
    checks_constraints = False
    caveat = ""

    def __init__(self, load, name: str):
        """`load`: a function returning the `PairRM` model, called on first use."""
        self._load, self._pairrm = load, None
        self.name = name

    @property
    def pairrm(self) -> PairRM:
        if self._pairrm is None:
            self._pairrm = self._load()
        return self._pairrm

    @classmethod
    def label(cls, recipe) -> str:
        return f"pairrm:{recipe.rank.pairrm_model}@{recipe.rank.pairrm_revision or PAIRRM_REVISION}"

    @classmethod
    def depends_on_policy(cls, rank) -> bool:
        return False

    @classmethod
    def judgments(cls, rank) -> int:
        return 1

    @classmethod
    def models(cls, rank) -> dict[str, str]:
        return {"rank.pairrm_model": rank.pairrm_model}

    @classmethod
    def from_recipe(cls, recipe, policy=None) -> PairRMRanker:
        cfg = recipe.rank

        def load() -> PairRM:
            try:
                return PairRM.load(cfg.pairrm_model, revision=cfg.pairrm_revision or PAIRRM_REVISION,
                                   device=recipe.model.device, dtype="auto",
                                   batch_size=cfg.batch_size or 32)
            except ValueError as e:  # a bad folder or id; PairRMUnavailable is a PrefloopError
                raise PrefloopError(f"rank.pairrm_model: {e}") from None

        return cls(load, cls.label(recipe))

    @classmethod
    def card_lines(cls, recipe) -> list[str]:
        r = recipe.rank
        return [
            f"- Ranker: PairRM `{r.pairrm_model}` at revision `{r.pairrm_revision or PAIRRM_REVISION}`"
            " (native reimplementation)",
            "- Score: (1/n) Σ_j (logit(i, j) − logit(j, i)) over the instruction's distinct "
            "responses",
            f"- Truncation: prompt ≤ {PAIRRM_MAX_SOURCE_TOKENS} tokens, each response ≤ "
            f"{PAIRRM_MAX_CANDIDATE_TOKENS} tokens plus half the prompt's unused budget; longer "
            "responses are judged on their beginning only",
        ]

    def rank_groups(self, sources: list[str], groups: list[list[str]]) -> list[list[float]]:
        """PairRM scores of each group's candidates, all groups in one batched call."""
        if not sources:
            return []
        return [list(r.scores) for r in self.pairrm.rank(sources, groups)]

    def score(self, records: list[dict], workdir: Path) -> tuple[list[dict], dict]:
        """One batched call over every instruction's distinct responses (seconds on a GPU, so a
        killed stage simply reruns it: nothing is logged in `workdir`)."""
        dup = duplicate_of(records)
        by_id: dict[str, list[dict]] = {}
        for r in records:
            if (r["id"], r["sample"]) not in dup:
                by_id.setdefault(r["id"], []).append(r)
        ids = list(by_id)
        ranked = self.rank_groups([by_id[i][0]["instruction"] for i in ids],
                                  [[r["response"] for r in by_id[i]] for i in ids])
        score_of = {(r["id"], r["sample"]): s for i, scores in zip(ids, ranked, strict=True)
                    for r, s in zip(by_id[i], scores, strict=True)}
        fields = [{"score": score_of[(r["id"], dup.get((r["id"], r["sample"]), r["sample"]))],
                   "n_valid": 1,
                   "scores": [], "over_budget": self.over_budget(r["response"])}
                  for r in records]
        return fields, {"over_candidate_budget": sum(f["over_budget"] for f in fields)}

    def summary(self, counts: dict) -> str | None:
        line = f"{counts['scored']}/{counts['responses']} responses scored by PairRM"
        n = counts.get("over_candidate_budget")
        if not n:
            return line
        return (f"{line}; {n} exceed PairRM's {self.pairrm.candidate_max_tokens}-token "
                "candidate budget, so it judged only their beginning")

    def compare(self, instructions: list[str], a: list[str], b: list[str]) -> list[float]:
        """logit(a, b) − logit(b, a): both orders, so PairRM's position bias cancels."""
        return list(self.pairrm.compare(instructions, a, b))

    def over_budget(self, text: str) -> bool:
        """True when PairRM may see only the beginning of `text` (> 412 candidate tokens)."""
        return self.pairrm.count_candidate_tokens(text) > self.pairrm.candidate_max_tokens
