"""Automatic prefix caching: shared prefixes are computed once, outputs do not change."""

from engine import LLM, EngineConfig, LLMEngine, SamplingParams
from helpers import assert_all_blocks_free

TINY = dict(model="dummy-tiny", dtype="float32", num_kv_blocks=256, max_model_len=1024)


def run_one(engine: LLMEngine, prompt, params):
    req = engine.add_request(prompt, params)
    while not req.is_finished:
        engine.step()
    return req


def test_prefix_caching_on_and_off_give_identical_outputs():
    shared = [3 + i % 300 for i in range(100)]
    prompts = [shared + [400 + i, 401 + i, 402] for i in range(12)] + [shared[:40]]
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    on = LLM(**TINY, enable_prefix_caching=True)
    off = LLM(**TINY, enable_prefix_caching=False)
    outs_on = [o.outputs[0].token_ids for o in on.generate(prompts, p)]
    # a second round, served from the cache
    outs_on2 = [o.outputs[0].token_ids for o in on.generate(prompts, p)]
    outs_off = [o.outputs[0].token_ids for o in off.generate(prompts, p)]
    assert outs_on == outs_off == outs_on2
    assert on.stats()["prefix_cache_hits"] > 0 and off.stats()["prefix_cache_hits"] == 0
    assert_all_blocks_free(on.engine)


def test_second_request_with_a_512_token_prefix_reuses_it_and_its_first_token_comes_sooner():
    # The default model's shape (random weights): prefill costs what it costs for SmolLM2 on a
    # CPU. (On a GPU a 512-token prefill of a 135M model is bound by kernel launches, not by
    # the tokens: the cache saves little time there.)
    engine = LLMEngine(EngineConfig(model="dummy-smollm2-135m", num_kv_blocks=512, max_model_len=2048, device="cpu"))
    prefix = [3 + (i * 31) % 40000 for i in range(512)]
    params = SamplingParams(temperature=0, max_tokens=1)
    run_one(engine, [7, 8, 9], params)  # warm-up
    first = run_one(engine, prefix + [11, 12, 13, 14], params)
    second = run_one(engine, prefix + [21, 22, 23, 24, 25], params)
    assert first.metrics.num_cached_tokens == 0
    assert second.metrics.num_cached_tokens >= 480
    assert second.metrics.num_cached_tokens == 512  # 32 full blocks
    ttft1, ttft2 = first.metrics.time_to_first_token, second.metrics.time_to_first_token
    print(f"TTFT without cache {ttft1 * 1e3:.1f} ms, with cache {ttft2 * 1e3:.1f} ms, ratio {ttft2 / ttft1:.2f}")
    assert ttft2 < 0.5 * ttft1


def test_second_turn_of_a_conversation_computes_only_its_new_tokens():
    engine = LLMEngine(EngineConfig(**TINY))
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    system_and_tools = [3 + i % 200 for i in range(150)]
    turn1 = run_one(engine, system_and_tools + [300, 301, 302], params)
    new_message = [310, 311, 312, 313, 314, 315]
    turn2_prompt = turn1.all_token_ids + new_message  # what an agent re-sends: everything so far
    turn2 = run_one(engine, turn2_prompt, params)
    computed = turn2.num_prompt_tokens - turn2.metrics.num_cached_tokens
    # Everything up to the last full block of turn 1 (prompt + reply) came from the cache.
    assert computed <= len(new_message) + engine.kv.block_size
    assert turn2.metrics.num_cached_tokens >= (len(turn1.all_token_ids) - 1) // 16 * 16
    # stats() counts the prompt tokens the model ran: turn 1's whole prompt, turn 2's misses
    assert engine.stats()["prefill_tokens_computed_total"] == turn1.num_prompt_tokens + computed


def test_freed_cached_blocks_stay_reusable_until_evicted_lru():
    engine = LLMEngine(EngineConfig(**dict(TINY, num_kv_blocks=70)))
    params = SamplingParams(temperature=0, max_tokens=1)
    a = [3 + i % 100 for i in range(321)]
    run_one(engine, a, params)
    again = run_one(engine, a, params)
    assert again.metrics.num_cached_tokens == 320
    # Fill the pool with other prompts: a's blocks (freed longest ago) are evicted first.
    for k in range(4):
        run_one(engine, [200 + k] + [3 + (i * 7 + k) % 100 for i in range(320)], params)
    evicted = run_one(engine, a, params)
    assert evicted.metrics.num_cached_tokens < 320
    assert_all_blocks_free(engine)


def test_chunked_prefill_of_a_long_prompt_never_stalls_running_decodes():
    engine = LLMEngine(EngineConfig(**dict(TINY, max_model_len=4096, num_kv_blocks=512, max_num_batched_tokens=256)))
    p = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    decoders = [engine.add_request([5 + i, 6, 7], p) for i in range(4)]
    for _ in range(3):
        engine.step()
    long = engine.add_request([3 + i % 400 for i in range(2000)], SamplingParams(temperature=0, max_tokens=2))
    steps = []
    while long.num_computed_tokens < long.num_prompt_tokens:
        engine.step()
        steps.append(engine.step_history[-1])
    assert len(steps) >= 2000 // 256  # the prompt was split across steps
    for s in steps:
        assert s.num_decodes == len(decoders)  # every running decode advanced in every step
        assert all(s.scheduled[d.request_id] == 1 for d in decoders)
