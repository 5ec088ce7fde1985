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
    assert all(len(r[0]) == 3 for r in results[30:])
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
llm = AsyncLLM(model="dummy-tiny", dtype="float32", num_kv_blocks=16, max_model_len=64)
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
