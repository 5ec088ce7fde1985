"""The engine behind ADK: concurrent Runner.run_async sessions land in one shared batch."""
import asyncio
import time

import pytest
from google.adk.agents import LlmAgent
from google.adk.agents.run_config import RunConfig, StreamingMode
from google.adk.models.lite_llm import LiteLlm
from google.adk.runners import InMemoryRunner
from google.genai import types

import adk_backend
from adk_backend import EngineLlm, configure_engine, engine_for
from adk_backend.errors import EngineModelError

ALIAS = "smollm2-fp32"  # the default model in fp32, so batched and one-by-one greedy runs agree exactly
TOPICS = ["the moon", "bread", "rivers", "owls", "chess", "volcanoes", "tea", "bicycles", "glaciers", "music",
          "bees", "libraries", "deserts", "trains", "coral", "maps", "clocks", "salt", "kites", "forests",
          "comets", "paper", "bridges", "whales", "honey", "islands", "storms", "lighthouses", "mushrooms",
          "rainbows", "pianos", "snow"]
CONFIG = types.GenerateContentConfig(max_output_tokens=12)


@pytest.fixture(scope="module", autouse=True)
def fp32_engine():
    configure_engine(ALIAS, model="smollm2-135m-instruct", dtype="float32", max_num_seqs=64, num_kv_blocks=2048,
                     program_kv_retention=True)  # KV kept across tool calls for calls of a program (the plugin's)
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


def _request(text: str, **config) -> "LlmRequest":
    from google.adk.models.llm_request import LlmRequest
    return LlmRequest(contents=[types.Content(role="user", parts=[types.Part(text=text)])],
                      config=types.GenerateContentConfig(**config))


async def _collect(model, req):
    return [r async for r in model.generate_content_async(req)]


@pytest.mark.parametrize("model,req,status,says", [
    (f"engine/{ALIAS}", _request("word " * 9000), 400, "max_model_len"),
    (f"engine/{ALIAS}", _request("hi", temperature=-1), 400, "temperature"),
    ("engine/no-such-model", _request("hi"), 400, "unknown model 'no-such-model'"),
    (f"engine/{ALIAS}", _request("hi", logprobs=3), 400, "needs response_logprobs"),
])
def test_a_refusal_is_raised_with_its_status(model, req, status, says):
    with pytest.raises(EngineModelError) as caught:
        asyncio.run(_collect(EngineLlm(model=model), req))
    assert caught.value.code == caught.value.status_code == status and says in caught.value.message


@pytest.fixture(scope="module")
def down_engine():
    configure_engine("down-tiny", model="dummy-tiny", dtype="float32", num_kv_blocks=32, max_model_len=256)
    engine_for("down-tiny").shutdown()
    return "engine/down-tiny"


def test_fallback_model_moves_on_from_an_engine_that_is_down(down_engine):
    from google.adk.models import FallbackModel
    fallback = FallbackModel(models=[EngineLlm(model=down_engine), EngineLlm(model=f"engine/{ALIAS}")])
    text = final_text(asyncio.run(run_session(make_runner(fallback), "Tell me about owls.")))
    assert text and text == final_text(asyncio.run(run_session(make_runner(f"engine/{ALIAS}"), "Tell me about owls.")))


def test_fallback_model_does_not_retry_a_refused_request_elsewhere():
    from google.adk.models import FallbackModel
    fallback = FallbackModel(models=[EngineLlm(model=f"engine/{ALIAS}"), EngineLlm(model=f"engine/{ALIAS}")])
    with pytest.raises(EngineModelError, match="max_model_len"):
        asyncio.run(_collect(fallback, _request("word " * 9000)))


def test_on_model_error_callback_sees_the_error_and_can_answer_instead(down_engine):
    from google.adk.models.llm_response import LlmResponse
    seen = []

    def on_error(callback_context, llm_request, error):
        seen.append(error)
        return LlmResponse(content=types.Content(role="model", parts=[types.Part(text="Try again later.")]))
    agent = LlmAgent(name="assistant", model=down_engine, on_model_error_callback=on_error)
    events = asyncio.run(run_session(InMemoryRunner(agent=agent, app_name="t"), "hi"))
    assert final_text(events) == "Try again later."
    assert isinstance(seen[0], EngineModelError) and seen[0].code == 503 and seen[0].status == "UNAVAILABLE"


