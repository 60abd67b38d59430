"""The verifiable-constraint library: checkers, strict vs loose, parsing errors, guards."""

import pytest

from prefloop.constraints import (
    KINDS,
    CheckResult,
    Constraint,
    check,
    check_all,
    describe,
    guards,
    instruction_text,
    loose_variants,
    parse_constraints,
    parse_ifeval,
    required_phrases,
    score,
)
from prefloop.constraints.kinds import count_sentences, split_sentences
from prefloop.errors import PrefloopError

LT, AL = "less than", "at least"
S, L = (True, True), (False, True)  # strict pass (loose follows); only loose passes
F = (False, False)

CASES = [
    # keywords
    ("keywords:existence", {"keywords": ["ocean", "salt"]}, "Salt comes from the OCEAN.", S),
    ("keywords:existence", {"keywords": ["ocean", "salt"]}, "Salt comes from mines.", F),
    ("keywords:existence", {"keywords": ["café"]}, "Ünïcödé at the CAFÉ", S),
    ("keywords:frequency", {"keyword": "tea", "frequency": 2, "relation": AL}, "Tea, more tea.", S),
    ("keywords:frequency", {"keyword": "tea", "frequency": 2, "relation": AL}, "Tea only.", F),
    ("keywords:frequency", {"keyword": "tea", "frequency": 2, "relation": LT}, "Tea only.", S),
    ("keywords:frequency", {"keyword": "tea", "frequency": 2, "relation": LT}, "tea tea", F),
    ("keywords:forbidden_words", {"forbidden_words": ["very"]}, "It is every bit good.", S),
    ("keywords:forbidden_words", {"forbidden_words": ["very"]}, "It is Very good.", F),
    (
        "keywords:letter_frequency",
        {"letter": "z", "let_frequency": 3, "let_relation": AL},
        "Zany jazz",
        S,
    ),
    (
        "keywords:letter_frequency",
        {"letter": "z", "let_frequency": 3, "let_relation": AL},
        "Zany jaz",
        F,
    ),
    (
        "keywords:letter_frequency",
        {"letter": "q", "let_frequency": 1, "let_relation": LT},
        "No such letter",
        S,
    ),
    # length
    ("length_constraints:number_words", {"num_words": 4, "relation": LT}, "One two three.", S),
    ("length_constraints:number_words", {"num_words": 4, "relation": LT}, "One two three four", F),
    ("length_constraints:number_words", {"num_words": 4, "relation": AL}, "One two three four", S),
    ("length_constraints:number_words", {"num_words": 3, "relation": AL}, "日本 語 テキスト", S),
    ("length_constraints:number_words", {"num_words": 2, "relation": AL}, "**bold** - - -", F),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 3, "relation": LT},
        "Dr. Smith paid 3.5 dollars. He left!",
        S,
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 3, "relation": AL},
        "One. Two? Three!",
        S,
    ),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": AL}, "One. Two.", F),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First part\n***\nSecond", S),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A\n***\n***\nB", F),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "***\nA\n***\nB\n***", S),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A\n\nB", F),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
        'Intro here.\n\n"However, not quite.',
        S,
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
        "Intro here.\n\nBut not quite.",
        F,
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "however"},
        "Intro here.\n\nHowever, two paragraphs only.",
        F,
    ),
    # detectable content / format
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name] at [city]", S),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name]", F),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n\np. s. bring tea", S),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi, add a P.S. later.", F),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n**P.S.** tea", L),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.P.S again", S),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* a\n* b\n- c", S),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "1. a\n2. b\n3. c", F),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "**Bold** start\n* a\n  * b", S),
    (
        "detectable_format:number_bullet_lists",
        {"num_bullets": 3},
        "Here you go:\n* a\n* b\n* c\n* d",
        L,
    ),
    (
        "detectable_format:number_bullet_lists",
        {"num_bullets": 3},
        "* a\n* b\n* c\n* d\n* e\n* f",
        F,
    ),
    ("detectable_format:constrained_response", {}, "Sure. My answer is no.", S),
    ("detectable_format:constrained_response", {}, "My answer is no", F),
    (
        "detectable_format:number_highlighted_sections",
        {"num_highlights": 2},
        "*one* and **two**",
        S,
    ),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and ** **", F),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "SECTION", "num_sections": 2},
        "SECTION 1\nfoo\nSECTION 2\nbar",
        S,
    ),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "SECTION", "num_sections": 2},
        "Section 1\nfoo\nSection 2\nbar",
        F,
    ),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', S),
    ("detectable_format:json_format", {}, "{'a': 1}", F),
    ("detectable_format:json_format", {}, 'Here it is:\n{"a": 1}', L),
    ("detectable_format:title", {}, "<<Rice Basics>>\nBoil water.", S),
    ("detectable_format:title", {}, "<<   >>\nBoil water.", F),
    ("detectable_format:title", {}, "<<Rice\nBasics>>", F),
    # combination, start/end, case, punctuation
    ("combination:two_responses", {}, "Yes.\n******\nNo.", S),
    ("combination:two_responses", {}, "Yes.\n******\nYes.", F),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Name a fruit."}, "name a fruit. Apple", S),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Name a fruit."}, "Apple", F),
    ("startend:end_checker", {"end_phrase": "Any questions?"}, '"Done. Any questions?"  \n', S),
    ("startend:end_checker", {"end_phrase": "Any questions?"}, "Any questions? Bye.", F),
    ("startend:end_checker", {"end_phrase": "Any questions?"}, "Done. Any questions?\nCheers!", L),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": AL},
        "USE ALL caps",
        S,
    ),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": LT},
        "USE ALL caps",
        F,
    ),
    ("change_case:english_capital", {}, "ÜBER ALLES, 42!", S),
    ("change_case:english_capital", {}, "ALL BUT one", F),
    ("change_case:english_lowercase", {}, "ünïcödé text 日本", S),
    ("change_case:english_lowercase", {}, "Sure!\nall lowercase here", L),
    ("change_case:english_lowercase", {}, "日本語", F),
    ("punctuation:no_comma", {}, "No commas here; none.", S),
    ("punctuation:no_comma", {}, "One, two", F),
    ("punctuation:no_comma", {}, "Fullwidth comma ， is not ASCII", S),
    ("startend:quotation", {}, '  "Quoted answer."  \n', S),
    ("startend:quotation", {}, '"Quoted answer." Then more', F),
    ("startend:quotation", {}, '"', F),
    ("startend:quotation", {}, 'Sure, here:\n"Quoted answer."', L),
]


