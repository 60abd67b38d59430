"""A programmatic reward: the share of an instruction's verifiable constraints a response
satisfies (IFEval's strict reading; the loose reading is recorded beside it).

    score(y | x) = (1/|C_x|) Σ_{c ∈ C_x} 1[y satisfies c strictly]

No model judges anything, so the reward cannot drift with the policy. What it cannot see is
substance, which is how a constraints-only reward gets hacked (docs/constraints.md): a response
that is empty, a refusal, a copy of its instruction, bare (only the postscript or closing
phrase it demands) or degenerate repetition scores 0 whatever it satisfies, and the pairs stage
can match lengths and consult a quality ranker (rank.quality) on top.
"""

from __future__ import annotations

from pathlib import Path

from prefloop.config import RankConfig
from prefloop.constraints import (
    Constraint,
    answer_body,
    check_all,
    guards,
    required_phrases,
)
from prefloop.errors import PrefloopError

# Constraint kinds that are about length: pairs for them need not be length-matched.
LENGTH_KINDS = frozenset({"length_constraints:number_words", "length_constraints:number_sentences",
                          "length_constraints:number_paragraphs"})


def hollow(response: str, instruction: str, constraints: list[Constraint]) -> str | None:
    """Why a response answers nothing (empty, refusal, copy of the instruction, bare: only the
    postscript or closing phrase its constraints demand, or degenerate repetition), else None."""
    if guards.is_empty(response):
        return "empty"
    if guards.is_refusal(response):
        return "refusal"
    if guards.copies_example(response, instruction, required_phrases(constraints)):
        return "copy"
    if guards.is_bare(answer_body(response, constraints)):
        return "bare"
    if guards.is_degenerate(response):
        return "degenerate"
    return None


def check_response(response: str, instruction: str, raw: list[dict]) -> dict:
    """The ranker's fields for one response: score, loose score, per-constraint results."""
    constraints = [Constraint(c["kind"], c["args"]) for c in raw]
    results = check_all(response, constraints, instruction)
    why = hollow(response, instruction, constraints)
    strict = sum(r.strict for r in results) / len(results)
    loose = sum(r.loose for r in results) / len(results)
    return {"score": 0.0 if why else strict, "n_valid": 1, "scores": [],
            "strict": strict, "loose": loose, "hollow": why,
            "length_free": any(c.kind in LENGTH_KINDS for c in constraints),
            "checks": [{"kind": c.kind, "strict": r.strict, "loose": r.loose}
                       for c, r in zip(constraints, results, strict=True)]}


class ConstraintsRanker:
    """Scores each response by the constraints its instruction carries (no model)."""

    pointwise = True
    programmatic = True  # no model: the iterate loop may use it as its reward
    compares = False  # it needs the instructions' constraints: compare reads them itself
    checks_constraints = True  # its score is compare's objective metric, on other instructions
    caveat = ""

    def __init__(self, cfg: RankConfig, name: str = "constraints"):
        self.cfg, self.name = cfg, name

    @classmethod
    def label(cls, recipe) -> str:
        return "constraints"

    @classmethod
    def depends_on_policy(cls, rank: RankConfig) -> bool:
        return False

    @classmethod
    def judgments(cls, rank) -> int:
        return 1

    @classmethod
    def models(cls, rank: RankConfig) -> dict[str, str]:
        return {}

    @classmethod
    def from_recipe(cls, recipe, policy=None) -> ConstraintsRanker:
        return cls(recipe.rank)

    @classmethod
    def card_lines(cls, recipe) -> list[str]:
        return [
            "- Ranker: verifiable constraints (IFEval-style checks, `prefloop.constraints`); "
            "score = share of the instruction's constraints satisfied (strict reading), 0 for "
            "an empty answer, a refusal, a copy of the instruction, a bare postscript or "
            "closing phrase with no answer before it, or degenerate repetition",
            "- Per-candidate results: `checks` (kind, strict, loose per constraint) and "
            "`hollow` in pairs/dropped.jsonl and rank/scores.jsonl",
        ]

    def score(self, records: list[dict], workdir: Path) -> tuple[list[dict], dict]:
        missing = next((r for r in records if not r.get("constraints")), None)
        if missing is not None:
            raise PrefloopError(
                f"rank.ranker constraints: instruction '{missing['id']}' has no constraints; "
                "use instructions.source=verifiable (or a file or Hub set with a constraints "
                "field), or another rank.ranker")
        fields = [check_response(r["response"], r["instruction"], r["constraints"])
                  for r in records]
        return fields, {
            "strict_mean": round(sum(f["strict"] for f in fields) / len(fields), 4),
            "loose_mean": round(sum(f["loose"] for f in fields) / len(fields), 4),
            "hollow": {k: sum(f["hollow"] == k for f in fields)
                       for k in ("empty", "refusal", "copy", "bare", "degenerate")},
        }

    def summary(self, counts: dict) -> str | None:
        h = counts["hollow"]
        return (f"{counts['responses']} responses checked against their constraints "
                f"(no model): mean satisfied {counts['strict_mean']:.3f} strict, "
                f"{counts['loose_mean']:.3f} loose; scored 0 as empty/refusal/copy/bare/"
                f"degenerate: {h['empty']}/{h['refusal']}/{h['copy']}/{h.get('bare', 0)}/"
                f"{h.get('degenerate', 0)}")

    def compare(self, instructions: list[str], a: list[str], b: list[str]) -> list[float]:
        raise PrefloopError("the constraints ranker compares responses through their "
                            "instructions' constraints; the compare stage reads them itself")
