"""New training prompts for one self-rewarding round: Self-Instruct by a fixed model, or seed prompts.

Yuan et al. 2024 (docs/self_rewarding.md §3) create the prompts of each round with a *fixed*
model (not the one being trained) by 8-shot prompting: 6 demonstrations from the seed (IFT) set
and 2 from the prompts generated so far, sampled at T 0.6, top-p 0.9, then filtered as in
Self-Instruct (Wang et al. 2023): a new prompt is dropped when

    max_{p in existing} ROUGE-L_F(new, p) > 0.7,  or  words(new) <= 3  or  words(new) > 150,

or when it names a banned keyword, starts with "Write a program" or with punctuation, or is not
ASCII anywhere (differences from Self-Instruct: docs/self_rewarding.md §9.4). The few-shot text
is a raw numbered list (header, "1." .. "8.", an open "9.") that the model continues, as
Self-Instruct prompts a base model; our header wording is prompts/self_instruct.txt.
Every generation and the fate of each parsed prompt go to `candidates.jsonl`, appended one call at
a time, so an interrupted round resumes exactly where it stopped.
"""

from __future__ import annotations

import math
import random
import re
import string
import sys
from collections import Counter
from dataclasses import replace
from importlib import resources
from pathlib import Path

from prefloop.artifacts import (
    RunDir,
    Stage,
    append_jsonl,
    read_jsonl,
    write_jsonl,
)
from prefloop.config import IterateConfig, Recipe
from prefloop.errors import PrefloopError

BANNED_WORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
                "map", "maps", "draw", "plot", "go to")
_BANNED_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in BANNED_WORDS) + r")\b",
                        re.IGNORECASE)
_ITEM_SPLIT = re.compile(r"\n\s*\d+\s*\.\s*")
CALLS_PER_BATCH = 8  # few-shot prompts sampled per engine call
MAX_GENERATIONS_PER_PROMPT = 20  # give up after prompts_per_round x this many generations


def header() -> str:
    return (resources.files("prefloop") / "prompts" / "self_instruct.txt").read_text("utf-8")


def one_line(text: str) -> str:
    """Collapse all whitespace so a multi-line seed prompt fits one numbered item."""
    return " ".join(text.split())


def fewshot_prompt(demos: list[str], head: str | None = None) -> str:
    """Header, demos numbered 1..n, then an open "n+1." for the model to continue."""
    head = header() if head is None else head
    items = "".join(f"{i}. {one_line(d)}\n" for i, d in enumerate(demos, start=1))
    return f"{head}{items}{len(demos) + 1}."


def parse_continuation(text: str, truncated: bool) -> list[str]:
    """Split the model's continuation of the open item into prompts.

    A blank line ends the list (Self-Instruct's stop sequence); the last item of a continuation
    cut by the token budget is incomplete and dropped, the others are kept (Self-Instruct drops
    the whole generation: docs/self_rewarding.md §9.4).
    """
    cut = text.find("\n\n")
    if cut >= 0:
        text, truncated = text[:cut], False
    items = [one_line(part) for part in _ITEM_SPLIT.split(text)]
    if truncated and items:
        items = items[:-1]
    return [it for it in items if it]


def rule_violation(text: str, min_words: int = 4, max_words: int = 150) -> str | None:
    """The first Self-Instruct rule (other than ROUGE-L) that `text` breaks, else None."""
    words = len(text.split())
    if words < min_words:
        return "too_short"
    if words > max_words:
        return "too_long"
    if _BANNED_RE.search(text):
        return "banned_keyword"
    if text.lower().startswith("write a program"):
        return "write_a_program"
    if text[0] in string.punctuation:
        return "starts_with_punctuation"
    if not text.isascii():
        return "non_ascii"
    return None


class RougeIndex:
    """Existing prompts, pre-tokenized once, for the max ROUGE-L F-measure of a new prompt."""

    def __init__(self, texts: list[str] = ()) -> None:
        from rouge_score import tokenizers

        self._tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
        self.texts: list[str] = []
        self._tokens: list[list[str]] = []
        for t in texts:
            self.add(t)

    def add(self, text: str) -> None:
        self.texts.append(text)
        self._tokens.append(self._tokenizer.tokenize(text))

    def most_similar(self, text: str) -> tuple[float, str | None]:
        """(max F, that prompt). F = 2·LCS/(m+n) <= 2·min(m,n)/(m+n) prunes long seeds cheaply."""
        from rouge_score.rouge_scorer import _score_lcs

        new = self._tokenizer.tokenize(text)
        best, best_text = 0.0, None
        for other, other_text in zip(self._tokens, self.texts, strict=True):
            total = len(new) + len(other)
            if total == 0 or 2 * min(len(new), len(other)) / total <= best:
                continue
            f = _score_lcs(other, new).fmeasure
            if f > best:
                best, best_text = f, other_text
        return best, best_text


