"""Chat prompts with tools, and tool calls parsed back out of generated text.

Both providers (native ADK and LiteLLM) and the OpenAI API reduce their requests to
transformers' chat messages - {'role': 'system'|'user'|'assistant'|'tool', 'content': str},
an assistant's 'tool_calls' ([{'id', 'type': 'function', 'function': {'name', 'arguments':
dict}}]) and a tool result's 'name' and 'tool_call_id' - plus JSON-schema tool declarations,
and parse the model's reply with the same code. A chat template that renders tools (Qwen3's,
Llama 3.1's) gets them as they are and shows them in the family's own format. Elsewhere
(SmolLM2's, Gemma 3's templates) tools use the Hermes format: declarations in the system
prompt, calls as <tool_call>{"name": ..., "arguments": ...}</tool_call> in the assistant's
text, results as <tool_response>...</tool_response>.
"""
from __future__ import annotations

import json

from adk_backend.stream_tags import held_tail
from adk_backend.tool_formats import HERMES, ParsedReply, ToolCall, ToolCallFormat  # noqa: F401 (re-exported)

TOOL_CALL_OPEN = "<tool_call>"

HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions about "
    "what values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags as follows:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-dict>}}\n</tool_call>"
)


LLAMA3_JSON_SYSTEM = (
    "You have access to the following functions. To call one, respond with only a JSON object in the format "
    "{{\"name\": function name, \"parameters\": dictionary of argument name and its value}}. Do not use variables."
    "\n\n{tools}"
)
_DECLARATIONS = {"hermes": HERMES_SYSTEM, "llama3_json": LLAMA3_JSON_SYSTEM}


def tool_response_text(name: str, response) -> str:
    return f"<tool_response>\n{json.dumps({'name': name, 'content': response}, default=str)}\n</tool_response>"


def assistant_message(text: str, calls: list[ToolCall]) -> dict:
    """An assistant turn in transformers' chat format."""
    message = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in calls]
    return message


def tool_message(name: str, call_id: str | None, response) -> dict:
    """A tool's result in transformers' chat format (content is JSON text unless a string)."""
    content = response if isinstance(response, str) else json.dumps(response, default=str)
    return {"role": "tool", "name": name, "tool_call_id": call_id, "content": content}


def messages_with_tools(messages: list[dict], tools: list[dict] | None, native: bool,
                        tool_role: bool = True, fmt: ToolCallFormat = HERMES) -> tuple[list[dict], list[dict] | None]:
    """The messages and tools to hand the chat template. `native`: the template renders
    tools, calls and results itself. Otherwise calls become text in `fmt` in the assistant's
    turn, results <tool_response> blocks (in a 'tool' turn, or a 'user' one where the
    template knows no tool role), and the tools are declared in a system block saying how
    to call them in `fmt`."""
    messages = [dict(m) for m in messages]
    if native:
        return messages, tools or None
    flat: list[dict] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = fmt.separator.join(fmt.call_text(c["function"]["name"], c["function"]["arguments"])
                                       for c in m["tool_calls"])
            m = {"role": "assistant", "content": "\n".join([m["content"], calls] if m.get("content") else [calls])}
        elif m["role"] == "tool":
            m = {"role": "tool" if tool_role else "user",
                 "content": tool_response_text(m.get("name") or "tool", _json_or_text(m.get("content")))}
        if flat and m["role"] == flat[-1]["role"] and m["role"] in ("tool", "user"):
            flat[-1] = {"role": m["role"], "content": flat[-1]["content"] + "\n" + m["content"]}
        else:
            flat.append(m)
    if tools:
        block = _DECLARATIONS[fmt.name].format(tools="\n".join(json.dumps(t) for t in tools))
        if flat and flat[0]["role"] == "system":
            flat[0]["content"] = flat[0]["content"] + "\n\n" + block
        else:
            flat.insert(0, {"role": "system", "content": block})
    return flat, None


def _json_or_text(content):
    try:
        return json.loads(content) if isinstance(content, str) else content
    except ValueError:
        return content


def parse_reply(text: str, callable_tools: set[str], fmt: ToolCallFormat = HERMES) -> ParsedReply:
    """Splits generated text into plain text and calls to `callable_tools` (see
    ToolCallFormat.parse)."""
    return fmt.parse(text, callable_tools)


class TextStreamFilter:
    """Streams the plain text of a reply while it is generated, holding back anything that
    is (or may become) a tool call (from the format's trigger on)."""

    def __init__(self, trigger: str = TOOL_CALL_OPEN) -> None:
        self.trigger = trigger
        self.buffer = ""
        self.emitted = 0
        self.in_call = False

    def feed(self, delta: str) -> str:
        self.buffer += delta
        if self.in_call:
            return ""
        start = self.buffer.find(self.trigger, self.emitted)
        if start != -1:
            self.in_call = True
            out, self.emitted = self.buffer[self.emitted:start], start
            return out
        safe = len(self.buffer) - held_tail(self.buffer, self.trigger)
        out, self.emitted = self.buffer[self.emitted:safe], max(self.emitted, safe)
        return out
