"""An OpenTelemetry span per engine request, with vLLM's attribute names.

The span is started on the caller's thread, as a child of the caller's current context
(ADK's `generate_content <model>` span, or an HTTP request span), and that context is
carried with the request to the engine thread, which only adds events and ends it. So
concurrent requests never cross traces, whichever thread does the work. Uses the global
tracer provider: whatever exporter the process installs (Cloud Trace, OTLP) gets these.
"""
from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry import trace

from engine.request import Request, RequestMetrics

_tracer = trace.get_tracer("engine")


def _ns(t: float) -> int:
    return int(t * 1e9)


def start_request_span(req: Request, model: str, parent: otel_context.Context | None = None) -> trace.Span:
    p = req.sampling_params
    return _tracer.start_span("llm_request", context=parent or otel_context.get_current(),
                              kind=trace.SpanKind.INTERNAL, start_time=_ns(req.arrival_time), attributes={
                                  "gen_ai.request.id": req.request_id,
                                  "gen_ai.request.model": model,
                                  "gen_ai.request.temperature": p.temperature,
                                  "gen_ai.request.top_p": p.top_p,
                                  "gen_ai.request.max_tokens": p.max_tokens or 0,
                              })


def on_first_token(span: trace.Span, metrics: RequestMetrics) -> None:
    span.add_event("first_token", timestamp=_ns(metrics.first_token_time))


def on_preempted(span: trace.Span, req: Request, when: float) -> None:
    span.add_event("preempted", {"engine.num_preemptions": req.metrics.num_preemptions}, timestamp=_ns(when))


def end_request_span(span: trace.Span, seqs: list[Request]) -> None:
    """Ends the span of a request (its n sequences) with its totals and latencies."""
    req = seqs[0]
    m = req.metrics
    attrs = {
        "gen_ai.usage.prompt_tokens": req.num_prompt_tokens,
        "gen_ai.usage.completion_tokens": sum(s.num_output_tokens for s in seqs),
        "gen_ai.response.finish_reasons": [s.finish_reason or "unknown" for s in seqs],
        "engine.num_cached_tokens": m.num_cached_tokens,
        "engine.num_preemptions": m.num_preemptions,
    }
    if m.time_in_queue is not None:
        attrs["gen_ai.latency.time_in_queue"] = m.time_in_queue
    if m.time_to_first_token is not None:
        attrs["gen_ai.latency.time_to_first_token"] = m.time_to_first_token
    if m.e2e_latency is not None:
        attrs["gen_ai.latency.e2e"] = m.e2e_latency
    if m.batch_size_at_first_schedule is not None:
        attrs["engine.batch_size_at_first_schedule"] = m.batch_size_at_first_schedule
    span.set_attributes(attrs)
    error = next((s.error for s in seqs if s.error), None)
    if error:
        span.set_status(trace.Status(trace.StatusCode.ERROR, error))
    span.end(end_time=_ns(m.finished_time) if m.finished_time else None)
