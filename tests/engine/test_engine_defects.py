"""Defects found in review (#14), each reproduced first: a caller's mistake fails only that
caller, shutdown ends open streams, stop strings wait for min_tokens, and what cannot be
served is refused up front."""
import asyncio
import time

import pytest

from engine import LLM, AsyncLLM, EngineConfig, SamplingParams
from engine.async_llm import EngineDeadError
from helpers import assert_all_blocks_free

CFG = dict(model="dummy-tiny", dtype="float32", num_kv_blocks=256, max_model_len=256)
LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


def test_reusing_a_request_id_right_after_abort_serves_both_and_keeps_the_engine_alive():
    engine = AsyncLLM(EngineConfig(**CFG))

    async def main():
        first = engine.generate([5, 6, 7], LONG, request_id="same")
        await first.__anext__()
        assert engine.abort("same")
        second = [o async for o in engine.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=4,
                                                                             ignore_eos=True), request_id="same")]
        rest = [o async for o in first]
        return second, rest

    try:
        second, rest = asyncio.run(main())
        assert rest[-1].outputs[0].finish_reason == "abort"
        assert second[-1].finished and second[-1].outputs[0].finish_reason == "length"
        assert sum(len(o.outputs[0].token_ids) for o in second) == 4
        assert all(o.request_id == "same" for o in second + rest)  # callers see their own ids
        assert engine.is_healthy()
        time.sleep(0.1)
        assert_all_blocks_free(engine.engine)
    finally:
        engine.shutdown()


def test_reusing_an_id_still_in_the_inbox_fails_only_the_duplicate():
    engine = AsyncLLM(EngineConfig(**CFG))

    async def main():
        a = asyncio.ensure_future(_drain(engine.generate([5, 6], LONG, request_id="dup")))
        await asyncio.sleep(0)
        with pytest.raises(ValueError, match="already in use"):
            await _drain(engine.generate([5, 6], LONG, request_id="dup"))
        engine.abort("dup")
        return await a

    try:
        outs = asyncio.run(main())
        assert outs[-1].outputs[0].finish_reason == "abort" and engine.is_healthy()
    finally:
        engine.shutdown()


async def _drain(agen):
    return [o async for o in agen]


def test_shutdown_ends_every_open_stream_with_a_clear_error():
    engine = AsyncLLM(EngineConfig(**CFG))

    async def main():
        streams = [asyncio.ensure_future(_drain(engine.generate([5 + i, 6], LONG))) for i in range(3)]
        while engine.stats()["generation_tokens_total"] < 3:
            await asyncio.sleep(0.005)
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        start = time.time()
        results = await asyncio.wait_for(asyncio.gather(*streams, return_exceptions=True), 2.0)
        return results, time.time() - start

    results, waited = asyncio.run(main())
    assert waited < 1.0
    assert all(isinstance(r, EngineDeadError) and "shut down" in str(r) for r in results)
    with pytest.raises(EngineDeadError, match="shut down"):
        asyncio.run(_drain(engine.generate([5], LONG)))


def test_stop_strings_count_only_once_min_tokens_is_reached():
    llm = LLM(**CFG)
    free = llm.generate([[9, 10, 11]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    early = free.text[2:6]  # a string that occurs within the first few tokens
    assert early and free.text.find(early) < len(llm.tokenizer.decode(free.token_ids[:10]))
    held = llm.generate([[9, 10, 11]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                      min_tokens=25, stop=[early]))[0].outputs[0]
    # nothing is cut out of the middle: the text is the free run's, up to where a stop counted
    assert free.text.startswith(held.text) and len(held.token_ids) >= 25
    if held.finish_reason == "stop":
        assert held.text + early in free.text
    else:
        assert held.text == free.text


def test_float16_on_cpu_is_refused_at_config_time():
    with pytest.raises(ValueError, match="float16.*CPU"):
        EngineConfig(model="dummy-tiny", dtype="float16", device="cpu")


def test_a_reader_that_stays_connected_but_stops_reading_is_aborted_and_costs_one_pending_item():
    engine = AsyncLLM(EngineConfig(**CFG, stalled_stream_timeout=0.05))

    async def main():
        agen = engine.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=250, ignore_eos=True))
        first = await agen.__anext__()
        await asyncio.sleep(1.5)  # connected, not reading: the engine keeps stepping meanwhile
        rest = [o async for o in agen]
        return first, rest

    try:
        first, rest = asyncio.run(main())
        assert len(rest) == 1  # every delta since, merged into the one pending output
        last = rest[0]
        assert last.finished and last.outputs[0].finish_reason == "abort"
        assert 1 <= len(first.outputs[0].token_ids) + len(last.outputs[0].token_ids) < 250
        assert engine.is_healthy()
        assert_all_blocks_free(engine.engine)
    finally:
        engine.shutdown()


def test_slow_readers_get_every_token_in_merged_deltas():
    engine = AsyncLLM(EngineConfig(**CFG))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    offline = LLM(**CFG).generate([[5, 6, 7]], params)[0].outputs[0]

    async def main():
        ids, text, n = [], "", 0
        async for out in engine.generate([5, 6, 7], params):
            ids += out.outputs[0].token_ids
            text += out.outputs[0].text
            n += 1
            await asyncio.sleep(0.02)
        return ids, text, n

    try:
        ids, text, n = asyncio.run(main())
    finally:
        engine.shutdown()
    assert ids == offline.token_ids and text == offline.text and n < 40


def test_an_aborted_chat_reports_finish_reason_abort_not_stop():
    from adk_backend.chat import ChatChoice
    from adk_backend.chat_format import ParsedReply
    from adk_backend.openai_format import finish_reason
    result = ChatChoice(0, ParsedReply(text="partial", tool_calls=[]), "abort", 2)
    assert finish_reason(result) == "abort"


def test_a_shut_down_async_engine_is_collected_with_its_kv_cache():
    """Nothing process-wide (metrics gauges, tracing) keeps a shut-down engine alive: a
    benchmark that starts an engine per point must not pile up KV caches."""
    import gc
    import weakref
    engine = AsyncLLM(EngineConfig(model="dummy-tiny", dtype="float32", num_kv_blocks=64, max_model_len=256))

    async def one():
        async for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=2)):
            pass
    asyncio.run(one())
    engine.shutdown()
    ref = weakref.ref(engine)
    del engine
    gc.collect()
    assert ref() is None


def test_gauges_drop_to_zero_when_the_last_running_request_is_aborted():
    """An abort with nothing else running is followed by no step: the metrics listener must
    still see the engine without that request (found by the soak: running_at_end == 1)."""
    from prometheus_client import generate_latest

    from adk_backend.metrics import EngineMetrics
    engine = AsyncLLM(EngineConfig(model="dummy-tiny", dtype="float32", num_kv_blocks=256, max_model_len=2048))
    metrics = EngineMetrics()
    metrics.attach("m", engine)

    async def main():
        async for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=1500, ignore_eos=True), request_id="r"):
            engine.abort("r")  # after its first output: it is running
    try:
        asyncio.run(main())
        time.sleep(0.2)
        text = generate_latest(metrics.registry).decode()
    finally:
        engine.shutdown()
    assert 'vllm:num_requests_running{model_name="m"} 0.0' in text
    assert 'vllm:kv_cache_usage_perc{model_name="m"} 0.0' in text
