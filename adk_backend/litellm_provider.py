"""The engine as a LiteLLM provider: `litellm.completion(model="engine/<model>", ...)` and
ADK's `LlmAgent(model=LiteLlm(model="engine/<model>"))` run in the same shared engine.

OpenAI-shaped requests (messages with tool_calls and tool results, `tools`, `tool_choice`)
are reduced to the same neutral chat messages as the native ADK model uses.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import AsyncIterator, Iterator

import litellm
from litellm import CustomLLM
from litellm.llms.custom_llm import CustomLLMError
from litellm.types.utils import ChatCompletionMessageToolCall, Function, GenericStreamingChunk, ModelResponse, Usage

from adk_backend.agent_runs import program_of
from adk_backend.chat import ChatResult, chat_stream
from adk_backend.engines import engine_for, model_name
from adk_backend.openai_format import (finish_reason, openai_reply_spec, openai_sampling, openai_to_messages,
                                       openai_tool_calls, usage)
from adk_backend.errors import ENGINE_ERRORS, classify

PROVIDER = "engine"


class EngineLiteLLM(CustomLLM):
    async def _events(self, model: str, messages: list, optional_params: dict):
        # vLLM's extensions (structured_outputs, ignore_eos, ...) come through extra_body.
        extra = optional_params.get("extra_body") or {}
        optional_params = {k: v for k, v in optional_params.items() if k != "extra_body"} | extra
        try:
            spec = openai_reply_spec(optional_params)
            msgs = openai_to_messages(messages)
            engine = engine_for(model_name(model))
            params = openai_sampling(optional_params, engine.sampling_defaults)
            template_kwargs = optional_params.get("chat_template_kwargs")
            # the agent program: prompt_cache_key as on /v1, else as for the native ADK model
            program = optional_params.get("prompt_cache_key") or program_of(msgs)
            async for item in chat_stream(engine, msgs, spec, params, template_kwargs, program=program):
                yield item
        except ENGINE_ERRORS as exc:
            raise CustomLLMError(status_code=classify(exc)[0], message=str(exc)) from exc

    async def acompletion(self, model: str, messages: list, api_base=None, custom_prompt_dict=None,
                          model_response: ModelResponse | None = None, print_verbose=None, encoding=None,
                          api_key=None, logging_obj=None, optional_params: dict | None = None, **kwargs) -> ModelResponse:
        result = None
        async for item in self._events(model, messages, optional_params or {}):
            if isinstance(item, ChatResult):
                result = item
        response = model_response or ModelResponse()
        reply = result.reply
        message = response.choices[0].message
        message.content = reply.text or None
        if reply.reasoning is not None:
            message.reasoning_content = reply.reasoning
        if reply.tool_calls:
            message.tool_calls = [ChatCompletionMessageToolCall(id=c["id"], type="function",
                                                                function=Function(**c["function"]))
                                  for c in openai_tool_calls(result.choices[0])]
        response.choices[0].finish_reason = finish_reason(result.choices[0])
        response.model = model
        response.created = int(time.time())
        response.usage = Usage(**usage(result))
        return response

    async def astreaming(self, model: str, messages: list, api_base=None, custom_prompt_dict=None,
                         model_response=None, print_verbose=None, encoding=None, api_key=None, logging_obj=None,
                         optional_params: dict | None = None, **kwargs) -> AsyncIterator[GenericStreamingChunk]:
        async for item in self._events(model, messages, optional_params or {}):
            if not isinstance(item, ChatResult):
                if not item.text:
                    continue
                yield {"text": item.text, "tool_use": None, "is_finished": False, "finish_reason": "", "usage": None,
                       "index": 0}
                continue
            calls = openai_tool_calls(item.choices[0])
            for call in calls:
                yield {"text": "", "tool_use": call, "is_finished": False, "finish_reason": "", "usage": None,
                       "index": 0}
            yield {"text": "", "tool_use": None, "is_finished": True, "finish_reason": finish_reason(item.choices[0]),
                   "usage": usage(item), "index": 0}

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
