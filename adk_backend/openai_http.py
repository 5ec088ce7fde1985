"""What every /v1 route shares: OpenAI's error shape, the request body and its fields
checked (a field a route does not honour is a 400 that names it), server-sent events,
per-client limits, the engine's errors mapped once, and a request run only while its client
is connected."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from adk_backend.chat import chat_stream, priority_of
from adk_backend.engines import engine_for, model_name
from adk_backend.errors import ENGINE_ERRORS, classify
from adk_backend.openai_format import chat_top_logprobs, openai_reply_spec, openai_sampling, openai_to_messages


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


class V1Context:
    """What the /v1 routes share: the models served, the limits, and the steps of a
    generation request (admit, resolve the model, check sampling, start a chat)."""

    def __init__(self, served: list[str], max_tokens_limit: int, max_concurrent_per_client: int | None,
                 max_waiting: int | None) -> None:
        self.names = {model_name(m) for m in served}
        self.max_tokens_limit = max_tokens_limit
        self.limiter = ClientLimiter(max_concurrent_per_client)
        self.max_waiting = max_waiting

    async def limited(self, request: Request, handler):
        """Runs a generation handler inside the client's slot; a streaming response keeps
        the slot until its body generator ends (sent, failed or client gone)."""
        if self.max_waiting is not None and any(engine_for(m).stats()["num_waiting"] >= self.max_waiting
                                                for m in self.names):
            raise APIError(503, f"the server is at capacity ({self.max_waiting} requests waiting); retry shortly",
                           "service_unavailable", retry_after=1)
        client = self.limiter.acquire(request)
        try:
            response = await handler(request)
        except ClientGone:  # nobody to answer: nginx's "client closed request"
            self.limiter.release(client)
            return Response(status_code=499)
        except BaseException:
            self.limiter.release(client)
            raise
        if isinstance(response, StreamingResponse):
            body = response.body_iterator

            async def releasing():
                try:
                    async for chunk in body:
                        yield chunk
                finally:
                    self.limiter.release(client)
            response.body_iterator = releasing()
        else:
            self.limiter.release(client)
        return response

    def resolve(self, body: dict) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "'model' is required", param="model")
        if model_name(model) not in self.names:  # never a file lookup: only the models configured at start-up
            raise APIError(404, f"the model '{model}' does not exist; served: {sorted(self.names)}",
                           param="model", code="model_not_found")
        return model_name(model)

    def sampling(self, body: dict, model: str):
        check_params(body)
        if body.get("response_format") is not None and body.get("structured_outputs") is not None:
            raise APIError(400, "give response_format or structured_outputs, not both", param="structured_outputs")
        limit = next((body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), None)
        if limit is not None and limit > self.max_tokens_limit:
            raise APIError(400, f"max_tokens must be <= {self.max_tokens_limit}, got {limit}", param="max_tokens")
        try:
            params = openai_sampling(body, engine_for(model).sampling_defaults)
            return dataclasses.replace(params, n=1 if body.get("n") is None else body["n"])
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc

    async def parse(self, request: Request, fields: set[str]):
        body = await read_body(request)
        check_fields(body, fields)
        model = self.resolve(body)
        return body, model, self.sampling(body, model)

    def start_chat(self, request: Request, body: dict, model: str, params):
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
        template_kwargs = with_reasoning_effort(template_kwargs, body.get("reasoning_effort"))
        engine = engine_for(model)  # a dead engine refuses in generate(): 503 through guarded
        return guarded(chat_stream(engine, messages, spec, params, template_kwargs, request_priority(body),
                                   program(request, body))), top_n


_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


def with_reasoning_effort(template_kwargs: dict | None, effort) -> dict | None:
    """OpenAI's reasoning_effort as the template's thinking switch (Qwen3's enable_thinking;
    dropped where the template reads none): "none"/"minimal" off, any other level on."""
    if effort is None:
        return template_kwargs
    if effort not in _EFFORTS:
        raise APIError(400, f"reasoning_effort must be one of {', '.join(_EFFORTS)}, got {effort!r}",
                       param="reasoning_effort")
    return {"enable_thinking": effort not in ("none", "minimal")} | (template_kwargs or {})


def request_priority(body: dict) -> int:
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
