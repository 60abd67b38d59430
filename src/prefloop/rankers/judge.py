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
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from prefloop.artifacts import append_jsonl, read_jsonl, write_jsonl
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


def forced_scores(backend, sequences: list[list[int]]) -> list[float]:
    """s = Σ_d d·p(d) / Σ_d p(d), d ∈ 0..5, p(d) = p(next token spells d | prompt, judgment,
    "\nScore:"): the probability-weighted score of G-Eval (Liu et al. 2023), not the paper's
    (docs/self_rewarding.md §5.4).

    The expectation rather than the argmax, because a small judge's argmax is nearly constant
    (SmolLM2-135M: "1" for 58 of 58 failed judgments) and would leave every response tied.
    sequences: token ids of prompt + judgment; prefilled by the backend (the rubric that every
    judge prompt starts with is computed once), last position only.
    """
    import torch

    tokenizer = backend.tokenizer
    digits = digit_tokens(tokenizer)
    if not digits:
        raise PrefloopError("rank.judge_force_score: the judge's tokenizer has no single-token "
                            "digits 0-5; turn judge_force_score off")
    suffix = tokenizer(FORCE_SUFFIX, add_special_tokens=False)["input_ids"]
    cand = list(digits)
    rows = [tuple(seq) + tuple(suffix) for seq in sequences]
    unique = list(dict.fromkeys(rows))  # equal judgments (common at low temperature): once
    logits = backend.last_logits(unique, cand)  # [U, D]
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

    pointwise = True
    programmatic = False  # a model scores: the iterate loop makes M_t judge itself instead
    compares = True
    checks_constraints = False
    caveat = "A small model judging is a weak evaluator."

    def __init__(self, backend, cfg: RankConfig, *, name: str):
        """`backend`: a generation backend, or a function that loads one on first use (a
        resumed stage with nothing left to judge then loads no model)."""
        self._backend = backend if hasattr(backend, "generate") else None
        self._load = None if self._backend is not None else backend
        self.cfg = cfg
        self.name = name
        self.template = load_template(cfg.judge_template)

    @property
    def backend(self):
        if self._backend is None:
            self._backend = self._load()
        return self._backend

    # -- description without loading ---------------------------------------------------------

    @classmethod
    def label(cls, recipe) -> str:
        return f"judge:{recipe.rank.judge_model or recipe.model.name}"

    @classmethod
    def depends_on_policy(cls, rank: RankConfig) -> bool:
        return rank.judge_model is None

    @classmethod
    def judgments(cls, rank) -> int:
        return rank.judge_samples

    @classmethod
    def models(cls, rank: RankConfig) -> dict[str, str]:
        return {"rank.judge_model": rank.judge_model} if rank.judge_model else {}

    @classmethod
    def from_recipe(cls, recipe, policy=None) -> JudgeRanker:
        """rank.judge_model, or (None) the policy judging itself: `policy` when given."""
        from prefloop.engine.backends import load_backend

        cfg = recipe.rank
        if cfg.judge_model is not None and recipe.model.backend != "local":
            raise PrefloopError("rank.judge_model: a separate judge runs only with "
                                "model.backend=local; leave it empty to let the served model "
                                "judge itself, or use rank.ranker=pairrm")
        if cfg.judge_model is None and policy is not None:
            return cls(policy, cfg, name=cls.label(recipe))
        model = recipe.model if cfg.judge_model is None else replace(
            recipe.model, name=cfg.judge_model, revision=cfg.judge_revision)
        return cls(lambda: load_backend(model), cfg, name=cls.label(recipe))

    @classmethod
    def card_lines(cls, recipe) -> list[str]:
        r = recipe.rank
        judge = (f"`{r.judge_model}`" if r.judge_model
                 else f"`{recipe.model.name}` (the generator judging itself)")
        return [
            f"- Ranker: LLM-as-a-judge, model {judge}",
            f"- Judge prompt: `prompts/judge_{r.judge_template}.txt` (the additive 5-point "
            "prompt of Yuan et al. 2024, Fig. 2, verbatim), sent as one user turn through the judge's chat "
            "template",
            f"- Judge sampling: {r.judge_samples} samples per response, temperature "
            f"{r.judge_temperature}, top-p {r.judge_top_p}, up to {r.judge_max_new_tokens} new "
            f"tokens; score = mean of the parsable samples (at least {r.min_valid}); the last "
            "\"Score: X\" in [0, 5] counts, "
            + ("unparsable samples get Σ d·p(d) over the judge's next-token probabilities of "
               "0-5 after an appended \"Score:\" (judge_force_score, G-Eval style, not in the "
               "paper)" if r.judge_force_score
               else "unparsable samples count as missing"),
        ]

    # -- the rank stage ----------------------------------------------------------------------

    def score(self, records: list[dict], workdir: Path) -> tuple[list[dict], dict]:
        """Judge every response not judged yet (appended to workdir/judgments.jsonl as each one
        finishes, so a killed stage resumes), then one score per response."""
        from tqdm.auto import tqdm

        path = Path(workdir) / "judgments.jsonl"
        done = judged_groups(path, self.cfg.judge_samples)
        # each response keeps its position in `records` as its random stream, so a resumed
        # stage judges the rest as an uninterrupted one would
        streams = [n for n, r in enumerate(records) if (r["id"], r["sample"]) not in done]
        todo = [records[n] for n in streams]
        if todo:
            bar = tqdm(total=len(records), initial=len(records) - len(todo), desc="judge",
                       unit="resp")

            def on_done(i: int, judgments: list[Judgment]) -> None:
                append_jsonl(path, [_judgment_row(todo[i], j, jd)
                                    for j, jd in enumerate(judgments)])
                bar.update(1)

            try:
                self.judge([r["instruction"] for r in todo], [r["response"] for r in todo],
                           on_done=on_done, stream_ids=streams)
            finally:
                bar.close()  # ends its line, so an error message starts on its own
            done = judged_groups(path, self.cfg.judge_samples)
        fields = []
        for r in records:
            samples = [row["score"] for row in done[(r["id"], r["sample"])]]
            fields.append({"score": mean_score(samples, self.cfg.min_valid),
                           "n_valid": sum(s is not None for s in samples), "scores": samples})
        rows = [row for r in records for row in done[(r["id"], r["sample"])]]
        return fields, judge_counts(rows)

    def summary(self, counts: dict) -> str | None:
        """How each score was obtained: judge samples whose text had a parsable "Score: X",
        those forced (judge_force_score), and those left without a score."""
        n = counts.get("judge_samples")
        if not n:
            return None
        forced, too_long = counts.get("forced_scores", 0), counts.get("prompt_too_long", 0)
        unparsed = counts["parse_failures"] - forced  # no score, no forced one either
        parsed = n - unparsed - forced - too_long
        how = [f"{parsed} parsed 'Score: X' from the judge's text"]
        if self.cfg.judge_force_score or forced:
            how.append(f"{forced} read from the judge's digit probabilities after 'Score:' "
                       "(judge_force_score: the expectation Σ d·p(d))")
        how.append(f"{unparsed + too_long} without a score"
                   + (f" ({too_long} prompts too long for the judge)" if too_long else ""))
        return (f"{counts['scored']}/{counts['responses']} responses scored from {n} judge "
                f"samples: " + ", ".join(how))

    # -- judging ------------------------------------------------------------------------------

    def judge(self, instructions: list[str], responses: list[str], *,
              on_done: Callable[[int, list[Judgment]], None] | None = None,
              stream_ids: Sequence[int] | None = None) -> list[list[Judgment]]:
        """N judgments per response; `on_done(i, judgments)` fires as each response finishes.
        `stream_ids[i]`: response i's random stream (default i), for a caller judging what a
        killed run left to judge."""
        from prefloop import engine

        _check_lengths(instructions, responses)
        n, cfg, backend = self.cfg.judge_samples, self.cfg, self.backend
        streams = list(range(len(responses)) if stream_ids is None else stream_ids)
        prompts = [render_prompt(backend.tokenizer, fill_template(self.template, i, r)).ids
                   for i, r in zip(instructions, responses, strict=True)]
        limit = backend.context_length - cfg.judge_max_new_tokens
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
        session = backend.session()  # the chunks share one loop (and its CUDA graphs)
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
            backend.generate([prompts[i] for i in part], n, sampling,
                             stream_ids=[streams[i] for i in part],
                             batch_size=cfg.batch_size, on_prompt_done=finished,
                             session=session)
            for i, judged in self._force(prompts, unforced).items():
                emit(i, judged)
        session.close()
        return out  # type: ignore[return-value]

    def _judgment(self, completion) -> Judgment:
        from prefloop.engine.backend import decode

        text = decode(self.backend.tokenizer, completion)
        return Judgment(text, parse_score(text))

    def _force(self, prompts: list[list[int]], unforced: dict[int, tuple]
               ) -> dict[int, list[Judgment]]:
        """Give unparsable judgments the judge's expected digit after "Score:" (non-paper)."""
        failed = [(i, k) for i, (_, judged) in unforced.items()
                  for k, j in enumerate(judged) if j.score is None]
        seqs = [prompts[i] + unforced[i][0][k].content_ids for i, k in failed]
        forced = dict(zip(failed, forced_scores(self.backend, seqs) if seqs else [],
                          strict=True))
        # NaN: none of the digits was in a server's top-k log-probs; the judgment stays unscored
        return {i: [Judgment(j.text, forced[(i, k)], forced=True)
                    if (i, k) in forced and not math.isnan(forced[(i, k)]) else j
                    for k, j in enumerate(judged)]
                for i, (_, judged) in sorted(unforced.items())}

    def compare(self, instructions: list[str], a: list[str], b: list[str]) -> list[float]:
        """score(a) − score(b), each judged on its own so order cannot matter; NaN if one fails."""
        _check_lengths(instructions, a, b)
        judged = self.judge(list(instructions) * 2, list(a) + list(b))
        s = [mean_score([j.score for j in js], self.cfg.min_valid) for js in judged]
        k = len(a)
        return [math.nan if x is None or y is None else x - y
                for x, y in zip(s[:k], s[k:], strict=True)]


