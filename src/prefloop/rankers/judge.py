"""LLM-as-a-Judge ranker: the additive 5-point prompt of Yuan et al. 2024 (arXiv:2401.10020, Fig 2).

Each response is judged N times (sampled, T 0.7, top-p 0.9 by default) and its score is the mean of
the valid judgments. The filled prompt is sent as one user turn through the judge's own chat
template; the paper fine-tuned a base model in Open Assistant format instead, so this is our choice.
A judgment whose score cannot be parsed counts as missing, never as a number (docs/self_rewarding.md
§5.3): mapping failures to 0 or -1 would turn broken judgments into "rejected" responses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from prefloop.chat import render_prompt
from prefloop.config import RankConfig
from prefloop.errors import PrefloopError

INSTRUCTION_SLOT = "<INSTRUCTION_HERE>"
RESPONSE_SLOT = "<RESPONSE_HERE>"
MAX_SCORE = 5.0

# The last "Score: X" wins: judges often write "Score:" inside their justification too.
# Label (score | points | total points), optional markdown emphasis around label and value,
# a colon, a signed decimal (a sign is captured so "-1" fails instead of being skipped), "/5".
SCORE_RE = re.compile(
    r"(?<![A-Za-z0-9])(?:total\s+points|points|score)\s*[*_]*\s*:\s*[*_]*\s*"
    r"(?P<num>[-+]?\d+(?:\.\d+)?)(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?",
    re.IGNORECASE,
)


FORCE_SUFFIX = "\nScore:"  # the paper's own format prefix, appended when forcing a score
FORCE_CHUNK = 64  # responses judged, then forced, per engine call when forcing scores


@dataclass(frozen=True)
class Judgment:
    text: str  # the judge's full output, kept for inspection
    score: float | None  # None: no valid score in the text
    error: str | None = None  # why no text was generated ("prompt_too_long"), else None
    forced: bool = False  # score read off the judge's logits after FORCE_SUFFIX (non-paper)


def load_template(name: str) -> str:
    """The judge prompt `prompts/judge_<name>.txt`; the file's final newline is not part of it."""
    path = resources.files("prefloop") / "prompts" / f"judge_{name}.txt"
    if not path.is_file():
        shipped = sorted(p.name[6:-4] for p in (resources.files("prefloop") / "prompts").iterdir()
                         if p.name.startswith("judge_") and p.name.endswith(".txt"))
        raise PrefloopError(f"rank.judge_template: unknown template '{name}'; shipped: "
                            f"{', '.join(shipped)}")
    text = path.read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text


def fill_template(template: str, instruction: str, response: str) -> str:
    """Fill both slots in one pass, so a slot name typed inside the instruction stays literal."""
    slots = {INSTRUCTION_SLOT: instruction, RESPONSE_SLOT: response}
    pattern = "|".join(re.escape(s) for s in slots)
    return re.sub(pattern, lambda m: slots[m.group(0)], template)


def parse_score(text: str) -> float | None:
    """The last "Score: X" in `text` as a float in [0, 5]; None when absent or out of range.

    Accepts "Score|Points|Total points" in any case, markdown bold (`**Score:** 4`,
    `**Score: 4**`), decimals, "X/5" and trailing text. A denominator other than 5 is a failure.
    """
    matches = list(SCORE_RE.finditer(text or ""))
    if not matches:
        return None
    last = matches[-1]
    if last.group("den") is not None and float(last.group("den")) != MAX_SCORE:
        return None
    value = float(last.group("num"))
    return value if 0.0 <= value <= MAX_SCORE else None


def digit_tokens(tokenizer) -> dict[int, int]:
    """Token id -> score for the single-token spellings of 0..5 ("3" and " 3")."""
    out = {}
    for d in range(int(MAX_SCORE) + 1):
        for text in (str(d), f" {d}"):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                out.setdefault(ids[0], d)
    return out


def forced_scores(model, tokenizer, sequences: list[list[int]]) -> list[float]:
    """s = Σ_d d·p(d) / Σ_d p(d), d ∈ 0..5, p(d) = p(next token spells d | prompt, judgment,
    "\nScore:"): the probability-weighted score of G-Eval (Liu et al. 2023), not the paper's
    (docs/self_rewarding.md §5.4).

    The expectation rather than the argmax, because a small judge's argmax is nearly constant
    (SmolLM2-135M: "1" for 58 of 58 failed judgments) and would leave every response tied.
    sequences: token ids of prompt + judgment; prefilled by the engine (the rubric that every
    judge prompt starts with is computed once), last position only.
    """
    import torch

    from prefloop import engine

    digits = digit_tokens(tokenizer)
    if not digits:
        raise PrefloopError("rank.judge_force_score: the judge's tokenizer has no single-token "
                            "digits 0-5; turn judge_force_score off")
    suffix = tokenizer(FORCE_SUFFIX, add_special_tokens=False)["input_ids"]
    cand = list(digits)
    rows = [tuple(seq) + tuple(suffix) for seq in sequences]
    unique = list(dict.fromkeys(rows))  # equal judgments (common at low temperature): once
    logits = engine.last_logits(model, unique, cand,
                                pad_token_id=tokenizer.pad_token_id or 0)  # [U, D]
    # softmax over the digits alone equals p(d) / Σ_d p(d) over the full vocabulary
    probs = logits.softmax(-1)
    values = torch.tensor([float(digits[t]) for t in cand])  # [D]
    score = dict(zip(unique, (probs * values).sum(-1).tolist(), strict=True))
    return [score[r] for r in rows]


def valid_scores(scores: list[float | None]) -> list[float]:
    return [s for s in scores if s is not None]


