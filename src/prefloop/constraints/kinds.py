"""The checkers, one per IFEval instruction id, and the registry ``KINDS`` that maps id to checker.

Each checker follows the semantics of IFEval (Zhou et al. 2023) as described in the paper and its
instruction descriptions; the deliberate differences are listed in docs/constraints.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prefloop.errors import PrefloopError

LESS_THAN = "less than"
AT_LEAST = "at least"
RELATIONS = (LESS_THAN, AT_LEAST)

# IFEval's constrained_response options, matched as exact substrings.
CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")

# Kinds that exist in IFEval but cannot be checked offline without a language model of text.
UNSUPPORTED = {
    "language:response_language": "it needs a language detector, which prefloop does not ship",
}

_WORD = re.compile(r"\w+")
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth")

# Abbreviations after which a period does not end a sentence (lowercased, without the dot).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc inc ltd co corp dept approx fig no vol ca cf e.g i.e a.m p.m"
    " u.s u.k jan feb mar apr jun jul aug sep sept oct nov dec mt ave min max".split()
)
# A candidate sentence end: terminal punctuation, closing quotes or brackets, then whitespace.
_SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s)")


@dataclass(frozen=True)
class Arg:
    """One keyword argument of a kind: its IFEval name, its type and whether it may be left out."""

    name: str
    type: str  # "int", "str", "words" (non-empty list of strings), "relation", "letter"
    required: bool = True
    minimum: int = 0


@dataclass(frozen=True)
class Kind:
    """A constraint kind: the checker, its arguments and the sentence that states it."""

    id: str
    args: tuple[Arg, ...]
    check: Callable[[str, Mapping[str, Any], str | None], bool]
    describe: Callable[[Mapping[str, Any]], str]


def count_words(text: str) -> int:
    """Number of runs of word characters (letters, digits, underscore; any script)."""
    return len(_WORD.findall(text))


def split_sentences(text: str) -> list[str]:
    """Split text at ., ! or ? followed by whitespace, except after abbreviations and initials.

    Stands in for NLTK's Punkt model (unavailable offline): like Punkt it does not split at line
    breaks alone, nor before a lowercase word, nor inside numbers such as 3.5.
    """
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
        before = text[start : match.start()].split()
        last = before[-1].lower().rstrip(".") if before else ""
        following = text[end:].lstrip()
        if match.group().startswith(".") and (last in _ABBREVIATIONS or len(last) == 1):
            continue
        if following[:1].islower():
            continue
        sentences.append(text[start:end])
        start = end
    sentences.append(text[start:])
    return [s.strip() for s in sentences if _WORD.search(s)]


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def _compare(actual: int, relation: str, target: int) -> bool:
    return actual < target if relation == LESS_THAN else actual >= target


def _relation_words(relation: str) -> str:
    return "fewer than" if relation == LESS_THAN else "at least"


def _quoted_list(words: list[str], joiner: str) -> str:
    quoted = [f'"{w}"' for w in words]
    if len(quoted) == 1:
        return quoted[0]
    return ", ".join(quoted[:-1]) + f" {joiner} " + quoted[-1]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _ordinal(n: int) -> str:
    return _ORDINALS[n - 1] if 1 <= n <= len(_ORDINALS) else f"{n}th"


# --- keywords ---------------------------------------------------------------------------------


def _existence(text, a, _p):
    return all(re.search(re.escape(k), text, flags=re.IGNORECASE) for k in a["keywords"])


def _frequency(text, a, _p):
    found = len(re.findall(re.escape(a["keyword"]), text, flags=re.IGNORECASE))
    return _compare(found, a["relation"], a["frequency"])


def _forbidden(text, a, _p):
    return not any(
        re.search(r"\b" + re.escape(w) + r"\b", text, flags=re.IGNORECASE)
        for w in a["forbidden_words"]
    )


def _letter_frequency(text, a, _p):
    return _compare(text.lower().count(a["letter"].lower()), a["let_relation"], a["let_frequency"])


# --- length -----------------------------------------------------------------------------------


def _number_words(text, a, _p):
    return _compare(count_words(text), a["relation"], a["num_words"])


def _number_sentences(text, a, _p):
    return _compare(count_sentences(text), a["relation"], a["num_sentences"])


def _split_paragraphs(parts: list[str]) -> list[str] | None:
    """Drop empty parts at either end; an empty part in the middle makes the split invalid."""
    while parts and not parts[0].strip():
        parts = parts[1:]
    while parts and not parts[-1].strip():
        parts = parts[:-1]
    return None if any(not p.strip() for p in parts) else parts


def _number_paragraphs(text, a, _p):
    parts = _split_paragraphs(re.split(r"\s?\*\*\*\s?", text))
    return parts is not None and len(parts) == a["num_paragraphs"]


def _first_word(paragraph: str) -> str:
    word = paragraph.split()[0].lstrip("'\"")
    return re.split(r"[.,?!'\"]", word, maxsplit=1)[0].lower()


def _nth_paragraph_first_word(text, a, _p):
    parts = [p for p in re.split(r"\n\n", text) if p.strip()]
    nth = a["nth_paragraph"]
    if len(parts) != a["num_paragraphs"] or nth > len(parts):
        return False
    return _first_word(parts[nth - 1]) == a["first_word"].lower()


# --- detectable content / format --------------------------------------------------------------


def _placeholders(text, a, _p):
    return len(re.findall(r"\[.*?\]", text)) >= a["num_placeholders"]


def _marker_pattern(marker: str) -> str:
    # Lets "P.S." also match "p. s." as IFEval does, by allowing a space after each dot.
    return "".join(r"\.\s?" if ch == "." else re.escape(ch) for ch in marker.strip().lower())


def find_postscript(text: str, marker: str) -> re.Match | None:
    """The first line of ``text`` that starts with the postscript ``marker`` (IFEval's reading)."""
    return re.search(r"^\s*" + _marker_pattern(marker), text.lower(), flags=re.MULTILINE)


def _postscript(text, a, _p):
    return find_postscript(text, a["postscript_marker"]) is not None


def count_bullets(text: str) -> int:
    """Lines starting with "*" (not "**") or "-", IFEval's markdown bullet definition."""
    stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes)


