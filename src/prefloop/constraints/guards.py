"""Pure checks that expose hollow constraint gains: empty, refusing, copied or off-topic answers.

A constraint reward alone can be won by answering in 12 words or by pasting the instruction's
example back; these functions measure exactly those failure modes. Definitions are in
docs/constraints.md.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable

_TOKEN = re.compile(r"\w+|\x00")
_LETTERS = re.compile(r"[^\W\d_]+")
_BARRIER = "\x00"  # stands where an allowed phrase was cut out, so no run can span it

# Openings of a refusal or a disclaimer instead of an answer, compared in lowercase with
# typographic apostrophes made plain.
REFUSAL_PHRASES = (
    "i'm sorry",
    "i am sorry",
    "i apologize",
    "i cannot",
    "i can't",
    "i can not",
    "i'm unable",
    "i am unable",
    "i'm not able",
    "i am not able",
    "i won't be able",
    "as an ai",
    "as a language model",
    "as an assistant",
)
REFUSAL_WINDOW = 150  # characters from the start in which a refusal phrase counts

MIN_SHARED_RUN = 8
# An answer needs this many words besides the postscript and the closing phrase its
# constraints demand; fewer is a bare decoration ("P.S. Hope this helps.")
MIN_BODY_WORDS = 5
# Degenerate repetition: text that zlib shrinks below this share of its bytes ("1.1.1.1...",
# "P.S. P.S. P.S. ...", one sentence again and again), or 20+ words of which fewer than 5 have
# letters ("1. 1. 2. 3. 4. ..."); set on the main job's answers of 2026-12-03 (docs/constraints.md)
MAX_COMPRESSED_SHARE = 0.15
MIN_REPEAT_CHARS = 60
# ... or a loop that zlib does not shrink that far because it starts after a paragraph of prose
# or counts up ("1. Keep warm: 2. Keep warm: ..."): at least this share of its word 4-grams
# (numbers masked) repeat an earlier one. Set on the main job's greedy answers of 2026-12-07:
# every answer at 0.46 or more loops to the token limit, the first below (0.39) repeats a
# paragraph; the sampled candidates of the same run reach 0.4 in 3 of 288 (docs/constraints.md)
MAX_REPEATED_SHARE = 0.4
REPEAT_NGRAM = 4
MIN_REPEAT_WORDS = 20
MAX_COPIED_SHARE = 0.6
NGRAM = 3

STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it its
    itself just let me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them themselves
    then there these they this those through to too under until up very was we were what when where
    which while who whom why will with would you your yours yourself yourselves give write tell
    explain describe list share name make use please""".split()
)


def word_count(text: str) -> int:
    """Runs of word characters, the count that length_constraints:number_words uses."""
    return len(re.findall(r"\w+", text))


def is_empty(text: str) -> bool:
    """True when the text has no letter or digit at all (only spaces, markdown or punctuation)."""
    return re.search(r"\w", text) is None


def is_bare(body: str | None) -> bool:
    """True when what is left of a response without its demanded postscript and closing phrase
    (``constraints.answer_body``; None: its constraints demand neither) has fewer than
    MIN_BODY_WORDS words: the decoration was written instead of an answer."""
    return body is not None and word_count(body) < MIN_BODY_WORDS


def is_degenerate(text: str) -> bool:
    """True when the response is degenerate repetition rather than prose: a tight loop
    (`is_tight_loop`) or one that repeats at least MAX_REPEATED_SHARE of its word 4-grams
    (`repeated_share`); texts shorter than MIN_REPEAT_CHARS bytes are never flagged."""
    if len(text.strip().encode("utf-8")) < MIN_REPEAT_CHARS:
        return False
    return is_tight_loop(text) or repeated_share(text) >= MAX_REPEATED_SHARE


def is_tight_loop(text: str) -> bool:
    """The narrower rule (the guard's only one before 2026-12-07): text of MIN_REPEAT_CHARS+
    bytes that zlib shrinks below MAX_COMPRESSED_SHARE, or MIN_REPEAT_WORDS+ words of which
    fewer than 5 have letters: a loop that fills nearly the whole answer."""
    raw = text.strip().encode("utf-8")
    if len(raw) < MIN_REPEAT_CHARS:
        return False
    if len(zlib.compress(raw, 9)) < MAX_COMPRESSED_SHARE * len(raw):
        return True
    return word_count(text) >= MIN_REPEAT_WORDS and len(_LETTERS.findall(text)) < 5


def repeated_share(text: str, n: int = REPEAT_NGRAM) -> float:
    """Share of the text's word n-grams (lowercased, every number written as '#') that repeat
    an earlier n-gram of the same text; 0.0 below MIN_REPEAT_WORDS words."""
    words = [re.sub(r"\d+", "#", w.lower()) for w in re.findall(r"\w+", text)]
    if len(words) < MIN_REPEAT_WORDS:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams)