def mean_score(scores: list[float | None], min_valid: int = 1) -> float | None:
    """s = (1/|V|) Σ_{v∈V} v over the valid judge samples V; None when |V| < min_valid."""
    valid = valid_scores(scores)
    if len(valid) < max(min_valid, 1):
        return None
    return sum(valid) / len(valid)


def score_variance(scores: list[float | None]) -> float:
    """Population variance (1/|V|) Σ (v − mean)² of the valid samples; 0 for fewer than two."""
    valid = valid_scores(scores)
    if len(valid) < 2:
        return 0.0
    mu = sum(valid) / len(valid)
    return sum((v - mu) ** 2 for v in valid) / len(valid)


class JudgeRanker:
    """Scores responses with a causal LM and the Yuan et al. 2024 prompt (N samples each)."""

    def __init__(self, model, tokenizer, cfg: RankConfig, *, name: str):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.name = name
        self.template = load_template(cfg.judge_template)

    def judge(self, instructions: list[str], responses: list[str], *,
              on_done: Callable[[int, list[Judgment]], None] | None = None,
              ) -> list[list[Judgment]]:
        """N judgments per response; `on_done(i, judgments)` fires as each response finishes."""
        from prefloop import engine
        from prefloop.models import context_length
        from prefloop.stages.generate import eos_ids

        _check_lengths(instructions, responses)
        n, cfg = self.cfg.judge_samples, self.cfg
        prompts = [render_prompt(self.tokenizer, fill_template(self.template, i, r)).ids
                   for i, r in zip(instructions, responses, strict=True)]
        limit = context_length(self.model) - cfg.judge_max_new_tokens
        fits = [i for i, ids in enumerate(prompts) if len(ids) <= limit]
        out: list[list[Judgment] | None] = [None] * len(prompts)
        for i in sorted(set(range(len(prompts))) - set(fits)):
            out[i] = [Judgment("", None, "prompt_too_long")] * n
            if on_done:
                on_done(i, out[i])

        def emit(i: int, judged: list[Judgment]) -> None:
            out[i] = judged
            if on_done:
                on_done(i, judged)

        # Forcing reads the judge once more per failed judgment; done per chunk of responses so
        # that one batched prefill (rubric shared) serves the chunk, and a kill loses one chunk.
        step = FORCE_CHUNK if cfg.judge_force_score else max(len(fits), 1)
        sampling = engine.Sampling(temperature=cfg.judge_temperature, top_p=cfg.judge_top_p,
                                   max_new_tokens=cfg.judge_max_new_tokens, seed=cfg.seed)
        session = engine.Session()  # the chunks share one loop (and its CUDA graphs)
        for start in range(0, len(fits), step):
            part = fits[start: start + step]
            unforced: dict[int, tuple] = {}

            def finished(j: int, completions, part=part, unforced=unforced) -> None:
                i = part[j]
                judged = [self._judgment(c) for c in completions]
                if cfg.judge_force_score:
                    unforced[i] = (completions, judged)
                else:
                    emit(i, judged)

            # Each response keeps the random stream it has in one unchunked call.
            engine.generate(self.model, [prompts[i] for i in part], n, sampling,
                            stream_ids=range(start, start + len(part)),
                            eos_token_ids=eos_ids(self.model, self.tokenizer),
                            pad_token_id=self.tokenizer.pad_token_id,
                            batch_size=cfg.batch_size, on_prompt_done=finished,
                            session=session)
            for i, judged in self._force(prompts, unforced).items():
                emit(i, judged)
        session.close()
        return out  # type: ignore[return-value]

    def _judgment(self, completion) -> Judgment:
        text = self.tokenizer.decode(_without_eos(completion), skip_special_tokens=True).strip()
        return Judgment(text, parse_score(text))

    def _force(self, prompts: list[list[int]], unforced: dict[int, tuple]
               ) -> dict[int, list[Judgment]]:
        """Give unparsable judgments the judge's expected digit after "Score:" (non-paper)."""
        failed = [(i, k) for i, (_, judged) in unforced.items()
                  for k, j in enumerate(judged) if j.score is None]
        seqs = [prompts[i] + _without_eos(unforced[i][0][k]) for i, k in failed]
        forced = dict(zip(failed, forced_scores(self.model, self.tokenizer, seqs) if seqs else [],
                          strict=True))
        return {i: [Judgment(j.text, forced[(i, k)], forced=True) if (i, k) in forced else j
                    for k, j in enumerate(judged)]
                for i, (_, judged) in sorted(unforced.items())}

    def score(self, instructions: list[str], responses: list[str]) -> list[float | None]:
        """Mean valid judge score per response (None when fewer than `min_valid` parsed)."""
        judged = self.judge(instructions, responses)
        return [mean_score([j.score for j in js], self.cfg.min_valid) for js in judged]

    def compare(self, instructions: list[str], a: list[str], b: list[str]) -> list[float]:
        """score(a) − score(b), each judged on its own so order cannot matter; NaN if one fails."""
        _check_lengths(instructions, a, b)
        s = self.score(list(instructions) * 2, list(a) + list(b))
        k = len(a)
        return [math.nan if x is None or y is None else x - y
                for x, y in zip(s[:k], s[k:], strict=True)]


def _without_eos(completion) -> list[int]:
    ids = list(completion.token_ids)
    return ids[:-1] if completion.finish_reason == "eos" else ids


def _check_lengths(*lists: list) -> None:
    if len({len(x) for x in lists}) > 1:
        sizes = ", ".join(str(len(x)) for x in lists)
        raise ValueError(f"judge: inputs differ in length ({sizes})")
