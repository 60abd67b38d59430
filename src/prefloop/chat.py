"""Render prompts with the model's own chat template, token-exact and without doubled specials.

The template decides where BOS goes, so the rendered text is tokenized with
`add_special_tokens=False`; a plain `tokenizer(text)` would prepend a second BOS on Llama/Mistral
tokenizers. A control-token string typed inside a message (a literal "<s>", a pasted "[INST]" or "</s>") is
encoded as text, never as the special token, and segmented as the text around it would be: the
rendered prompt is split only at the control tokens the template itself inserted, and each piece
between them is tokenized as plain text (`_plain_segments`), which is what Mistral's reference
encoder does (transformers alone would cut the text at the control string and emit a lone "▁"
before it; see tests/test_chat.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from prefloop.errors import PrefloopError


class ChatTemplateError(PrefloopError, ValueError):
    """A prompt cannot be rendered safely: no template, or special tokens doubled."""


@dataclass(frozen=True)
class RenderedPrompt:
    text: str  # the rendered chat prompt string
    ids: list[int]  # token ids fed to the model


def render_prompt(tokenizer, instruction: str, system: str | None = None) -> RenderedPrompt:
    """One user turn (plus an optional system turn) ready for generation.

    `system=None` sends no system message, so the template's own default applies.
    """
    if not isinstance(instruction, str) or not instruction.strip():
        raise ChatTemplateError("instruction is empty; give a non-empty string")
    messages = [{"role": "user", "content": instruction}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return render_messages(tokenizer, messages)


def render_messages(
    tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True
) -> RenderedPrompt:
    """Render `messages` with the tokenizer's chat template; text and ids agree token for token."""
    _require_template(tokenizer)
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    ids = _template_ids(tokenizer, messages, add_generation_prompt)
    text_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    control = _has_control_text(tokenizer, messages)
    if control:  # segment the control-token strings of the messages as the text around them
        ids = _plain_segments(tokenizer, text, messages, add_generation_prompt) or ids
    if ids is None:
        raise ChatTemplateError(
            f"{_name(tokenizer)}: a message contains the unknown-token string "
            f"{tokenizer.unk_token!r}, which this tokenizer cannot keep as text; remove it")
    # The two differ only where a message itself contains a control-token string: the sanitized
    # ids keep it as text, re-tokenizing the text would turn it into the special token.
    if ids != text_ids and not control:
        raise ChatTemplateError(
            f"{_name(tokenizer)}: the chat template's token ids differ from the tokenized "
            "prompt text; report this with the model name and transformers version"
        )
    check_no_double_special(tokenizer, ids)
    return RenderedPrompt(text=text, ids=ids)


def check_no_double_special(tokenizer, ids: list[int]) -> None:
    """Raise if BOS opens the prompt twice or any special token is repeated back to back."""
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos]:
        raise ChatTemplateError(
            f"{_name(tokenizer)}: the prompt starts with BOS twice ({tokenizer.bos_token!r}); "
            "tokenize the rendered template with add_special_tokens=False"
        )
    # [UNK] legitimately repeats (two unknown characters in a row); only added markers count
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    for i in range(len(ids) - 1):
        if ids[i] == ids[i + 1] and ids[i] in special:
            token = tokenizer.convert_ids_to_tokens(ids[i])
            raise ChatTemplateError(
                f"{_name(tokenizer)}: special token {token!r} appears twice in a row at position "
                f"{i}; the template and the tokenizer both add it"
            )


def _require_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"{_name(tokenizer)} has no chat template; use an instruct/chat model or set "
            "tokenizer.chat_template to the template the model was trained with"
        )


def _template_ids(
    tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool
) -> list[int] | None:
    """The template's ids with the messages' control-token strings kept as text; None when
    transformers refuses because the text gives the unknown token, as a word-level tokenizer
    encodes "<unk>" (then `_plain_segments` encodes it as the plain text it is)."""
    # transformers 5 returns a BatchEncoding by default; older versions returned a bare list.
    try:
        out = tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            add_generation_prompt=add_generation_prompt,
            sanitize_control_tokens=True,
            return_dict=True,
        )
    except ValueError as e:  # "Can't sanitize '<unk>': the tokenizer produces it from plain text"
        unk = tokenizer.unk_token
        if unk is None or not str(e).startswith(f"Can't sanitize {unk!r}"):
            raise
        return None
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(i) for i in ids]


def _has_control_text(tokenizer, messages: list[dict[str, str]]) -> bool:
    tokens = [str(t.content) for t in tokenizer.added_tokens_decoder.values()]
    return any(tok in str(m.get("content", "")) for m in messages for tok in tokens)


def _content_spans(tokenizer, text: str, messages: list[dict[str, str]],
                   add_generation_prompt: bool) -> list[tuple[int, int]] | None:
    """Where each message's content lies in the rendered text: the template is rendered again
    with a marker for each content, and the markers located. None if the template changed a
    content (then the sanitized ids are kept)."""
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
    marked = tokenizer.apply_chat_template(
        [{**m, "content": k} for m, k in zip(messages, marks, strict=True)], tokenize=False,
        add_generation_prompt=add_generation_prompt)
    spans, out, pos = [], [], 0
    for m, k in zip(messages, marks, strict=True):
        at = marked.find(k, pos)
        if at < 0:
            return None
        out.append(marked[pos:at])
        start = sum(len(x) for x in out)
        out.append(str(m.get("content", "")))
        spans.append((start, start + len(out[-1])))
        pos = at + len(k)
    out.append(marked[pos:])
    return spans if "".join(out) == text else None


def _plain_tokenizer(tokenizer, first: bool):
    """A copy of the fast tokenizer's pipeline without added tokens (so a control-token string
    is only text); `first=False` also stops a Metaspace pre-tokenizer from prepending "▁", as it
    does not for a section that follows an added token. Cached on the tokenizer."""
    import json

    from tokenizers import Tokenizer

    cache = tokenizer.__dict__.setdefault("_prefloop_plain", {})
    if first not in cache:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        spec["added_tokens"], spec["post_processor"] = [], None

        def walk(node):
            if isinstance(node, dict):
                if node.get("type") == "Metaspace" and not first:
                    node["prepend_scheme"] = "never"
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(spec.get("pre_tokenizer"))
        cache[first] = Tokenizer.from_str(json.dumps(spec))
    return cache[first]


def _plain_segments(tokenizer, text: str, messages: list[dict[str, str]],
                    add_generation_prompt: bool) -> list[int] | None:
    """Token ids of `text` where only the added tokens the template inserted (outside every
    message's content) are control tokens; each stretch between them is tokenized as plain text.
    None when that cannot be done (no fast tokenizer, a content the template rewrote)."""
    spans = _content_spans(tokenizer, text, messages, add_generation_prompt)
    if spans is None or not hasattr(tokenizer, "backend_tokenizer"):
        return None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    added = {int(i) for i in tokenizer.added_tokens_decoder}
    cuts = [(int(t), a, b) for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"],
                                                strict=True)
            if int(t) in added and not any(lo <= a < hi for lo, hi in spans)]
    ids: list[int] = []
    pos = 0
    for token, a, b in [*cuts, (None, len(text), len(text))]:
        if a > pos:
            piece = _plain_tokenizer(tokenizer, first=pos == 0).encode(
                text[pos:a], add_special_tokens=False)
            ids += piece.ids
        if token is not None:
            ids.append(token)
        pos = b
    return ids


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
