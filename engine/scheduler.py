"""Iteration-level scheduler.

One idea, as in vLLM V1: every step has ONE token budget (`max_num_batched_tokens`) and
no separate prefill and decode phases. Each request just has tokens it has not computed
yet: one for a decode, many for a prompt. The budget goes to running decodes first (so
they never stall), then to prompt chunks of running requests, then to new requests while
blocks and `max_num_seqs` allow. A request that needs a block when none is free preempts
the lowest-priority (latest-arriving) running request.

Waiting requests are admitted by priority (lower first: vLLM's convention), then arrival.
A request gains one priority level per `PRIORITY_AGING_S` seconds waited, so a low tier
(ADK's flex) waits longer under load but is never starved.

With `program_scheduling`, between priority and arrival comes the service its agent program
(the calls of one agent run) has attained: tokens computed for the program so far, in
levels that double (Autellix's PLAS over multilevel queues). A short run's next call gets
ahead of a long run's, so the short one finishes soon instead of queueing behind every
call of the long one; waiting lowers the level too (one per `PRIORITY_AGING_S`), so a long
program is delayed, never starved. Preemption takes the most-served program's call first.
`program_order="first_arrived"` ranks programs by their first call's arrival instead: a
started program's next call goes ahead of new programs, so under overload the programs
already running keep their latency and new ones wait at their start; preemption takes the
newest program's call first. `max_programs_in_progress` caps the programs in progress (a
call running or waiting, or KV pinned between calls): a new program's first call waits
while the cap is reached, so under overload the started programs are not diluted by ever
more new ones; "auto" sets the cap to the programs whose KV the memory holds (the cache's
blocks and the CPU pool's, less a prefix the programs share, over the mean blocks the last
program calls left that no other holds; at least the batch size), so that the programs in
progress keep their KV between calls.
With `program_kv_retention` (on with program_scheduling unless set), a program's finished
call leaves its KV blocks (the partial last one too) pinned for the program's next call
(the one after its tool calls) for a time-to-live: 1.5x the 95th percentile of the last
gaps observed between a program's calls (its tools' time), within 2-60 s, or until the
front end says the call ended in no tool call (`release_program_kv`); pins yield to any
allocation that would fail without them (kv_cache_manager), to the CPU swap pool where
there is one (preemption_mode "swap"), from which the program's next call brings them
back; a pin that expires goes to that pool too, for one more time-to-live. A pin whose
program's next call is already waiting neither expires nor yields before the others. The
scheduler plans and the runner moves memory: swaps (engine/swap.py) and parallel sampling's
block copies come out as plans the runner makes before the step's forward pass.

The static-batching baseline is `engine.static_scheduler.StaticScheduler`.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from engine.kv_cache_manager import KVCacheManager
from engine.config import EngineConfig
from engine.request import Request, RequestStatus
from engine.swap import SwapSpace

PRIORITY_AGING_S = 5.0
SERVICE_QUANTUM = 256      # tokens of a program's first service level; each next level doubles
PROGRAM_IDLE_S = 300.0     # a program not seen this long is forgotten
PIN_TTL_S = (2.0, 60.0)    # bounds of a program's KV pin between its calls
PIN_TTL_UNSEEN_S = 10.0    # before any gap between a program's calls has been seen


@dataclass
class SchedulerOutput:
    # (request, number of tokens to compute this step): one-token rows (decodes, and prompts
    # with one token left) first, then prompt chunks, the layout the runner and attention take
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Rows that compute a pad token at this position and sample nothing (static batching).
    pads: dict[Request, int] = field(default_factory=dict)
    # KV moves the runner makes before the forward pass (engine/swap.py): swap-outs as
    # (device block, CPU block), then swap-ins as (CPU block, device block).
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def num_decodes(self) -> int:
        """The one-token rows, at the front."""
        return sum(1 for _, n in self.scheduled if n == 1)

    def order_rows(self) -> "SchedulerOutput":
        """One-token rows first (stable: arrival order kept within each kind)."""
        self.scheduled.sort(key=lambda rn: rn[1] > 1)
        return self

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager, swap_space: SwapSpace | None = None) -> None:
        self.config = config
        self.kv = kv
        self.swap_space = swap_space  # when preemption_mode == "swap"
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.program_service: dict[str, list[float]] = {}  # program -> [tokens, last seen, first arrival]
        self._pruned_at = time.time()
        self.call_gaps: deque[float] = deque(maxlen=64)  # the last gaps between a program's calls (tool time)
        # the last program calls' KV: (blocks held alone, full blocks shared with others)
        self.call_kv_blocks: deque[tuple[int, int]] = deque(maxlen=64)

    # -- queue ---------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def fork(self, first: Request) -> list[tuple[int, int]]:
        """Parallel sampling: the siblings of `first`, whose prompt was just computed and who
        sampled their first tokens from its last row, share its full prompt blocks (ref
        counts) and get their own copy of its partial last block (copy-on-write, now, since
        each writes its next token there). Without a free block or a batch slot a sibling
        waits and recomputes its prompt (prefix-cache hits, when enabled). Returns the block
        copies (src, dst) for the runner to make before the next step."""
        copies: list[tuple[int, int]] = []
        for sib in first.forks:
            if sib.finish_reason is not None:  # finished at its first token
                continue
            sib_copies = self.kv.fork(first, sib) if len(self.running) < self.config.max_num_seqs else None
            if sib_copies is None:
                self.add(sib)
                continue
            copies += sib_copies
            sib.num_computed_tokens = first.num_computed_tokens
            assert sib.block_ids and sib.num_computed_tokens == sib.num_tokens - 1
            self._start(sib)
        for sib in first.forks:
            if sib.finish_reason is not None:
                self.finish(sib, sib.finish_reason)
        first.forks = []
        return copies

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, reason: str) -> None:
        """Leave the batch now and give the blocks back (also for aborts and errors)."""
        if req.is_finished:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if req.status == RequestStatus.SWAPPED and self.swap_space is not None:
            self.swap_space.discard(req)
        if req.program is not None and reason in ("stop", "length"):
            self.call_kv_blocks.append(self.kv.blocks_held_alone(req))
            if self.config.program_kv_retention:
                now = time.time()
                self.kv.pin(req.program, req, now + self.pin_ttl(), now)
        req.metrics.num_computed_tokens = req.num_computed_tokens
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = req.finish_reason or reason
        req.metrics.finished_time = time.time()

    # -- one step ------------------------------------------------------------------------
    def leaving(self, sched: SchedulerOutput, done: list[Request]) -> list[Request]:
        """After a step: which requests leave the batch now, given those that reached a
        finish condition (here: all of them)."""
        return done

    def _chunk(self, req: Request, budget: int) -> int:
        """Tokens of `req` to compute within `budget` (0: does not fit this step)."""
        remaining = req.num_tokens - req.num_computed_tokens
        if remaining <= budget:
            return remaining
        return budget if self.config.enable_chunked_prefill else 0

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        if self.swap_space is not None:
            self.swap_space.begin_plan()
        if self.kv.pins or (self.swap_space is not None and self.swap_space.pins):
            # a pin whose program's next call has come is about to be taken: it neither expires nor yields first
            now, awaited = time.time(), {r.program for r in self.waiting if r.program is not None}
            if self.swap_space is not None:
                self.swap_space.expire_pins(now, awaited)  # (before the device's expired pins join it)
            self.kv.expire_pins(now, awaited, self.pin_ttl if self.swap_space is not None else None)
        # Decodes (one token left) before prompt chunks; stable, so arrival order is kept.
        for req in sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1):
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = self._chunk(req, budget)
            if num_new == 0:
                continue
            while not self.kv.allocate(req, num_new):
                victim = max(self.running, key=lambda r: (r.priority, self._program_rank(r), r.arrival_time))
                budget += self._preempt(victim, out)
                if victim is req:
                    break
            if req.status == RequestStatus.RUNNING:
                out.scheduled.append((req, num_new))
                budget -= num_new
        if not out.preempted:  # under memory pressure, admit nobody new this step
            self._admit(out, budget)
        if self.config.program_scheduling:
            self._account(out)
        if self.swap_space is not None and self.kv.spill:  # pins that yielded: to CPU, before the forward pass
            out.swap_out += self.swap_space.swap_out_pins()
        return out.order_rows()

    # -- agent programs ------------------------------------------------------------------
    def pin_ttl(self) -> float:
        """How long a program's KV stays pinned for its next call: 1.5x the 95th percentile
        of the last gaps seen between a program's calls (tool times are heavy-tailed: a
        mean would let the long tools' pins expire just before their next call), within
        PIN_TTL_S. Long is cheap: pins yield to memory pressure whatever their time left."""
        if not self.call_gaps:
            return PIN_TTL_UNSEEN_S
        gaps = sorted(self.call_gaps)
        p95 = gaps[math.ceil(0.95 * len(gaps)) - 1]  # nearest rank
        return min(max(1.5 * p95, PIN_TTL_S[0]), PIN_TTL_S[1])

    def release_program_kv(self, program: str, finished_by: float) -> None:
        """`program`'s call that finished at `finished_by` ended in no tool call: no next call
        will take the KV kept for it, so it goes now (device or CPU pool), not at its time
        to live. A pin made later (another call of the program since) stays."""
        pin = self.kv.pins.get(program)
        if pin is not None and pin.pinned_at <= finished_by:
            self.kv.unpin(program, "released")
        swapped = self.swap_space.pins.get(program) if self.swap_space is not None else None
        if swapped is not None and swapped.pinned_at <= finished_by:
            self.swap_space.drop_pin(program, "released")

    def _program_rank(self, req: Request) -> float:
        """Where the call's program stands, lower first (0 without program scheduling).
        least_attained: 0 for a program's first SERVICE_QUANTUM tokens, then one more per
        doubling (0 for a call of no known program). first_arrived: when the program's first
        call arrived (a call of no known program: its own arrival)."""
        if not self.config.program_scheduling:
            return 0
        entry = self.program_service.get(req.program)
        if self.config.program_order == "first_arrived":
            return entry[2] if entry else req.arrival_time
        return int(entry[0] // SERVICE_QUANTUM).bit_length() if entry else 0

    def _account(self, out: SchedulerOutput) -> None:
        now = time.time()
        for req, n in out.scheduled:
            if req.program is not None:
                # [tokens computed, last seen, its first call's arrival]
                entry = self.program_service.setdefault(req.program, [0.0, now, req.arrival_time])
                entry[0] += n
                entry[1] = now
        if now - self._pruned_at > PROGRAM_IDLE_S / 10:  # bounded memory: forget idle programs
            self._pruned_at = now
            self.program_service = {p: e for p, e in self.program_service.items() if now - e[1] < PROGRAM_IDLE_S}

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        """Starts waiting requests in admission order while the budget, the batch and the
        blocks allow; the first that does not fit stops it (no overtaking by smaller ones)."""
        cap = self.program_cap()
        active = self._programs_in_progress() if cap is not None else set()
        for req in self._admission_order():
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if cap is not None and req.program is not None and req.program not in active and len(active) >= cap:
                continue  # a new program's first call waits while the cap is reached
            if req.status == RequestStatus.SWAPPED:
                moves = self.swap_space.swap_in(req)
                if moves is None:
                    break
                out.swap_in += moves
                num_new = self._chunk(req, budget)
                if num_new == 0 or not self.kv.allocate(req, num_new):
                    # It holds its blocks again; it runs (decodes) from the next step on.
                    num_new = 0
                cached = []
            else:
                if self.swap_space is not None and req.program in self.swap_space.pins:
                    out.swap_in += self.swap_space.swap_in_pin(req.program, req)
                cached, req.num_computed_tokens = self.kv.find_cached_prefix(req)
                num_new = self._chunk(req, budget)
                if num_new == 0 or not self.kv.allocate(req, num_new, cached):
                    req.num_computed_tokens = 0
                    break
                if req.metrics.first_scheduled_time is None:
                    req.metrics.num_cached_tokens = req.num_computed_tokens
            self.waiting.remove(req)
            if req.program is not None and req.program in self.kv.pins:  # its blocks are shared now
                pinned_at = self.kv.unpin(req.program, "taken")  # the gap: the tools' time, not the queue's
                self.call_gaps.append(max(req.arrival_time - pinned_at, 0.0))
            if self.swap_space is not None and req.program in self.swap_space.pins:  # no room to bring it back
                self.swap_space.drop_pin(req.program, "yielded")
            self._start(req)
            if req.program is not None:
                active.add(req.program)
            if num_new:
                out.scheduled.append((req, num_new))
                budget -= num_new

    def program_cap(self) -> int | None:
        """How many programs may be in progress (max_programs_in_progress; None: any)."""
        cap = self.config.max_programs_in_progress if self.config.program_scheduling else None
        if cap != "auto":
            return cap
        if not any(alone for alone, _ in self.call_kv_blocks):
            return None  # no program's KV seen yet
        memories = 1 + (self.swap_space is not None)  # each keeps a shared prefix once
        blocks = self.kv.num_blocks + (self.swap_space.num_cpu_blocks if self.swap_space is not None else 0)
        alone, shared = (sum(column) / len(self.call_kv_blocks) for column in zip(*self.call_kv_blocks))
        return max(self.config.max_num_seqs, int((blocks - memories * shared) / alone))

    def _programs_in_progress(self) -> set[str]:
        """Programs with a call running, KV kept between calls, or a call waiting after one
        started (max_programs_in_progress counts these)."""
        active = {r.program for r in self.running if r.program is not None} | set(self.kv.pins)
        active |= set(self.swap_space.pins) if self.swap_space is not None else set()
        return active | {r.program for r in self.waiting if r.program in self.program_service}

    def _admission_order(self) -> list[Request]:
        """The waiting requests in the order they may start, computed once a step: by
        priority, aged; then (program scheduling) by their program's rank (service levels
        aged; first arrivals need no aging); then by queue position (FIFO, preempted requests
        put back in front)."""
        waiting = list(self.waiting)
        ranks = [self._program_rank(r) for r in waiting]
        if all(r.priority == waiting[0].priority for r in waiting) and all(rk == ranks[0] for rk in ranks):
            return waiting
        now = time.time()
        rank_ages = self.config.program_order == "least_attained"

        def key(i: int) -> tuple[int, float, int]:
            r = waiting[i]
            aged = int((now - r.arrival_time) // PRIORITY_AGING_S)  # whole levels gained by waiting
            return r.priority - aged, ranks[i] - aged * rank_ages, i
        return [waiting[i] for i in sorted(range(len(waiting)), key=key)]

    def _start(self, req: Request) -> None:
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        if req.metrics.first_scheduled_time is None:
            req.metrics.first_scheduled_time = time.time()
            req.metrics.batch_size_at_first_schedule = len(self.running)

    def _preempt(self, req: Request, out: SchedulerOutput) -> int:
        """Take `req` out of the batch; returns the budget it had been given this step."""
        self.running.remove(req)
        returned = 0
        for i, (r, n) in enumerate(out.scheduled):
            if r is req:
                del out.scheduled[i]
                returned = n
                break
        moves = self.swap_space.swap_out(req) if self.swap_space is not None else None
        if moves is not None:
            out.swap_out += moves
            req.status = RequestStatus.SWAPPED
        else:  # recompute: drop its blocks (full ones stay in the prefix cache) and start over
            self.kv.free(req)
            req.num_computed_tokens = 0
            req.status = RequestStatus.PREEMPTED
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)
        return returned
