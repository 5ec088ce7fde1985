"""The engine as a LiteLLM provider: `litellm.completion(model="engine/<model>", ...)` and
ADK's `LlmAgent(model=LiteLlm(model="engine/<model>"))` run in the same shared engine.

OpenAI-shaped requests (messages with tool_calls and tool results, `tools`, `tool_choice`)
are reduced to the same neutral chat messages as the native ADK model uses.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import AsyncIterator, Iterator

import litellm
from litellm import CustomLLM
from litellm.llms.custom_llm import CustomLLMError
from litellm.types.utils import ChatCompletionMessageToolCall, Function, GenericStreamingChunk, ModelResponse, Usage

from adk_backend.chat_format import ChatResult, chat_stream, tool_call_text, tool_response_text
from adk_backend.engines import engine_for, model_name
from engine import SamplingParams
from engine.async_llm import EngineDeadError, RequestFailedError

PROVIDER = "engine"
_FINISH = {"stop": "stop", "length": "length", "abort": "stop"}


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
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
            parts = [_text(m.get("content"))] if m.get("content") else []
            for tc in m.get("tool_calls") or []:
                fn = tc["function"]
                args = fn.get("arguments") or "{}"
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except ValueError as exc:
                    raise ValueError(f"tool call {fn.get('name')!r} has arguments that are not JSON: {exc}") from exc
                call_names[tc.get("id")] = fn["name"]
                parts.append(tool_call_text(fn["name"], args))
            out.append({"role": "assistant", "content": "\n".join(parts)})
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if call_names and call_id not in call_names:
                raise ValueError(f"tool message answers tool_call_id {call_id!r}, which no assistant message made")
            out.append({"role": "tool", "content": tool_response_text(call_names.get(call_id, m.get("name", "tool")),
                                                                      _text(m.get("content")))})
        else:
            out.append({"role": "system" if role == "developer" else role, "content": _text(m.get("content"))})
    return out


def openai_tools(optional_params: dict) -> tuple[list[dict] | None, list[str] | None]:
    tools = optional_params.get("tools") or None
    if tools is not None:
        if not isinstance(tools, list):
            raise ValueError("tools must be a list")
        for t in tools:
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise ValueError(f"each tool must be {{'type': 'function', 'function': {{'name': ...}}}}, got {t!r}"[:300])
            if "parameters" in fn and not isinstance(fn["parameters"], dict):
                raise ValueError(f"tool {fn['name']!r} has parameters that are not a JSON schema object")
    choice = optional_params.get("tool_choice")
    names = [t["function"]["name"] for t in tools or []]
    force = None
    if tools and choice == "required":
        force = names
    elif tools and isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools {names}")
        force = [name]
    return tools, force


def openai_sampling(optional_params: dict) -> SamplingParams:
    p = optional_params
    stop = p.get("stop")
    return SamplingParams(
        temperature=p.get("temperature", 0.0) if p.get("temperature") is not None else 0.0,
        top_p=p.get("top_p") if p.get("top_p") is not None else 1.0,
        top_k=p.get("top_k") or -1,
        max_tokens=p.get("max_completion_tokens") or p.get("max_tokens") or 512,
        stop=[stop] if isinstance(stop, str) else (stop or []),
        seed=p.get("seed"),
        presence_penalty=p.get("presence_penalty") or 0.0,
        frequency_penalty=p.get("frequency_penalty") or 0.0,
    )


def _openai_tool_calls(result: ChatResult) -> list[dict]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
             "index": i} for i, c in enumerate(result.reply.tool_calls)]


def _finish_reason(result: ChatResult) -> str:
    return "tool_calls" if result.reply.tool_calls else _FINISH.get(result.finish_reason, "stop")


def _usage(result: ChatResult) -> dict:
    return {"prompt_tokens": result.num_prompt_tokens, "completion_tokens": result.num_output_tokens,
            "total_tokens": result.num_prompt_tokens + result.num_output_tokens}


class EngineLiteLLM(CustomLLM):
    async def _events(self, model: str, messages: list, optional_params: dict):
        try:
            tools, force = openai_tools(optional_params)
            msgs = openai_to_messages(messages)
            params = openai_sampling(optional_params)
            async for item in chat_stream(engine_for(model_name(model)), msgs, tools, force, params):
                yield item
        except ValueError as exc:
            raise CustomLLMError(status_code=400, message=str(exc)) from exc
        except EngineDeadError as exc:
            raise CustomLLMError(status_code=503, message=str(exc)) from exc
        except RequestFailedError as exc:
            raise CustomLLMError(status_code=500, message=str(exc)) from exc

    async def acompletion(self, model: str, messages: list, api_base=None, custom_prompt_dict=None,
                          model_response: ModelResponse | None = None, print_verbose=None, encoding=None,
                          api_key=None, logging_obj=None, optional_params: dict | None = None, **kwargs) -> ModelResponse:
        result = None
        async for item in self._events(model, messages, optional_params or {}):
            if isinstance(item, ChatResult):
                result = item
        response = model_response or ModelResponse()
        reply = result.reply
        if reply.error:
            raise CustomLLMError(status_code=500, message=f"the model produced a {reply.error}")
        message = response.choices[0].message
        message.content = reply.text or None
        if reply.tool_calls:
            message.tool_calls = [ChatCompletionMessageToolCall(id=c["id"], type="function",
                                                                function=Function(**c["function"]))
                                  for c in _openai_tool_calls(result)]
        response.choices[0].finish_reason = _finish_reason(result)
        response.model = model
        response.created = int(time.time())
        response.usage = Usage(**_usage(result))
        return response

    async def astreaming(self, model: str, messages: list, api_base=None, custom_prompt_dict=None,
                         model_response=None, print_verbose=None, encoding=None, api_key=None, logging_obj=None,
                         optional_params: dict | None = None, **kwargs) -> AsyncIterator[GenericStreamingChunk]:
        async for item in self._events(model, messages, optional_params or {}):
            if not isinstance(item, ChatResult):
                yield {"text": item, "tool_use": None, "is_finished": False, "finish_reason": "", "usage": None,
                       "index": 0}
                continue
            if item.reply.error:
                raise CustomLLMError(status_code=500, message=f"the model produced a {item.reply.error}")
            calls = _openai_tool_calls(item)
            for call in calls:
                yield {"text": "", "tool_use": call, "is_finished": False, "finish_reason": "", "usage": None,
                       "index": 0}
            yield {"text": "", "tool_use": None, "is_finished": True, "finish_reason": _finish_reason(item),
                   "usage": _usage(item), "index": 0}

    # Sync entry points run the async ones on a private event loop thread.
    def completion(self, *args, **kwargs) -> ModelResponse:
        return asyncio.run_coroutine_threadsafe(self.acompletion(*args, **kwargs), _sync_loop()).result()

    def streaming(self, *args, **kwargs) -> Iterator[GenericStreamingChunk]:
        agen = self.astreaming(*args, **kwargs)
        loop = _sync_loop()
        while True:
            try:
                yield asyncio.run_coroutine_threadsafe(agen.__anext__(), loop).result()
            except StopAsyncIteration:
                return


_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _sync_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="engine-litellm-sync", daemon=True).start()
        return _loop


_handler = EngineLiteLLM()


def register_litellm_provider() -> None:
    """Adds provider `engine` to LiteLLM (idempotent)."""
    if not any(p.get("provider") == PROVIDER for p in litellm.custom_provider_map):
        litellm.custom_provider_map.append({"provider": PROVIDER, "custom_handler": _handler})
    litellm.utils.custom_llm_setup()
