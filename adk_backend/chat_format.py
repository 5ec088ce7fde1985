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
    text: str                        # the reply with tool-call blocks removed
    tool_calls: list[ToolCall]
    error: str | None = None         # a malformed tool call, described


def tool_call_text(name: str, arguments: dict) -> str:
    return f"{TOOL_CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments})}\n{TOOL_CALL_CLOSE}"


def tool_response_text(name: str, response) -> str:
    return f"<tool_response>\n{json.dumps({'name': name, 'content': response}, default=str)}\n</tool_response>"


def render_prompt(engine, messages: list[dict], tools: list[dict] | None,
                  force_tool: str | list[str] | None = None) -> str:
    """The prompt text for `messages`; `force_tool` (a name, or a list of names to choose
    from) opens the assistant turn with a tool call, as a tool_config of mode ANY asks."""
    messages = [dict(m) for m in messages]
    if tools:
        block = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t) for t in tools))
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = messages[0]["content"] + "\n\n" + block
        else:
            messages.insert(0, {"role": "system", "content": block})
    prompt = engine.apply_chat_template(messages)
    if force_tool:
        prompt += forced_prefix(force_tool)
    return prompt


def forced_prefix(force_tool: str | list[str]) -> str:
    if isinstance(force_tool, str) or len(force_tool) == 1:
        name = force_tool if isinstance(force_tool, str) else force_tool[0]
        return f'{TOOL_CALL_OPEN}\n{{"name": "{name}", "arguments": '
    return f'{TOOL_CALL_OPEN}\n{{"name": "'


def parse_reply(text: str, known_tools: set[str] | None = None) -> ParsedReply:
    """Splits generated text into plain text and tool calls; a block that is not valid
    JSON of the form {"name": str, "arguments": object} is reported, not dropped."""
    calls: list[ToolCall] = []
    errors: list[str] = []
    for m in _TOOL_CALL_RE.finditer(text):
        body = m.group(1).strip()
        try:
            obj = _first_call_object(body)
            name, args = obj["name"], obj.get("arguments", {})
            if isinstance(args, str):
                args = json.loads(args) if args.strip() else {}
            if not isinstance(name, str) or not isinstance(args, dict):
                raise TypeError("name must be a string and arguments an object")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            errors.append(f"malformed tool call {body[:200]!r}: {exc}")
            continue
        if known_tools is not None and name not in known_tools:
            errors.append(f"call to unknown tool {name!r}; declared tools: {sorted(known_tools)}")
            continue
        calls.append(ToolCall(name=name, arguments=args))
    plain = _TOOL_CALL_RE.sub("", text).strip() if calls or errors else text
    return ParsedReply(text=plain, tool_calls=calls, error="; ".join(errors) or None)


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


@dataclass
class ChatResult:
    """The whole reply of one chat request, as both providers report it."""
    reply: ParsedReply
    request_id: str
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    finish_reason: str  # the engine's: "stop" | "length" | "abort"


async def chat_stream(engine, messages: list[dict], tools: list[dict] | None, force_tool, params):
    """Runs one chat request on an AsyncLLM. Yields the reply's plain text as it is
    generated (str pieces, tool-call blocks held back), then one ChatResult. Raises the
    engine's ValueError / EngineDeadError / RequestFailedError."""
    prompt = render_prompt(engine.engine, messages, tools, force_tool)
    prefix = forced_prefix(force_tool) if force_tool else ""
    stream_filter = TextStreamFilter()
    stream_filter.feed(prefix)
    text, last, num_output = "", None, 0
    async for out in engine.generate(prompt, params):
        delta = out.outputs[0].text
        text += delta
        num_output += len(out.outputs[0].token_ids)
        last = out
        piece = stream_filter.feed(delta) if delta else ""
        if piece:
            yield piece
    names = {t["function"]["name"] for t in tools} if tools else None
    yield ChatResult(reply=parse_reply(prefix + text, names), request_id=last.request_id,
                     num_prompt_tokens=len(last.prompt_token_ids), num_output_tokens=num_output,
                     num_cached_tokens=last.metrics.num_cached_tokens,
                     finish_reason=last.outputs[0].finish_reason or "stop")