def _bullets(text, a, _p):
    return count_bullets(text) == a["num_bullets"]


def _constrained_response(text, _a, _p):
    return any(option in text for option in CONSTRAINED_OPTIONS)


def _highlights(text, a, _p):
    singles = [h for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip()]
    doubles = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h[2:-2].strip()]
    return len(singles) + len(doubles) >= a["num_highlights"]


def _sections(text, a, _p):
    pattern = r"\s?" + re.escape(a["section_spliter"].strip()) + r"\s?\d+\s?"
    return len(re.split(pattern, text)) - 1 >= a["num_sections"]


def _json_format(text, _a, _p):
    body = text.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        if body.startswith(fence):
            body = body[len(fence) :]
            break
    body = body.removesuffix("```").strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _title(text, _a, _p):
    return any(t[2:-2].strip() for t in re.findall(r"<<[^\n]+>>", text))


# --- combination, start/end, case, punctuation ------------------------------------------------


def _two_responses(text, _a, _p):
    parts = _split_paragraphs(text.split("******"))
    return parts is not None and len(parts) == 2 and parts[0].strip() != parts[1].strip()


def _repeat_prompt(text, a, prompt):
    target = a.get("prompt_to_repeat") or prompt
    if not target:
        raise PrefloopError(
            "combination:repeat_prompt: no prompt to compare with; "
            "fix: give args.prompt_to_repeat or pass prompt= to check()"
        )
    return text.strip().lower().startswith(target.strip().lower())


def _end_checker(text, a, _p):
    return text.strip().strip('"').lower().endswith(a["end_phrase"].strip().lower())


def _capital_words(text, a, _p):
    capitals = [w for w in re.findall(r"\w+", text) if w.isupper()]
    return _compare(len(capitals), a["capital_relation"], a["capital_frequency"])


def _all_capital(text, _a, _p):
    return text.isupper()


def _all_lowercase(text, _a, _p):
    return text.islower()


def _no_comma(text, _a, _p):
    return "," not in text


def _quotation(text, _a, _p):
    body = text.strip()
    return len(body) > 1 and body[0] == '"' and body[-1] == '"'


# --- descriptions -----------------------------------------------------------------------------


def _d_words(a):
    if a["relation"] == LESS_THAN:
        return f"Answer in fewer than {a['num_words']} words."
    return f"Answer in at least {a['num_words']} words."


def _d_sentences(a):
    if a["relation"] == LESS_THAN:
        return f"Use fewer than {a['num_sentences']} sentences."
    return f"Write at least {a['num_sentences']} sentences."


def _d_paragraphs(a):
    return (
        f"Write exactly {_plural(a['num_paragraphs'], 'paragraph')}, separated from each other"
        " by the markdown divider made of three asterisks on a line of its own."
    )


def _d_nth_paragraph(a):
    return (
        f"Write exactly {_plural(a['num_paragraphs'], 'paragraph')} separated by blank lines,"
        f" and begin the {_ordinal(a['nth_paragraph'])} paragraph with the word"
        f' "{a["first_word"]}".'
    )


def _d_bullets(a):
    n = a["num_bullets"]
    points = "bullet point" if n == 1 else "bullet points"
    return (
        f"Format your answer as exactly {n} markdown {points}, each on its own line"
        " and starting with an asterisk."
    )


KINDS: dict[str, Kind] = {}


def _register(kind_id: str, args: tuple[Arg, ...], check, describe) -> None:
    KINDS[kind_id] = Kind(kind_id, args, check, describe)


