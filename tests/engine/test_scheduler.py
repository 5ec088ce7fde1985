"""Iteration-level scheduling: who runs in each step, and where the blocks go."""
import time

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from helpers import assert_all_blocks_free


def tiny_engine(**kw) -> LLMEngine:
    opts = dict(model="dummy-tiny", dtype="float32", num_kv_blocks=64, block_size=16, max_num_batched_tokens=256,
                max_model_len=128)
    opts.update(kw)
    return LLMEngine(EngineConfig(**opts))


def test_early_finisher_frees_blocks_in_its_step_and_waiting_request_joins_next_step():
    engine = tiny_engine(max_num_seqs=2)
    short = engine.add_request(list(range(10, 30)), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    long = engine.add_request(list(range(40, 60)), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    waiter = engine.add_request(list(range(70, 90)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    free_before = engine.kv.num_free_blocks
    finish_step = None
    while finish_step is None:
        engine.step()
        last = engine.step_history[-1]
        assert waiter.request_id not in last.scheduled  # max_num_seqs=2 keeps it waiting
        if short.request_id in last.finished:
            finish_step = last
    # The short request's 2 blocks (20 prompt + 2 computed tokens) are back in this same step.
    assert short.block_ids == []
    assert finish_step.num_free_blocks == free_before - len(long.block_ids)
    engine.step()
    nxt = engine.step_history[-1]
    assert nxt.step == finish_step.step + 1
    assert nxt.scheduled[waiter.request_id] == 20  # its whole prompt, in the very next forward pass
    assert nxt.scheduled[long.request_id] == 1     # alongside the running decode
    while engine.has_unfinished():
        engine.step()
    assert_all_blocks_free(engine)


def test_decodes_get_budget_before_prompt_chunks_and_long_prompt_is_chunked():
    engine = tiny_engine(max_num_batched_tokens=8, num_kv_blocks=64)
    a = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    engine.step()  # a's prompt
    b = engine.add_request(list(range(100, 140)), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    chunks = []
    while b.num_computed_tokens < b.num_prompt_tokens:
        engine.step()
        s = engine.step_history[-1]
        assert s.scheduled[a.request_id] == 1  # the decode never stalls
        chunks.append(s.scheduled[b.request_id])
    assert chunks == [7, 7, 7, 7, 7, 5]  # 8-token budget minus the decode
    while engine.has_unfinished():
        engine.step()
    assert_all_blocks_free(engine)


def test_without_chunked_prefill_a_prompt_waits_for_a_step_with_room():
    engine = tiny_engine(max_num_batched_tokens=1024, enable_chunked_prefill=False, max_model_len=1024)
    engine.config.max_num_batched_tokens = 600  # exactly one prompt per step
    reqs = [engine.add_request(list(range(3 + i, 3 + i + 600)), SamplingParams(temperature=0, max_tokens=2,
                                                                               ignore_eos=True))
            for i in range(2)]
    engine.step()
    assert engine.step_history[-1].scheduled == {reqs[0].request_id: 600}
    engine.step()  # 1 decode + 600 > 512 budget: the second prompt waits whole, not split
    assert engine.step_history[-1].scheduled == {reqs[0].request_id: 1}
    engine.step()  # req 0 finished (2 tokens): the budget is free again
    assert engine.step_history[-1].scheduled == {reqs[1].request_id: 600}


def test_static_policy_holds_the_batch_until_its_longest_member_finishes():
    engine = tiny_engine(max_num_seqs=2, scheduling_policy="static", num_kv_blocks=64)
    short = engine.add_request([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    long = engine.add_request([9, 10, 11], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    late = engine.add_request([12, 13], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    # KV for the batch's full length (longest prompt 4 + longest output 6) is reserved for each member.
    engine.step()
    assert len(short.block_ids) == 1 and len(long.block_ids) == 1
    assert engine.kv.num_free_blocks == 62
    steps, pads = [], []
    while not late.metrics.first_scheduled_time:
        pads.append(engine.scheduler.pad_positions.get(short))
        engine.step()
        steps.append(engine.step_history[-1])
    # The finished short member kept computing a pad token, at a growing position, in every
    # step of the batch ...
    assert all(short.request_id in s.scheduled for s in steps[:-1])
    computed = [p for p in pads if p is not None]  # the pad token's position in each step
    assert computed == list(range(computed[0], 9)) and computed[0] == 5  # past its own 6 tokens, up to the batch's 9
    # ... and both members of the first batch finished in the same step.
    assert sorted(steps[-2].finished) == sorted([short.request_id, long.request_id])
    assert short.num_output_tokens == 2 and long.num_output_tokens == 6
    assert steps[-1].scheduled == {late.request_id: 2}
    while engine.has_unfinished():
        engine.step()
    assert_all_blocks_free(engine)


def test_static_and_continuous_policies_give_identical_greedy_outputs():
    prompts = [[i, i + 1, i + 2] * (1 + i % 5) for i in range(3, 13)]
    params = [SamplingParams(temperature=0, max_tokens=2 + 3 * (i % 4), ignore_eos=True) for i in range(10)]
    outs = {}
    for policy in ("continuous", "static"):
        engine = tiny_engine(max_num_seqs=4, scheduling_policy=policy)
        reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        while engine.has_unfinished():
            engine.step()
        outs[policy] = [r.output_token_ids for r in reqs]
        assert_all_blocks_free(engine)
    assert outs["continuous"] == outs["static"]


def test_recompute_preemption_when_blocks_run_out_keeps_outputs_identical():
    prompts = [list(range(3 + i, 40 + i)) for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref_engine = tiny_engine(num_kv_blocks=256)
    ref = [ref_engine.add_request(p, params) for p in prompts]
    while ref_engine.has_unfinished():
        ref_engine.step()
    engine = tiny_engine(num_kv_blocks=12, max_model_len=96, preemption_mode="recompute")  # room for about 2 of 6
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    assert [r.output_token_ids for r in reqs] == [r.output_token_ids for r in ref]
    assert engine.stats()["num_preemptions"] > 0
    assert sum(r.metrics.num_preemptions for r in reqs) == engine.stats()["num_preemptions"]
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("policy", ["continuous", "static"])
def test_stats_report_batch_sizes(policy):
    engine = tiny_engine(max_num_seqs=3, scheduling_policy=policy)
    for i in range(5):
        engine.add_request([3 + i, 4, 5], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    stats = engine.stats()
    assert stats["peak_batch_size"] == 3
    assert max(stats["batch_size_history"]) == 3
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] == 64


def _admission_order(engine: LLMEngine) -> list[str]:
    reqs = list(engine.scheduler.waiting) + list(engine.scheduler.running)
    while engine.has_unfinished():
        engine.step()
    return [r.request_id for r in sorted(reqs, key=lambda r: r.metrics.first_scheduled_time)]


def test_under_a_full_batch_a_priority_request_is_admitted_before_earlier_default_ones():
    engine = tiny_engine(max_num_seqs=1)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request([5, 6, 7], params, request_id="running")
    engine.step()
    for name in ("default-1", "default-2"):
        engine.add_request([8, 9], params, request_id=name)
    engine.add_request([10, 11], params, request_id="flex", priority=1)
    engine.add_request([12, 13], params, request_id="priority", priority=-1)
    assert _admission_order(engine) == ["running", "priority", "default-1", "default-2", "flex"]
    assert_all_blocks_free(engine)


def test_a_low_priority_request_ages_ahead_of_fresh_ones_and_is_never_starved():
    import time
    from engine.scheduler import PRIORITY_AGING_S
    engine = tiny_engine(max_num_seqs=1)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request([5, 6, 7], params, request_id="running")
    engine.step()
    # waited 3 aging periods: as urgent now as a fresh request two levels above it
    engine.add_request([8, 9], params, request_id="old-flex", priority=1,
                       arrival_time=time.time() - 3 * PRIORITY_AGING_S)
    engine.add_request([10, 11], params, request_id="fresh-default")
    assert _admission_order(engine) == ["running", "old-flex", "fresh-default"]


@pytest.mark.parametrize("program_scheduling", [False, True])
def test_a_short_programs_next_call_is_admitted_before_a_long_programs_that_came_first(program_scheduling):
    """Autellix's PLAS: with program scheduling, a waiting call of the program that has had
    less service (tokens computed) goes first; without, arrival order."""
    engine = tiny_engine(max_num_seqs=1, program_scheduling=program_scheduling, max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request(list(range(10, 110)), SamplingParams(temperature=0, max_tokens=200, ignore_eos=True),
                       program="long")
    while engine.has_unfinished():  # the long program's first call: ~300 tokens of service
        engine.step()
    blocker = engine.add_request(list(range(5, 20)), params)  # holds the only slot
    engine.step()
    long_next = engine.add_request(list(range(200, 220)), params, program="long")
    short_first = engine.add_request(list(range(30, 50)), params, program="short")
    admitted = []
    while engine.has_unfinished():
        engine.step()
        admitted += [rid for rid in engine.step_history[-1].scheduled if rid not in admitted]
    order = [rid for rid in admitted if rid in (long_next.request_id, short_first.request_id)]
    expected = [short_first, long_next] if program_scheduling else [long_next, short_first]
    assert order == [r.request_id for r in expected] and blocker.request_id == admitted[0]
    if program_scheduling:
        service = engine.scheduler.program_service
        assert service["long"][0] == 100 + 200 - 1 + 20 + 4 - 1 and service["short"][0] == 20 + 4 - 1
    else:
        assert engine.scheduler.program_service == {}


@pytest.mark.parametrize("order, first", [(None, "new"), ("least_attained", "new"), ("first_arrived", "old")])
def test_with_the_oldest_program_first_a_started_programs_next_call_goes_before_a_new_program(order, first):
    """program_order="first_arrived": the waiting call of the program that started first
    goes first, though a new program's first call came before it (first come first served
    and least attained service both take the new program's)."""
    engine = tiny_engine(max_num_seqs=1, max_model_len=512, program_scheduling=order is not None,
                         program_order=order or "least_attained")
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request(list(range(10, 110)), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                       program="old")
    while engine.has_unfinished():  # the old program's first call, before its tool call
        engine.step()
    engine.add_request(list(range(5, 20)), params)  # holds the only slot
    engine.step()
    calls = {"new": engine.add_request(list(range(30, 50)), params, program="new"),
             "old": engine.add_request(list(range(200, 220)), params, program="old")}
    admitted = []
    while engine.has_unfinished():
        engine.step()
        admitted += [rid for rid in engine.step_history[-1].scheduled if rid not in admitted]
    order_seen = [rid for rid in admitted if rid in {r.request_id for r in calls.values()}]
    assert order_seen[0] == calls[first].request_id and len(order_seen) == 2


@pytest.mark.parametrize("cap", [None, 1])
def test_a_new_program_waits_while_the_cap_of_programs_in_progress_is_reached(cap):
    """max_programs_in_progress: with one program in progress, another program's first call
    waits though the batch has room; a call of no program does not; the new program starts
    when the first one is no longer in progress (here: its call done, no KV kept)."""
    engine = tiny_engine(max_num_seqs=4, program_scheduling=True, program_kv_retention=False,
                         max_programs_in_progress=cap)
    short = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    first = engine.add_request(list(range(10, 30)), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                               program="a")
    engine.step()
    new = engine.add_request(list(range(40, 60)), short, program="b")
    plain = engine.add_request(list(range(70, 90)), short)
    steps: dict[str, int] = {}
    step = 0
    while engine.has_unfinished():
        step += 1
        engine.step()
        for rid in engine.step_history[-1].scheduled:
            steps.setdefault(rid, step)
    assert steps[plain.request_id] == 1  # at once, beside program a
    if cap is None:
        assert steps[new.request_id] == 1
    else:
        assert first.is_finished and steps[new.request_id] > 10  # after program a's call ended
    assert_all_blocks_free(engine)


def test_an_auto_cap_admits_as_many_programs_as_the_kv_memory_holds_at_what_a_call_leaves():
    """max_programs_in_progress="auto": no cap before any program's call has finished; then
    the cache's blocks (and the CPU pool's) over the mean full blocks a call left, at least
    the batch; a new program waits at it like at a fixed cap."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine = tiny_engine(num_kv_blocks=24, max_model_len=384, max_num_seqs=2, program_scheduling=True,
                         max_programs_in_progress="auto")
    assert engine.stats()["program_cap"] is None
    engine.add_request(list(range(100, 161)), params, program="a")  # 64 tokens computed: 4 full blocks left
    while engine.has_unfinished():
        engine.step()
    assert engine.stats()["program_cap"] == 24 // 4
    engine.add_request(list(range(200, 300)), params, program="b")  # 103 computed: 6 blocks
    while engine.has_unfinished():
        engine.step()
    assert engine.stats()["program_cap"] == int(24 / 5)
    swapping = tiny_engine(num_kv_blocks=24, max_model_len=384, max_num_seqs=2, program_scheduling=True,
                           max_programs_in_progress="auto", preemption_mode="swap", swap_space=24 * _block_bytes())
    swapping.add_request(list(range(100, 161)), params, program="a")
    while swapping.has_unfinished():
        swapping.step()
    assert swapping.stats()["program_cap"] == 48 // 4
    big = tiny_engine(num_kv_blocks=24, max_model_len=384, max_num_seqs=8, program_scheduling=True,
                      max_programs_in_progress="auto")
    big.add_request(list(range(100, 400)), params, program="a")  # 18 blocks: the batch is the floor
    while big.has_unfinished():
        big.step()
    assert big.stats()["program_cap"] == 8
    # at the cap, a new program waits: a and b pinned, the cap at 2 (calls of 6 blocks in 16)
    engine = tiny_engine(num_kv_blocks=16, max_model_len=256, max_num_seqs=2, program_scheduling=True,
                         max_programs_in_progress="auto")
    for program, start in (("a", 100), ("b", 200)):
        engine.add_request(list(range(start, start + 100)), params, program=program)
        while engine.has_unfinished():
            engine.step()
    assert engine.stats()["program_cap"] == 2 and set(engine.kv.pins) == {"a", "b"}
    late = engine.add_request(list(range(300, 320)), params, program="c")
    for _ in range(3):
        engine.step()
    assert late.num_computed_tokens == 0  # waiting: a and b are in progress
    engine.scheduler.release_program_kv("a", time.time())
    while engine.has_unfinished():
        engine.step()
    assert late.finish_reason == "length"


def test_an_unknown_program_order_or_a_cap_below_one_is_a_value_error():
    with pytest.raises(ValueError, match="program_order"):
        EngineConfig(model="dummy-tiny", program_order="shortest")
    for bad in (0, "many", True):
        with pytest.raises(ValueError, match="max_programs_in_progress"):
            EngineConfig(model="dummy-tiny", max_programs_in_progress=bad)


@pytest.mark.parametrize("options, retained", [
    ({}, False),
    ({"program_scheduling": True}, True),  # retention comes with program scheduling ...
    ({"program_scheduling": True, "program_kv_retention": False}, False),  # ... unless turned off
    ({"program_kv_retention": True}, True),  # and works without it
])
def test_a_programs_kv_outlives_other_traffic_until_its_next_call(options, retained):
    """The call before a tool call leaves its blocks pinned for its program: other requests
    that churn the whole cache in between do not evict them, so the next call (the same
    prompt, the reply, the tool's result) computes only what is new. Without retention,
    least-recently-freed eviction takes them."""
    engine = tiny_engine(num_kv_blocks=24, max_model_len=384, **options)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = engine.add_request(list(range(100, 164)), params, program="agent-run")
    while engine.has_unfinished():
        engine.step()
    for start in (1000, 2000, 3000):  # 13 blocks each, freed after: every unpinned block is reused
        engine.add_request(list(range(start, start + 200)), params)
        while engine.has_unfinished():
            engine.step()
    follow_up = first.all_token_ids[:-1] + list(range(500, 520))  # + the tool's result
    nxt = engine.add_request(follow_up, params, program="agent-run")
    while engine.has_unfinished():
        engine.step()
    assert nxt.metrics.num_cached_tokens == (71 if retained else 0)  # all the first call computed
    assert "agent-run" in engine.kv.pins if retained else not engine.kv.pins  # pinned again, for its next
    stats = engine.stats()
    none = dict.fromkeys(["made", "taken", "released", "expired", "yielded", "swapped_out", "swapped_in"], 0)
    assert stats["kv_pins"] == (none | {"made": 2, "taken": 1} if retained else none)
    assert stats["kv_blocks_pinned"] == (7 if retained else 0)  # 98 tokens computed: 6 full blocks and a partial


@pytest.mark.parametrize("kept_of_tail", [13, 5, 0])
def test_a_programs_next_call_takes_the_partial_last_block_its_call_left(kept_of_tail):
    """Prefix caching shares full blocks only, so a next call used to compute again the
    tokens of its previous call's partial last block (up to 15 of them after every tool
    call). The pin keeps that block too: the next call that continues it takes it, so every
    token the previous call computed is a hit, and writes its own tokens after them in place
    (where it diverges within the block, over the old ones), with the tokens of a call
    computed from scratch."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine = tiny_engine(num_kv_blocks=24, max_model_len=384, program_scheduling=True)
    first = engine.add_request(list(range(100, 170)), params, program="agent-run")
    while engine.has_unfinished():
        engine.step()
    assert first.num_computed_tokens == 77  # 4 full blocks and 13 tokens of a 5th
    assert engine.kv.num_free_blocks == 24 - 5 and engine.stats()["kv_blocks_pinned"] == 5
    follow_up = first.all_token_ids[:64 + kept_of_tail] + list(range(500, 520))
    nxt = engine.add_request(follow_up, params, program="agent-run")
    while engine.has_unfinished():
        engine.step()
    assert nxt.metrics.num_cached_tokens == 64 + kept_of_tail
    fresh = tiny_engine(num_kv_blocks=24, max_model_len=384, enable_prefix_caching=False)
    alone = fresh.add_request(follow_up, params)
    while fresh.has_unfinished():
        fresh.step()
    assert nxt.output_token_ids == alone.output_token_ids
    engine.kv.unpin("agent-run")
    assert_all_blocks_free(engine)


def _engine_after_one_pinned_call() -> tuple[LLMEngine, SamplingParams]:
    """24 blocks; a program's 64-token call finished, its 4 full blocks and its partial
    5th (3 tokens computed) pinned."""
    engine = tiny_engine(num_kv_blocks=24, max_model_len=384, program_scheduling=True)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request(list(range(100, 164)), params, program="agent-run")
    while engine.has_unfinished():
        engine.step()
    return engine, params


def test_pinned_kv_yields_to_a_request_that_needs_the_memory():
    engine, params = _engine_after_one_pinned_call()
    assert engine.kv.num_free_blocks == 24 - 5
    big = engine.add_request(list(range(1000, 1370)), params)  # 24 blocks: all of them
    while engine.has_unfinished():
        engine.step()
    assert big.finish_reason == "length" and big.metrics.num_preemptions == 0
    assert "agent-run" not in engine.kv.pins and engine.kv.num_free_blocks == 24
    assert engine.stats()["kv_pins"]["yielded"] == 1


def test_without_a_swap_pool_the_pins_partial_blocks_yield_before_any_pins_full_blocks():
    """A pin's partial last block saves its next call fewer tokens than any full block (up to
    15 against 16 and all that follow), so, where a yielding pin is lost (no CPU pool to
    take it whole), memory pressure takes the pins' partial blocks first, oldest pin first,
    and a whole pin only when no partial block is left."""
    engine = tiny_engine(num_kv_blocks=24, max_model_len=384, program_scheduling=True)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for program, start in (("a", 100), ("b", 200)):  # each: 4 full blocks and a partial 5th
        engine.add_request(list(range(start, start + 64)), params, program=program)
        while engine.has_unfinished():
            engine.step()
    assert engine.kv.num_free_blocks == 14
    engine.add_request(list(range(1000, 1252)), SamplingParams(temperature=0, max_tokens=1))  # 16 blocks
    engine.step()
    assert [(len(p.blocks), p.tail is not None) for p in engine.kv.pins.values()] == [(4, False), (4, False)]
    assert engine.stats()["kv_pins"]["yielded"] == 0
    engine.add_request(list(range(2000, 2268)), SamplingParams(temperature=0, max_tokens=1))  # 17 blocks
    while engine.has_unfinished():
        engine.step()
    assert list(engine.kv.pins) == ["b"] and engine.stats()["kv_pins"]["yielded"] == 1


def test_a_pin_past_its_time_to_live_gives_its_blocks_back():
    import time as _time
    engine, _ = _engine_after_one_pinned_call()
    until = engine.kv.pins["agent-run"].until
    assert engine.kv.num_free_blocks == 24 - 5 and until > _time.time()
    engine.kv.expire_pins(until + 0.001)  # what each step does with the clock past the pin's end
    assert not engine.kv.pins and engine.kv.num_free_blocks == 24
    assert engine.stats()["kv_pins"]["expired"] == 1 and engine.stats()["kv_blocks_pinned"] == 0


def test_a_call_that_ends_in_no_tool_call_lets_its_programs_kept_kv_go_on_device_and_cpu():
    """The front end parses the reply and tells: no tool call, so no next call will take the
    KV. It goes at once (device blocks free, CPU blocks free), counted as released; a release
    for an earlier call leaves the pin of a call that finished after it."""
    engine, params = _engine_after_one_pinned_call()
    pinned_at = engine.kv.pins["agent-run"].pinned_at
    engine.release_program_kv("agent-run", pinned_at - 1.0)  # an earlier call's answer: not this pin's
    assert "agent-run" in engine.kv.pins
    engine.release_program_kv("agent-run", pinned_at)
    assert not engine.kv.pins and engine.kv.num_free_blocks == 24
    assert engine.stats()["kv_pins"]["released"] == 1 and engine.stats()["kv_blocks_pinned"] == 0
    engine.release_program_kv("never-seen", pinned_at)  # nothing kept: nothing to do

    swapping = tiny_engine(num_kv_blocks=24, max_model_len=384, program_scheduling=True, preemption_mode="swap",
                           swap_space=24 * _block_bytes())
    done = swapping.add_request(list(range(100, 164)), params, program="agent-run")
    while swapping.has_unfinished():
        swapping.step()
    swapping.add_request(list(range(5000, 5370)), params)  # needs every block: the pin goes to CPU
    while swapping.has_unfinished():
        swapping.step()
    swap = swapping.scheduler.swap_space
    assert "agent-run" in swap.pins and len(swap.free_cpu_blocks) == 19  # 4 full blocks and the partial 5th
    swapping.release_program_kv("agent-run", done.metrics.finished_time)
    assert not swap.pins and len(swap.free_cpu_blocks) == 24
    assert swapping.stats()["kv_pins"]["released"] == 1


def test_a_pin_whose_programs_next_call_is_queued_does_not_expire():
    """The next call has come (the tool returned) but waits behind a full batch: its KV is
    about to be used, so the pin outlives its time-to-live until the call takes it."""
    engine, params = _engine_after_one_pinned_call()
    engine.config.max_num_seqs = 1
    blocker = engine.add_request(list(range(1000, 1100)), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    engine.step()  # the blocker holds the batch's one slot
    nxt = engine.add_request(list(range(100, 164)) + list(range(500, 520)), params, program="agent-run")
    engine.kv.pins["agent-run"] = engine.kv.pins["agent-run"]._replace(until=0.0)  # long past its time to live
    engine.step()
    assert "agent-run" in engine.kv.pins and engine.stats()["kv_pins"]["expired"] == 0
    while engine.has_unfinished():
        engine.step()
    assert blocker.finish_reason == "length" and nxt.metrics.num_cached_tokens == 64
    assert engine.stats()["kv_pins"]["taken"] == 1


def test_under_memory_pressure_a_pin_whose_next_call_is_queued_yields_last():
    """Pins yield oldest first, but a pin whose program's next call is already waiting goes
    after the others: that KV is about to be used."""
    engine = tiny_engine(num_kv_blocks=24, max_model_len=384, program_scheduling=True, max_num_seqs=1)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for program, start in (("b", 100), ("a", 200)):  # b pinned first: the older pin
        engine.add_request(list(range(start, start + 64)), params, program=program)
        while engine.has_unfinished():
            engine.step()
    assert list(engine.kv.pins) == ["b", "a"] and engine.kv.num_free_blocks == 14
    # 224 prompt tokens: 14 blocks, all free ones; its output to 264 tokens needs 3 more: the
    # pins' partial blocks, then a whole pin
    grower = engine.add_request(list(range(1000, 1224)), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    engine.step()
    nxt = engine.add_request(list(range(100, 164)) + list(range(500, 520)), params, program="b")  # waits: batch full
    while not grower.is_finished:
        engine.step()
    assert grower.metrics.num_preemptions == 0
    assert "b" in engine.kv.pins and "a" not in engine.kv.pins  # a yielded, though b was older
    while engine.has_unfinished():
        engine.step()
    assert nxt.metrics.num_cached_tokens == 64


def test_the_pins_time_to_live_follows_the_time_between_a_call_and_the_next_calls_arrival():
    """The gap a pin must bridge is the tool's time: from the call's finish to the next
    call's arrival, not to its admission (queueing is not tool time)."""
    engine, params = _engine_after_one_pinned_call()
    pinned_at = engine.kv.pins["agent-run"].pinned_at
    assert engine.scheduler.pin_ttl() == 10.0  # before any gap is seen
    engine.add_request(list(range(100, 164)) + [7] * 20, params, program="agent-run", arrival_time=pinned_at + 3.0)
    engine.step()
    assert engine.stats()["kv_pins"]["taken"] == 1
    assert list(engine.scheduler.call_gaps) == [3.0] and engine.scheduler.pin_ttl() == 4.5


def test_the_pins_time_to_live_outlasts_the_long_tools_of_a_heavy_tail():
    """Tools are heavy-tailed: most return at once, a few take seconds. The time-to-live
    follows the tail (1.5x the 95th percentile of the last 64 gaps), not the mean, within
    2-60 s."""
    sched = tiny_engine().scheduler
    sched.call_gaps.extend([0.2] * 16 + [3.0] * 4)  # mean 0.76 s; 1 in 5 takes 3 s
    assert sched.pin_ttl() == pytest.approx(4.5)
    sched.call_gaps.clear()
    sched.call_gaps.extend([0.1] * 20)
    assert sched.pin_ttl() == 2.0   # at least the floor
    sched.call_gaps.extend([300.0] * 64)
    assert sched.pin_ttl() == 60.0 and len(sched.call_gaps) == 64  # at most the ceiling; the last 64


def _churn(engine: LLMEngine, params: SamplingParams, starts=(1000, 2000, 3000)) -> None:
    """Requests of 13 blocks each, one after the other: every evictable block is reused."""
    for start in starts:
        engine.add_request(list(range(start, start + 200)), params)
        while engine.has_unfinished():
            engine.step()


def _next_call_after_pressure(preemption_mode: str) -> tuple[LLMEngine, list[int], int]:
    """A program's call, then a request that needs every block (the pin yields), other
    traffic, then the program's next call: (engine, its tokens, its cached prompt tokens)."""
    engine = tiny_engine(num_kv_blocks=24, max_model_len=384, program_scheduling=True,
                         preemption_mode=preemption_mode, swap_space=24 * _block_bytes())
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = engine.add_request(list(range(100, 164)), params, program="agent-run")
    while engine.has_unfinished():
        engine.step()
    big = engine.add_request(list(range(5000, 5370)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert big.metrics.num_preemptions == 0 and "agent-run" not in engine.kv.pins
    _churn(engine, params)
    nxt = engine.add_request(first.all_token_ids[:-1] + list(range(500, 520)), params, program="agent-run")
    while engine.has_unfinished():
        engine.step()
    return engine, nxt.output_token_ids, nxt.metrics.num_cached_tokens


def _block_bytes() -> int:
    """One block of dummy-tiny's K and V, every layer, in fp32 (what swap_space counts)."""
    from engine.loader import DUMMY_SHAPES
    cfg = DUMMY_SHAPES["dummy-tiny"]
    return 2 * cfg.num_layers * 16 * cfg.num_kv_heads * cfg.head_dim * 4


def test_a_pin_that_yields_to_memory_pressure_is_swapped_out_and_back_for_its_programs_next_call():
    """With a CPU swap pool, a pinned program's KV that must yield goes to CPU memory instead
    of away; the program's next call brings it back and computes only what is new, with the
    tokens of a run that kept the KV on the device all along (the copies are right)."""
    swapped, tokens, cached = _next_call_after_pressure("swap")
    stats = swapped.stats()
    assert cached == 71  # every token the first call computed: its partial last block came back too
    assert stats["kv_pins"] | {"made": 0} == {"made": 0, "taken": 1, "released": 0, "expired": 0, "yielded": 0,
                                              "swapped_out": 1, "swapped_in": 1}
    assert stats["kv_blocks_pinned_swapped"] == 0  # back on the device, then taken
    dropped, tokens_recomputed, cached_recomputed = _next_call_after_pressure("recompute")
    assert cached_recomputed == 0 and dropped.stats()["kv_pins"]["yielded"] == 1
    assert tokens == tokens_recomputed
    kept = tiny_engine(num_kv_blocks=24, max_model_len=384, program_scheduling=True)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = kept.add_request(list(range(100, 164)), params, program="agent-run")
    while kept.has_unfinished():
        kept.step()
    nxt = kept.add_request(first.all_token_ids[:-1] + list(range(500, 520)), params, program="agent-run")
    while kept.has_unfinished():
        kept.step()
    assert nxt.metrics.num_cached_tokens == 71 and nxt.output_token_ids == tokens  # with the partial block
    for engine in (swapped, kept):
        engine.kv.unpin("agent-run")
        assert_all_blocks_free(engine)
    assert len(swapped.scheduler.swap_space.free_cpu_blocks) == swapped.scheduler.swap_space.num_cpu_blocks


def test_a_swapped_pin_comes_back_when_other_pins_must_yield_for_it():
    """Bringing a program's KV back takes no more blocks than computing it again, so other
    programs' pins yield for it (to the CPU pool) as they would for the recompute."""
    engine = tiny_engine(num_kv_blocks=24, max_model_len=384, program_scheduling=True, preemption_mode="swap",
                         swap_space=24 * _block_bytes())
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = engine.add_request(list(range(100, 164)), params, program="a")
    while engine.has_unfinished():
        engine.step()
    engine.add_request(list(range(5000, 5370)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert "a" in engine.scheduler.swap_space.pins
    engine.add_request(list(range(2000, 2290)), params, program="b")  # 18 full blocks and a partial pinned after
    while engine.has_unfinished():
        engine.step()
    assert len(engine.kv.pins["b"].blocks) == 18 and engine.kv.pins["b"].tail and engine.kv.num_free_blocks == 5
    nxt = engine.add_request(first.all_token_ids[:-1] + list(range(500, 520)), params, program="a")  # 6 blocks
    while engine.has_unfinished():
        engine.step()
    assert nxt.metrics.num_cached_tokens == 71
    pins = engine.stats()["kv_pins"]
    assert pins["swapped_out"] == 2 and pins["swapped_in"] == 1 and "b" in engine.scheduler.swap_space.pins


def test_a_swapped_pin_past_its_time_to_live_frees_its_cpu_blocks():
    engine = tiny_engine(num_kv_blocks=24, max_model_len=384, program_scheduling=True, preemption_mode="swap",
                         swap_space=24 * _block_bytes())
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request(list(range(100, 164)), params, program="agent-run")
    while engine.has_unfinished():
        engine.step()
    engine.add_request(list(range(5000, 5370)), params)  # needs every block: the pin goes to CPU
    engine.step()
    engine.step()  # its prompt's second chunk
    swap = engine.scheduler.swap_space
    assert engine.stats()["kv_blocks_pinned_swapped"] == 5 and len(swap.free_cpu_blocks) == 19
    until = swap.pins["agent-run"].until
    swap.expire_pins(until + 0.001)
    assert not swap.pins and len(swap.free_cpu_blocks) == 24
    assert engine.stats()["kv_pins"]["expired"] == 1 and engine.stats()["kv_blocks_pinned_swapped"] == 0


def test_a_pin_past_its_time_to_live_goes_to_the_cpu_pool_and_comes_back_for_a_late_next_call():
    """A tool in the heavy tail outlasts the pin's time to live on the device: with a CPU
    pool the pin goes there (for as long again) instead of away, so the program's next call,
    after other traffic has reused every device block, still finds its prefix, with the
    tokens it would have computed; without a pool it recomputes. A pin that also outlives
    its time in the pool frees its CPU blocks (counted as expired once)."""
    import time as _time
    results = {}
    for mode in ("swap", "recompute"):
        engine = tiny_engine(num_kv_blocks=24, max_model_len=384, program_scheduling=True, preemption_mode=mode,
                             swap_space=24 * _block_bytes())
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        first = engine.add_request(list(range(100, 164)), params, program="agent-run")
        while engine.has_unfinished():
            engine.step()
        engine.kv.pins["agent-run"] = engine.kv.pins["agent-run"]._replace(until=_time.time() - 0.001)
        _churn(engine, params)  # its first step expires the pin; then every device block is reused
        assert "agent-run" not in engine.kv.pins
        pins = engine.stats()["kv_pins"]
        if mode == "swap":
            swapped = engine.scheduler.swap_space.pins["agent-run"]
            assert swapped.until > _time.time() + 1 and len(swapped.cpu_blocks) == 5
            assert pins["swapped_out"] == 1 and pins["expired"] == 0
        else:
            assert pins["expired"] == 1
        nxt = engine.add_request(first.all_token_ids[:-1] + list(range(500, 520)), params, program="agent-run")
        while engine.has_unfinished():
            engine.step()
        results[mode] = (nxt.output_token_ids, nxt.metrics.num_cached_tokens, engine)
    (tokens, cached, swap_engine), (tokens_recomputed, cached_recomputed, _) = results["swap"], results["recompute"]
    assert (cached, cached_recomputed) == (71, 0) and tokens == tokens_recomputed
    assert swap_engine.stats()["kv_pins"]["swapped_in"] == 1
    # once more, the pin that call left now outlives both times: away from the pool as well
    engine = swap_engine
    engine.kv.pins["agent-run"] = engine.kv.pins["agent-run"]._replace(until=_time.time() - 0.001)
    _churn(engine, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), starts=(7000,))
    swap = engine.scheduler.swap_space
    swap.expire_pins(swap.pins["agent-run"].until + 0.001)
    assert not swap.pins and len(swap.free_cpu_blocks) == swap.num_cpu_blocks
    assert engine.stats()["kv_pins"]["expired"] == 1 and engine.stats()["kv_blocks_pinned_swapped"] == 0
    engine.kv.unpin("agent-run")
    assert_all_blocks_free(engine)


def test_a_full_cpu_pool_takes_the_swapped_pins_partial_blocks_before_a_whole_swapped_pin():
    """The CPU pool is a pin's last stop: a swapped pin that gives way is lost. So, as on a
    device without a pool, the swapped pins' partial blocks go first, and a pin that comes
    to a full pool finds room there without another pin being dropped."""
    engine = tiny_engine(num_kv_blocks=24, max_model_len=384, program_scheduling=True, preemption_mode="swap",
                         swap_space=9 * _block_bytes())
    swap = engine.scheduler.swap_space
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = {}
    for program, start, big in (("a", 100, 5000), ("b", 200, 6000)):  # each: 4 full blocks and a partial 5th
        first[program] = engine.add_request(list(range(start, start + 64)), params, program=program)
        while engine.has_unfinished():
            engine.step()
        engine.add_request(list(range(big, big + 370)), SamplingParams(temperature=0, max_tokens=1))  # every block
        while engine.has_unfinished():
            engine.step()
    assert [(len(p.cpu_blocks), p.tail is not None) for p in swap.pins.values()] == [(4, False), (5, True)]
    assert engine.stats()["kv_pins"]["yielded"] == 0 and not swap.free_cpu_blocks
    cached = {}
    for program in ("a", "b"):
        nxt = engine.add_request(first[program].all_token_ids[:-1] + list(range(500, 520)), params, program=program)
        while engine.has_unfinished():
            engine.step()
        cached[program] = nxt.metrics.num_cached_tokens
    assert cached == {"a": 64, "b": 71}


def test_swapped_pins_keep_a_prefix_their_programs_share_once_in_the_cpu_pool():
    """Two programs open with the same 48 tokens (an agent's instruction and tools) and pin
    4 full blocks and a partial one each, 3 of the full ones shared. On the device and in the
    CPU pool the shared blocks are kept once (7 blocks, not 10). Each next call, one after
    the other with the device's blocks reused in between (so the shared blocks come back
    from the CPU copy the other pin still holds), finds every token it computed, with the
    tokens of a recompute; every CPU block is free at the end."""
    engine = tiny_engine(num_kv_blocks=24, max_model_len=384, program_scheduling=True, preemption_mode="swap",
                         swap_space=24 * _block_bytes())
    swap = engine.scheduler.swap_space
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    common = list(range(100, 148))
    first = {}
    for program, start in (("a", 200), ("b", 300)):
        first[program] = engine.add_request(common + list(range(start, start + 16)), params, program=program)
        while engine.has_unfinished():
            engine.step()
    assert engine.stats()["kv_blocks_pinned"] == 7
    engine.add_request(list(range(5000, 5370)), SamplingParams(temperature=0, max_tokens=1))  # every block
    while engine.has_unfinished():
        engine.step()
    assert set(swap.pins) == {"a", "b"} and swap.pins["a"].cpu_blocks[:3] == swap.pins["b"].cpu_blocks[:3]
    assert engine.stats()["kv_blocks_pinned_swapped"] == 7 and len(swap.free_cpu_blocks) == 24 - 7
    cached, tokens = {}, {}
    for program in ("a", "b"):
        prompt = first[program].all_token_ids[:-1] + list(range(500, 520))
        nxt = engine.add_request(prompt, params, program=program)
        while engine.has_unfinished():
            engine.step()
        cached[program], tokens[program] = nxt.metrics.num_cached_tokens, nxt.output_token_ids
        _churn(engine, params)  # the device's copies of the shared blocks are reused
        fresh = tiny_engine(num_kv_blocks=24, max_model_len=384, enable_prefix_caching=False)
        again = fresh.add_request(prompt, params)
        while fresh.has_unfinished():
            fresh.step()
        assert tokens[program] == again.output_token_ids
    assert cached == {"a": 71, "b": 71} and engine.stats()["kv_pins"]["swapped_in"] == 2
    for program in ("a", "b"):
        engine.kv.unpin(program)
        swap.drop_pin(program)
    assert len(swap.free_cpu_blocks) == swap.num_cpu_blocks and not swap.by_name and not swap.named
    assert_all_blocks_free(engine)


def test_an_auto_cap_counts_a_prefix_the_programs_share_once():
    """Programs that open with the same 128 tokens (8 blocks) hold them once: three calls of
    9 full blocks and a partial one leave 10, 2 and 2 blocks held alone and 0, 8 and 8
    shared, so 24 blocks hold (24 - 16/3) / (14/3) = 4 programs, not 24 / 9 = 2."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine = tiny_engine(num_kv_blocks=24, max_model_len=384, max_num_seqs=2, program_scheduling=True,
                         max_programs_in_progress="auto")
    common = list(range(100, 228))
    for program, start in (("a", 300), ("b", 400), ("c", 500)):
        engine.add_request(common + list(range(start, start + 16)), params, program=program)
        while engine.has_unfinished():
            engine.step()
    assert list(engine.scheduler.call_kv_blocks) == [(10, 0), (2, 8), (2, 8)]
    assert engine.stats()["program_cap"] == 4 and engine.stats()["kv_blocks_pinned"] == 14


def test_a_preempted_request_takes_the_cpu_pool_from_swapped_pins():
    """Swapped pins hold CPU blocks only while no preempted request needs them: a running
    request's KV matters more than a program's between calls."""
    engine = tiny_engine(num_kv_blocks=24, max_model_len=384, program_scheduling=True, preemption_mode="swap",
                         swap_space=14 * _block_bytes())
    swap = engine.scheduler.swap_space
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request(list(range(100, 164)), params, program="agent-run")
    while engine.has_unfinished():
        engine.step()
    # Two requests of 10 blocks beside the 4 pinned fill the cache; as they grow, the pin goes
    # to CPU (4 of 14 CPU blocks), then one of them is preempted with 12 blocks: only 10 free.
    long = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    reqs = [engine.add_request(list(range(s, s + 150)), long) for s in (1000, 2000)]
    while engine.has_unfinished():
        engine.step()
    pins = engine.stats()["kv_pins"]
    assert pins["swapped_out"] == 1 and pins["yielded"] == 1 and not swap.pins
    assert swap.num_swap_outs == 1 and sum(r.metrics.num_preemptions for r in reqs) == 1
    assert all(r.finish_reason == "length" and len(r.output_token_ids) == 60 for r in reqs)
    assert len(swap.free_cpu_blocks) == swap.num_cpu_blocks
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_program_scheduling_changes_no_token(preemption_mode):
    """The same programs' calls, under memory pressure, give the same greedy tokens with and
    without program scheduling (order and retention change, outputs do not)."""
    def run(on: bool) -> list[list[int]]:
        engine = tiny_engine(num_kv_blocks=24, max_model_len=384, max_num_seqs=3, program_scheduling=on,
                             preemption_mode=preemption_mode)
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        reqs = [engine.add_request(list(range(10 * i, 10 * i + 40 + 7 * i)), params, program=f"p{i % 3}")
                for i in range(8)]
        while engine.has_unfinished():
            engine.step()
        return [r.output_token_ids for r in reqs]
    assert run(True) == run(False)
