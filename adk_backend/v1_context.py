"""What a /v1 route needs to run a request on the engine: the served model resolved, the
body's sampling and chat fields checked and converted, per-client and queue limits, the
request's priority and agent program, and the chat run started (`V1Context`), shared by
/v1/chat/completions, /v1/completions and /v1/responses."""
from __future__ import annotations

import dataclasses

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from adk_backend.chat import chat_stream, priority_of
from adk_backend.engines import engine_for, model_name
from adk_backend.openai_format import chat_top_logprobs, openai_reply_spec, openai_sampling, openai_to_messages
from adk_backend.openai_http import APIError, ClientGone, check_fields, check_params, guarded, read_body

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
