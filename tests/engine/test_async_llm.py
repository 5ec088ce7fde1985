"""AsyncLLM: many concurrent callers on any event loops share one engine and one batch."""
import asyncio
import threading
import time

import pytest

from engine import LLM, AsyncLLM, EngineConfig, SamplingParams
from engine.async_llm import EngineDeadError, RequestFailedError
from helpers import assert_all_blocks_free, fail_next_forward

CFG = dict(model="dummy-tiny", dtype="float32", num_kv_blocks=256, max_model_len=256, max_num_batched_tokens=128)
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
TINY_FP32 = dict(model="dummy-tiny", dtype="float32", num_kv_blocks=256, max_model_len=256)  # the default budget
LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


def prompt(i: int) -> list[int]:
    return [3 + (i * 7 + j) % 500 for j in range(5 + i % 23)]


@pytest.fixture(scope="module")
def reference():
    llm = LLM(**CFG)
    return [o.outputs[0].token_ids for o in llm.generate([prompt(i) for i in range(64)], PARAMS)]


@pytest.fixture
def engine():
    eng = AsyncLLM(EngineConfig(**CFG))
    yield eng
    eng.shutdown()


async def collect(engine, i, params=PARAMS, stop_after=None):
    text, ids, last = "", [], None
    async for out in engine.generate(prompt(i), params, request_id=f"r{i}"):
        text += out.outputs[0].text
        ids += out.outputs[0].token_ids
        last = out
        if stop_after is not None and len(ids) >= stop_after:
            break
    return ids, text, last


def wait_for(cond, timeout=5.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_concurrent_streams_share_one_batch_and_match_offline_outputs(engine, reference):
    async def main():
        return await asyncio.gather(*(collect(engine, i) for i in range(64)))

    results = asyncio.run(main())
    for i, (ids, text, last) in enumerate(results):
        assert ids == reference[i]
        assert last.finished and last.outputs[0].finish_reason == "length"
        assert last.metrics.first_token_time >= last.metrics.first_scheduled_time >= last.metrics.arrival_time
    stats = engine.stats()
    assert stats["peak_batch_size"] >= 32
    assert_all_blocks_free(engine.engine)


def test_streamed_deltas_add_up_to_the_offline_text():
    llm = LLM(**CFG)
    full = llm.generate([prompt(3)], PARAMS)[0].outputs[0].text
    eng = AsyncLLM(EngineConfig(**CFG))
    try:
        ids, text, last = asyncio.run(collect(eng, 3))
    finally:
        eng.shutdown()
    assert text == full and len(ids) == 12


def test_callers_on_several_event_loops_in_several_threads(engine, reference):
    results = {}

    def worker(k):
        async def main():
            return await asyncio.gather(*(collect(engine, i) for i in range(k * 8, k * 8 + 8)))
        results[k] = asyncio.run(main())

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for k in range(4):
        for j, (ids, _, _) in enumerate(results[k]):
            assert ids == reference[k * 8 + j]
    assert_all_blocks_free(engine.engine)


def test_cancelled_streams_free_their_blocks_and_the_rest_complete(engine, reference):
    long = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)

    async def main():
        tasks = [asyncio.create_task(collect(engine, i, long)) for i in range(30)]
        await asyncio.sleep(0)
        while engine.stats()["generation_tokens_total"] < 60:
            await asyncio.sleep(0.005)
        for t in tasks[::5]:  # 20% of streams, cancelled mid-way
            t.cancel()
        early = [collect(engine, 40 + i, stop_after=3) for i in range(5)]  # consumers that walk away
        return await asyncio.gather(*tasks, *early, return_exceptions=True)

    results = asyncio.run(main())
    offline = LLM(**CFG).generate([prompt(i) for i in range(30)], long)
    for i, r in enumerate(results[:30]):
        if i % 5 == 0:
            assert isinstance(r, asyncio.CancelledError)
        else:
            assert r[0] == offline[i].outputs[0].token_ids
    # a consumer that lags gets the tokens of several steps in one delta: at least the 3 it
    # waited for, and the very tokens the engine gives that prompt
    for i, r in enumerate(results[30:]):
        assert len(r[0]) >= 3 and r[0] == reference[40 + i][:len(r[0])]
    wait_for(lambda: not engine.engine.has_unfinished())
    assert_all_blocks_free(engine.engine)
    assert engine.stats()["num_running"] == 0


def test_abort_ends_the_stream_with_finish_reason_abort(engine):
    async def main():
        agen = engine.generate(prompt(1), SamplingParams(temperature=0, max_tokens=200, ignore_eos=True),
                               request_id="victim")
        first = await agen.__anext__()
        assert engine.abort("victim")
        outs = [first] + [o async for o in agen]
        return outs[-1]

    last = asyncio.run(main())
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert_all_blocks_free(engine.engine)


def test_failed_step_fails_its_requests_and_the_engine_keeps_serving(engine, reference):
    async def main():
        fail_next_forward(engine.engine, RuntimeError("injected fault"))
        failed = await asyncio.gather(*(collect(engine, i) for i in range(3)), return_exceptions=True)
        ok = await collect(engine, 7)
        return failed, ok

    failed, ok = asyncio.run(main())
    # the requests in the failing step fail (the three may reach the engine in different steps)
    assert any(isinstance(f, RequestFailedError) for f in failed)
    for i, f in enumerate(failed):
        assert (isinstance(f, RequestFailedError) and "injected fault" in str(f)) or f[0] == reference[i]
    assert ok[0] == reference[7]
    assert engine.is_healthy()
    assert_all_blocks_free(engine.engine)