def judged_groups(path: Path, n: int) -> dict[tuple[str, int], list[dict]]:
    """Judgments of responses with all n samples; rewrites the file without partial groups."""
    if not path.exists():
        return {}
    rows = read_jsonl(path, allow_partial_tail=True)
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["id"], row["sample"])].append(row)
    done = {k: sorted(g, key=lambda x: x["judge_sample"]) for k, g in groups.items()
            if sorted(x["judge_sample"] for x in g) == list(range(n))}
    kept = [row for row in rows if (row["id"], row["sample"]) in done]
    if len(kept) != len(rows):
        write_jsonl(path, kept)
    return done


def _judgment_row(r: dict, j: int, jd: Judgment) -> dict:
    row = {"id": r["id"], "sample": r["sample"], "judge_sample": j, "text": jd.text,
           "score": jd.score}
    if jd.error:
        row["error"] = jd.error
    if jd.forced:
        row["forced"] = True
    return row


def judge_counts(rows: list[dict]) -> dict:
    """Judge-sample parse failures and the exact per-sample score counts.

    parse_failures counts every sample without a parsable score, forced ones included;
    judge_sample_failure_rate is the share still without a score after forcing.
    """
    failed = sum(row["score"] is None for row in rows)
    forced = sum(bool(row.get("forced")) for row in rows)
    return {
        "judge_samples": len(rows),
        "parse_failures": sum(row["score"] is None and "error" not in row for row in rows)
        + forced,
        "forced_scores": forced,
        "prompt_too_long": sum("error" in row for row in rows),
        "judge_sample_failure_rate": round(failed / len(rows), 4) if rows else 0.0,
        "judge_sample_scores": {f"{k:g}": v for k, v in sorted(  # 0.1 bins: forced scores vary
            Counter(round(row["score"], 1) for row in rows if row["score"] is not None).items())},
    }


def _check_lengths(*lists: list) -> None:
    if len({len(x) for x in lists}) > 1:
        sizes = ", ".join(str(len(x)) for x in lists)
        raise ValueError(f"judge: inputs differ in length ({sizes})")
