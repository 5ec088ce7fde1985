"""One chat request on the shared engine, as both providers and the OpenAI API run it:
render the prompt (on the engine's input thread), constrain the reply to the grammar its
ReplySpec asks for, stream the thinking and the plain text apart, and parse each whole
reply into reasoning, text and tool calls at the end. With `n > 1` every sequence streams
and parses on its own.

How a model writes tool calls and thinking (`ChatFormats`) is read once per engine from
its chat template, unless `configure_engine(..., tool_call_parser=, reasoning_parser=)`
names them.
"""
from __future__ import annotations

import asyncio
import dataclasses
import weakref
from dataclasses import dataclass

from adk_backend.chat_format import ParsedReply, TextStreamFilter, messages_with_tools
from adk_backend.engines import chat_overrides
from adk_backend.reasoning import ReasoningFormat, ReasoningStreamSplitter, reasoning_format, \
    reasoning_format_from_template
from adk_backend.reply_grammar import ReplySpec, reply_grammar
from adk_backend.tool_formats import PROBE_CONVERSATION, PROBE_TOOL, ToolCallFormat, format_from_rendering, \
    tool_call_format
from engine import Logprob, SamplingParams

# What a chat request (ADK, /v1, LiteLLM) that leaves them unset gets, unless the checkpoint's
# generation_config.json sets them: greedy decoding up to 512 tokens. (`SamplingParams()`
# itself keeps vLLM's offline defaults: temperature 1.0, 16 tokens.)
CHAT_TEMPERATURE = 0.0
CHAT_MAX_TOKENS = 512


@dataclass(frozen=True)
class ChatFormats:
    tools: ToolCallFormat
    native_tools: bool                  # the template renders tools, calls and results itself
    tool_role: bool                     # the template takes a 'tool' turn (Gemma 3's does not)
    reasoning: ReasoningFormat | None   # a reasoning model's thinking tags


_formats: "weakref.WeakKeyDictionary[object, ChatFormats]" = weakref.WeakKeyDictionary()


async def chat_formats(engine) -> ChatFormats:
    """The engine's ChatFormats, probed from its chat template on first use."""
    found = _formats.get(engine)
    if found is not None:
        return found

    async def renders(messages: list[dict], tools: list[dict] | None) -> str | None:
        try:
            return await engine.apply_chat_template(messages, tools)
        except Exception:  # noqa: BLE001 - a template that refuses this conversation
            return None
    detected, native = format_from_rendering(await renders(PROBE_CONVERSATION, [PROBE_TOOL]))
    # A tool turn right after the assistant's, as in a real round trip (Gemma 3's template
    # insists on user/model turns and refuses it there).
    tool_role = await renders([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                               {"role": "tool", "content": "r7f3a"}], None)
    overrides = chat_overrides(engine)
    tools = tool_call_format(overrides["tool_call_parser"]) if overrides.get("tool_call_parser") else detected
    native = native and tools == detected  # a named parser the template does not render: we declare the tools
    template = getattr(engine.tokenizer, "chat_template", None) if engine.tokenizer is not None else None
    reasoning = (reasoning_format(overrides["reasoning_parser"]) if "reasoning_parser" in overrides
                 else reasoning_format_from_template(template if isinstance(template, str) else None))
    found = ChatFormats(tools, native, tool_role is not None and "r7f3a" in tool_role, reasoning)
    _formats[engine] = found
    return found


async def render_chat(engine, messages: list[dict], tools: list[dict] | None,
                      template_kwargs: dict | None = None) -> tuple[str, ChatFormats]:
    """The prompt of a conversation with tools: through the model's template where it renders
    tools, calls and results, else with the tools declared in the family's format. Every
    front end renders chats here (offline engines through render_chat_offline)."""
    formats = await chat_formats(engine)
    messages, tools = messages_with_tools(messages, tools, formats.native_tools, formats.tool_role, formats.tools)
    return await engine.apply_chat_template(messages, tools, template_kwargs), formats


class _OfflineEngine:
    """An offline LLMEngine as render_chat sees an AsyncLLM."""

    def __init__(self, engine) -> None:
        self.engine, self.tokenizer = engine, engine.tokenizer

    async def apply_chat_template(self, messages, tools=None, template_kwargs=None) -> str:
        return self.engine.apply_chat_template(messages, tools, template_kwargs)


def render_chat_offline(engine, messages: list[dict], tools: list[dict] | None) -> str:
    """render_chat's prompt on an offline LLMEngine (`LLM(...).engine`: benchmarks, tests);
    not from inside a running event loop."""
    return asyncio.run(render_chat(_OfflineEngine(engine), messages, tools))[0]


@dataclass
class ChatDelta:
    """New output of one of the request's sequences: thinking and plain reply text as they
    stream (tool calls held back), and the tokens they came with."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None = None
    reasoning: str = ""


@dataclass
class ChatChoice:
    """One sequence's whole reply."""
    index: int
    reply: ParsedReply
    finish_reason: str  # the engine's: "stop" | "length" | "abort"
    num_output_tokens: int
    num_reasoning_tokens: int = 0  # of them, the thinking's (its text re-encoded)


