"""Per-request spans reach Cloud Trace with their latency attributes and the right parent.

A gRPC server on 127.0.0.1 plays Cloud Trace v2 (BatchWriteSpans); the real
CloudTraceSpanExporter talks to it through an insecure channel.
"""
import asyncio

import grpc
import pytest
from google.adk.agents import LlmAgent
from google.adk.agents.run_config import RunConfig, StreamingMode
from google.adk.runners import InMemoryRunner
from google.cloud.trace_v2 import TraceServiceClient
from google.cloud.trace_v2.services.trace_service.transports import TraceServiceGrpcTransport
from google.genai import types
from opentelemetry import trace
from opentelemetry.exporter.cloud_trace import CloudTraceSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from adk_backend import configure_engine
from fake_google_cloud import FakeCloudTrace


@pytest.fixture(scope="module")
def cloud_trace():
    fake = FakeCloudTrace()
    transport = TraceServiceGrpcTransport(channel=grpc.insecure_channel(f"127.0.0.1:{fake.port}"))
    exporter = CloudTraceSpanExporter(project_id="test-project", client=TraceServiceClient(transport=transport))
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # the global provider ADK and the engine both use
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    configure_engine("smollm2-traced", model="smollm2-135m-instruct", num_kv_blocks=1024)
    yield fake
    # Take the exporter off the global provider before its server goes: later tests' spans
    # would otherwise block on retries to a server that is gone.
    active = provider._active_span_processor
    active._span_processors = tuple(p for p in active._span_processors if p is not processor)
    fake.close()


def attr(span, key):
    v = span.attributes.attribute_map.get(key)
    if v is None:
        return None
    return v.int_value if v.int_value else (float(v.string_value.value) if v.string_value.value else v.bool_value)


def test_each_adk_request_span_arrives_with_latency_attributes_under_its_generate_content_span(cloud_trace):
    agent = LlmAgent(name="traced", model="engine/smollm2-traced", instruction="Answer briefly.",
                     generate_content_config=types.GenerateContentConfig(max_output_tokens=8))
    runner = InMemoryRunner(agent=agent, app_name="t")

    async def one(i):
        s = await runner.session_service.create_session(app_name="t", user_id=f"u{i}")
        async for _ in runner.run_async(user_id=f"u{i}", session_id=s.id, run_config=RunConfig(
                streaming_mode=StreamingMode.SSE),
                new_message=types.Content(role="user", parts=[types.Part(text=f"Say the number {i}.")])):
            pass

    async def main():
        await asyncio.gather(*(one(i) for i in range(6)))

    asyncio.run(main())
    spans = list(cloud_trace.spans)
    by_id = {s.span_id: s for s in spans}
    requests = [s for s in spans if s.display_name.value == "llm_request"]
    assert len(requests) == 6
    trace_ids = set()
    for span in requests:
        parent = by_id.get(span.parent_span_id)
        assert parent is not None and parent.display_name.value.startswith("generate_content")
        trace_id = span.name.split("/")[3]
        assert parent.name.split("/")[3] == trace_id  # same trace as its parent
        trace_ids.add(trace_id)
        keys = span.attributes.attribute_map
        for key in ("gen_ai.latency.time_in_queue", "gen_ai.latency.time_to_first_token", "gen_ai.latency.e2e",
                    "gen_ai.usage.prompt_tokens", "gen_ai.usage.completion_tokens", "gen_ai.request.id",
                    "engine.num_cached_tokens", "engine.num_preemptions", "engine.batch_size_at_first_schedule"):
            assert key in keys, key
        assert any(e.annotation.description.value == "first_token" for e in span.time_events.time_event)
    assert len(trace_ids) == 6  # concurrent sessions never crossed traces
