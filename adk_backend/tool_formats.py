"""How a model family writes tool calls, and how we read them back.

- `hermes` (Qwen2.5/Qwen3's native format, and our fallback for templates without tools,
  such as SmolLM2's and Gemma 3's): `<tool_call>\\n{"name": N, "arguments": A}\\n</tool_call>`,
  one block per call.
- `llama3_json` (Llama 3.1-3.3's JSON tool calling): the reply is `{"name": N, "parameters": A}`,
  several calls joined by "; ", optionally after `<|python_tag|>`.

The format is chosen from the chat template (what it renders for an assistant turn that
calls a tool) unless the user names one (`--tool-call-parser`, as in vLLM). The same
format object gives the grammar its call prefix and trigger, the stream filter the text
to hold back, and the parser the shape to read: they cannot disagree.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class ParsedReply:
    text: str                        # the reply with its tool calls removed
    tool_calls: list[ToolCall]
    reasoning: str | None = None     # a reasoning model's thinking, split off the answer


@dataclass(frozen=True)
class ToolCallFormat:
    name: str
    trigger: str       # what opens a call in free text
    args_key: str      # "arguments" | "parameters"
    begin: str         # before the call's JSON object
    end: str           # after it
    separator: str     # between calls
    marker: str = ""   # a token the model may write before its calls, dropped from the text

    def call_prefix(self, tool: str) -> str:
        """Everything of a call to `tool` before its arguments' JSON."""
        return f'{self.begin}{{"name": {json.dumps(tool)}, "{self.args_key}": '

    @property
    def call_suffix(self) -> str:
        return "}" + self.end

    def call_text(self, tool: str, arguments: dict) -> str:
        return self.call_prefix(tool) + json.dumps(arguments) + self.call_suffix

    def parse(self, text: str, callable_tools: set[str]) -> ParsedReply:
        """Splits generated text into plain text and calls to `callable_tools`. A call that is
        not whole (cut short by max_tokens or a stop string, or naming another tool) stays
        in the text: a model's output is never an error."""
        if not callable_tools or self.trigger not in text:
            return ParsedReply(text=text, tool_calls=[])
        calls: list[ToolCall] = []
        kept: list[str] = []
        last = pos = 0
        while (start := text.find(self.trigger, pos)) != -1:
            found = self._call_at(text, start, callable_tools)
            if found is None:
                pos = start + 1
                continue
            call, end = found
            kept.append(text[last:start])
            last = pos = end
            calls.append(call)
        if not calls:
            return ParsedReply(text=text, tool_calls=[])
        kept.append(text[last:])
        remainder = "".join(kept)
        return ParsedReply(text=remainder.replace(self.marker, "").strip(), tool_calls=calls)

    def _call_at(self, text: str, start: int, callable_tools: set[str]) -> tuple[ToolCall, int] | None:
        """The call beginning at `start` and where it ends, or None."""
        end_tag = self.end.strip()
        if end_tag:  # a closed block: its body must hold the call
            close = text.find(end_tag, start)
            if close == -1:
                return None
            body, end = text[start + len(self.begin.strip()):close].strip(), close + len(end_tag)
            obj = _call_object(body, self.args_key)
        else:  # a bare JSON object, then an optional separator
            try:
                obj, end = json.JSONDecoder().raw_decode(text, start)
            except ValueError:
                return None
            sep = self.separator.strip()
            rest = len(text[end:]) - len(text[end:].lstrip())
            if sep and text[end + rest:].startswith(sep):
                end += rest + len(sep)
        call = _tool_call(obj, callable_tools)
        return None if call is None else (call, end)


_NAME_ARGS_RE = re.compile(r'^\{\s*"name"\s*:\s*"([^"]+)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def _call_object(body: str, args_key: str) -> dict | None:
    """The call in a block: the whole body as JSON, or else - as a grammar would stop the
    model there - the name and the first complete JSON value after the arguments key."""
    try:
        return json.loads(body)
    except ValueError:
        m = _NAME_ARGS_RE.match(body)
        if m is None:
            return None
        try:
            args, _ = json.JSONDecoder().raw_decode(body, m.end())
        except ValueError:
            return None
        return {"name": m.group(1), args_key: args}


def _tool_call(obj, callable_tools: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(name, str) or not isinstance(args, dict) or name not in callable_tools:
        return None
    return ToolCall(name=name, arguments=args)


HERMES = ToolCallFormat("hermes", trigger="<tool_call>", args_key="arguments", begin="<tool_call>\n",
                        end="\n</tool_call>", separator="\n")
LLAMA3_JSON = ToolCallFormat("llama3_json", trigger='{"name":', args_key="parameters", begin="", end="",
                             separator="; ", marker="<|python_tag|>")
TOOL_CALL_FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON)}

PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool_7f3a", "description": "",
                                               "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}
PROBE_CONVERSATION = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_probe", "type": "function", "function": {"name": "probe_tool_7f3a", "arguments": {"x": 1}}}]},
    {"role": "tool", "name": "probe_tool_7f3a", "tool_call_id": "call_probe", "content": "7"},
]


def format_from_rendering(rendered: str | None) -> tuple[ToolCallFormat, bool]:
    """(the format, whether the template renders tools natively) from the template's
    rendering of PROBE_CONVERSATION with PROBE_TOOL (None: it could not render it)."""
    if rendered is None or "probe_tool_7f3a" not in rendered:
        return HERMES, False
    if "<tool_call>" in rendered:
        return HERMES, True
    if re.search(r'"name":\s*"probe_tool_7f3a",\s*"parameters"', rendered):
        return LLAMA3_JSON, True
    return HERMES, False  # calls rendered some other way: declare tools ourselves, in Hermes


def tool_call_format(name: str) -> ToolCallFormat:
    if name not in TOOL_CALL_FORMATS:
        raise ValueError(f"unknown tool call parser {name!r}; known: {sorted(TOOL_CALL_FORMATS)}")
    return TOOL_CALL_FORMATS[name]
