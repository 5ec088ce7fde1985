"""An OpenTelemetry span per engine request, with the OpenTelemetry GenAI names and, beside
them, vLLM's older ones (users' existing queries keep working); and the GenAI server
metrics (gen_ai.server.time_to_first_token, .time_per_output_token, .request.duration) as
OpenTelemetry histograms, recorded from the same hooks, beside gauges of each engine's
batch (engine.batch_size, engine.requests.running / .waiting, engine.kv_cache.usage), so a
dashboard can chart latency against batch size and load.

The span is started on the caller's thread, as a child of the caller's current context
(ADK's `generate_content <model>` span, or an HTTP request span), and that context is
carried with the request to the engine thread, which only adds events and ends it. So
concurrent requests never cross traces, whichever thread does the work. Uses the global
tracer provider: whatever exporter the process installs (Cloud Trace, OTLP) gets these.
"""
from __future__ import annotations

import weakref
from typing import Callable

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation

from engine.request import Request, RequestMetrics

_tracer = trace.get_tracer("engine")
_meter = metrics.get_meter("engine")
PROVIDER_NAME = "adk_engine"  # gen_ai.provider.name: the engine serving the model
# The GenAI conventions' advised buckets for these histograms (seconds).
_LATENCY_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
_TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
_ttft = _meter.create_histogram("gen_ai.server.time_to_first_token", unit="s",
                                description="Time to generate the first token",
                                explicit_bucket_boundaries_advisory=_LATENCY_BUCKETS)
_tpot = _meter.create_histogram("gen_ai.server.time_per_output_token", unit="s",
                                description="Time per output token after the first",
                                explicit_bucket_boundaries_advisory=_TPOT_BUCKETS)
_duration = _meter.create_histogram("gen_ai.server.request.duration", unit="s",
                                    description="Time from arrival to the last token",
                                    explicit_bucket_boundaries_advisory=_LATENCY_BUCKETS)


# Live engines (held weakly: a shut-down engine is collected with its KV cache) -> model.
_engines: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()


def observe_engine(engine, model: str) -> None:
    """Reports `engine.stats()` through the gauges below until the engine is collected."""
    _engines[engine] = model


def _gauge(stat: Callable[[dict], float]):
    def callback(options: CallbackOptions):
        for engine, model in list(_engines.items()):
            yield Observation(stat(engine.stats()), {"gen_ai.request.model": model})
    return [callback]


_meter.create_observable_gauge("engine.batch_size", _gauge(lambda s: (s["batch_size_history"] or [0])[-1]),
                               description="Requests in the engine's last forward pass")
_meter.create_observable_gauge("engine.requests.running", _gauge(lambda s: s["num_running"]),
                               description="Requests in the running batch")
_meter.create_observable_gauge("engine.requests.waiting", _gauge(lambda s: s["num_waiting"]),
                               description="Requests waiting to be scheduled")
_meter.create_observable_gauge("engine.kv_cache.usage", _gauge(lambda s: s["kv_cache_usage"]),
                               description="Fraction of KV cache blocks in use")


def _metric_attributes(model: str) -> dict:
    return {"gen_ai.operation.name": "text_completion", "gen_ai.provider.name": PROVIDER_NAME,
            "gen_ai.request.model": model}


def _ns(t: float) -> int:
    return int(t * 1e9)


def start_request_span(req: Request, model: str, parent: otel_context.Context | None = None) -> trace.Span:
    p = req.sampling_params
    return _tracer.start_span("llm_request", context=parent or otel_context.get_current(),
                              kind=trace.SpanKind.INTERNAL, start_time=_ns(req.arrival_time), attributes={
                                  "gen_ai.provider.name": PROVIDER_NAME,
                                  "gen_ai.operation.name": "text_completion",
                                  "gen_ai.request.model": model,
                                  "gen_ai.request.temperature": p.temperature,
                                  "gen_ai.request.top_p": p.top_p,
                                  "gen_ai.request.max_tokens": p.max_tokens or 0,
                                  "gen_ai.request.choice.count": p.n,
                                  "gen_ai.request.id": req.request_id,  # vLLM's
                              })


def on_first_token(span: trace.Span, m: RequestMetrics, model: str) -> None:
    span.add_event("first_token", timestamp=_ns(m.first_token_time))
    if m.time_to_first_token is not None:
        _ttft.record(m.time_to_first_token, _metric_attributes(model))


def on_preempted(span: trace.Span, req: Request, when: float) -> None:
    span.add_event("preempted", {"engine.num_preemptions": req.metrics.num_preemptions}, timestamp=_ns(when))


def end_request_span(span: trace.Span, seqs: list[Request], model: str) -> None:
    """Ends the span of a request (its n sequences) with its totals and latencies."""
    req = seqs[0]
    m = req.metrics
    output_tokens = sum(s.num_output_tokens for s in seqs)
    attrs = {
        "gen_ai.response.id": req.group_id,
        "gen_ai.usage.input_tokens": req.num_prompt_tokens,
        "gen_ai.usage.output_tokens": output_tokens,
        "gen_ai.usage.cache_read.input_tokens": m.num_cached_tokens,
        "gen_ai.response.finish_reasons": [s.finish_reason or "unknown" for s in seqs],
        "gen_ai.usage.prompt_tokens": req.num_prompt_tokens,  # vLLM's names, kept beside
        "gen_ai.usage.completion_tokens": output_tokens,
        "engine.num_cached_tokens": m.num_cached_tokens,
        "engine.num_preemptions": m.num_preemptions,
    }
    if m.time_in_queue is not None:
        attrs["gen_ai.latency.time_in_queue"] = m.time_in_queue
    if m.time_to_first_token is not None:
        attrs["gen_ai.response.time_to_first_chunk"] = m.time_to_first_token
        attrs["gen_ai.latency.time_to_first_token"] = m.time_to_first_token
    if m.e2e_latency is not None:
        attrs["gen_ai.latency.e2e"] = m.e2e_latency
    if m.batch_size_at_first_schedule is not None:
        attrs["engine.batch_size_at_first_schedule"] = m.batch_size_at_first_schedule
    span.set_attributes(attrs)
    error = next((s.error for s in seqs if s.error), None)
    labels = _metric_attributes(model) | ({"error.type": "engine_error"} if error else {})
    if m.e2e_latency is not None:
        _duration.record(m.e2e_latency, labels)
        if m.time_to_first_token is not None and req.num_output_tokens > 1:
            _tpot.record((m.e2e_latency - m.time_to_first_token) / (req.num_output_tokens - 1), labels)
    if error:
        span.set_status(trace.Status(trace.StatusCode.ERROR, error))
    span.end(end_time=_ns(m.finished_time) if m.finished_time else None)
