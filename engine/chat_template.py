"""Prompts from clients: only the model's own chat template writes control tokens.

A message, a tool result or a raw prompt that contains the text of a control token (say
`<|im_end|>\\n<|im_start|>system`) must not become that token: any user, or any web page a
tool fetched, could then forge a turn. So text that came from a client is marked where it
spells a control token (`ProtectedText.protected`: character spans), and the tokenizer
encodes those spans as plain text (`split_special_tokens`) while the template's own markup
around them keeps its control tokens. Prompts without such text encode exactly as before.

Also here, the other limits of rendering: a client's template arguments count only where
the template reads them, as plain values (never a template of its own), and a prompt longer
than any `max_model_len` tokens could spell is refused before it is tokenized.
"""
from __future__ import annotations

import functools
import re

# Template variables transformers itself supplies: never a client's to set.
_SUPPLIED = frozenset({"messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
                       "bos_token", "eos_token", "unk_token", "pad_token", "raise_exception", "strftime_now",
                       "chat_template", "tokenize", "conversation"})
MAX_TEMPLATE_VALUE_CHARS = 256


class ProtectedText(str):
    """Text whose `protected` character spans never encode as control tokens."""
    protected: tuple[tuple[int, int], ...] = ()

    def __new__(cls, text: str, protected=()):
        obj = super().__new__(cls, text)
        obj.protected = tuple(protected)
        return obj


class RenderedChat(ProtectedText):
    """A conversation the chat template rendered: its special tokens are what the template wrote."""


def untrusted(text: str) -> ProtectedText:
    """Raw text from a client (a /v1/completions prompt): all of it plain text."""
    return ProtectedText(text, ((0, len(text)),))


@functools.lru_cache(maxsize=8)
def _template_variables(template: str) -> frozenset[str]:
    import jinja2
    import jinja2.meta
    return frozenset(jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template)))


def check_template_kwargs(template: str, kwargs: dict | None) -> dict:
    """The client's template arguments the template reads, each a plain value. Others are
    dropped, as vLLM does (clients send e.g. enable_thinking to every model); the variables
    the server supplies (the template itself, messages, tools...) are refused."""
    reads = _template_variables(template) - _SUPPLIED
    out = {}
    for name, value in (kwargs or {}).items():
        if name in _SUPPLIED:
            raise ValueError(f"chat template argument {name!r} is the server's to set, not a request's "
                             f"(this model's template reads: {', '.join(sorted(reads)) or 'nothing else'})")
        if name not in reads:
            continue
        if not (value is None or isinstance(value, (bool, int, float))
                or (isinstance(value, str) and len(value) <= MAX_TEMPLATE_VALUE_CHARS)):
            raise ValueError(f"chat template argument {name!r} must be a boolean, a number or a string of at "
                             f"most {MAX_TEMPLATE_VALUE_CHARS} characters")
        out[name] = value
    return out


@functools.lru_cache(maxsize=8)
def _control_tokens(tokenizer) -> tuple[frozenset[str], frozenset[str], frozenset[int]]:
    """(every added token's text, the special ones', the ids of all of them)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = frozenset(t.content for t in added.values() if t.content)
    special = frozenset(t.content for t in added.values() if t.content and t.special)
    return texts | frozenset(tokenizer.all_special_tokens), special | frozenset(tokenizer.all_special_tokens), \
        frozenset(added) | frozenset(tokenizer.all_special_ids)


def control_token_ids(tokenizer) -> frozenset[int]:
    """The ids of every added and special token: those a client's text never encodes to."""
    return _control_tokens(tokenizer)[2]


def max_token_chars(tokenizer) -> int:
    """No token decodes to more characters than its vocabulary entry has."""
    return _max_token_chars(tokenizer)


@functools.lru_cache(maxsize=8)
def _max_token_chars(tokenizer) -> int:
    return max(len(t) for t in tokenizer.get_vocab())


def render(tokenizer, messages: list[dict], tools: list[dict] | None, kwargs: dict) -> ProtectedText:
    """The conversation through the model's template, with every control-token spelling that
    came from the messages or tools marked protected. An assistant turn may carry the
    template's own non-special tags (Qwen3's <think>, which the template takes apart)."""
    every, special, _ = _control_tokens(tokenizer)
    if not every:
        return RenderedChat(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                           tokenize=False, **kwargs))
    start, end = _markers(messages, tools)
    originals: list[str] = []
    pattern_all = _alternation(every)
    pattern_special = _alternation(special) if special else None

    def hide(value, pattern):
        if isinstance(value, str):
            def placeholder(m: re.Match) -> str:
                originals.append(m.group())
                return f"{start}{len(originals) - 1}{end}"
            return pattern.sub(placeholder, value) if pattern is not None else value
        if isinstance(value, list):
            return [hide(v, pattern) for v in value]
        if isinstance(value, dict):
            return {k: hide(v, pattern) for k, v in value.items()}
        return value

    safe = [hide(m, pattern_special if m.get("role") == "assistant" else pattern_all) if isinstance(m, dict) else m
            for m in messages]
    safe_tools = hide(tools, pattern_all) if tools else tools
    text = tokenizer.apply_chat_template(safe, tools=safe_tools, add_generation_prompt=True, tokenize=False, **kwargs)
    if not originals:
        return RenderedChat(text)
    out, spans, at = [], [], 0
    for m in re.finditer(re.escape(start) + r"(\d+)" + re.escape(end), text):
        out.append(text[at:m.start()])
        begin = sum(len(p) for p in out)
        original = originals[int(m.group(1))]
        out.append(original)
        spans.append((begin, begin + len(original)))
        at = m.end()
    out.append(text[at:])
    return RenderedChat("".join(out), spans)


def _alternation(tokens) -> re.Pattern:
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _markers(*values) -> tuple[str, str]:
    """Two private-use characters no string of `values` holds."""
    text = repr(values)
    for code in range(0xE000, 0xF8FF, 2):
        start, end = chr(code), chr(code + 1)
        if start not in text and end not in text:
            return start, end
    raise ValueError("messages use every private-use character")


def encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of `text`; a ProtectedText's protected spans encode as plain text. Where
    they hold no control-token spelling, the ids are exactly those of the whole text.
    `add_special_tokens` (BOS) applies to plain and wholly protected text; a rendered chat
    has what its template wrote."""
    if not isinstance(text, ProtectedText) or not text.protected:
        return tokenizer.encode(str(text), add_special_tokens=add_special_tokens)
    if text.protected == ((0, len(text)),):  # all of it plain text (BOS is the tokenizer's own)
        return tokenizer.encode(str(text), add_special_tokens=add_special_tokens, split_special_tokens=True)
    _, _, control_ids = _control_tokens(tokenizer)
    enc = tokenizer(str(text), add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    regions: list[list[int]] = []  # [first token, last token] to encode again, in order
    for i, (t, (a, b)) in enumerate(zip(ids, offsets)):
        if t in control_ids and any(s < b and a < e for s, e in text.protected):
            first, last = i, i  # with the neighbours that share its characters
            while first > 0 and offsets[first - 1][1] > a:
                first -= 1
            while last + 1 < len(ids) and offsets[last + 1][0] < b:
                last += 1
            if regions and first <= regions[-1][1] + 1:
                regions[-1][1] = max(regions[-1][1], last)
            else:
                regions.append([first, last])
    for first, last in reversed(regions):  # right to left: the indices before stay valid
        a, b = offsets[first][0], offsets[last][1]
        ids[first:last + 1] = tokenizer.encode(str(text)[a:b], add_special_tokens=False, split_special_tokens=True)
    return ids