def test_dead_step_thread_fails_pending_callers_promptly_and_refuses_new_ones(engine):
    def broken_step():
        raise SystemError("scheduler bug")

    engine.engine.step = broken_step

    async def main():
        start = time.time()
        with pytest.raises(EngineDeadError, match="scheduler bug"):
            await asyncio.wait_for(collect(engine, 1), 1.0)
        return time.time() - start

    assert asyncio.run(main()) < 1.0
    assert not engine.is_healthy()
    with pytest.raises(EngineDeadError):
        asyncio.run(collect(engine, 2))


def test_idle_engine_does_not_step(engine):
    asyncio.run(collect(engine, 1))
    before = engine.engine.step_count
    time.sleep(0.3)
    assert engine.engine.step_count == before


def test_bad_request_is_refused_at_once_and_others_carry_on(engine, reference):
    async def main():
        good = asyncio.create_task(collect(engine, 5))
        with pytest.raises(ValueError, match="max_model_len"):
            async for _ in engine.generate(list(range(3, 300)), PARAMS):
                pass
        return await good

    assert asyncio.run(main())[0] == reference[5]


_OPENMP_PROBE = """
import os, time, torch
from engine import AsyncLLM
from engine.platform import current_platform
ops = current_platform("cpu").ops
torch.set_num_threads(2)
tasks = lambda: len(os.listdir('/proc/self/task'))

def ended_by_release(before):  # a thread's exit is asynchronous: wait for it, on a busy machine too
    ops.release_openmp_pool()
    deadline = time.time() + 2
    while tasks() >= before and time.time() < deadline:
        time.sleep(0.01)
    return before - tasks()

torch.ones(1 << 24).sum()  # a parallel region on this thread: libgomp starts its pool
released = ended_by_release(tasks())
torch.ones(1 << 24).sum()  # and again
llm = AsyncLLM(model="dummy-tiny", dtype="float32", num_kv_blocks=16, max_model_len=64, device="cpu")
time.sleep(0.2)
print(released, ended_by_release(tasks()))
llm.shutdown()
"""


def test_the_callers_openmp_workers_are_ended_so_the_step_thread_keeps_spinning_workers():
    """libgomp keeps a worker pool per thread that opened a parallel region and, once the
    process has more OpenMP threads than CPUs, stops every pool spin-waiting: a model
    loaded on the caller's thread then made each kernel on the step thread wait on a
    futex (measured on two cores: decode steps 1.5-1.9x slower than LLMEngine's)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _OPENMP_PROBE], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    released_by_hand, left_after_init = map(int, out.stdout.split()[-2:])
    assert released_by_hand == 1  # the probe works: the caller's one worker thread ended
    assert left_after_init == 0   # AsyncLLM ended the pool its load started on this thread


# -- a caller's mistake fails only that caller; shutdown, slow and stalled readers -------
def test_reusing_a_request_id_right_after_abort_serves_both_and_keeps_the_engine_alive():
    engine = AsyncLLM(EngineConfig(**TINY_FP32))

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
    engine = AsyncLLM(EngineConfig(**TINY_FP32))

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
    engine = AsyncLLM(EngineConfig(**TINY_FP32))

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


def test_a_reader_that_stays_connected_but_stops_reading_is_aborted_and_costs_one_pending_item():
    engine = AsyncLLM(EngineConfig(**TINY_FP32, stalled_stream_timeout=0.05))

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
    engine = AsyncLLM(EngineConfig(**TINY_FP32))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    offline = LLM(**TINY_FP32).generate([[5, 6, 7]], params)[0].outputs[0]

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


def test_a_call_held_back_by_the_cap_of_programs_in_progress_does_not_spin_the_step_thread():
    """With the cap reached, a new program's call waits and there is nothing to run: the step
    thread waits too (for a release, new work, or a pin's time) instead of stepping
    emptily on a core that the callers' own work needs; the release lets the call in."""
    engine = AsyncLLM(EngineConfig(**TINY_FP32, program_scheduling=True, max_programs_in_progress=1,
                                   program_kv_retention=True))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def main():
        first = [o async for o in engine.generate(list(range(5, 45)), params, program="a")][-1]  # 2 blocks pinned
        held = asyncio.ensure_future(_collect(engine.generate([8, 9, 10], params, program="b")))
        await asyncio.sleep(0.1)  # b's call is taken in, and held back
        steps_before = engine.stats()["num_steps"]
        await asyncio.sleep(0.5)
        idle_steps = engine.stats()["num_steps"] - steps_before
        assert not held.done()
        engine.release_program_kv("a", first.metrics.finished_time)  # a's run ended: b may start
        outputs = await asyncio.wait_for(held, 5)
        return idle_steps, outputs

    try:
        idle_steps, outputs = asyncio.run(main())
        assert idle_steps <= 60, idle_steps  # a step every 10 ms at most while nothing can run
        assert outputs[-1].outputs[0].finish_reason == "length"
    finally:
        engine.shutdown()


async def _collect(stream) -> list:
    return [o async for o in stream]
