"""Record llm-blender's PairRM outputs on a tiny random model, as parity fixtures for prefloop.

The reference (llm-blender 0.0.2) needs transformers < 5, so this script runs in its own venv,
never in the project env. From the repository root:

    python3 -m venv .pairrm-ref-venv
    .pairrm-ref-venv/bin/pip install torch==2.13.0 transformers==4.57.6 tokenizers \
        huggingface_hub==0.36.2 sentencepiece protobuf safetensors dataclasses-json numpy tqdm
    .pairrm-ref-venv/bin/pip install --no-deps llm-blender==0.0.2
    .pairrm-ref-venv/bin/python scripts/make_pairrm_fixtures.py [--out tests/fixtures/pairrm]

It needs no network. It builds (docs/pairrm.md §7.1):
1. a tiny SentencePiece Unigram model (nmt_nfkc, [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3, 200 pieces);
2. a random DeBERTa-v2 backbone of PairRM's shape, scaled down (hidden 32, 2 layers, 4 heads,
   position_buckets 16) with that tokenizer ([MASK]=200);
3. llm-blender's `CrossCompareReranker` on it (markers 201-204, vocab 205), every parameter
   perturbed by seeded noise, saved as model.safetensors (42 tensors) + config.json +
   tokenizer.json;
4. the reference's outputs on tricky inputs, written to reference_outputs.json.

Rerunning it rewrites every fixture file; the outputs are deterministic for a given stack
(pinned above), so a diff after a rerun means the reference stack changed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

SOURCE_MAXLENGTH = 64
CANDIDATE_MAXLENGTH = 24
NOISE_STD = 0.3
SEED = 20240429

BACKBONE_CONFIG = {
    "model_type": "deberta-v2",
    "vocab_size": 201,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-7,
    "relative_attention": True,
    "max_relative_positions": -1,
    "position_buckets": 16,
    "pad_token_id": 0,
    "position_biased_input": False,
    "pos_att_type": ["p2c", "c2p"],
    "share_att_key": True,
    "norm_rel_ebd": "layer_norm",
}

_WORDS = (
    "the a an and or but if then so because of to in on at by for with from about into over "
    "after before under between through during without within is are was were be been being "
    "have has had do does did can could will would should may might must shall I you he she it "
    "we they me him her us them my your his its our their this that these those here there "
    "what which who whom whose when where why how all any both each few more most other some "
    "such no nor not only own same than too very just now also well hello hi thanks thank "
    "please sorry yes okay great good bad fine nice love hate like want need know think say "
    "tell ask answer question help explain write read code model data text token tokens word "
    "words sentence prompt response candidate best worse better rank ranking score judge pair "
    "first second third final fix fine file find fish fit five fifty office coffee official "
    "number numbers one two three four seven ten hundred square power degree x y z math "
    "joke story poem letter email list table summary example examples step steps reason"
).split()


def training_text() -> str:
    """Deterministic English-like text with the characters the fixtures use."""
    import random

    rng = random.Random(SEED)
    lines = []
    for _ in range(3000):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        line = " ".join(words) + rng.choice([".", "!", "?", ",", ":", ";", "..."])
        if rng.random() < 0.2:
            line += f" {rng.randint(0, 999)}"
        if rng.random() < 0.1:
            line = f'"{line}" (x-{rng.randint(1, 9)}) [{rng.choice(_WORDS)}]'
        lines.append(line)
    lines.append("ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789")
    lines.append("' \" . , ! ? : ; - _ ( ) [ ] { } / * + = < > | # @ & % $ ^ ~ `")
    return "\n".join(lines) + "\n"


def build_spm(workdir: Path) -> Path:
    import sentencepiece as spm

    text_path = workdir / "spm_train.txt"
    text_path.write_text(training_text(), encoding="utf-8")
    prefix = workdir / "spm"
    spm.SentencePieceTrainer.train(
        input=str(text_path),
        model_prefix=str(prefix),
        model_type="unigram",
        vocab_size=200,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        pad_piece="[PAD]",
        bos_piece="[CLS]",
        eos_piece="[SEP]",
        unk_piece="[UNK]",
        num_threads=1,
        seed_sentencepiece_size=100000,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def build_backbone(workdir: Path, spm_path: Path) -> Path:
    import torch
    from transformers import DebertaV2Config, DebertaV2Model, DebertaV2Tokenizer

    backbone = workdir / "tiny-deberta-v3"
    backbone.mkdir()
    tok = DebertaV2Tokenizer(vocab_file=str(spm_path), do_lower_case=False)
    assert tok.convert_tokens_to_ids("[MASK]") == 200, tok.convert_tokens_to_ids("[MASK]")
    tok.save_pretrained(backbone)
    torch.manual_seed(SEED)
    config = DebertaV2Config(**{k: v for k, v in BACKBONE_CONFIG.items() if k != "model_type"})
    DebertaV2Model(config).save_pretrained(backbone, safe_serialization=True)
    return backbone


def build_ranker(backbone: Path):
    import torch
    from llm_blender.blender.blender_utils import load_ranker
    from llm_blender.pair_ranker.config import RankerConfig

    config = RankerConfig(
        ranker_type="pairranker",
        model_type="deberta",
        model_name=str(backbone),
        source_maxlength=SOURCE_MAXLENGTH,
        candidate_maxlength=CANDIDATE_MAXLENGTH,
        n_tasks=1,
        drop_out=0.05,
        fp16=False,
        device="cpu",
    )
    ranker, tokenizer, _ = load_ranker(config)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for _, p in sorted(ranker.named_parameters()):
            p.add_(NOISE_STD * torch.randn(p.shape, generator=gen))
    return config, ranker, tokenizer


def save_ranker(ranker_dir: Path, config, ranker, tokenizer) -> None:
    from safetensors.torch import save_model

    ranker_dir.mkdir(parents=True, exist_ok=True)
    save_model(ranker, str(ranker_dir / "model.safetensors"))
    ranker_config = config.to_dict()
    ranker_config.update(load_checkpoint=None, cache_dir=None, device=None)
    (ranker_dir / "config.json").write_text(json.dumps(ranker_config, indent=2) + "\n")
    tokenizer.save_pretrained(ranker_dir)


LONG_A = (
    "Here is a long answer. First, we read the prompt and think about it. Then we write "
    "a list of steps: one, two, three, four. Each step has a reason and an example, and "
    "the final summary says what to do next with the code and the data. Thanks for asking!"
)
# Differs from LONG_A after ~25 tokens: distinct at batch_size 1, identical once truncated in a
# batch with LONG_PROMPT (the reference's batch-dependent candidate budget).
LONG_B = LONG_A.replace("we read", "we skim").replace("Thanks for asking!", "Sorry!")
LONG_C = (
    "No. This answer is long too, but it talks about coffee, fish and fifty office files "
    "instead of the question; it is not a good response to the prompt at all, and it goes "
    "on and on about numbers like seven, ten and one hundred without any reason."
)
LONG_PROMPT = (
    "Please read this long question with care. I have a model, some data and a list of "
    "prompts. For each prompt I want two or three candidate answers, and then I want to "
    "rank them with a judge so that the best one is first and the worst one is last. "
    "How should I write the code for this, and what should I check before I trust it?"
)

INPUTS = [
    "Tell me a joke.",
    LONG_PROMPT,
    "Say hello.",
    "Explain the [SEP] token in one line.",
    "Normalise this: hello… ﬁne Ｈｅｌｌｏ a\u00a0b x²",
    "Line one\nLine two\twith a tab   and spaces 🙂",
]
CANDIDATES = [
    [LONG_A, LONG_B, LONG_C],
    ["Use a judge.", "Write the code, then check the ranks on a few examples.", "I do not know."],
    ["Hello!", "Hello!", "No."],
    ["It marks the end [SEP] of a segment.", "[SEP]", "A [SEP] token [SEP] separates text."],
    ["hello… ﬁne", "Ｈｅｌｌｏ x² a\u00a0b", "hello... fine"],
    ["Sure:\n\n1.\tone\n2.\ttwo", "🙂🙂 great   answer", "Sure: 1. one 2. two"],
]
TRICKY_STRINGS = sorted(
    {
        "hello…",
        "ﬁne",
        "Ｈｅｌｌｏ",
        "a\u00a0b",
        "x²",
        "hello... fine",
        "  leading and trailing  ",
        "tabs\tand\nnewlines\r\nand   spaces",
        "emoji 🙂 here",
        "café",
        "cafe\u0301",
        "[SEP]",
        "a [SEP] b",
        "[CLS] [PAD] [MASK] [UNK]",
        "<|source|>",
        "<|candidate|>x",
        "<|candidate1|> <|candidate2|>",
        "",
        " ",
        "Tell me a joke.",
        LONG_PROMPT,
        LONG_A,
    }
)


class ForwardRecorder:
    """Records the unpadded input ids of every backbone forward (one row per ordered pair)."""

    def __init__(self, backbone):
        self.calls: list[list[list[int]]] = []
        backbone.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        self.calls.append([row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)])


def record_rank(blender, recorder, batch_size: int) -> dict:
    import numpy as np

    ranker = blender.ranker
    matrices = []
    original = ranker._full_predict

    def full_predict(**batch):
        outputs = original(**batch)
        matrices.extend(outputs["logits"].detach().cpu().numpy().tolist())
        return outputs

    ranker._full_predict = full_predict
    recorder.calls.clear()
    scores = blender.rank(INPUTS, CANDIDATES, return_scores=True, batch_size=batch_size)
    calls = list(recorder.calls)
    ranks = blender.rank(INPUTS, CANDIDATES, return_scores=False, batch_size=batch_size)
    ranker._full_predict = original
    n = len(CANDIDATES[0])
    order = [(i, j) for i in range(n) for j in range(n) if i != j]
    pair_ids = [[None] * len(order) for _ in INPUTS]
    # _full_predict loops over (i, j) once per dataloader batch; each call holds that batch's rows.
    calls_per_batch = len(order)
    for c, rows in enumerate(calls):
        batch_index, pair_index = divmod(c, calls_per_batch)
        for r, row in enumerate(rows):
            pair_ids[batch_index * batch_size + r][pair_index] = row
    return {
        "batch_size": batch_size,
        "pair_order": order,
        "pair_ids": pair_ids,
        "matrix": matrices,
        "scores": np.asarray(scores, dtype=np.float32).tolist(),
        "ranks": np.asarray(ranks).tolist(),
    }


def record(ranker_dir: Path) -> dict:
    import numpy as np
    from llm_blender.blender.blender import Blender
    from llm_blender.blender.config import BlenderConfig

    blender = Blender(BlenderConfig(device="cpu", use_tqdm=False))
    blender.loadranker(str(ranker_dir), device="cpu")
    tokenizer = blender.ranker_tokenizer
    recorder = ForwardRecorder(blender.ranker.pretrained_model)
    a = [c[0] for c in CANDIDATES]
    b = [c[2] for c in CANDIDATES]

    def compare(mode: str) -> list[float]:
        out = blender.compare(INPUTS, a, b, batch_size=1, return_logits=True, mode=mode)
        return np.asarray(out, dtype=np.float32).tolist()

    def with_ref(ref_mode: str) -> list[list[float]]:
        out = blender.rank_with_ref(
            INPUTS, CANDIDATES, return_scores=True, batch_size=1, ref_mode=ref_mode
        )
        return np.asarray(out, dtype=np.float32).tolist()

    return {
        "special_ids": {
            "pad": tokenizer.pad_token_id,
            "cls": tokenizer.cls_token_id,
            "sep": tokenizer.sep_token_id,
            "unk": tokenizer.unk_token_id,
            "mask": tokenizer.mask_token_id,
            "source": tokenizer.source_prefix_id,
            "candidate1": tokenizer.cand1_prefix_id,
            "candidate2": tokenizer.cand2_prefix_id,
            "candidate": tokenizer.cand_prefix_id,
        },
        "tokens": {s: tokenizer.encode(s) for s in TRICKY_STRINGS},
        "inputs": INPUTS,
        "candidates": CANDIDATES,
        "rank_bs1": record_rank(blender, recorder, batch_size=1),
        "rank_all": record_rank(blender, recorder, batch_size=len(INPUTS)),
        "compare": {
            "a": a,
            "b": b,
            "batch_size": 1,
            "[A,B]": compare("[A,B]"),
            "[B,A]": compare("[B,A]"),
            "[A,B]+[B,A]": compare("[A,B]+[B,A]"),
        },
        "rank_with_ref": {"longest": with_ref("longest"), "first": with_ref("first")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/pairrm"))
    args = parser.parse_args()
    import transformers

    assert transformers.__version__.startswith("4."), "run this in the llm-blender venv"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        backbone = build_backbone(work, build_spm(work))
        config, ranker, tokenizer = build_ranker(backbone)
        ranker_dir = work / "ranker"
        save_ranker(ranker_dir, config, ranker, tokenizer)
        outputs = record(ranker_dir)
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(ranker_dir / "model.safetensors", args.out / "model.safetensors")
        shutil.copy(ranker_dir / "tokenizer.json", args.out / "tokenizer.json")
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(ranker_dir / name, args.out / name)
        ranker_config = json.loads((ranker_dir / "config.json").read_text())
        ranker_config["model_name"] = "tiny-deberta-v3 (built by this script)"
        (args.out / "config.json").write_text(json.dumps(ranker_config, indent=2) + "\n")
        (args.out / "backbone_config.json").write_text(
            json.dumps(BACKBONE_CONFIG | {"vocab_size": 205}, indent=2) + "\n"
        )
    (args.out / "reference_outputs.json").write_text(
        json.dumps(outputs, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    for path in sorted(args.out.iterdir()):
        print(f"{path.stat().st_size:>9,d}  {path}")


if __name__ == "__main__":
    main()
