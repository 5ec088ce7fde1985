"""Preemption under memory pressure: swap to CPU memory or recompute, outputs unchanged."""
import asyncio

import pytest

from engine import LLM, AsyncLLM, EngineConfig, SamplingParams
from helpers import assert_all_blocks_free

BASE = dict(model="dummy-tiny", dtype="float32", max_model_len=128, max_num_batched_tokens=256, max_num_seqs=256)


def prompts(n):
    return [[3 + (i * 13 + j) % 400 for j in range(10 + i % 30)] for i in range(n)]


def params(i):
    return SamplingParams(temperature=0, max_tokens=10 + i % 25, ignore_eos=True)


@pytest.fixture(scope="module")
def unconstrained():
    llm = LLM(**BASE, num_kv_blocks=2048)
    return [o.outputs[0].token_ids for o in llm.generate(prompts(200), [params(i) for i in range(200)])]


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_200_concurrent_requests_with_kv_for_a_tenth_of_them(mode, unconstrained):
    # Each request needs 2-5 blocks of 16 tokens, about 650 in all: give the pool 64.
    engine = AsyncLLM(EngineConfig(**BASE, num_kv_blocks=64, preemption_mode=mode, swap_space=256 * 2 * 2 * 16 * 2 * 16 * 4))

    async def run(i, p):
        ids = []
        async for out in engine.generate(p, params(i), request_id=f"r{i}"):
            ids += out.outputs[0].token_ids
            last = out
        return ids, last.metrics.num_preemptions

    async def main():
        return await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts(200))))

    try:
        results = asyncio.run(main())
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert [ids for ids, _ in results] == unconstrained
    assert stats["num_preemptions"] > 0
    assert sum(n for _, n in results) == stats["num_preemptions"]
    if mode == "swap":
        swap = engine.engine.scheduler.swap_space
        assert swap.num_swap_outs > 0 and swap.num_swap_ins == swap.num_swap_outs
        assert swap.num_swapped == 0 and len(swap.free_cpu_blocks) == swap.num_cpu_blocks
    assert_all_blocks_free(engine.engine)


def test_swap_falls_back_to_recompute_when_the_cpu_pool_is_full(unconstrained):
    engine = LLM(**BASE, num_kv_blocks=64, preemption_mode="swap", swap_space=1)  # no CPU block fits
    outs = engine.generate(prompts(60), [params(i) for i in range(60)])
    assert [o.outputs[0].token_ids for o in outs] == unconstrained[:60]
    assert engine.engine.scheduler.swap_space.num_swap_outs == 0
    assert engine.stats()["num_preemptions"] > 0
    assert_all_blocks_free(engine.engine)


def test_lowest_priority_request_is_preempted_first():
    engine = LLM(**BASE, num_kv_blocks=8)
    eng = engine.engine
    vip = eng.add_request(list(range(3, 40)), SamplingParams(temperature=0, max_tokens=60, ignore_eos=True), priority=0)
    low = eng.add_request(list(range(50, 87)), SamplingParams(temperature=0, max_tokens=60, ignore_eos=True), priority=5)
    while eng.has_unfinished():
        eng.step()
    assert low.metrics.num_preemptions > 0 and vip.metrics.num_preemptions == 0
