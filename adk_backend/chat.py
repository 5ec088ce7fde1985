"""One chat request on the shared engine, as both providers and the OpenAI API run it:
render the prompt, constrain the reply to the grammar its ReplySpec asks for, stream the
plain text, and parse the whole reply into text and tool calls at the end."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from adk_backend.chat_format import ParsedReply, TextStreamFilter, parse_reply, render_prompt
from adk_backend.reply_grammar import ReplySpec, reply_grammar
from engine import SamplingParams


@dataclass
class ChatResult:
    """The whole reply of one chat request, as both providers report it."""
    reply: ParsedReply
    request_id: str
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    finish_reason: str  # the engine's: "stop" | "length" | "abort"


async def chat_stream(engine, messages: list[dict], spec: ReplySpec, params: SamplingParams):
    """Runs one chat request on an AsyncLLM. Yields the reply's plain text as it is
    generated (str pieces; tool-call blocks held back), then one ChatResult. Raises the
    engine's ValueError / EngineDeadError / RequestFailedError."""
    grammar = reply_grammar(spec)
    if grammar is not None:
        if params.structured_outputs is not None:
            raise ValueError("structured_outputs cannot be combined with tools or a response format; "
                             "use one of them")
        params = dataclasses.replace(params, structured_outputs=grammar)
    prompt = render_prompt(engine.engine, messages, spec.tools)
    callable_names = spec.callable_names
    stream_filter = TextStreamFilter()
    text, streamed, last, num_output = "", "", None, 0
    async for out in engine.generate(prompt, params):
        delta = out.outputs[0].text
        text += delta
        num_output += len(out.outputs[0].token_ids)
        last = out
        piece = stream_filter.feed(delta) if callable_names else delta
        if piece:
            streamed += piece
            yield piece
    reply = parse_reply(text, callable_names)
    if reply.text.startswith(streamed) and len(reply.text) > len(streamed):
        yield reply.text[len(streamed):]  # held back as a possible call, and not one after all
    yield ChatResult(reply=reply, request_id=last.request_id,
                     num_prompt_tokens=len(last.prompt_token_ids), num_output_tokens=num_output,
                     num_cached_tokens=last.metrics.num_cached_tokens,
                     finish_reason=last.outputs[0].finish_reason or "stop")
