"""Tiny random-weight models, a word-level tokenizer with a chat template, and run-directory
fixtures for the train and compare tests. Everything is built in memory; nothing downloads."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from prefloop.artifacts import write_jsonl, write_manifest

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
WORDS = ("a an the is are was be to of and or in on at for with as by it this that what how why "
         "who when where which do does can could should would will i you we they he she my your "
         "write poem about sea short story cat dog explain simple words give three tips sleep "
         "list name capital france paris city river sun moon star tree water fire good bad yes "
         "no one two four five here there answer question please thanks hello world red blue "
         "green small big fast slow day night time make help learn code python data model "
         ". , ! ? : ; ' \" - ( )").split()
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {{ eos_token }} "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@contextmanager
def one_thread():
    """Run torch on one thread: tiny models gain nothing from two, and on a busy machine every
    matmul would wait for the second thread's time slice (~20 ms per call)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_tokenizer():
    """A word-level PreTrainedTokenizerFast with BOS/EOS/PAD and a simple chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=SPECIALS[4:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _gen_config(model, tok) -> None:
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id


def tiny_llama(tok, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    _gen_config(model, tok)
    return model


def tiny_mistral(tok, seed: int = 0):
    """Mistral-7B-Instruct-v0.2's architecture at toy size: no sliding window, rope 1e6, GQA 4/2."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=8, max_position_embeddings=1024, sliding_window=None,
                        rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    model = MistralForCausalLM(cfg).eval()
    _gen_config(model, tok)
    return model


def save_model_folder(path: Path, kind: str = "llama", seed: int = 0) -> Path:
    """A from_pretrained-loadable folder holding a tiny model and its tokenizer."""
    tok = tiny_tokenizer()
    model = (tiny_llama if kind == "llama" else tiny_mistral)(tok, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


PAIRS = [
    ("write a short poem about the sea", "the sea is blue and the sun is good .",
     "no ."),
    ("give three tips to sleep", "one : sleep at night . two : no code . three : water .",
     "sleep ."),
    ("what is the capital of france ?", "the capital of france is paris .",
     "the capital is the moon ."),
    ("explain data in simple words", "data is what we learn from , like a story .",
     "data is bad ."),
    ("name a big river", "a big river is here , in the city .", "fire ."),
    ("how do i learn python ?", "write small code each day and ask for help .",
     "you can not ."),
]


def pair_records(pairs=PAIRS) -> list[dict]:
    """Rows in the pairs-dataset contract (conversational prompt/chosen/rejected plus metadata)."""
    rows = []
    for i, (instruction, chosen, rejected) in enumerate(pairs):
        rows.append({
            "id": f"t-{i}",
            "prompt": [{"role": "user", "content": instruction}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "prompt_text": f"<s><|user|> {instruction} </s> <|assistant|>",
            "chosen_score": 5.0, "rejected_score": 1.0,
            "candidates": [chosen, rejected], "scores": [5.0, 1.0],
            "ranker": "judge:tiny", "generator": "tiny",
        })
    return rows


def write_pairs(run_dir: Path, rows: list[dict] | None = None) -> Path:
    """pairs/dataset/data/train-00000-of-00001.parquet + card + a finished pairs manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pair_records() if rows is None else rows
    out = Path(run_dir) / "pairs"
    data = out / "dataset" / "data"
    data.mkdir(parents=True, exist_ok=True)
    if rows:
        table = pa.Table.from_pylist(rows)
    else:  # an empty table with the contract's schema
        table = pa.Table.from_pylist(pair_records()[:1]).slice(0, 0)
    pq.write_table(table, data / "train-00000-of-00001.parquet")
    (out / "dataset" / "README.md").write_text("# tiny pairs\n", encoding="utf-8")
    write_manifest(out, "pairs", "pairs-hash", started=time.time(), counts={"pairs": len(rows)})
    return out


def write_instructions(run_dir: Path, train: list[str], heldout: list[str]) -> Path:
    out = Path(run_dir) / "instructions"
    write_jsonl(out / "train.jsonl", [{"id": f"tr-{i}", "instruction": t}
                                      for i, t in enumerate(train)])
    write_jsonl(out / "heldout.jsonl", [{"id": f"ho-{i}", "instruction": t}
                                        for i, t in enumerate(heldout)])
    write_manifest(out, "instructions", "instructions-hash", started=time.time())
    return out


def write_word_instructions(path: Path, n_train: int, n_heldout: int, constraint: dict,
                            prefix: str = "w") -> Path:
    """A built-in-style instruction file: n_train + n_heldout tasks of five random WORDS each
    (seeded), every one with `constraint`, the first n_train in the train split."""
    import random

    rng = random.Random(0)
    words = [w for w in WORDS if w.isalpha()]
    rows = []
    for i in range(n_train + n_heldout):
        task = " ".join(rng.sample(words, 5))
        rows.append({"id": f"{prefix}-{i}", "instruction": task, "task": task, "topic": "words",
                     "split": "train" if i < n_train else "heldout", "constraints": [constraint]})
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)


def read_jsonl_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