def is_refusal(text: str) -> bool:
    """True when a REFUSAL_PHRASES entry starts within the first REFUSAL_WINDOW characters."""
    head = text.strip().lower().replace("\u2019", "'")[:REFUSAL_WINDOW]
    return any(phrase in head for phrase in REFUSAL_PHRASES)


def _tokens(text: str) -> list[str]:
    return [t.lower() for t in _TOKEN.findall(text)]


def _cut(text: str, allowed: Iterable[str]) -> str:
    for phrase in sorted(allowed, key=len, reverse=True):
        if phrase.strip():
            text = re.sub(re.escape(phrase), f" {_BARRIER} ", text, flags=re.IGNORECASE)
    return text


def shared_run(a: str, b: str) -> int:
    """Length in words of the longest run of consecutive words common to a and b (lowercased)."""
    x, y = _tokens(a), _tokens(b)
    best, prev = 0, [0] * (len(y) + 1)
    for tx in x:
        cur = [0] * (len(y) + 1)
        for j, ty in enumerate(y, 1):
            if tx == ty and tx != _BARRIER:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def copied_share(response: str, instruction: str, n: int = NGRAM) -> float:
    """Share of the response's words that sit inside an n-gram also found in the instruction."""
    words = _tokens(response)
    real = [w for w in words if w != _BARRIER]
    if len(real) < n:
        return 0.0
    source = _tokens(instruction)
    grams = {tuple(source[i : i + n]) for i in range(len(source) - n + 1)}
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        if tuple(words[i : i + n]) in grams:
            covered[i : i + n] = [True] * n
    return sum(c for c, w in zip(covered, words, strict=True) if w != _BARRIER) / len(real)


def example_spans(instruction: str) -> list[str]:
    """Example text in an instruction: double-quoted spans and markdown list-item lines."""
    quoted = re.findall(r'"([^"\n]+)"|\u201c([^\u201d\n]+)\u201d', instruction)
    spans = [a or b for a, b in quoted]
    spans += re.findall(r"^\s*(?:[*\-\u2022]|\d+[.)])\s+(.+)$", instruction, flags=re.MULTILINE)
    return [s for s in spans if len(_tokens(s)) >= 2]


def _contains(words: list[str], span: list[str]) -> bool:
    n = len(span)
    return any(words[i : i + n] == span for i in range(len(words) - n + 1))


def copies_example(response: str, instruction: str, allowed: Iterable[str] = ()) -> bool:
    """True when the response reproduces the instruction rather than answering it.

    After cutting out the ``allowed`` phrases (text the constraints demand, see
    required_phrases), any of: a shared run of >= MIN_SHARED_RUN words; an example span of 2+
    words (see example_spans) reproduced verbatim; or >= MAX_COPIED_SHARE of the response's words
    covered by word trigrams of the instruction.
    """
    allowed = list(allowed)
    text = _cut(response, allowed)
    if shared_run(text, instruction) >= MIN_SHARED_RUN:
        return True
    words = _tokens(text)
    spans = [_tokens(_cut(s, allowed)) for s in example_spans(instruction)]
    # A span holding demanded text is not an example to avoid: the response must repeat it.
    if any(_contains(words, s) for s in spans if _BARRIER not in s and len(s) >= 2):
        return True
    return copied_share(text, instruction) >= MAX_COPIED_SHARE


def stem(word: str) -> str:
    """Crude English suffix stripping: cooking, cooked, cooks -> cook; berries -> berry; boxes -> box."""
    w = word.lower()
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("ses", "xes", "zes", "ches", "shes")) and len(w) > 4:
        return w[:-2]
    for suffix in ("ing", "ed", "ly"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            return w[: -len(suffix)]
    if w.endswith("s") and not w.endswith(("ss", "us", "is")) and len(w) > 3:
        return w[:-1]
    return w


def content_words(text: str) -> set[str]:
    """Stems of the letters-only words of 3+ characters that are not in STOPWORDS."""
    return {stem(w) for w in _LETTERS.findall(text.lower()) if len(w) > 2 and w not in STOPWORDS}


def relevance(instruction: str, response: str) -> float:
    """Share of the instruction's content words whose stem also occurs in the response.

    1.0 when the instruction has no content words. Pass the bare task, not the constraint
    sentences, or words like "answer" and "commas" count as topic.
    """
    wanted = content_words(instruction)
    if not wanted:
        return 1.0
    have = {stem(w) for w in _LETTERS.findall(response.lower())}
    return len(wanted & have) / len(wanted)
