"""What every /v1 route shares: OpenAI's error shape, the request body and its fields
checked (a field a route does not honour is a 400 that names it), server-sent events, the
engine's errors mapped once, and a request run only while its client is connected. Running
a request on the engine (limits, model, sampling, the chat run) is v1_context.py's."""
from __future__ import annotations

import asyncio
import contextlib
import json
import math

from fastapi import Request
from fastapi.responses import JSONResponse

from adk_backend.errors import ENGINE_ERRORS, classify


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


async def sse_stream(events):
    """Server-sent events: each item framed, an API error after the headers went out as an
    error event (the status can no longer change), then [DONE]."""
    try:
        async for event in events:
            yield _sse(event)
    except APIError as exc:
        yield _sse({"error": {"message": exc.message, "type": exc.type}})
    yield "data: [DONE]\n\n"


async def named_sse_stream(events):
    """Server-sent events named by their type, as the Responses API streams them (no [DONE])."""
    async for event in events:
        yield f"event: {event['type']}\n" + _sse(event)


async def read_body(request: Request) -> dict:
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


def check_fields(body: dict, known: set[str], no_op_values: dict = _NO_OP_VALUES) -> None:
    for key, value in body.items():
        if key in known:
            continue
        if key in no_op_values:
            if any(value == ok and type(value) is type(ok) for ok in no_op_values[key]):
                continue
            raise APIError(400, f"'{key}'={json.dumps(value)[:80]} is not supported by this server", param=key)
        raise APIError(400, f"unsupported field '{key}'", param=key)


def check_params(body: dict) -> None:
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


def as_api_error(exc: Exception) -> APIError:
    """The engine's exceptions as OpenAI errors: refused input 400, engine down 503, failed step 500."""
    status, type_, _ = classify(exc)
    return APIError(status, str(exc), type_)


async def guarded(events):
    try:
        async for item in events:
            yield item
    except ENGINE_ERRORS as exc:
        raise as_api_error(exc) from exc


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


async def first_item(agen):
    """The first item, awaited before the response starts (so early errors get a status)."""
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        return None


async def prepend(first, rest):
    if first is not None:
        yield first
    async for item in rest:
        yield item
