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


@pytest.mark.parametrize("plugins", [[], ["ServiceTierPlugin"]], ids=["plain runner", "with ServiceTierPlugin"])
def test_an_agents_invoke_agent_span_carries_what_its_model_calls_cost_in_the_engine(cloud_trace, plugins):
    """A tool call and the answer after it: the agent's own span sums their queue time,
    prompt and cached tokens, and the prompt tokens computed again though the agent had
    computed them before (here only the unfilled last block: the cache is large). A plain
    Runner needs nothing added; the plugin, where a user adds it, counts nothing twice."""
    import adk_backend
    from adk_backend.tool_policy import call_tools_then_answer
    from agents.tools.agent import add_numbers
    name = f"calc_{len(plugins)}"
    agent = LlmAgent(name=name, model="engine/smollm2-traced", tools=[add_numbers],
                     before_model_callback=call_tools_then_answer,
                     generate_content_config=types.GenerateContentConfig(max_output_tokens=48))
    runner = InMemoryRunner(agent=agent, app_name="t", plugins=[getattr(adk_backend, p)() for p in plugins])

    async def run():
        s = await runner.session_service.create_session(app_name="t", user_id="u")
        return [e async for e in runner.run_async(user_id="u", session_id=s.id, new_message=types.Content(
            role="user", parts=[types.Part(text="What is 2 plus 3?")]))]
    events = asyncio.run(run())
    usage = [e.usage_metadata for e in events if e.usage_metadata is not None and not e.partial]
    assert len(usage) == 2 and any(e.get_function_calls() for e in events)
    spans = [s for s in cloud_trace.spans if s.display_name.value == f"invoke_agent {name}"]
    assert len(spans) == 1
    span = spans[0]
    assert attr(span, "engine.agent.model_calls") == 2
    assert attr(span, "engine.agent.prompt_tokens") == sum(u.prompt_token_count for u in usage)
    assert attr(span, "engine.agent.cache_read.input_tokens") == sum(u.cached_content_token_count for u in usage) > 0
    assert 0 <= attr(span, "engine.agent.prefill_recomputed_tokens") < 16  # block_size
    assert attr(span, "engine.agent.time_in_queue") >= 0


def test_each_agent_of_a_workflow_carries_its_own_model_calls_and_the_workflow_none(cloud_trace):
    """Two agents in a SequentialAgent, one run: each `invoke_agent` span sums its own
    calls (a tool call and an answer each), not its sibling's; the workflow's span, which
    called no model, carries no engine totals."""
    from google.adk.agents import SequentialAgent
    from adk_backend.tool_policy import call_tools_then_answer
    from agents.tools.agent import add_numbers

    def worker(name: str) -> LlmAgent:
        return LlmAgent(name=name, model="engine/smollm2-traced", tools=[add_numbers],
                        before_model_callback=call_tools_then_answer,
                        generate_content_config=types.GenerateContentConfig(max_output_tokens=48))
    runner = InMemoryRunner(agent=SequentialAgent(name="pipeline", sub_agents=[worker("first"), worker("second")]),
                            app_name="t")

    async def run():
        s = await runner.session_service.create_session(app_name="t", user_id="u")
        return [e async for e in runner.run_async(user_id="u", session_id=s.id, new_message=types.Content(
            role="user", parts=[types.Part(text="What is 2 plus 3?")]))]
    events = asyncio.run(run())
    by_author = {a: [e.usage_metadata.prompt_token_count for e in events
                     if e.author == a and e.usage_metadata is not None and not e.partial] for a in ("first", "second")}
    assert all(len(v) == 2 for v in by_author.values()), by_author
    spans = {s.display_name.value: s for s in cloud_trace.spans
             if s.display_name.value in ("invoke_agent first", "invoke_agent second", "invoke_agent pipeline")}
    for a in ("first", "second"):
        assert attr(spans[f"invoke_agent {a}"], "engine.agent.model_calls") == 2
        assert attr(spans[f"invoke_agent {a}"], "engine.agent.prompt_tokens") == sum(by_author[a])
    assert sum(by_author["second"]) > sum(by_author["first"])  # the second agent reads the first's turns
    assert attr(spans["invoke_agent pipeline"], "engine.agent.model_calls") is None


def test_agent_totals_count_as_recomputed_only_tokens_computed_before_and_not_served_from_cache():
    from adk_backend.agent_runs import AgentEngineTotals
    totals = AgentEngineTotals()
    totals.add_call([1, 2, 3, 4], [5, 6], cached=0, queued=0.5)  # the first call: nothing was computed before
    totals.add_call([1, 2, 3, 4, 5, 6, 7, 8], [9], cached=2, queued=0.25)  # 1-5 were (6 never fed back); 2 cached
    totals.add_call([1, 2, 9], [], cached=2, queued=None)  # another history: shares 1, 2, both cached
    assert (totals.model_calls, totals.time_in_queue, totals.prompt_tokens, totals.cached_tokens,
            totals.prefill_recomputed) == (3, 0.75, 15, 4, 3)
    # a call that left its last 3 tokens uncomputed (a closing jump-forward stretch): only the
    # computed ones count when the next call computes them
    totals.add_call([1, 2, 3, 4], [5, 6, 7, 8], cached=2, queued=0.0, computed=5)  # 1, 2 cached: none again
    totals.add_call([1, 2, 3, 4, 5, 6, 7, 8, 9], [], cached=4, queued=0.0)
    assert totals.prefill_recomputed == 3 + 1