@pytest.mark.parametrize("tier,priority", [("priority", -1), ("standard", 0), ("flex", 1), (None, 0)])
def test_adk_service_tiers_reach_the_engine_as_priorities(tier, priority, monkeypatch):
    engine, seen = engine_for(ALIAS), []
    original = engine.generate

    def spy(prompt, params, *args, priority=0, **kwargs):
        seen.append(priority)
        return original(prompt, params, *args, priority=priority, **kwargs)
    monkeypatch.setattr(engine, "generate", spy)
    agent = LlmAgent(name="assistant", model=f"engine/{ALIAS}", generate_content_config=CONFIG)
    runner = InMemoryRunner(agent=agent, app_name="t", plugins=[adk_backend.ServiceTierPlugin()])
    asyncio.run(run_session(runner, "hi", RunConfig(service_tier=tier, max_llm_calls=5)))
    assert seen == [priority]


@pytest.mark.parametrize("part,named", [
    (types.Part(inline_data=types.Blob(mime_type="image/png", data=b"\x89PNG")), "inline_data (image/png)"),
    (types.Part(file_data=types.FileData(mime_type="application/pdf", file_uri="gs://b/f.pdf")),
     "file_data (application/pdf)"),
    (types.Part(executable_code=types.ExecutableCode(code="print(1)", language="PYTHON")), "executable_code"),
])
def test_a_part_the_model_cannot_read_is_refused_by_name_not_dropped(part, named):
    from google.adk.models.llm_request import LlmRequest
    req = LlmRequest(contents=[types.Content(role="user", parts=[types.Part(text="What is this?"), part])])
    with pytest.raises(EngineModelError) as caught:
        asyncio.run(_collect(EngineLlm(model=f"engine/{ALIAS}"), req))
    assert caught.value.code == 400 and f"contents[0].parts[1] is {named}" in caught.value.message


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


def test_response_logprobs_give_each_chosen_token_its_top_candidates_and_their_mean():
    config = types.GenerateContentConfig(max_output_tokens=10, response_logprobs=True, logprobs=3, temperature=0)
    agent = LlmAgent(name="assistant", model=f"engine/{ALIAS}", generate_content_config=config)
    events = asyncio.run(run_session(InMemoryRunner(agent=agent, app_name="t"), "Name a fruit.",
                                     RunConfig(streaming_mode=StreamingMode.NONE)))
    final = [e for e in events if e.content and e.content.parts][-1]
    result = final.logprobs_result
    chosen = result.chosen_candidates
    assert 0 < len(chosen) <= 10 and "".join(c.token for c in chosen) == final_text(events)
    tokenizer = engine_for(ALIAS).tokenizer
    assert tokenizer.decode([c.token_id for c in chosen]) == final_text(events)
    for picked, top in zip(chosen, result.top_candidates, strict=True):
        assert len(top.candidates) == 3
        assert top.candidates[0].token_id == picked.token_id  # greedy: the chosen token is the most likely
        assert top.candidates[0].log_probability == picked.log_probability
        assert [c.log_probability for c in top.candidates] == sorted((c.log_probability for c in top.candidates),
                                                                     reverse=True)
        assert all(c.log_probability <= 0 for c in top.candidates)
    assert final.avg_logprobs == pytest.approx(sum(c.log_probability for c in chosen) / len(chosen))