@dataclass
class ChatResult:
    """The whole reply of one chat request (n sequences), as the providers report it."""
    choices: list[ChatChoice]
    request_id: str
    num_prompt_tokens: int
    num_cached_tokens: int
    prompt_token_ids: list[int] = dataclasses.field(default_factory=list)
    output_token_ids: list[int] = dataclasses.field(default_factory=list)  # the first sequence's
    time_in_queue: float | None = None  # seconds from arrival to the first step that ran it
    num_computed_tokens: int | None = None  # of prompt + output: those whose KV it computed (RequestMetrics)

    @property
    def reply(self) -> ParsedReply:
        return self.choices[0].reply

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason

    @property
    def num_output_tokens(self) -> int:
        return sum(c.num_output_tokens for c in self.choices)

    @property
    def num_reasoning_tokens(self) -> int:
        return sum(c.num_reasoning_tokens for c in self.choices)


def finite_logprob(lp: Logprob) -> float:
    return max(lp.logprob, -9999.0)  # JSON has no -inf


def top_candidates(entry: dict[int, Logprob], n: int) -> list[tuple[int, Logprob]]:
    """A token's `n` most likely candidates (token id, logprob), most likely first."""
    return sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= n),
                  key=lambda item: item[1].rank)


# Service tiers (ADK's RunConfig.service_tier, OpenAI's service_tier) as engine priorities:
# lower is admitted first; a waiting request gains a level every few seconds (scheduler).
TIER_PRIORITY = {"priority": -1, "standard": 0, "default": 0, "auto": 0, "flex": 1, "deferred": 2}
MAX_PRIORITY = 10  # |priority| a client may ask for (vLLM's `priority` field)


def priority_of(tier: str | None = None, priority: int | None = None) -> int:
    """The engine priority of a service tier or an explicit priority (not both)."""
    if priority is not None:
        if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > MAX_PRIORITY:
            raise ValueError(f"priority must be an integer in [-{MAX_PRIORITY}, {MAX_PRIORITY}] "
                             f"(lower runs first), got {priority!r}")
        return priority
    tier = getattr(tier, "value", tier)  # ADK's ServiceTier is a str enum
    if tier is None:
        return 0
    if tier not in TIER_PRIORITY:
        raise ValueError(f"service_tier must be one of {', '.join(TIER_PRIORITY)}, got {tier!r}")
    return TIER_PRIORITY[tier]


async def chat_stream(engine, messages: list[dict], spec: ReplySpec, params: SamplingParams,
                      template_kwargs: dict | None = None, priority: int = 0, program: str | None = None):
    """Runs one chat request on an AsyncLLM. Yields ChatDeltas as the reply is generated,
    then one ChatResult. `template_kwargs` reach the chat template (e.g. enable_thinking);
    `priority`: the engine's (priority_of); `program`: the agent run the call belongs to.
    Raises the engine's ValueError / EngineDeadError / RequestFailedError."""
    prompt, formats = await render_chat(engine, messages, spec.tools, template_kwargs)
    reasoning = formats.reasoning
    if reasoning is not None and prompt.rstrip().endswith(reasoning.close):
        reasoning = None  # thinking is off: the template closed an empty block
    opened = reasoning is not None and reasoning.opened_by(prompt)
    grammar = reply_grammar(spec, formats.tools, reasoning, opened)
    if grammar is not None:
        if params.structured_outputs is not None:
            raise ValueError("structured_outputs cannot be combined with tools or a response format; "
                             "use one of them")
        params = dataclasses.replace(params, structured_outputs=grammar)
    callable_names = spec.callable_names
    n = params.n
    splitters = [ReasoningStreamSplitter(reasoning, opened) if reasoning else None for _ in range(n)]
    filters = [TextStreamFilter(formats.tools.trigger) for _ in range(n)]
    texts, streamed, num_output, finish = [""] * n, [""] * n, [0] * n, ["stop"] * n
    first_ids: list[int] = []
    last = None

    def visible(i: int, text: str) -> str:
        piece = filters[i].feed(text) if callable_names else text
        streamed[i] += piece
        return piece

    async for out in engine.generate(prompt, params, priority=priority, program=program):
        last = out
        for c in out.outputs:
            i = c.index
            texts[i] += c.text
            num_output[i] += len(c.token_ids)
            if i == 0:
                first_ids += c.token_ids
            finish[i] = c.finish_reason or finish[i]
            thought, text = splitters[i].feed(c.text) if splitters[i] else ("", c.text)
            piece = visible(i, text)
            if piece or thought or c.logprobs:
                yield ChatDelta(i, piece, c.token_ids, c.logprobs, thought)
    choices = []
    for i in range(n):
        if splitters[i]:
            thought, text = splitters[i].finish()
            piece = visible(i, text)
            if piece or thought:
                yield ChatDelta(i, piece, [], None, thought)
        thinking, answer = reasoning.split(texts[i], opened) if reasoning else (None, texts[i])
        reply = formats.tools.parse(answer, callable_names)
        reply.reasoning = thinking
        if reply.text.startswith(streamed[i]) and len(reply.text) > len(streamed[i]):
            yield ChatDelta(i, reply.text[len(streamed[i]):], [])  # held back as a possible call, and not one
        thought_tokens = await engine.count_tokens(thinking) if thinking else 0
        choices.append(ChatChoice(i, reply, finish[i], num_output[i], min(thought_tokens, num_output[i])))
    if program is not None and not any(c.reply.tool_calls for c in choices) and last.metrics.finished_time:
        engine.release_program_kv(program, last.metrics.finished_time)  # no tool call: no next call takes its KV
    yield ChatResult(choices=choices, request_id=last.request_id, num_prompt_tokens=len(last.prompt_token_ids),
                     num_cached_tokens=last.metrics.num_cached_tokens, prompt_token_ids=list(last.prompt_token_ids),
                     output_token_ids=first_ids, time_in_queue=last.metrics.time_in_queue,
                     num_computed_tokens=last.metrics.num_computed_tokens)
