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

The static-batching baseline is `engine.static_scheduler.StaticScheduler`.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import KVCacheManager
from engine.config import EngineConfig
from engine.request import Request, RequestStatus

PRIORITY_AGING_S = 5.0


@dataclass
class SchedulerOutput:
    # (request, number of tokens to compute this step); decodes first, then prompt chunks.
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Rows that compute a pad token at this position and sample nothing (static batching).
    pads: dict[Request, int] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager, swapper=None) -> None:
        self.config = config
        self.kv = kv
        self.swapper = swapper  # engine.swap.Swapper when preemption_mode == "swap"
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # -- queue ---------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def add_forked(self, req: Request) -> None:
        """A sibling that holds its share of its prompt's blocks joins the batch directly."""
        assert req.block_ids and req.num_computed_tokens == req.num_tokens - 1
        self._start(req)

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
        if req.status == RequestStatus.SWAPPED and self.swapper is not None:
            self.swapper.discard(req)
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
        # Decodes (one token left) before prompt chunks; stable, so arrival order is kept.
        for req in sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1):
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = self._chunk(req, budget)
            if num_new == 0:
                continue
            while not self.kv.allocate(req, num_new):
                victim = max(self.running, key=lambda r: (r.priority, r.arrival_time))
                budget += self._preempt(victim, out)
                if victim is req:
                    break
            if req.status == RequestStatus.RUNNING:
                out.scheduled.append((req, num_new))
                budget -= num_new
        if not out.preempted:  # under memory pressure, admit nobody new this step
            self._admit(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self._next_waiting()
            if req.status == RequestStatus.SWAPPED:
                if not self.swapper.swap_in(req):
                    break
                num_new = self._chunk(req, budget)
                if num_new == 0 or not self.kv.allocate(req, num_new):
                    # It holds its blocks again; it runs (decodes) from the next step on.
                    num_new = 0
                cached = []
            else:
                cached = self.kv.find_cached_prefix(req)
                req.num_computed_tokens = len(cached) * self.kv.block_size
                num_new = self._chunk(req, budget)
                if num_new == 0 or not self.kv.allocate(req, num_new, cached):
                    req.num_computed_tokens = 0
                    break
                if req.metrics.first_scheduled_time is None:
                    req.metrics.num_cached_tokens = req.num_computed_tokens
            self.waiting.remove(req)
            self._start(req)
            if num_new:
                out.scheduled.append((req, num_new))
                budget -= num_new

    def _next_waiting(self) -> Request:
        """The waiting request to admit next: by priority, aged, then by arrival."""
        first = self.waiting[0]  # FIFO, preempted requests put back in front
        if all(r.priority == first.priority for r in self.waiting):
            return first
        now = time.time()
        return min(self.waiting, key=lambda r: r.priority - (now - r.arrival_time) / PRIORITY_AGING_S)

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
        if self.swapper is not None and self.swapper.swap_out(req):
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
