"""What an ADK run tells the engine, and what the engine tells the run's trace.

`ServiceTierPlugin` sees every model call of a run before the model does. It passes the
run's service tier and identity to the engine: the identity (`<app>/<session>/<invocation>`)
is the call's agent program (docs/agent-scheduling.md). Back the other way, with or without
the plugin, each agent's model calls add up what they cost in the engine (time queued for
the batch, prompt tokens computed again that the agent had computed before, e.g. after its
KV was evicted during a tool call), and the agent's own `invoke_agent` span carries the
running totals, so Cloud Trace shows whether an agent's latency grows with load and why.
"""
from __future__ import annotations

import contextvars
import hashlib
import json
import weakref
from dataclasses import dataclass

from google.adk.models.llm_request import LlmRequest
from google.adk.plugins.base_plugin import BasePlugin
from opentelemetry import context as otel_context
from opentelemetry import trace

from engine.program_tokens import common_prefix


@dataclass
class AgentEngineTotals:
    """One agent's model calls in one invocation, as the engine served them."""
    model_calls: int = 0
    time_in_queue: float = 0.0       # seconds its calls waited for the batch, summed
    prompt_tokens: int = 0
    cached_tokens: int = 0           # prompt tokens served from the prefix cache
    prefill_recomputed: int = 0      # prompt tokens it had computed before and computed again
    _last: list[int] | None = None   # the previous call's prompt and reply token ids
    _last_computed: int = 0          # how many of them had KV (the rest were appended after its last step)

    def add_call(self, prompt_ids: list[int], output_ids: list[int], cached: int, queued: float | None,
                 computed: int | None = None) -> None:
        """`computed`: of prompt and reply, the tokens whose KV the call computed (unknown:
        all but the last, which was never fed back)."""
        if self._last is not None:  # KV that existed once
            seen = min(common_prefix(self._last, prompt_ids), self._last_computed)
            self.prefill_recomputed += max(0, seen - cached)
        self._last = list(prompt_ids) + list(output_ids)
        self._last_computed = len(self._last) - 1 if computed is None else computed
        self.model_calls += 1
        self.time_in_queue += queued or 0.0
        self.prompt_tokens += len(prompt_ids)
        self.cached_tokens += cached

    def span_attributes(self) -> dict:
        return {"engine.agent.model_calls": self.model_calls,
                "engine.agent.time_in_queue": self.time_in_queue,
                "engine.agent.prompt_tokens": self.prompt_tokens,
                "engine.agent.cache_read.input_tokens": self.cached_tokens,
                "engine.agent.prefill_recomputed_tokens": self.prefill_recomputed}


try:  # ADK's own key, not a public name: where a later ADK moves it, no totals (tests/adk_backend/test_tracing.py)
    from google.adk.telemetry._instrumentation import _AGENT_INVOCATION_SCOPE_KEY
except ImportError:
    _AGENT_INVOCATION_SCOPE_KEY = None


def _invoke_agent_span() -> trace.Span | None:
    """The `invoke_agent` span of the agent whose model call is running, while it records.
    ADK (2.x) publishes each agent run's telemetry scope in the OpenTelemetry context its
    model calls inherit, and the scope's own context holds the agent's span: the innermost
    agent, so each agent of a workflow is found, not its parent."""
    if _AGENT_INVOCATION_SCOPE_KEY is None:
        return None
    scope = otel_context.get_value(_AGENT_INVOCATION_SCOPE_KEY)
    span = trace.get_current_span(getattr(scope, "otel_context", None)) if scope is not None else None
    return span if span is not None and span.is_recording() else None


_AGENT_TOTALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # invoke_agent span -> AgentEngineTotals


def record_agent_call(prompt_ids: list[int], output_ids: list[int], cached: int, queued: float | None,
                      computed: int | None = None) -> None:
    """Adds one finished model call to its agent's totals and puts them on the agent's
    `invoke_agent` span (each call overwrites them: the span ends with the agent's whole
    run). No span (no SDK tracer provider, or a call outside an agent): nothing to do."""
    span = _invoke_agent_span()
    if span is None:
        return
    totals = _AGENT_TOTALS.setdefault(span, AgentEngineTotals())
    totals.add_call(prompt_ids, output_ids, cached, queued, computed)
    span.set_attributes(totals.span_attributes())


# Set by ServiceTierPlugin in the task that then calls the model: the call's agent program
# ("<app>/<session>/<invocation>").
CURRENT_PROGRAM: contextvars.ContextVar[str | None] = contextvars.ContextVar("engine_program", default=None)


def program_of(messages: list[dict]) -> str:
    """A call's agent program (its neutral chat `messages`: chat_format): the plugin's name for
    its run, else one read from the call itself, so that a plain `Runner` (or a LiteLLM
    caller) needs no change: the messages up to the user's message that started the run, the
    system instruction first. Every call of the run shares them (its tool calls and their
    results come after that message) and the next run's differ (its own message comes
    after). Runs whose instruction and history are identical so far (two sessions opening
    with the same words) count as one program until they differ; their KV prefix is the same
    anyway."""
    named = CURRENT_PROGRAM.get()
    if named is not None:
        return named
    started = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages) - 1)
    opening = json.dumps(messages[:started + 1], sort_keys=True, default=str)
    return "run/" + hashlib.sha256(opening.encode()).hexdigest()[:32]


class ServiceTierPlugin(BasePlugin):
    """Carries what a run knows to every model call of it: `RunConfig.service_tier` (ADK
    itself copies it into the LlmRequest only for Gemini's interactions API) and the run's
    identity, its agent program (EngineConfig.program_scheduling; without the plugin, the
    program is read from the call's messages, see program_of). `Runner(...,
    plugins=[ServiceTierPlugin()])` or `App(plugins=[...])`; `serve` adds it."""

    def __init__(self, name: str = "engine_service_tier") -> None:
        super().__init__(name=name)

    async def before_model_callback(self, *, callback_context, llm_request: LlmRequest):
        run_config = callback_context.run_config
        if llm_request.service_tier is None and run_config is not None and run_config.service_tier:
            llm_request.service_tier = run_config.service_tier
        session = callback_context.session
        CURRENT_PROGRAM.set(f"{session.app_name}/{session.id}/{callback_context.invocation_id}")
        return None
