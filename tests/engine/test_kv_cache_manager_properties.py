"""Property-based: random arrivals, steps, finishes, aborts and preemptions never break
the block accounting of the scheduler and block manager."""
from collections import Counter

from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine.kv_cache_manager import KVCacheManager
from engine.config import EngineConfig
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.swap import SwapSpace

BLOCK = 4

op = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 30), st.integers(1, 24), st.integers(0, 3)),  # prompt len, max tokens, prefix
    st.tuples(st.just("step"), st.integers(0, 0), st.integers(0, 0), st.integers(0, 0)),
    st.tuples(st.just("step"), st.integers(0, 0), st.integers(0, 0), st.integers(0, 0)),
    st.tuples(st.just("abort"), st.integers(0, 1000), st.integers(0, 0), st.integers(0, 0)),
    # a program's next call: its last finished call's tokens, less 0-2 of the last computed, then new ones
    st.tuples(st.just("next"), st.integers(0, 2), st.integers(1, 12), st.integers(0, 3)),
    st.tuples(st.just("next"), st.integers(0, 2), st.integers(1, 12), st.integers(0, 3)),
)


def simulate_step(sched: Scheduler, kv: KVCacheManager, live: list[Request]) -> None:
    """One engine step with the model replaced by a constant next token. The step's swap
    plan moves each block once and swaps in only into blocks the request now holds."""
    out = sched.schedule()
    assert len({c for _, c in out.swap_out}) == len(out.swap_out) and len({c for c, _ in out.swap_in}) == len(out.swap_in)
    # a plan's swap-outs run before its swap-ins: no CPU block may be written and read in one
    assert not {c for _, c in out.swap_out} & {c for c, _ in out.swap_in}
    holders = {b: r.status == RequestStatus.RUNNING for r in live for b in r.block_ids}
    holders |= {b.block_id: True for pin in kv.pins.values() for b in pin.held}  # a program's KV, back
    assert all(holders.get(d) for _, d in out.swap_in)
    for req, num in out.scheduled:
        req.num_computed_tokens += num
        kv.cache_full_blocks(req)
        if req.num_computed_tokens == req.num_tokens:
            req.all_token_ids.append(7)
            if req.num_output_tokens >= req.max_output_tokens:
                sched.finish(req, "length")
                live.remove(req)


def check_invariants(sched: Scheduler, kv: KVCacheManager, live: list[Request]) -> None:
    owners = Counter(b.block_id for pin in kv.pins.values() for b in pin.held)
    for pin in kv.pins.values():  # a partial block: no name in the prefix cache, and no more tokens than it holds
        assert pin.tail is None or (pin.tail[0].hash is None and 0 < len(pin.tail[1]) < BLOCK)
    for r in live:
        assert len(set(r.block_ids)) == len(r.block_ids), "a request holds a block twice"
        if r.status == RequestStatus.SWAPPED:
            assert not r.block_ids
        owners.update(r.block_ids)
    for b in kv.pool.blocks:
        assert b.ref_count == owners[b.block_id], f"block {b.block_id}: ref {b.ref_count} != owners"
        assert (b.block_id in kv.pool.free) == (b.ref_count == 0)
    used = sum(1 for b in kv.pool.blocks if b.ref_count > 0)
    assert kv.num_free_blocks + used == kv.num_blocks
    for h, bid in kv.pool.cached.items():
        assert kv.pool.blocks[bid].hash == h
    if sched.swap_space is not None:
        swap = sched.swap_space
        # swapped pins share full blocks by name (each held by count), their partial ones not
        held = Counter(c for p in swap.pins.values() for c in p.cpu_blocks)
        for p in swap.pins.values():
            assert len(p.cpu_blocks) == len(p.names) + (p.tail is not None)
            assert [swap.named[c][0] for c in p.cpu_blocks[:len(p.names)]] == p.names
        assert {c: n for c, n in held.items() if c in swap.named} == {c: n for c, (_, n) in swap.named.items()}
        assert all(n == 1 for c, n in held.items() if c not in swap.named)
        assert swap.by_name == {name: c for c, (name, _) in swap.named.items()}
        cpu = [c for ids in swap.swapped.values() for c in ids] + list(held) + swap.free_cpu_blocks + swap._read_this_plan
        assert sorted(cpu) == list(range(swap.num_cpu_blocks))
    for r in live:
        assert r.num_computed_tokens <= len(r.block_ids) * BLOCK or r.status == RequestStatus.SWAPPED


_STEPS = [("step", 0, 0, 0)] * 3


@settings(max_examples=150, deadline=None)
@example(  # two programs' calls open with the same 2 blocks; a long prompt sends both pins to CPU, which shares them
    ops=[("add", 5, 2, 2), *_STEPS, ("add", 6, 2, 2), *_STEPS, ("add", 28, 1, 0), *_STEPS, ("next", 0, 3, 1), *_STEPS],
    mode="swap", caching=True, budget=40, num_blocks=8, programs=True)
@given(ops=st.lists(op, min_size=10, max_size=100), mode=st.sampled_from(["swap", "recompute"]), caching=st.booleans(),
       budget=st.integers(4, 40), num_blocks=st.integers(8, 20), programs=st.booleans())
def test_block_accounting_survives_any_sequence_of_events(ops, mode, caching, budget, num_blocks, programs):
    """programs: calls belong to 4 agent programs, with program scheduling, so finished calls
    pin their KV, pins yield (to the CPU pool with swap, where pins that share a prefix hold
    its blocks once) and come back for the next call."""
    config = EngineConfig(model="dummy-tiny", block_size=BLOCK, num_kv_blocks=num_blocks, max_num_seqs=6,
                          max_num_batched_tokens=budget, enable_prefix_caching=caching, preemption_mode=mode,
                          program_scheduling=programs)
    kv = KVCacheManager(num_blocks, BLOCK, caching)
    sched = Scheduler(config, kv, SwapSpace(kv, num_cpu_blocks=12) if mode == "swap" else None)
    live: list[Request] = []
    added: list[Request] = []
    max_len = num_blocks * BLOCK
    for n, (kind, a, b, c) in enumerate(ops):
        if kind == "next":  # p{c}'s last finished call, less `a` of its computed tokens, + `b` new ones
            last = [r for r in added if r.program == f"p{c}" and r.finish_reason == "length"]
            if not last:
                continue
            prompt = last[-1].all_token_ids[:max(1, last[-1].num_computed_tokens - a)] + [200 + n] * b
            kind, b, program = "add", 4, f"p{c}"
        else:  # shared prefixes of 0-3 blocks, across programs too (a CPU pool block held by several pins)
            prompt, program = [1] * (c * BLOCK) + [100 + n] * a, f"p{a % 4}"
        if kind == "add":
            req = Request(f"r{n}", prompt[:max_len - 1], SamplingParams(max_tokens=b, ignore_eos=True),
                          max_total_tokens=max_len, arrival_time=float(n), program=program if programs else None)
            sched.add(req)
            live.append(req)
            added.append(req)
        elif kind == "abort" and live:
            req = live[a % len(live)]
            sched.finish(req, "abort")
            live.remove(req)
        elif kind == "step":
            simulate_step(sched, kv, live)
        check_invariants(sched, kv, live)
    for _ in range(2000):  # drain: everything left runs to completion
        if not sched.has_unfinished():
            break
        simulate_step(sched, kv, live)
        check_invariants(sched, kv, live)
    assert not live and not sched.has_unfinished()
    for key in list(kv.pins):
        kv.unpin(key)
    assert kv.num_free_blocks == kv.num_blocks