@pytest.mark.parametrize(("kind", "args", "response", "expected"), CASES)
def test_checker(kind, args, response, expected):
    assert check(response, Constraint(kind, args)) == CheckResult(*expected)


def test_every_supported_kind_has_pass_and_fail_cases():
    passing = {k for k, _, _, e in CASES if e[0]}
    failing = {k for k, _, _, e in CASES if not e[0]}
    assert passing == failing == set(KINDS)
    assert len(KINDS) == 24


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_empty_response_satisfies_nothing(kind):
    args = {
        "keywords:frequency": {"keyword": "x", "frequency": 1, "relation": LT},
        "keywords:letter_frequency": {"letter": "z", "let_frequency": 1, "let_relation": LT},
        "length_constraints:number_words": {"num_words": 5, "relation": LT},
        "length_constraints:number_sentences": {"num_sentences": 5, "relation": LT},
        "keywords:forbidden_words": {"forbidden_words": ["x"]},
        "change_case:capital_word_frequency": {"capital_frequency": 1, "capital_relation": LT},
    }
    example = args.get(kind) or next(a for k, a, _, _ in CASES if k == kind)
    for empty in ("", "   \n\t"):
        assert check(empty, Constraint(kind, example)) == CheckResult(False, False)


def test_loose_variants_are_ifevals_eight():
    assert loose_variants("Sure:\n*a*\nBye") == [
        "Sure:\n*a*\nBye", "*a*\nBye", "Sure:\n*a*", "*a*",
        "Sure:\na\nBye", "a\nBye", "Sure:\na", "a",
    ]  # fmt: skip


