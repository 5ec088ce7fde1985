"""n > 1: one prompt, n sequences sharing its KV blocks by reference count, copy-on-write
of the partial last block. Seeded sibling i draws from seed + i, so each must equal the
same request run alone with that seed: any sharing or copying mistake changes tokens."""
from __future__ import annotations

import asyncio

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.async_llm import AsyncLLM
from helpers import assert_all_blocks_free

PROMPT = list(range(100, 137))  # 37 tokens: two full blocks of 16 and a partial one


def tiny(**overrides) -> LLMEngine:
    cfg = dict(model="dummy-tiny", dtype="float32", num_kv_blocks=128, max_model_len=256)
    return LLMEngine(EngineConfig(**cfg | overrides))


def params(n: int, seed: int, max_tokens: int = 20) -> SamplingParams:
    return SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=max_tokens, ignore_eos=True)


def solo(seed: int, max_tokens: int = 20) -> list[int]:
    eng = tiny()
    eng.add_request(PROMPT, params(1, seed, max_tokens))
    while eng.has_unfinished():
        outs = eng.step().outputs
    return outs[0].outputs[0].token_ids


@pytest.fixture(scope="module")
def solos() -> list[list[int]]:
    return [solo(7 + i) for i in range(4)]


def test_n_sequences_share_the_prompts_full_blocks_and_copy_only_the_partial_one():
    eng = tiny()
    first = eng.add_request(PROMPT, params(4, 7))
    sibs = list(first.forks)
    eng.step()  # the whole prompt, then four first tokens from its last row
    seqs = [first, *sibs]
    shared = first.block_ids[:2]
    assert all(s.block_ids[:2] == shared for s in seqs)
    assert [eng.kv.pool.blocks[b].ref_count for b in shared] == [4, 4]
    partials = [s.block_ids[2] for s in seqs]
    assert len(set(partials)) == 4 and all(eng.kv.pool.blocks[b].ref_count == 1 for b in partials)
    assert eng.kv.num_free_blocks == 128 - 2 - 4
    # The copies hold the prompt's last 5 tokens' K/V, slot for slot.
    kv = eng.runner.kv_buffer
    for b in partials[1:]:
        assert kv[:, b, :5].equal(kv[:, partials[0], :5])


def test_each_sibling_equals_its_seed_run_alone(solos):
    eng = tiny()
    eng.add_request(PROMPT, params(4, 7))
    while eng.has_unfinished():
        outs = eng.step().outputs
    (out,) = outs
    assert out.finished and [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert [c.token_ids for c in out.outputs] == solos
    assert len({tuple(t) for t in solos}) == 4  # they really differ
    assert_all_blocks_free(eng)


def test_siblings_survive_preemption_and_a_pool_too_small_to_fork_at_once(solos):
    # 8 blocks: a 60-token filler holds 4 and the prompt 3, so only one sibling gets its
    # copy of the partial block at once; the others wait and recompute their prompt, and
    # growing sequences preempt one another.
    eng = tiny(num_kv_blocks=8, max_model_len=128)
    eng.add_request(list(range(300, 360)), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    first = eng.add_request(PROMPT, params(4, 7))
    sibs = list(first.forks)
    eng.step()
    waiting = [s for s in sibs if s in eng.scheduler.waiting]
    assert waiting and all(not s.block_ids for s in waiting)
    preempted, out = 0, None
    while eng.has_unfinished():
        step = eng.step()
        preempted += len(step.preempted)
        out = next((o for o in step.outputs if o.request_id == first.request_id and o.finished), out)
    assert preempted > 0
    assert [c.token_ids for c in out.outputs] == solos
    assert_all_blocks_free(eng)


def test_aborting_a_parallel_request_frees_every_sequences_blocks():
    eng = tiny()
    eng.add_request(PROMPT, params(3, 1, max_tokens=50), request_id="r")
    for _ in range(4):
        eng.step()
    out = eng.abort("r")
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort"] * 3
    assert not eng.has_unfinished()
    assert_all_blocks_free(eng)


def test_async_stream_of_a_parallel_request_carries_each_sequence_by_index(solos):
    engine = AsyncLLM(EngineConfig(model="dummy-tiny", dtype="float32", num_kv_blocks=128, max_model_len=256))

    async def main():
        tokens: dict[int, list[int]] = {}
        finished = set()
        async for out in engine.generate(PROMPT, params(4, 7)):
            for c in out.outputs:
                tokens.setdefault(c.index, []).extend(c.token_ids)
                if c.finish_reason:
                    finished.add(c.index)
        return tokens, finished, out

    try:
        tokens, finished, last = asyncio.run(main())
    finally:
        engine.shutdown()
    assert last.finished and finished == {0, 1, 2, 3}
    assert [tokens[i] for i in range(4)] == solos