def sample_demos(rng: random.Random, seeds: list[str], generated: list[str],
                 n_seed: int, n_generated: int) -> list[str]:
    """n_seed + n_generated demos; seeds fill the generated slots while too few exist."""
    take_gen = min(n_generated, len(generated))
    take_seed = min(n_seed + n_generated - take_gen, len(seeds))
    demos = rng.sample(seeds, take_seed) + rng.sample(generated, take_gen)
    rng.shuffle(demos)
    return demos


def seed_round_prompts(pool: list[dict], t: int, n: int, seed: int) -> list[dict]:
    """Round t's slice of one seeded permutation of the seed pool: disjoint across rounds."""
    if t * n > len(pool):
        raise PrefloopError(
            f"iterate.prompt_source=seed: round {t} needs {t * n} seed prompts "
            f"(iterate.prompts_per_round {n} x round) but the seed split holds {len(pool)}; "
            "raise instructions.n_train or lower iterate.prompts_per_round"
        )
    order = random.Random(seed).sample(pool, len(pool))
    return [dict(it) for it in order[(t - 1) * n:t * n]]


def judge_candidate(text: str, index: RougeIndex, cfg: IterateConfig) -> tuple[str | None, float]:
    """(reason or None, max ROUGE-L) for one parsed prompt; rule checks run before ROUGE-L."""
    reason = rule_violation(text, cfg.min_words, cfg.max_words)
    if reason is not None:
        return reason, 0.0
    score, _ = index.most_similar(text)
    return ("rouge" if score > cfg.rouge_threshold else None), score


def replay(path: Path, index: RougeIndex, accepted: list[str]) -> int:
    """Rebuild state from an interrupted round's candidates.jsonl; return the next call number."""
    if not path.exists():
        return 0
    records = read_jsonl(path, allow_partial_tail=True)
    for rec in records:
        for item in rec["items"]:
            if item["reason"] is None:
                accepted.append(item["instruction"])
                index.add(item["instruction"])
    return max((r["call"] for r in records), default=-1) + 1


def generate_prompts(backend, seeds: list[str], existing: list[str],
                     previous: list[str], cfg: IterateConfig, out_path: Path, *,
                     round_seed: int) -> list[str]:
    """Self-Instruct until prompts_per_round prompts pass the filters (or the budget ends)."""
    from prefloop.engine import Sampling

    index = RougeIndex(existing + previous)
    accepted: list[str] = []
    call = replay(out_path, index, accepted)
    max_calls = math.ceil(cfg.prompts_per_round * MAX_GENERATIONS_PER_PROMPT / CALLS_PER_BATCH)
    tokenizer = backend.tokenizer
    session = backend.session()  # the calls share one decode loop (and its CUDA graphs)
    while len(accepted) < cfg.prompts_per_round and call < max_calls:
        rng = random.Random(f"{round_seed}-{call}")
        texts = [fewshot_prompt(sample_demos(rng, seeds, previous + accepted,
                                             cfg.fewshot_seed, cfg.fewshot_generated))
                 for _ in range(CALLS_PER_BATCH)]
        ids = [tokenizer(t)["input_ids"] for t in texts]
        sampling = Sampling(temperature=cfg.prompt_temperature, top_p=cfg.prompt_top_p,
                            max_new_tokens=cfg.prompt_max_new_tokens, seed=round_seed + call)
        outs = backend.generate(ids, 1, sampling, session=session)
        records = []
        for slot, (group,) in enumerate(outs):
            text = tokenizer.decode(group.token_ids, skip_special_tokens=True)
            items = []
            for inst in parse_continuation(text, group.finish_reason == "length"):
                reason, rouge = judge_candidate(inst, index, cfg)
                items.append({"instruction": inst, "reason": reason, "rouge": round(rouge, 4)})
                if reason is None:
                    accepted.append(inst)
                    index.add(inst)
            records.append({"call": call, "slot": slot, "continuation": text,
                            "finish_reason": group.finish_reason, "items": items})
        append_jsonl(out_path, records)
        call += 1
    session.close()
    return accepted[:cfg.prompts_per_round]