def test_sentence_splitter():
    text = "Mr. Lee met Dr. Ray at 5 p.m. today. It was fun! Was it? e.g. this stays one."
    assert split_sentences(text) == [
        "Mr. Lee met Dr. Ray at 5 p.m. today.",
        "It was fun!",
        "Was it? e.g. this stays one.",
    ]
    assert count_sentences("* no period\n* second line") == 1
    assert count_sentences("") == 0


def test_check_all_and_score():
    cs = [
        Constraint("punctuation:no_comma"),
        Constraint("length_constraints:number_words", {"num_words": 3, "relation": LT}),
        Constraint("detectable_format:title"),
    ]
    assert check_all("Fine, thanks", cs) == [CheckResult(False, False), CheckResult(True, True),
                                             CheckResult(False, False)]  # fmt: skip
    s = score("Fine, thanks", cs)
    assert (s.strict, s.loose, s.all_strict, s.all_loose) == (1 / 3, 1 / 3, False, False)
    s = score("<<T>>\nok", cs)
    assert (s.strict, s.all_strict) == (1.0, True)
    with pytest.raises(PrefloopError, match="no constraints given"):
        score("x", [])


def test_repeat_prompt_uses_prompt_argument_when_args_omit_it():
    c = Constraint("combination:repeat_prompt")
    assert check("Name a fruit. Apple", c, prompt="Name a fruit.").strict is True
    with pytest.raises(PrefloopError, match="no prompt to compare with"):
        check("Apple", c)


def test_constraint_is_frozen_hashable_and_copies_args():
    args = {"num_words": 40, "relation": LT}
    c = Constraint("length_constraints:number_words", args)
    args["num_words"] = 5
    assert c.args["num_words"] == 40
    assert (
        len({c, Constraint("length_constraints:number_words", {"relation": LT, "num_words": 40})})
        == 1
    )
    with pytest.raises(AttributeError):
        c.kind = "x"
    assert c.to_json() == {
        "kind": "length_constraints:number_words",
        "args": {"num_words": 40, "relation": LT},
    }


@pytest.mark.parametrize(
    ("kind", "args", "sentence"),
    [
        (
            "length_constraints:number_words",
            {"num_words": 40, "relation": LT},
            "Answer in fewer than 40 words.",
        ),
        (
            "length_constraints:number_words",
            {"num_words": 70, "relation": AL},
            "Answer in at least 70 words.",
        ),
        (
            "keywords:existence",
            {"keywords": ["a", "b", "c"]},
            'Include the words "a", "b" and "c" in your answer.',
        ),
        ("keywords:forbidden_words", {"forbidden_words": ["very"]}, 'Do not use the word "very".'),
        (
            "detectable_format:number_bullet_lists",
            {"num_bullets": 1},
            "Format your answer as exactly 1 markdown bullet point, each on its own line and starting"
            " with an asterisk.",
        ),
        (
            "length_constraints:nth_paragraph_first_word",
            {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "next"},
            "Write exactly 3 paragraphs separated by blank lines, and begin the second paragraph with"
            ' the word "next".',
        ),
        (
            "keywords:frequency",
            {"keyword": "tea", "frequency": 1, "relation": LT},
            'Use the word "tea" fewer than 1 time.',
        ),
    ],
)
def test_describe(kind, args, sentence):
    assert describe(Constraint(kind, args)) == sentence


def test_instruction_text_and_required_phrases():
    cs = (Constraint("startend:end_checker", {"end_phrase": "Bye now."}),
          Constraint("keywords:existence", {"keywords": ["tea"]}))  # fmt: skip
    assert instruction_text(" Name a drink. ", cs) == (
        'Name a drink. Finish your answer with the exact phrase "Bye now." and write nothing after'
        ' it. Include the word "tea" in your answer.'
    )
    assert required_phrases(cs) == ("Bye now.", "tea")


