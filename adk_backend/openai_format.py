"""OpenAI chat shapes <-> the neutral chat messages of chat_format: shared by the LiteLLM
provider and the OpenAI-compatible HTTP API."""
from __future__ import annotations

import json

from adk_backend.chat import (CHAT_MAX_TOKENS, CHAT_TEMPERATURE, ChatChoice, ChatResult, finite_logprob,
                              top_candidates)
from adk_backend.chat_format import ToolCall, assistant_message, tool_message
from adk_backend.reply_grammar import ReplySpec
from engine import SamplingParams, StructuredOutputsParams
from engine import Logprob

_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}  # "abort" as vLLM reports it


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        for part in content:
            kind = part.get("type", "text") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise ValueError(f"message content: {kind!r} parts are not supported; the model is text-only")
        return "".join(p.get("text", "") for p in content)
    raise ValueError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


def openai_to_messages(messages: list) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out, call_names = [], {}
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise ValueError(f"each message needs a role of system, user, assistant or tool, got {m!r}"[:300])
        role = m["role"]
        if role == "assistant":
            calls = []
            for tc in m.get("tool_calls") or []:
                fn = tc["function"]
                args = fn.get("arguments") or "{}"
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except ValueError as exc:
                    raise ValueError(f"tool call {fn.get('name')!r} has arguments that are not JSON: {exc}") from exc
                if not isinstance(args, dict):
                    raise ValueError(f"tool call {fn.get('name')!r} has arguments that are not a JSON object")
                call_names[tc.get("id")] = fn["name"]
                calls.append(ToolCall(fn["name"], args, **({"id": tc["id"]} if tc.get("id") else {})))
            out.append(assistant_message(_text(m.get("content")) if m.get("content") else "", calls))
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if call_names and call_id not in call_names:
                raise ValueError(f"tool message answers tool_call_id {call_id!r}, which no assistant message made")
            out.append(tool_message(call_names.get(call_id, m.get("name", "tool")), call_id, _text(m.get("content"))))
        else:
            out.append({"role": "system" if role == "developer" else role, "content": _text(m.get("content"))})
    return out


def openai_tools(tools) -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ValueError("tools must be a list")
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"each tool must be {{'type': 'function', 'function': {{'name': ...}}}}, got {t!r}"[:300])
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise ValueError(f"tool {fn['name']!r} has parameters that are not a JSON schema object")
    return tools


def openai_reply_spec(p: dict) -> ReplySpec:
    """tools, tool_choice, parallel_tool_calls and response_format as one ReplySpec."""
    tools = openai_tools(p.get("tools"))
    choice = p.get("tool_choice")
    parallel = p.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ValueError(f"parallel_tool_calls must be a boolean, got {parallel!r}")
    mode, allowed = "auto", None
    if choice in (None, "auto"):
        pass
    elif choice in ("none", "required"):
        mode = choice
    elif isinstance(choice, dict) and choice.get("type", "function") == "function":
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str):
            raise ValueError(f"tool_choice must name a function: {{'type': 'function', 'function': {{'name': ...}}}}, "
                             f"got {choice!r}"[:300])
        mode, allowed, parallel = "required", [name], False  # a named function: one call to it
    else:
        raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}"[:300])
    return ReplySpec(tools=tools, mode=mode, allowed=allowed,
                     parallel=True if parallel is None else parallel,
                     response_schema=response_schema(p.get("response_format")))


def response_schema(response_format) -> dict | None:
    """OpenAI's response_format as the JSON schema the answer must match (None: free text)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        return schema  # enforced whether or not 'strict' is set
    raise ValueError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def openai_sampling(optional_params: dict, defaults: dict | None = None) -> SamplingParams:
    """SamplingParams from OpenAI-style fields; a field left unset takes the model's
    generation_config default (`defaults`, as vLLM), else the chat defaults (chat.py: greedy, 512 tokens)."""
    p = {**(defaults or {}), **{k: v for k, v in optional_params.items() if v is not None}}
    stop = p.get("stop")
    return SamplingParams(
        temperature=p.get("temperature", CHAT_TEMPERATURE),
        top_p=p.get("top_p", 1.0),
        top_k=p.get("top_k") or -1,
        max_tokens=next((p[k] for k in ("max_completion_tokens", "max_tokens") if p.get(k) is not None),
                        CHAT_MAX_TOKENS),
        stop=[stop] if isinstance(stop, str) else (stop or []),
        seed=p.get("seed"),
        presence_penalty=p.get("presence_penalty") or 0.0,
        frequency_penalty=p.get("frequency_penalty") or 0.0,
        # vLLM's extensions of the OpenAI API
        ignore_eos=bool(p.get("ignore_eos", False)),
        min_tokens=p.get("min_tokens") or 0,
        repetition_penalty=p.get("repetition_penalty") if p.get("repetition_penalty") is not None else 1.0,
        min_p=p.get("min_p") or 0.0,
        structured_outputs=StructuredOutputsParams.from_any(p["structured_outputs"])
        if p.get("structured_outputs") is not None else None,
    )


def openai_tool_calls(choice: ChatChoice) -> list[dict]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
             "index": i} for i, c in enumerate(choice.reply.tool_calls)]


def finish_reason(choice: ChatChoice) -> str:
    return "tool_calls" if choice.reply.tool_calls else _FINISH.get(choice.finish_reason, "stop")


def token_usage(num_prompt_tokens: int, num_output_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_output_tokens,
            "total_tokens": num_prompt_tokens + num_output_tokens}


def usage(result: ChatResult) -> dict:
    """OpenAI's usage, with the prompt tokens the prefix cache held and the thinking's tokens."""
    return token_usage(result.num_prompt_tokens, result.num_output_tokens) | {
        "prompt_tokens_details": {"cached_tokens": result.num_cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": result.num_reasoning_tokens}}


def chat_top_logprobs(body: dict) -> int | None:
    """SamplingParams.logprobs for a chat request: `top_logprobs` when `logprobs` is on."""
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted not in (None, True, False):
        raise ValueError(f"'logprobs' must be a boolean, got {wanted!r}")
    if top is not None and not wanted:
        raise ValueError("'top_logprobs' needs 'logprobs': true")
    return (top or 0) if wanted else None


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], top_n: int) -> dict:
    """OpenAI's chat `logprobs` object for the given tokens."""
    def token(lp: Logprob) -> dict:
        text = lp.decoded_token or ""
        return {"token": text, "logprob": finite_logprob(lp), "bytes": list(text.encode("utf-8"))}
    return {"content": [token(entry[t]) | {"top_logprobs": [token(lp) for _, lp in top_candidates(entry, top_n)]}
                        for t, entry in zip(token_ids, logprobs)], "refusal": None}


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], top_n: int,
                        text_offset: int = 0) -> dict:
    """The legacy completions `logprobs` object; offsets count from `text_offset`."""
    tokens, offsets = [], []
    for t, entry in zip(token_ids, logprobs):
        offsets.append(text_offset)
        tokens.append(entry[t].decoded_token or "")
        text_offset += len(tokens[-1])
    return {"tokens": tokens,
            "token_logprobs": [finite_logprob(entry[t]) for t, entry in zip(token_ids, logprobs)],
            "top_logprobs": [{lp.decoded_token or "": finite_logprob(lp) for _, lp in top_candidates(entry, top_n)}
                             for entry in logprobs],
            "text_offset": offsets}