def reason_counts(path: Path) -> dict:
    """Generations, parsed prompts and the count of each filter reason, for the manifest."""
    records = read_jsonl(path, allow_partial_tail=True) if path.exists() else []
    items = [it for r in records for it in r["items"]]
    reasons = Counter(it["reason"] or "accepted" for it in items)
    return {"generations": len(records), "parsed": len(items),
            "unparsable_generations": sum(not r["items"] for r in records), **dict(reasons)}


def _hash_fields(cfg: IterateConfig) -> dict:
    """Only the settings that shape the prompts, so raising iterate.rounds keeps done rounds."""
    keep = ("prompt_source", "prompt_model", "prompts_per_round", "fewshot_seed",
            "fewshot_generated", "prompt_temperature", "prompt_top_p", "prompt_max_new_tokens",
            "rouge_threshold", "min_words", "max_words", "seed")
    return {k: getattr(cfg, k) for k in keep}


def run_round(recipe: Recipe, run_dir: Path, t: int, *, force: bool = False) -> Path:
    """Write rounds/<t>/instructions/{train,heldout}.jsonl (+ manifest) for round t."""
    run_dir = Path(run_dir)
    cfg = recipe.iterate
    run = RunDir(run_dir)
    rnd = run.round(t)
    out = rnd.stage("instructions")
    stage = Stage(out, "instructions", {
        "iterate": _hash_fields(cfg), "round": t, "model": recipe.model.name,
        "upstream": run.upstream("instructions"),
        "previous": run.round(t - 1).upstream("model") if t > 1 else None},
        inputs=[run.stage("instructions"), *([run.round(t - 1).stage("model")] if t > 1 else [])])
    if stage.begin(force=force):
        return out
    pool = read_jsonl(run.train_instructions)
    heldout = read_jsonl(run.heldout_instructions)
    if cfg.prompt_source == "seed":
        items = seed_round_prompts(pool, t, cfg.prompts_per_round, cfg.seed)
        counts = {"source": "seed", "accepted": len(items)}
    else:
        items, counts = _self_instruct(recipe, run_dir, t, pool, heldout, out)
    write_jsonl(rnd.train_instructions, items)
    write_jsonl(rnd.heldout_instructions, heldout)
    return stage.finish({**counts, "train": len(items), "heldout": len(heldout)})


def _self_instruct(recipe: Recipe, run_dir: Path, t: int, pool: list[dict],
                   heldout: list[dict], out: Path) -> tuple[list[dict], dict]:
    from prefloop.engine.backends import load_backend

    cfg = recipe.iterate
    name = cfg.prompt_model or recipe.model.name
    revision = recipe.model.revision if name == recipe.model.name else None
    seeds = [one_line(it["instruction"]) for it in pool]
    demos = [s for s in seeds if rule_violation(s, cfg.min_words, cfg.max_words) is None]
    if len(demos) < cfg.fewshot_seed:
        raise PrefloopError(
            f"instructions.source: only {len(demos)} seed prompts pass the Self-Instruct rules "
            f"(iterate.fewshot_seed needs {cfg.fewshot_seed}); raise instructions.n_train"
        )
    previous = [it["instruction"] for s in range(1, t)
                for it in read_jsonl(RunDir(run_dir).round(s).train_instructions)]
    existing = seeds + [one_line(it["instruction"]) for it in heldout]
    backend = load_backend(replace(recipe.model, name=name, revision=revision))
    prompts = generate_prompts(backend, demos, existing, previous, cfg,
                               out / "candidates.jsonl", round_seed=cfg.seed * 1000 + t)
    counts = reason_counts(out / "candidates.jsonl")
    if not prompts:
        raise PrefloopError(
            f"{out / 'candidates.jsonl'}: Self-Instruct with '{name}' produced no prompt that "
            "passes the filters; set iterate.prompt_source=seed or a stronger iterate.prompt_model"
        )
    if len(prompts) < cfg.prompts_per_round:
        print(f"[prefloop] round {t}: only {len(prompts)} of {cfg.prompts_per_round} prompts "
              "passed the Self-Instruct filters; continuing with those", file=sys.stderr)
    items = [{"id": f"r{t}-si-{i:04d}", "instruction": p} for i, p in enumerate(prompts)]
    return items, {"source": "self-instruct", "prompt_model": name, **counts}
