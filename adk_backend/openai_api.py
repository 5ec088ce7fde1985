"""OpenAI-compatible routes on the shared engine: /v1/chat/completions (streaming or not,
tools with tool_choice and parallel_tool_calls, response_format, vLLM's structured_outputs),
/v1/responses (the same path in the Responses API's shapes, openai_responses.py),
/v1/completions, /v1/models. What the routes share (errors, field checks, limits, SSE) is
in openai_http.py."""
from __future__ import annotations

import dataclasses
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from adk_backend.chat import ChatResult
from adk_backend.engines import engine_for
from adk_backend.openai_format import (chat_logprobs, completion_logprobs, finish_reason, openai_tool_calls,
                                       response_schema, token_usage, usage)
from adk_backend.openai_http import (CHAT_FIELDS, COMPLETION_FIELDS, APIError, first_item, guarded, prepend,
                                     sse_stream, while_connected)
from adk_backend.v1_context import V1Context, program, request_priority
from adk_backend.openai_responses import add_responses_route
from engine import StructuredOutputsParams
from engine.chat_template import untrusted
from engine.output_stream import merge


def make_router(served: list[str], max_tokens_limit: int, max_concurrent_per_client: int | None = None,
                max_waiting: int | None = None) -> APIRouter:
    """`max_waiting`: a generation request is refused (503, Retry-After) while that many wait
    in the engine's queue already."""
    router = APIRouter(prefix="/v1")
    ctx = V1Context(served, max_tokens_limit, max_concurrent_per_client, max_waiting)

    @router.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "adk-engine"}
                                           for n in sorted(ctx.names)]}

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        return await ctx.limited(request, _chat_completions)

    async def _chat_completions(request: Request):
        body, model, params = await ctx.parse(request, CHAT_FIELDS)
        events, top_n = ctx.start_chat(request, body, model, params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def logprobs(token_ids: list[int], entries) -> dict | None:
            return chat_logprobs(token_ids, entries, top_n) if top_n is not None else None

        if not body.get("stream"):
            result, tokens = None, [([], []) for _ in range(params.n)]
            async for item in while_connected(request, events):
                if isinstance(item, ChatResult):
                    result = item
                elif item.logprobs:
                    tokens[item.index][0].extend(item.token_ids)
                    tokens[item.index][1].extend(item.logprobs)
            choices = []
            for c in result.choices:
                message = {"role": "assistant", "content": c.reply.text or None}
                if c.reply.reasoning is not None:
                    message["reasoning_content"] = c.reply.reasoning  # vLLM's field
                if c.reply.tool_calls:
                    message["tool_calls"] = [{k: v for k, v in t.items() if k != "index"} for t in openai_tool_calls(c)]
                choices.append({"index": c.index, "message": message, "logprobs": logprobs(*tokens[c.index]),
                                "finish_reason": finish_reason(c)})
            return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                    "choices": choices, "usage": usage(result)}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        first = await first_item(events)  # errors before the first token still get a proper status

        def chunk(choices: list, **extra) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": choices, **extra}

        def delta(index: int, d: dict, finish=None, lp=None) -> dict:
            choice = {"index": index, "delta": d, "finish_reason": finish}
            return chunk([choice | ({"logprobs": lp} if lp is not None else {})])

        async def events_out():
            for i in range(params.n):
                yield delta(i, {"role": "assistant", "content": ""})
            async for item in prepend(first, events):
                if not isinstance(item, ChatResult):
                    if item.reasoning:
                        yield delta(item.index, {"reasoning_content": item.reasoning})
                    if item.text or item.logprobs or not item.reasoning:
                        yield delta(item.index, {"content": item.text},
                                    lp=logprobs(item.token_ids, item.logprobs) if item.logprobs else None)
                    continue
                for c in item.choices:
                    calls = openai_tool_calls(c)
                    if calls:
                        yield delta(c.index, {"tool_calls": calls})
                    yield delta(c.index, {}, finish_reason(c))
                if include_usage:
                    yield chunk([], usage=usage(item))

        return StreamingResponse(sse_stream(events_out()), media_type="text/event-stream")

    @router.post("/completions")
    async def completions(request: Request):
        return await ctx.limited(request, _completions)

    async def _completions(request: Request):
        body, model, params = await ctx.parse(request, COMPLETION_FIELDS)
        try:
            schema = response_schema(body.get("response_format"))
        except ValueError as exc:
            raise APIError(400, str(exc), param="response_format") from exc
        if schema is not None:
            params = dataclasses.replace(params, structured_outputs=StructuredOutputsParams(json=schema))
        top_n = body.get("logprobs")
        if top_n is not None:
            if isinstance(top_n, bool) or not isinstance(top_n, int):
                raise APIError(400, f"'logprobs' must be an integer, got {top_n!r}", param="logprobs")
            try:
                params = dataclasses.replace(params, logprobs=top_n)
            except ValueError as exc:
                raise APIError(400, str(exc), param="logprobs") from exc
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt = untrusted(prompt)  # a client's text: never control tokens
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt))):
            raise APIError(400, "'prompt' must be a string or a list of token ids", param="prompt")
        engine = engine_for(model)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        stream_outputs = guarded(engine.generate(prompt, params, priority=request_priority(body),
                                                  program=program(request, body)))
        first = await first_item(stream_outputs)
        offsets = [0] * params.n  # text already returned per choice (for logprobs' text_offset)

        def choice(c) -> dict:
            lp = None
            if top_n is not None:
                lp = completion_logprobs(c.token_ids, c.logprobs, top_n, offsets[c.index])
            offsets[c.index] += len(c.text)
            return {"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}

        if not body.get("stream"):
            whole = None  # every delta merged, choice by choice
            async for out in while_connected(request, prepend(first, stream_outputs)):
                whole = out if whole is None else merge(whole, out)
            return {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [choice(c) for c in whole.outputs],
                    "usage": token_usage(len(whole.prompt_token_ids), sum(len(c.token_ids) for c in whole.outputs))}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(choices: list, **extra) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": choices, **extra}

        async def events_out():
            n_out = 0
            async for out in prepend(first, stream_outputs):
                n_out += sum(len(c.token_ids) for c in out.outputs)
                yield chunk([choice(c) for c in out.outputs])
                if out.finished and include_usage:
                    yield chunk([], usage=token_usage(len(out.prompt_token_ids), n_out))

        return StreamingResponse(sse_stream(events_out()), media_type="text/event-stream")

    add_responses_route(router, ctx)
    return router


