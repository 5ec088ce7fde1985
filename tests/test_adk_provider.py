"""The engine behind ADK: concurrent Runner.run_async sessions land in one shared batch."""
import asyncio

import pytest
from google.adk.agents import LlmAgent
from google.adk.agents.run_config import RunConfig, StreamingMode
from google.adk.models.lite_llm import LiteLlm
from google.adk.runners import InMemoryRunner
from google.genai import types

import adk_backend
from adk_backend import EngineLlm, configure_engine, engine_for

ALIAS = "smollm2-fp32"  # the default model in fp32, so batched and one-by-one greedy runs agree exactly
TOPICS = ["the moon", "bread", "rivers", "owls", "chess", "volcanoes", "tea", "bicycles", "glaciers", "music",
          "bees", "libraries", "deserts", "trains", "coral", "maps", "clocks", "salt", "kites", "forests",
          "comets", "paper", "bridges", "whales", "honey", "islands", "storms", "lighthouses", "mushrooms",
          "rainbows", "pianos", "snow"]
CONFIG = types.GenerateContentConfig(max_output_tokens=12)


@pytest.fixture(scope="module", autouse=True)
def fp32_engine():
    configure_engine(ALIAS, model="smollm2-135m-instruct", dtype="float32", max_num_seqs=64, num_kv_blocks=2048)
    yield engine_for(ALIAS)


def make_runner(model) -> InMemoryRunner:
    agent = LlmAgent(name="assistant", model=model, instruction="Answer in one short sentence.",
                     generate_content_config=CONFIG)
    return InMemoryRunner(agent=agent, app_name="t")


async def run_session(runner, text, run_config=None):
    session = await runner.session_service.create_session(app_name="t", user_id="u")
    events = []
    async for ev in runner.run_async(user_id="u", session_id=session.id,
                                     new_message=types.Content(role="user", parts=[types.Part(text=text)]),
                                     run_config=run_config or RunConfig(streaming_mode=StreamingMode.SSE,
                                                                        max_llm_calls=5)):
        events.append(ev)
    return events


def final_text(events) -> str:
    finals = [e for e in events if not e.partial and e.content and e.content.parts]
    assert len(finals) == 1, [e.model_dump(exclude_none=True) for e in finals]
    return "".join(p.text or "" for p in finals[0].content.parts)


@pytest.mark.parametrize("path", ["native", "litellm"])
def test_32_concurrent_sse_sessions_share_one_batch_and_equal_one_by_one_runs(path):
    model = f"engine/{ALIAS}" if path == "native" else LiteLlm(model=f"engine/{ALIAS}")
    runner = make_runner(model)
    engine = engine_for(ALIAS)
    questions = [f"Tell me one fact about {t}." for t in TOPICS]
    steps_before = engine.engine.step_count

    async def together():
        return await asyncio.gather(*(run_session(runner, q) for q in questions))

    concurrent = asyncio.run(together())
    batch_sizes = [s.batch_size for s in engine.engine.step_history if s.step > steps_before]
    assert max(batch_sizes) >= 24, "the sessions did not share one batch"
    for events in concurrent:
        assert any(e.partial for e in events), "no partial (streamed) events"
        final = [e for e in events if not e.partial]
        assert final and final[-1].usage_metadata.candidates_token_count > 0

    async def one_by_one():
        return [await run_session(runner, q) for q in questions[:12]]

    sequential = asyncio.run(one_by_one())
    assert [final_text(e) for e in sequential] == [final_text(e) for e in concurrent[:12]]
    assert all(final_text(e) for e in concurrent)


def test_streamed_final_response_equals_non_streamed_response():
    model = EngineLlm(model=f"engine/{ALIAS}")
    from google.adk.models.llm_request import LlmRequest
    req = LlmRequest(contents=[types.Content(role="user", parts=[types.Part(text="Name three colors.")])],
                     config=types.GenerateContentConfig(max_output_tokens=20, system_instruction="Be brief."))

    async def collect(stream):
        return [r async for r in model.generate_content_async(req, stream=stream)]

    streamed, plain = asyncio.run(collect(True)), asyncio.run(collect(False))
    assert len(plain) == 1 and not plain[0].partial
    assert all(r.partial for r in streamed[:-1]) and len(streamed) > 2
    assert streamed[-1].content == plain[0].content
    assert streamed[-1].usage_metadata.prompt_token_count == plain[0].usage_metadata.prompt_token_count
    assert "".join(r.content.parts[0].text for r in streamed[:-1]) == plain[0].content.parts[0].text


def test_model_name_resolves_through_adk_registry_to_one_shared_engine():
    from google.adk.models.registry import LLMRegistry
    assert LLMRegistry.resolve(f"engine/{ALIAS}") is EngineLlm
    a, b = LLMRegistry.new_llm(f"engine/{ALIAS}"), LLMRegistry.new_llm(f"engine/{ALIAS}")
    assert a is not b
    assert adk_backend.engine_for(a.model) is adk_backend.engine_for(b.model)

    seen = []

    def other_loop():
        async def main():
            seen.append(engine_for(f"engine/{ALIAS}"))
        asyncio.run(main())

    import threading
    t = threading.Thread(target=other_loop)
    t.start()
    t.join()
    assert seen == [engine_for(ALIAS)]


def test_prompt_over_max_model_len_comes_back_as_an_error_response():
    model = EngineLlm(model=f"engine/{ALIAS}")
    from google.adk.models.llm_request import LlmRequest
    req = LlmRequest(contents=[types.Content(role="user", parts=[types.Part(text="word " * 9000)])])

    async def collect():
        return [r async for r in model.generate_content_async(req)]

    out = asyncio.run(collect())
    assert len(out) == 1 and out[0].error_code == "INVALID_ARGUMENT"
    assert "max_model_len" in out[0].error_message
    bad = LlmRequest(contents=[types.Content(role="user", parts=[types.Part(text="hi")])],
                     config=types.GenerateContentConfig(temperature=-1))
    out = asyncio.run((lambda: _collect(model, bad))())
    assert out[0].error_code == "INVALID_ARGUMENT" and "temperature" in out[0].error_message


async def _collect(model, req):
    return [r async for r in model.generate_content_async(req)]


def test_unknown_engine_model_is_an_error_response():
    model = EngineLlm(model="engine/no-such-model")
    from google.adk.models.llm_request import LlmRequest
    req = LlmRequest(contents=[types.Content(role="user", parts=[types.Part(text="hi")])])
    out = asyncio.run(_collect(model, req))
    assert out[0].error_code == "INVALID_ARGUMENT" and "unknown model 'no-such-model'" in out[0].error_message


def test_cancelled_adk_run_aborts_its_engine_request():
    runner = make_runner(f"engine/{ALIAS}")
    long_config = RunConfig(streaming_mode=StreamingMode.SSE)
    engine = engine_for(ALIAS)

    async def main():
        session = await runner.session_service.create_session(app_name="t", user_id="u")
        runner.agent.generate_content_config = types.GenerateContentConfig(max_output_tokens=400)
        agen = runner.run_async(user_id="u", session_id=session.id, run_config=long_config,
                                new_message=types.Content(role="user", parts=[types.Part(text="Write a long story.")]))
        task = asyncio.create_task(agen.__anext__())
        await task  # first partial event: the request is running
        assert engine.stats()["num_running"] == 1
        await agen.aclose()

    try:
        asyncio.run(main())
    finally:
        runner.agent.generate_content_config = CONFIG
    import time
    deadline = time.time() + 5
    while engine.stats()["num_running"] and time.time() < deadline:
        time.sleep(0.01)
    stats = engine.stats()
    assert stats["num_running"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
