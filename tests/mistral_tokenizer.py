"""Rebuild the Hub tokenizer of mistralai/Mistral-7B-Instruct-v0.2 offline, and Mistral's reference.

The Hub repository holds `tokenizer_config.json` (copied verbatim into fixtures/) and a
`tokenizer.json` converted from Mistral's SentencePiece model. transformers 5 reads only the
vocabulary, the merges and the post-processor from that file and rebuilds the rest from the config
(`legacy: false` -> Metaspace with prepend_scheme "first"). So we write those three parts from the
SentencePiece model that ships in `mistral-common`, the same model Mistral's reference encoder uses.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, models, processors
from transformers import AutoTokenizer
from transformers.tokenization_utils_base import generate_merges

FIXTURE = Path(__file__).parent / "fixtures" / "mistral-7b-instruct-v0.2"


def sentencepiece_model() -> Path:
    """mistral_common/data/tokenizer.model.v1 (the Mistral 7B v0.1/v0.2 tokenizer)."""
    origin = importlib.util.find_spec("mistral_common").origin
    return Path(origin).parent / "data" / "tokenizer.model.v1"


def write_tokenizer_json(out: Path, merges_by_score: bool = True) -> None:
    """Vocabulary in id order, BPE merges in SentencePiece score order, BOS post-processor.

    Score order is what SentencePiece applies; '▁▁' (id 259) and '▁▁▁▁' (id 260) have score -1e9,
    so ordering merges by id instead (`merges_by_score=False`) splits runs of spaces differently.
    """
    sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_model()))
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(n)} if merges_by_score else None
    # Control, unknown and byte pieces are never produced by a merge in SentencePiece.
    never_merged = [
        sp.id_to_piece(i) for i in range(n) if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)
    ]
    merges = generate_merges(vocab, scores, skip_tokens=never_merged)
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.save(str(out))


def load_hub_tokenizer(folder: Path, merges_by_score: bool = True):
    """AutoTokenizer.from_pretrained on a folder laid out like the Hub repository."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURE / "tokenizer_config.json", folder / "tokenizer_config.json")
    write_tokenizer_json(folder / "tokenizer.json", merges_by_score)
    return AutoTokenizer.from_pretrained(str(folder))


def load_reference():
    """Mistral's own encoder for the same model (mistral-common, tokenizer v1)."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(sentencepiece_model()))


def reference_ids(reference, messages: list[dict[str, str]]) -> list[int]:
    """mistral-common's `encode_chat_completion(...).tokens` for role/content dicts."""
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(
        messages=[kinds[m["role"]](content=m["content"]) for m in messages]
    )
    return reference.encode_chat_completion(request).tokens
