"""OpenAI-compatible routes on the shared engine: /v1/chat/completions (streaming or not,
tools with tool_choice and parallel_tool_calls, response_format, vLLM's structured_outputs),
/v1/responses (the same path in the Responses API's shapes, openai_responses.py),
/v1/completions, /v1/models. Errors use OpenAI's error shape; a field a route does not
honour is a 400 that names it."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from adk_backend.chat import ChatResult, chat_stream, priority_of
from adk_backend.engines import engine_for, model_name
from adk_backend.openai_format import (chat_logprobs, chat_top_logprobs, completion_logprobs, finish_reason,
                                       openai_reply_spec, openai_sampling, openai_to_messages, openai_tool_calls,
                                       response_schema, token_usage, usage)
from engine import StructuredOutputsParams
from engine.chat_template import untrusted
from adk_backend.errors import ENGINE_ERRORS, classify
from adk_backend.openai_responses import NO_OP_VALUES as RESPONSES_NO_OP_VALUES
from adk_backend.openai_responses import RESPONSES_FIELDS, FieldError, ResponseWriter, as_chat_body
from engine.output_stream import merge


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(status_code=self.status, headers=headers, content={"error": {
            "message": self.message, "type": self.type, "param": self.param, "code": self.code}})


def error_response(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
    return APIError(status, message, type_, code=code).response()


def _reject_non_finite(value):
    raise ValueError(f"{value} is not a valid JSON number")


def _sse(event: dict) -> str:
    return "data: " + json.dumps(event) + "\n\n"


async def _sse_stream(events):
    """Server-sent events: each item framed, an API error after the headers went out as an
    error event (the status can no longer change), then [DONE]."""
    try:
        async for event in events:
            yield _sse(event)
    except APIError as exc:
        yield _sse({"error": {"message": exc.message, "type": exc.type}})
    yield "data: [DONE]\n\n"


async def _named_sse_stream(events):
    """Server-sent events named by their type, as the Responses API streams them (no [DONE])."""
    async for event in events:
        yield f"event: {event['type']}\n" + _sse(event)


async def _body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_non_finite)
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8: {exc}") from exc
    except ValueError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from exc
    except RecursionError:
        raise APIError(400, "request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


# The fields each route honours; any other is refused by name, never silently ignored.
_COMMON_FIELDS = {"model", "stream", "stream_options", "temperature", "top_p", "top_k", "min_p", "max_tokens",
                  "seed", "stop", "presence_penalty", "frequency_penalty", "n", "user", "ignore_eos", "min_tokens",
                  "repetition_penalty", "structured_outputs", "response_format", "priority", "service_tier",
                  "prompt_cache_key"}
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "tools", "tool_choice", "parallel_tool_calls",
                                "logprobs", "top_logprobs", "chat_template_kwargs", "reasoning_effort"}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "logprobs"}
# Fields accepted only at a value that asks for nothing.
_NO_OP_VALUES = {"logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}), "echo": (None, False),
                 "suffix": (None, ""), "best_of": (None, 1), "store": (None, False)}


def _check_fields(body: dict, known: set[str], no_op_values: dict = _NO_OP_VALUES) -> None:
    for key, value in body.items():
        if key in known:
            continue
        if key in no_op_values:
            if any(value == ok and type(value) is type(ok) for ok in no_op_values[key]):
                continue
            raise APIError(400, f"'{key}'={json.dumps(value)[:80]} is not supported by this server", param=key)
        raise APIError(400, f"unsupported field '{key}'", param=key)


def _check_params(body: dict) -> None:
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "max_tokens",
                "max_completion_tokens", "seed", "top_k", "n", "min_tokens", "repetition_penalty", "top_logprobs"):
        v = body.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise APIError(400, f"'{key}' must be a number, got {v!r}", param=key)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, "'stop' must be a string or a list of non-empty strings", param="stop")
    if not isinstance(body.get("stream", False), bool):
        raise APIError(400, "'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}
                                    and isinstance(options.get("include_usage", False), bool)):
        raise APIError(400, "'stream_options' must be an object like {\"include_usage\": true}", param="stream_options")


class ClientLimiter:
    """At most `limit` generation requests in flight per client address (None: no limit).
    A slot is held until the response is fully sent or the client goes away."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.in_flight: dict[str, int] = {}

    def acquire(self, request: Request) -> str:
        client = request.client.host if request.client else "unknown"
        if self.limit is not None:
            if self.in_flight.get(client, 0) >= self.limit:
                raise APIError(429, f"more than {self.limit} requests in flight from this client",
                               "rate_limit_error")
            self.in_flight[client] = self.in_flight.get(client, 0) + 1
        return client

    def release(self, client: str) -> None:
        if self.limit is not None:
            self.in_flight[client] -= 1
            if not self.in_flight[client]:
                del self.in_flight[client]


