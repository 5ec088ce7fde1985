"""One chat request on the shared engine, as both providers and the OpenAI API run it:
render the prompt (on the engine's input thread), constrain the reply to the grammar its
ReplySpec asks for, stream the plain text, and parse each whole reply into text and tool
calls at the end. With `n > 1` every sequence streams and parses on its own."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from adk_backend.chat_format import ParsedReply, TextStreamFilter, messages_with_tools, parse_reply
from adk_backend.reply_grammar import ReplySpec, reply_grammar
from engine import SamplingParams
from engine import Logprob


@dataclass
class ChatDelta:
    """New output of one of the request's sequences: plain reply text as it streams
    (tool-call blocks held back), and the tokens it came with."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None = None


@dataclass
class ChatChoice:
    """One sequence's whole reply."""
    index: int
    reply: ParsedReply
    finish_reason: str  # the engine's: "stop" | "length" | "abort"
    num_output_tokens: int


@dataclass
class ChatResult:
    """The whole reply of one chat request (n sequences), as the providers report it."""
    choices: list[ChatChoice]
    request_id: str
    num_prompt_tokens: int
    num_cached_tokens: int

    @property
    def reply(self) -> ParsedReply:
        return self.choices[0].reply

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason

    @property
    def num_output_tokens(self) -> int:
        return sum(c.num_output_tokens for c in self.choices)


async def chat_stream(engine, messages: list[dict], spec: ReplySpec, params: SamplingParams):
    """Runs one chat request on an AsyncLLM. Yields ChatDeltas as the reply is generated,
    then one ChatResult. Raises the engine's ValueError / EngineDeadError /
    RequestFailedError."""
    grammar = reply_grammar(spec)
    if grammar is not None:
        if params.structured_outputs is not None:
            raise ValueError("structured_outputs cannot be combined with tools or a response format; "
                             "use one of them")
        params = dataclasses.replace(params, structured_outputs=grammar)
    messages, tools = messages_with_tools(messages, spec.tools, engine.chat_template_renders_tools)
    prompt = await engine.apply_chat_template(messages, tools)
    callable_names = spec.callable_names
    n = params.n
    filters = [TextStreamFilter() for _ in range(n)]
    texts, streamed, num_output, finish = [""] * n, [""] * n, [0] * n, ["stop"] * n
    last = None
    async for out in engine.generate(prompt, params):
        last = out
        for c in out.outputs:
            i = c.index
            texts[i] += c.text
            num_output[i] += len(c.token_ids)
            finish[i] = c.finish_reason or finish[i]
            piece = filters[i].feed(c.text) if callable_names else c.text
            streamed[i] += piece
            if piece or c.logprobs:
                yield ChatDelta(i, piece, c.token_ids, c.logprobs)
    choices = []
    for i in range(n):
        reply = parse_reply(texts[i], callable_names)
        if reply.text.startswith(streamed[i]) and len(reply.text) > len(streamed[i]):
            yield ChatDelta(i, reply.text[len(streamed[i]):], [])  # held back as a possible call, and not one
        choices.append(ChatChoice(i, reply, finish[i], num_output[i]))
    yield ChatResult(choices=choices, request_id=last.request_id, num_prompt_tokens=len(last.prompt_token_ids),
                     num_cached_tokens=last.metrics.num_cached_tokens)