def test_no_description_carries_a_satisfying_example():
    # The 135M model learned to paste an instruction's example list; none of ours contains one.
    for kind_id, kind in KINDS.items():
        args = next(a for k, a, _, _ in CASES if k == kind_id)
        text = kind.describe(args)
        assert "<<" not in text and "\n" not in text and "***" not in text and "[" not in text


# --- parsing ----------------------------------------------------------------------------------


def _error(value, where="data.jsonl:7") -> str:
    with pytest.raises(PrefloopError) as info:
        parse_constraints(value, where)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_parse_valid_list():
    got = parse_constraints(
        [{"kind": "punctuation:no_comma"},
         {"kind": "length_constraints:number_words", "args": {"num_words": 40, "relation": LT}}],
        "x",
    )  # fmt: skip
    assert got == (
        Constraint("punctuation:no_comma", {}),
        Constraint("length_constraints:number_words", {"num_words": 40, "relation": LT}),
    )


def test_parse_ifeval_row_ignores_null_kwargs():
    row = {
        "key": 1000,
        "instruction_id_list": ["punctuation:no_comma", "detectable_format:number_bullet_lists"],
        "kwargs": [{"num_bullets": None, "relation": None}, {"num_bullets": 4, "relation": None}],
    }
    assert parse_ifeval(row["instruction_id_list"], row["kwargs"], "ifeval:1000") == (
        Constraint("punctuation:no_comma"),
        Constraint("detectable_format:number_bullet_lists", {"num_bullets": 4}),
    )


def test_parse_ifeval_errors():
    with pytest.raises(PrefloopError) as info:
        parse_ifeval(["punctuation:no_comma"], [{}, {}], "row 3")
    assert str(info.value) == (
        "row 3: kwargs: must be a list with one object per instruction id (1), got [{}, {}]; "
        "fix: give one kwargs object per entry of instruction_id_list, {} when it has none"
    )
    with pytest.raises(PrefloopError) as info:
        parse_ifeval(["language:response_language"], [{"language": "de"}], "row 4")
    assert str(info.value) == (
        "row 4: instruction_id_list[0]: constraint kind 'language:response_language' is not"
        " supported: it needs a language detector, which prefloop does not ship; fix: remove this"
        " constraint"
    )
    with pytest.raises(PrefloopError, match=r"row 5: kwargs\[0\].num_words: missing"):
        parse_ifeval(["length_constraints:number_words"], [{"relation": LT}], "row 5")


def test_unknown_kind_names_closest():
    assert _error([{"kind": "length_constraints:number_word", "args": {}}]) == (
        "data.jsonl:7: constraints[0].kind: unknown constraint kind"
        " 'length_constraints:number_word'; fix: did you mean 'length_constraints:number_words'?"
        " (docs/constraints.md lists all kinds)"
    )
    assert "did you mean 'punctuation:no_comma'?" in _error([{"kind": "no_comma"}])


def test_wrong_arg_type():
    value = [
        {"kind": "punctuation:no_comma", "args": {}},
        {"kind": "length_constraints:number_words", "args": {"num_words": "40", "relation": LT}},
    ]
    assert _error(value) == (
        'data.jsonl:7: constraints[1].args.num_words: must be a whole number, got "40"; '
        "fix: write it as a whole number, e.g. 40"
    )


def test_bad_relation_and_bool_int():
    bad = [{"kind": "length_constraints:number_words",
            "args": {"num_words": 4, "relation": "fewer than"}}]  # fmt: skip
    assert _error(bad) == (
        'data.jsonl:7: constraints[0].args.relation: must be either "less than" or "at least",'
        ' got "fewer than"; fix: use "less than" or "at least"'
    )
    bad = [{"kind": "detectable_format:number_bullet_lists", "args": {"num_bullets": True}}]
    assert "must be a whole number, got true" in _error(bad)


def test_missing_arg():
    assert _error([{"kind": "startend:end_checker", "args": {}}]) == (
        "data.jsonl:7: constraints[0].args.end_phrase: missing; startend:end_checker needs it; "
        'fix: add "end_phrase": "some text"'
    )


