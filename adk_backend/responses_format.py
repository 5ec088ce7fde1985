"""OpenAI Responses request shapes -> a chat completions body (as openai_format.py does for
chat): input items (messages, function calls and their outputs, reasoning), instructions,
function tools, tool_choice, `text.format` and `reasoning.effort`. Fields this server
cannot honour are refused by name (`FieldError.param`)."""
from __future__ import annotations

# The fields /v1/responses honours besides the sampling fields it shares with chat.
RESPONSES_FIELDS = {"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text",
                    "reasoning", "max_output_tokens", "stream", "metadata", "prompt_cache_key",
                    # shared with chat; `stop` and the rest are vLLM's extensions, as ADK sends them
                    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "user", "service_tier", "priority"}
# Accepted only at a value that asks for nothing this server does not do.
NO_OP_VALUES = {"store": (None, False), "previous_response_id": (None,), "truncation": (None, "disabled"),
                "include": (None, []), "background": (None, False)}
_SHARED = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "user", "service_tier", "priority", "parallel_tool_calls", "stream",
           "prompt_cache_key")


class FieldError(ValueError):
    """A request field this server cannot honour; `param` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _text_of(content, param: str) -> str:
    """A message's content: a string, or input_text / output_text parts (text-only model)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise FieldError("message content must be a string or a list of content parts", param)
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text") or not isinstance(part.get("text"), str):
            raise FieldError(f"content parts of type {kind!r} are not supported: the model reads text only "
                             f"(input_text, output_text)", param)
        texts.append(part["text"])
    return "".join(texts)


def _messages(body: dict) -> list[dict]:
    """instructions and input items as chat completions messages."""
    out: list[dict] = []
    if body.get("instructions") is not None:
        if not isinstance(body["instructions"], str):
            raise FieldError("'instructions' must be a string", "instructions")
        out.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        return out + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise FieldError("'input' must be a string or a non-empty list of input items", "input")
    for i, item in enumerate(items):
        param = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise FieldError(f"a message's role must be user, assistant, system or developer, got {role!r}", param)
            out.append({"role": role, "content": _text_of(item.get("content"), param)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":  # one assistant turn: its text, then its calls
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": output if isinstance(output, str) else _text_of(output, param)})
        elif kind == "reasoning":
            continue  # earlier thinking: chat templates do not replay it
        else:
            raise FieldError(f"input items of type {kind!r} are not supported (message, function_call, "
                             f"function_call_output, reasoning)", param)
    return out


def _tools(tools) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise FieldError("'tools' must be a list", "tools")
    out = []
    for t in tools:
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else t
            raise FieldError(f"only function tools are supported, got {kind!r}"[:200], "tools")
        out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                                      if t.get(k) is not None}})
    return out


def _tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice  # none | auto | required, checked with chat's


def _response_format(text) -> dict | None:
    if text is None:
        return None
    if not isinstance(text, dict) or set(text) - {"format"}:
        raise FieldError("'text' must be an object like {\"format\": {\"type\": \"json_schema\", ...}}", "text")
    fmt = text.get("format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "schema"), "schema": fmt.get("schema")}}
    raise FieldError("text.format type must be 'text', 'json_object' or 'json_schema'", "text")


def as_chat_body(body: dict) -> dict:
    """The chat completions body that runs this Responses request."""
    chat = {k: body[k] for k in _SHARED if k in body}
    chat["model"] = body.get("model")
    chat["messages"] = _messages(body)
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    tools = _tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
        if body.get("tool_choice") is not None:
            chat["tool_choice"] = _tool_choice(body["tool_choice"])
    fmt = _response_format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict) or set(reasoning) - {"effort", "summary"}:
            raise FieldError("'reasoning' must be an object like {\"effort\": \"low\"}", "reasoning")
        if reasoning.get("effort") is not None:
            chat["reasoning_effort"] = reasoning["effort"]
    return chat