_register(
    "keywords:existence",
    (Arg("keywords", "words"),),
    _existence,
    lambda a: (
        f"Include the {'word' if len(a['keywords']) == 1 else 'words'} "
        f"{_quoted_list(a['keywords'], 'and')} in your answer."
    ),
)
_register(
    "keywords:frequency",
    (Arg("keyword", "str"), Arg("frequency", "int", minimum=1), Arg("relation", "relation")),
    _frequency,
    lambda a: (
        f'Use the word "{a["keyword"]}" {_relation_words(a["relation"])} '
        f"{_plural(a['frequency'], 'time')}."
    ),
)
_register(
    "keywords:forbidden_words",
    (Arg("forbidden_words", "words"),),
    _forbidden,
    lambda a: (
        f"Do not use the {'word' if len(a['forbidden_words']) == 1 else 'words'} "
        f"{_quoted_list(a['forbidden_words'], 'or')}."
    ),
)
_register(
    "keywords:letter_frequency",
    (
        Arg("letter", "letter"),
        Arg("let_frequency", "int", minimum=1),
        Arg("let_relation", "relation"),
    ),
    _letter_frequency,
    lambda a: (
        f'Use the letter "{a["letter"]}" {_relation_words(a["let_relation"])} '
        f"{_plural(a['let_frequency'], 'time')}."
    ),
)
_register(
    "length_constraints:number_words",
    (Arg("num_words", "int", minimum=1), Arg("relation", "relation")),
    _number_words,
    _d_words,
)
_register(
    "length_constraints:number_sentences",
    (Arg("num_sentences", "int", minimum=1), Arg("relation", "relation")),
    _number_sentences,
    _d_sentences,
)
_register(
    "length_constraints:number_paragraphs",
    (Arg("num_paragraphs", "int", minimum=1),),
    _number_paragraphs,
    _d_paragraphs,
)
_register(
    "length_constraints:nth_paragraph_first_word",
    (
        Arg("num_paragraphs", "int", minimum=1),
        Arg("nth_paragraph", "int", minimum=1),
        Arg("first_word", "str"),
    ),
    _nth_paragraph_first_word,
    _d_nth_paragraph,
)
_register(
    "detectable_content:number_placeholders",
    (Arg("num_placeholders", "int", minimum=1),),
    _placeholders,
    lambda a: (
        f"Include at least {_plural(a['num_placeholders'], 'placeholder')} written inside"
        " square brackets."
    ),
)
_register(
    "detectable_content:postscript",
    (Arg("postscript_marker", "str"),),
    _postscript,
    lambda a: (
        f'At the end, add a postscript on its own line starting with "{a["postscript_marker"]}".'
    ),
)
_register(
    "detectable_format:number_bullet_lists",
    (Arg("num_bullets", "int", minimum=0),),
    _bullets,
    _d_bullets,
)
_register(
    "detectable_format:constrained_response",
    (),
    _constrained_response,
    lambda a: (
        'Give your verdict as the sentence "My answer is" followed by yes, no or maybe'
        " and a period."
    ),
)
_register(
    "detectable_format:number_highlighted_sections",
    (Arg("num_highlights", "int", minimum=1),),
    _highlights,
    lambda a: (
        f"Highlight at least {_plural(a['num_highlights'], 'part')} of your answer in"
        " markdown italics, with one asterisk on each side."
    ),
)
_register(
    "detectable_format:multiple_sections",
    (Arg("section_spliter", "str"), Arg("num_sections", "int", minimum=1)),
    _sections,
    lambda a: (
        f"Split your answer into {_plural(a['num_sections'], 'section')} and begin each one"
        f' with "{a["section_spliter"]} X", where X is the number of the section.'
    ),
)
_register(
    "detectable_format:json_format",
    (),
    _json_format,
    lambda a: "Format your entire answer as valid JSON.",
)
_register(
    "detectable_format:title",
    (),
    _title,
    lambda a: (
        "Start with a title wrapped in double angle brackets, two < signs before it and"
        " two > signs after it."
    ),
)
_register(
    "combination:two_responses",
    (),
    _two_responses,
    lambda a: "Give two different answers, separated by a line of six asterisks.",
)
_register(
    "combination:repeat_prompt",
    (Arg("prompt_to_repeat", "str", required=False),),
    _repeat_prompt,
    lambda a: "First repeat the request word for word, then give your answer.",
)
_register(
    "startend:end_checker",
    (Arg("end_phrase", "str"),),
    _end_checker,
    lambda a: (
        f'Finish your answer with the exact phrase "{a["end_phrase"]}" and write nothing after it.'
    ),
)
_register(
    "change_case:capital_word_frequency",
    (Arg("capital_frequency", "int", minimum=1), Arg("capital_relation", "relation")),
    _capital_words,
    lambda a: (
        f"Use {_relation_words(a['capital_relation'])} "
        f"{_plural(a['capital_frequency'], 'word')} written entirely in capital letters."
    ),
)
_register(
    "change_case:english_capital",
    (),
    _all_capital,
    lambda a: "Write your whole answer in capital letters only.",
)
_register(
    "change_case:english_lowercase",
    (),
    _all_lowercase,
    lambda a: "Write your whole answer in lowercase letters only, with no capital letters.",
)
_register(
    "punctuation:no_comma",
    (),
    _no_comma,
    # Quoting the character itself shows a small model what is meant, and means a response that
    # merely copies the instruction never passes.
    lambda a: 'Do not use any commas (the "," character) in your answer.',
)
_register(
    "startend:quotation",
    (),
    _quotation,
    lambda a: "Wrap your entire answer in double quotation marks.",
)
