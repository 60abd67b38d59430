"""Render prompts with the model's own chat template, token-exact and without doubled specials.

The template decides where BOS goes, so the rendered text is tokenized with
`add_special_tokens=False`; a plain `tokenizer(text)` would prepend a second BOS on Llama/Mistral
tokenizers. A control-token string typed inside a message (a literal "<s>") is encoded as text,
never as the special token (Mistral's reference encoder does the same, though transformers may
split the pieces around it differently; see tests/test_chat.py).
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
    # The two differ only where a message itself contains a control-token string: the sanitized
    # ids keep it as text, re-tokenizing the text would turn it into the special token.
    if ids != text_ids and not _has_control_text(tokenizer, messages):
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
) -> list[int]:
    # transformers 5 returns a BatchEncoding by default; older versions returned a bare list.
    out = tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        add_generation_prompt=add_generation_prompt,
        sanitize_control_tokens=True,
        return_dict=True,
    )
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(i) for i in ids]


def _has_control_text(tokenizer, messages: list[dict[str, str]]) -> bool:
    tokens = [str(t.content) for t in tokenizer.added_tokens_decoder.values()]
    return any(tok in str(m.get("content", "")) for m in messages for tok in tokens)


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