def make_router(served: list[str], max_tokens_limit: int, max_concurrent_per_client: int | None = None,
                max_waiting: int | None = None) -> APIRouter:
    """`max_waiting`: a generation request is refused (503, Retry-After) while that many wait
    in the engine's queue already."""
    router = APIRouter(prefix="/v1")
    names = {model_name(m) for m in served}
    limiter = ClientLimiter(max_concurrent_per_client)

    async def limited(request: Request, handler):
        """Runs a generation handler inside the client's slot; a streaming response keeps
        the slot until its body generator ends (sent, failed or client gone)."""
        if max_waiting is not None and any(engine_for(m).stats()["num_waiting"] >= max_waiting for m in names):
            raise APIError(503, f"the server is at capacity ({max_waiting} requests waiting); retry shortly",
                           "service_unavailable", retry_after=1)
        client = limiter.acquire(request)
        try:
            response = await handler(request)
        except ClientGone:  # nobody to answer: nginx's "client closed request"
            limiter.release(client)
            return Response(status_code=499)
        except BaseException:
            limiter.release(client)
            raise
        if isinstance(response, StreamingResponse):
            body = response.body_iterator

            async def releasing():
                try:
                    async for chunk in body:
                        yield chunk
                finally:
                    limiter.release(client)
            response.body_iterator = releasing()
        else:
            limiter.release(client)
        return response

    def resolve(body: dict) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "'model' is required", param="model")
        if model_name(model) not in names:  # never a file lookup: only the models configured at start-up
            raise APIError(404, f"the model '{model}' does not exist; served: {sorted(names)}",
                           param="model", code="model_not_found")
        return model_name(model)

    def sampling(body: dict, model: str):
        _check_params(body)
        if body.get("response_format") is not None and body.get("structured_outputs") is not None:
            raise APIError(400, "give response_format or structured_outputs, not both", param="structured_outputs")
        limit = next((body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), None)
        if limit is not None and limit > max_tokens_limit:
            raise APIError(400, f"max_tokens must be <= {max_tokens_limit}, got {limit}", param="max_tokens")
        try:
            params = openai_sampling(body, engine_for(model).sampling_defaults)
            return dataclasses.replace(params, n=1 if body.get("n") is None else body["n"])
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc

    @router.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "adk-engine"}
                                           for n in sorted(names)]}

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        return await limited(request, _chat_completions)

    async def parse(request: Request, fields: set[str]):
        body = await _body(request)
        _check_fields(body, fields)
        model = resolve(body)
        return body, model, sampling(body, model)

    def start_chat(request: Request, body: dict, model: str, params):
        """A chat completions body running: its ChatDeltas then ChatResult, and top_logprobs."""
        try:
            messages = openai_to_messages(body.get("messages"))
            spec = openai_reply_spec(body)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise APIError(400, f"invalid messages, tools or response_format: {exc}") from exc
        try:
            top_n = chat_top_logprobs(body)
            params = dataclasses.replace(params, logprobs=top_n)
        except ValueError as exc:
            raise APIError(400, str(exc), param="logprobs") from exc
        template_kwargs = body.get("chat_template_kwargs")
        if template_kwargs is not None and not isinstance(template_kwargs, dict):
            raise APIError(400, "'chat_template_kwargs' must be an object", param="chat_template_kwargs")
        template_kwargs = _with_reasoning_effort(template_kwargs, body.get("reasoning_effort"))
        engine = engine_for(model)  # a dead engine refuses in generate(): 503 through _guarded
        return _guarded(chat_stream(engine, messages, spec, params, template_kwargs, _priority(body),
                                    program(request, body))), top_n

    async def _chat_completions(request: Request):
        body, model, params = await parse(request, CHAT_FIELDS)
        events, top_n = start_chat(request, body, model, params)
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
        first = await _first(events)  # errors before the first token still get a proper status

        def chunk(choices: list, **extra) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": choices, **extra}

        def delta(index: int, d: dict, finish=None, lp=None) -> dict:
            choice = {"index": index, "delta": d, "finish_reason": finish}
            return chunk([choice | ({"logprobs": lp} if lp is not None else {})])

        async def events_out():
            for i in range(params.n):
                yield delta(i, {"role": "assistant", "content": ""})
            async for item in _prepend(first, events):
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

        return StreamingResponse(_sse_stream(events_out()), media_type="text/event-stream")

    @router.post("/responses")
    async def responses(request: Request):
        return await limited(request, _responses)

    async def _responses(request: Request):
        body = await _body(request)
        _check_fields(body, RESPONSES_FIELDS, RESPONSES_NO_OP_VALUES)
        try:
            chat = as_chat_body(body)
        except FieldError as exc:
            raise APIError(400, str(exc), param=exc.param) from exc
        model = resolve(chat)
        events, _ = start_chat(request, chat, model, sampling(chat, model))
        writer = ResponseWriter(body, model)
        if not body.get("stream"):
            result = None
            async for item in while_connected(request, events):
                result = item if isinstance(item, ChatResult) else result
            return writer.response(result)
        first = await _first(events)  # errors before the first token still get a proper status

        async def events_out():
            try:
                async for event in writer.events(_prepend(first, events)):
                    yield event
            except APIError as exc:
                yield writer.failed(exc.message, exc.type)
        return StreamingResponse(_named_sse_stream(events_out()), media_type="text/event-stream")

    @router.post("/completions")
    async def completions(request: Request):
        return await limited(request, _completions)

    async def _completions(request: Request):
        body, model, params = await parse(request, COMPLETION_FIELDS)
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

        stream_outputs = _guarded(engine.generate(prompt, params, priority=_priority(body),
                                                  program=program(request, body)))
        first = await _first(stream_outputs)
        offsets = [0] * params.n  # text already returned per choice (for logprobs' text_offset)

        def choice(c) -> dict:
            lp = None
            if top_n is not None:
                lp = completion_logprobs(c.token_ids, c.logprobs, top_n, offsets[c.index])
            offsets[c.index] += len(c.text)
            return {"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}

        if not body.get("stream"):
            whole = None  # every delta merged, choice by choice
            async for out in while_connected(request, _prepend(first, stream_outputs)):
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
            async for out in _prepend(first, stream_outputs):
                n_out += sum(len(c.token_ids) for c in out.outputs)
                yield chunk([choice(c) for c in out.outputs])
                if out.finished and include_usage:
                    yield chunk([], usage=token_usage(len(out.prompt_token_ids), n_out))

        return StreamingResponse(_sse_stream(events_out()), media_type="text/event-stream")

    return router


_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


def _with_reasoning_effort(template_kwargs: dict | None, effort) -> dict | None:
    """OpenAI's reasoning_effort as the template's thinking switch (Qwen3's enable_thinking;
    dropped where the template reads none): "none"/"minimal" off, any other level on."""
    if effort is None:
        return template_kwargs
    if effort not in _EFFORTS:
        raise APIError(400, f"reasoning_effort must be one of {', '.join(_EFFORTS)}, got {effort!r}",
                       param="reasoning_effort")
    return {"enable_thinking": effort not in ("none", "minimal")} | (template_kwargs or {})


def _priority(body: dict) -> int:
    """vLLM's `priority` or OpenAI's `service_tier` (flex, priority...) as the engine's."""
    try:
        if body.get("priority") is not None and body.get("service_tier") not in (None, "auto", "default"):
            raise ValueError("give priority or service_tier, not both")
        return priority_of(body.get("service_tier"), body.get("priority"))
    except ValueError as exc:
        raise APIError(400, str(exc), param="priority" if "priority" in str(exc) else "service_tier") from None


def program(request: Request, body: dict) -> str | None:
    """The agent program a call belongs to: OpenAI's `prompt_cache_key`, within the client's
    own namespace (its address), so no client can spend another's program service."""
    key = body.get("prompt_cache_key")
    if key is None:
        return None
    if not isinstance(key, str) or not 0 < len(key) <= 256:
        raise APIError(400, "'prompt_cache_key' must be a string of 1 to 256 characters", param="prompt_cache_key")
    return f"{request.client.host if request.client else 'unknown'}/{key}"


def _as_api_error(exc: Exception) -> APIError:
    """The engine's exceptions as OpenAI errors: refused input 400, engine down 503, failed step 500."""
    status, type_, _ = classify(exc)
    return APIError(status, str(exc), type_)


async def _guarded(events):
    try:
        async for item in events:
            yield item
    except ENGINE_ERRORS as exc:
        raise _as_api_error(exc) from exc


class ClientGone(Exception):
    """The client of a non-streaming request left; its generation was aborted."""


async def while_connected(request: Request, events):
    """The items of `events` while the client is connected; when it leaves, the generation
    is closed (its request aborted: its blocks freed at the next step) and ClientGone raised."""
    async def gone() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
    watcher = asyncio.ensure_future(gone())
    items = events.__aiter__()
    try:
        while True:
            item = asyncio.ensure_future(items.__anext__())
            await asyncio.wait({item, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not item.done():
                item.cancel()
                with contextlib.suppress(BaseException):
                    await item
                raise ClientGone()
            try:
                yield item.result()
            except StopAsyncIteration:
                return
    finally:
        watcher.cancel()


async def _first(agen):
    """The first item, awaited before the response starts (so early errors get a status)."""
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        return None


async def _prepend(first, rest):
    if first is not None:
        yield first
    async for item in rest:
        yield item