@pytest.mark.parametrize("plugin", [True, False])
@pytest.mark.parametrize("wrapper", ["native", "litellm"])
def test_every_model_call_of_one_adk_run_carries_that_runs_program(monkeypatch, plugin, wrapper):
    """The plugin names the run (app/session/invocation); without it (a plain Runner) the
    model reads the run from the call (instruction and history up to the run's user
    message): either way, through the native model or LiteLLM, a tool call and the answer
    after it are one program; the next run is another, and so is another session's run."""
    from adk_backend.tool_policy import call_tools_then_answer
    from agents.tools.agent import add_numbers
    engine, seen = engine_for(ALIAS), []
    original = engine.generate

    def spy(prompt, params, *args, program=None, **kwargs):
        seen.append(program)
        return original(prompt, params, *args, program=program, **kwargs)
    monkeypatch.setattr(engine, "generate", spy)
    model = f"engine/{ALIAS}" if wrapper == "native" else LiteLlm(model=f"engine/{ALIAS}")
    agent = LlmAgent(name="calc", model=model, tools=[add_numbers], before_model_callback=call_tools_then_answer,
                     generate_content_config=types.GenerateContentConfig(max_output_tokens=48))
    runner = InMemoryRunner(agent=agent, app_name="t", plugins=[adk_backend.ServiceTierPlugin()] if plugin else [])

    async def runs(texts: tuple[str, ...]):
        session = await runner.session_service.create_session(app_name="t", user_id="u")
        runs = []
        for text in texts:
            runs.append([e async for e in runner.run_async(user_id="u", session_id=session.id, new_message=types.Content(
                role="user", parts=[types.Part(text=text)]))])
        return session, runs
    session, (first_run, second_run) = asyncio.run(runs(("What is 2 plus 3?", "And 4 plus 5?")))
    first, second = ({e.invocation_id for e in events} for events in (first_run, second_run))
    assert len(first) == len(second) == 1
    if plugin:
        assert seen == [f"t/{session.id}/{first.pop()}"] * 2 + [f"t/{session.id}/{second.pop()}"] * 2
    else:
        assert len(seen) == 4 and seen[0] == seen[1] != seen[2] == seen[3] and seen[0].startswith("run/")
        asyncio.run(runs(("What is 7 plus 1?",)))  # another session, another opening
        assert len(seen) == 6 and seen[4] == seen[5] and seen[4] not in seen[:4]


def test_kv_is_kept_across_a_tool_call_and_let_go_after_the_final_answer(monkeypatch):
    """A run's call that ends in a tool call leaves its KV pinned for the run's next call,
    which takes it, its prompt continuing the first call's tokens as the model wrote them, so
    every full block of them is a cache hit; the final answer (no tool call) lets its KV go at
    once instead of holding it for a time-to-live, taking memory from programs still between
    tool calls."""
    from adk_backend import adk_model
    from adk_backend.tool_policy import call_tools_then_answer
    from agents.tools.agent import add_numbers
    from engine import SamplingParams
    engine = engine_for(ALIAS)

    async def round_trip():  # through the step thread: what earlier tests' runs let go is counted by now
        return [o async for o in engine.generate([1, 2, 3], SamplingParams(max_tokens=1))]
    asyncio.run(round_trip())
    before = dict(engine.stats()["kv_pins"])
    calls = []
    record = adk_model.record_agent_call

    def spy(prompt_ids, output_ids, cached, queued, computed):  # each finished call, as the model reports it
        calls.append((list(prompt_ids), list(output_ids), cached, computed))
        return record(prompt_ids, output_ids, cached, queued, computed)
    monkeypatch.setattr(adk_model, "record_agent_call", spy)
    agent = LlmAgent(name="calc", model=f"engine/{ALIAS}", tools=[add_numbers],
                     before_model_callback=call_tools_then_answer,
                     generate_content_config=types.GenerateContentConfig(max_output_tokens=48))
    runner = InMemoryRunner(agent=agent, app_name="t", plugins=[adk_backend.ServiceTierPlugin()])
    events = asyncio.run(run_session(runner, "What is 2 plus 3?", RunConfig(max_llm_calls=4)))
    assert any(e.get_function_calls() for e in events) and events[-1].content.parts[0].text
    (first_prompt, first_output, _, computed), (second_prompt, _, cached, _) = calls
    wrote = first_prompt + first_output
    # every full block the first call computed (a closing jump-forward stretch it appended
    # after its last step, never: the second call computes those)
    assert len(first_prompt) < computed < len(wrote)
    assert second_prompt[:len(wrote)] == wrote and cached >= computed // 16 * 16  # block size 16

    def counted() -> dict:
        return {k: v - before.get(k, 0) for k, v in engine.stats()["kv_pins"].items()}
    deadline = time.monotonic() + 5  # the step thread takes the release in after the answer is out
    while counted().get("released", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert counted() | {"expired": 0, "yielded": 0} == {"made": 2, "taken": 1, "released": 1, "expired": 0,
                                                         "yielded": 0, "swapped_out": 0, "swapped_in": 0}
    stats = engine.stats()
    assert stats["kv_blocks_pinned"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
