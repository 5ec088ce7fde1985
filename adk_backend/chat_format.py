"""Chat prompts with tools, and tool calls parsed back out of generated text.

Both providers (native ADK and LiteLLM) reduce their requests to neutral chat messages
({'role': 'system'|'user'|'assistant'|'tool', 'content': str}) plus JSON-schema tool
declarations, and parse the model's reply with the same code. Where the model's chat
template has no tool support (SmolLM2's has none) tools use the Hermes format:
declarations in the system prompt, calls as <tool_call>{"name": ..., "arguments": ...}</tool_call>,
results as <tool_response>...</tool_response> in a 'tool' message.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions about "
    "what values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags as follows:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-dict>}}\n</tool_call>"
)


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class ParsedReply:
    text: str                        # the reply with its tool-call blocks removed
    tool_calls: list[ToolCall]


def tool_call_text(name: str, arguments: dict) -> str:
    return f"{TOOL_CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments})}\n{TOOL_CALL_CLOSE}"


def tool_response_text(name: str, response) -> str:
    return f"<tool_response>\n{json.dumps({'name': name, 'content': response}, default=str)}\n</tool_response>"


def messages_with_tools(messages: list[dict], tools: list[dict] | None,
                        template_renders_tools: bool) -> tuple[list[dict], list[dict] | None]:
    """The messages and tools to hand the chat template: the tools as they are where the
    template renders them, else declared in a Hermes system block."""
    messages = [dict(m) for m in messages]
    if not tools or template_renders_tools:
        return messages, tools or None
    block = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t) for t in tools))
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = messages[0]["content"] + "\n\n" + block
    else:
        messages.insert(0, {"role": "system", "content": block})
    return messages, None


def render_prompt(engine, messages: list[dict], tools: list[dict] | None) -> str:
    """The prompt text on an offline LLMEngine (AsyncLLM callers go through chat_stream)."""
    messages, tools = messages_with_tools(messages, tools, engine.chat_template_renders_tools)
    return engine.apply_chat_template(messages, tools)


def parse_reply(text: str, callable_tools: set[str]) -> ParsedReply:
    """Splits generated text into plain text and calls to `callable_tools`. A block that is
    not a whole call to one of them (cut short by max_tokens or a stop string, or naming
    another tool) stays in the text: a model's output is never an error."""
    if not callable_tools or TOOL_CALL_OPEN not in text:
        return ParsedReply(text=text, tool_calls=[])
    calls: list[ToolCall] = []
    kept: list[str] = []
    last = 0
    for m in _TOOL_CALL_RE.finditer(text):
        call = _parse_call(m.group(1).strip(), callable_tools) if m.group(0).endswith(TOOL_CALL_CLOSE) else None
        if call is None:
            continue
        kept.append(text[last:m.start()])
        last = m.end()
        calls.append(call)
    kept.append(text[last:])
    return ParsedReply(text="".join(kept).strip() if calls else text, tool_calls=calls)


def _parse_call(body: str, callable_tools: set[str]) -> ToolCall | None:
    try:
        obj = _first_call_object(body)
        name, args = obj["name"], obj.get("arguments", {})
        if isinstance(args, str):
            args = json.loads(args) if args.strip() else {}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(name, str) or not isinstance(args, dict) or name not in callable_tools:
        return None
    return ToolCall(name=name, arguments=args)


_NAME_ARGS_RE = re.compile(r'^\{\s*"name"\s*:\s*"([^"]+)"\s*,\s*"arguments"\s*:\s*')


def _first_call_object(body: str) -> dict:
    """The call in a block: the whole body as JSON, or else - as a grammar would stop the
    model there - the name and the first complete JSON value after "arguments"."""
    try:
        return json.loads(body)
    except ValueError:
        m = _NAME_ARGS_RE.match(body)
        if m is None:
            raise
        args, _ = json.JSONDecoder().raw_decode(body, m.end())
        return {"name": m.group(1), "arguments": args}


class TextStreamFilter:
    """Streams the plain text of a reply while it is generated, holding back anything that
    is (or may become) a <tool_call> block."""

    def __init__(self) -> None:
        self.buffer = ""
        self.emitted = 0
        self.in_call = False

    def feed(self, delta: str) -> str:
        self.buffer += delta
        if self.in_call:
            return ""
        start = self.buffer.find(TOOL_CALL_OPEN, self.emitted)
        if start != -1:
            self.in_call = True
            out, self.emitted = self.buffer[self.emitted:start], start
            return out
        # Keep back a tail that could still grow into "<tool_call>".
        safe = len(self.buffer)
        for k in range(min(len(TOOL_CALL_OPEN) - 1, len(self.buffer)), 0, -1):
            if TOOL_CALL_OPEN.startswith(self.buffer[-k:]):
                safe = len(self.buffer) - k
                break
        out, self.emitted = self.buffer[self.emitted:safe], max(self.emitted, safe)
        return out
