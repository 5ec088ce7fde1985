"""OpenAI's Responses API (/v1/responses) as a shape over the chat path: a request's input
items, instructions, function tools, text format and reasoning effort become a chat
completions body (`responses_format.as_chat_body`), which runs as /v1/chat/completions does; the reply comes
back as a Response object or as its stream of typed events (`ResponseWriter`).

Responses are not stored (`store` true, `previous_response_id` and `background` are refused
by name): a client sends the whole conversation each turn, as ADK's OpenAIResponsesLlm does.
Reasoning items of earlier turns are accepted and not replayed (chat templates drop past
thinking); a reply's thinking comes back as a reasoning item with `reasoning_text` content.
"""
from __future__ import annotations

import json
import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse

from adk_backend.chat import ChatDelta, ChatResult
from adk_backend.responses_format import NO_OP_VALUES, RESPONSES_FIELDS, FieldError, as_chat_body
from adk_backend.openai_http import (APIError, check_fields, first_item, named_sse_stream, prepend, read_body,
                                     while_connected)

def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseWriter:
    """One reply as a Response object (`response`) or as the events that stream it (`events`)."""

    def __init__(self, body: dict, model: str) -> None:
        self.body, self.model = body, model
        self.id, self.created_at = _id("resp"), int(time.time())
        self.sequence = 0

    def response(self, result: ChatResult | None, error: dict | None = None) -> dict:
        """The Response object: in progress (no result yet), completed, incomplete or failed."""
        status, output, usage, incomplete = "in_progress", [], None, None
        if error is not None:
            status = "failed"
        elif result is not None:
            choice = result.choices[0]
            output = self.output_items(result)
            status = "incomplete" if choice.finish_reason == "length" else "completed"
            incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
            usage = {"input_tokens": result.num_prompt_tokens,
                     "input_tokens_details": {"cached_tokens": result.num_cached_tokens},
                     "output_tokens": result.num_output_tokens,
                     "output_tokens_details": {"reasoning_tokens": result.num_reasoning_tokens},
                     "total_tokens": result.num_prompt_tokens + result.num_output_tokens}
        b = self.body
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "model": self.model, "output": output, "usage": usage, "error": error,
                "incomplete_details": incomplete, "instructions": b.get("instructions"),
                "metadata": b.get("metadata") or {}, "max_output_tokens": b.get("max_output_tokens"),
                "parallel_tool_calls": b.get("parallel_tool_calls", True), "previous_response_id": None,
                "reasoning": b.get("reasoning"), "service_tier": b.get("service_tier") or "default",
                "store": False, "temperature": b.get("temperature"), "top_p": b.get("top_p"),
                "text": b.get("text") or {"format": {"type": "text"}}, "tool_choice": b.get("tool_choice", "auto"),
                "tools": b.get("tools") or [], "truncation": "disabled", "user": b.get("user")}

    def output_items(self, result: ChatResult) -> list[dict]:
        reply = result.choices[0].reply
        items = []
        if reply.reasoning:
            items.append(self._reasoning_item(reply.reasoning))
        if reply.text:
            items.append(self._message_item(reply.text))
        items += [self._call_item(c) for c in reply.tool_calls]
        return items

    # -- items, with the ids their stream events name --------------------------------------
    def _reasoning_item(self, text: str, item_id: str | None = None) -> dict:
        return {"type": "reasoning", "id": item_id or _id("rs"), "summary": [],
                "content": [{"type": "reasoning_text", "text": text}]}

    def _message_item(self, text: str, item_id: str | None = None, status: str = "completed") -> dict:
        return {"type": "message", "id": item_id or _id("msg"), "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text or
                status == "completed" else []}

    def _call_item(self, call, arguments: str | None = None) -> dict:
        return {"type": "function_call", "id": _id("fc"), "call_id": call.id, "name": call.name,
                "arguments": json.dumps(call.arguments) if arguments is None else arguments, "status": "completed"}

    # -- the stream --------------------------------------------------------------------------
    def _event(self, kind: str, **fields) -> dict:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    async def events(self, chat_events):
        """Responses stream events for the chat path's ChatDeltas and final ChatResult."""
        yield self._event("response.created", response=self.response(None))
        yield self._event("response.in_progress", response=self.response(None))
        output: list[dict] = []  # items done so far
        open_item: dict | None = None  # the reasoning or message item streaming now
        text = ""

        def close():
            nonlocal open_item, text
            if open_item is None:
                return
            index, item_id = len(output), open_item["id"]
            if open_item["type"] == "reasoning":
                yield self._event("response.reasoning_text.done", item_id=item_id, output_index=index,
                                  content_index=0, text=text)
                done = self._reasoning_item(text, item_id)
            else:
                part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
                yield self._event("response.output_text.done", item_id=item_id, output_index=index,
                                  content_index=0, text=text, logprobs=[])
                yield self._event("response.content_part.done", item_id=item_id, output_index=index,
                                  content_index=0, part=part)
                done = self._message_item(text, item_id)
            yield self._event("response.output_item.done", output_index=index, item=done)
            output.append(done)
            open_item, text = None, ""

        def opening(kind: str):
            nonlocal open_item
            if open_item is not None and open_item["type"] == kind:
                return
            yield from close()
            index = len(output)
            if kind == "reasoning":
                open_item = self._reasoning_item("")
                open_item["content"] = []
                yield self._event("response.output_item.added", output_index=index, item=open_item)
            else:
                open_item = self._message_item("", status="in_progress")
                yield self._event("response.output_item.added", output_index=index, item=open_item)
                yield self._event("response.content_part.added", item_id=open_item["id"], output_index=index,
                                  content_index=0, part={"type": "output_text", "text": "", "annotations": []})

        async for item in chat_events:
            if isinstance(item, ChatDelta):
                for kind, piece in (("reasoning", item.reasoning), ("message", item.text)):
                    if not piece:
                        continue
                    for event in opening(kind):
                        yield event
                    text += piece
                    delta = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
                    yield self._event(delta, item_id=open_item["id"], output_index=len(output), content_index=0,
                                      delta=piece, **({"logprobs": []} if kind == "message" else {}))
                continue
            for event in close():
                yield event
            for call in item.reply.tool_calls:
                index, arguments = len(output), json.dumps(call.arguments)
                added = self._call_item(call, arguments="") | {"status": "in_progress"}
                yield self._event("response.output_item.added", output_index=index, item=added)
                yield self._event("response.function_call_arguments.delta", item_id=added["id"],
                                  output_index=index, delta=arguments)
                yield self._event("response.function_call_arguments.done", item_id=added["id"],
                                  output_index=index, name=call.name, arguments=arguments)
                done = added | {"arguments": arguments, "status": "completed"}
                yield self._event("response.output_item.done", output_index=index, item=done)
                output.append(done)
            final = self.response(item)
            final["output"] = output  # the ids the events named
            kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
            yield self._event(kind, response=final)

    def failed(self, message: str, code: str) -> dict:
        """The event that ends a stream whose generation failed after it began."""
        return self._event("response.failed", response=self.response(None, {"code": code, "message": message}))


def add_responses_route(router, ctx) -> None:
    """/v1/responses on `router`, sharing the other routes' context (v1_context.V1Context)."""
    @router.post("/responses")
    async def responses(request: Request):
        return await ctx.limited(request, _responses)

    async def _responses(request: Request):
        body = await read_body(request)
        check_fields(body, RESPONSES_FIELDS, NO_OP_VALUES)
        try:
            chat = as_chat_body(body)
        except FieldError as exc:
            raise APIError(400, str(exc), param=exc.param) from exc
        model = ctx.resolve(chat)
        events, _ = ctx.start_chat(request, chat, model, ctx.sampling(chat, model))
        writer = ResponseWriter(body, model)
        if not body.get("stream"):
            result = None
            async for item in while_connected(request, events):
                result = item if isinstance(item, ChatResult) else result
            return writer.response(result)
        first = await first_item(events)  # errors before the first token still get a proper status

        async def events_out():
            try:
                async for event in writer.events(prepend(first, events)):
                    yield event
            except APIError as exc:
                yield writer.failed(exc.message, exc.type)
        return StreamingResponse(named_sse_stream(events_out()), media_type="text/event-stream")