def test_unknown_arg_names_closest():
    bad = [{"kind": "detectable_format:number_bullet_lists", "args": {"num_bullet": 3}}]
    assert _error(bad) == (
        "data.jsonl:7: constraints[0].args.num_bullet: unknown argument for"
        " detectable_format:number_bullet_lists; fix: use 'num_bullets'"
    )


def test_not_a_list():
    assert _error({"kind": "punctuation:no_comma"}, where="cfg.yaml:constraints") == (
        'cfg.yaml:constraints: constraints: must be a non-empty JSON list of {"kind", "args"}'
        ' objects, got {"kind": "punctuation:no_comma"}; fix: write e.g. [{"kind":'
        ' "punctuation:no_comma", "args": {}}]'
    )
    assert "got an empty list" in _error([])
    assert "constraints[0]: must be an object" in _error(["punctuation:no_comma"])
    assert "constraints[0].arg: unknown key" in _error(
        [{"kind": "punctuation:no_comma", "arg": {}}]
    )


def test_cross_argument_check():
    bad = [{"kind": "length_constraints:nth_paragraph_first_word",
            "args": {"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "so"}}]  # fmt: skip
    assert "constraints[0].args.nth_paragraph: is 3 but num_paragraphs is 2" in _error(bad)


def test_check_validates_constraints_built_in_code():
    with pytest.raises(PrefloopError, match="constraint: args.num_words: missing"):
        check("x", Constraint("length_constraints:number_words", {"relation": LT}))


# --- guards -----------------------------------------------------------------------------------


def test_word_count_and_is_empty():
    assert guards.word_count("Hello, wide world! 42 times; Ünïcödé") == 6
    assert guards.word_count("") == 0
    assert guards.is_empty(" \n** - ... **") is True
    assert guards.is_empty("ok") is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I\u2019m sorry, that is not possible.", True),
        ("As an AI, I do not eat food.", True),
        ("Rice needs water. I cannot stress enough how simple it is.", True),
        ("Rice needs water and salt. " * 8 + "I cannot say more.", False),
        ("Boil the rice for 12 minutes.", False),
    ],
)
def test_is_refusal(text, expected):
    assert guards.is_refusal(text) is expected


def test_copies_example_catches_pasted_example_list():
    instruction = (
        "List three tips for sleep. Use markdown bullets such as:\n* first point\n"
        "* second point\n* third point"
    )
    assert guards.copies_example("* first point\n* second point\n* third point", instruction)
    assert guards.copied_share("* first point * second point * third point", instruction) == 1.0
    honest = "* Keep a fixed bedtime\n* Avoid screens late\n* Keep the room cool"
    assert not guards.copies_example(honest, instruction)
    assert guards.example_spans(instruction) == ["first point", "second point", "third point"]


def test_copies_example_long_run_and_allowed_phrases():
    instruction = 'Explain how to cook rice. Finish with the exact phrase "Is there anything else I can help with?"'
    answer = "Rinse the rice, simmer it for 15 minutes and rest it. Is there anything else I can help with?"
    assert guards.shared_run(answer, instruction) == 8
    assert guards.copies_example(answer, instruction) is True
    assert (
        guards.copies_example(
            answer, instruction, allowed=["Is there anything else I can help with?"]
        )
        is False
    )
    assert guards.copies_example(instruction, instruction) is True


def test_relevance():
    task = "Explain how to cook fluffy rice on the stove."
    assert guards.content_words(task) == {"cook", "fluffy", "rice", "stove"}
    assert guards.relevance(task, "Cooking rice: rinse it and simmer.") == 0.5
    assert guards.relevance(task, "Stocks went up today.") == 0.0
    assert guards.relevance("Why?", "Because.") == 1.0
    assert guards.stem("berries") == "berry" and guards.stem("boxes") == "box"
    assert guards.stem("class") == "class" and guards.stem("recipes") == "recipe"
