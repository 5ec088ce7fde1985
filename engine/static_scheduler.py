"""The static-batching baseline that continuous batching is measured against.

Faithful to padded static batching (transformers' `generate` on a batch): admit a batch,
reserve every member's KV for the batch's full length up front, and keep every row busy
until the longest member finishes; a finished member keeps computing pad tokens (its last
token again, at growing positions within its reservation) and leaves with the batch.
"""
from __future__ import annotations

from engine.request import Request
from engine.scheduler import Scheduler, SchedulerOutput


class StaticScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pad_positions: dict[Request, int] = {}  # finished members -> position of their next pad token

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        if not self.running:
            self._admit_batch()
        for req in self.running:
            if req in self.pad_positions:
                if budget < 1:
                    continue
                out.scheduled.append((req, 1))
                out.pads[req] = self.pad_positions[req]
                budget -= 1
                continue
            num_new = self._chunk(req, budget)
            if num_new == 0:
                continue
            out.scheduled.append((req, num_new))
            budget -= num_new
        return out.order_rows()

    def _admit_batch(self) -> None:
        batch = list(self.waiting)[:self.config.max_num_seqs]
        if not batch:
            return
        length = min(max(r.num_prompt_tokens for r in batch) + max(r.max_output_tokens for r in batch),
                     self.kv.num_blocks * self.kv.block_size // len(batch))
        for req in batch:
            if not self.kv.allocate(req, max(length, req.num_prompt_tokens + req.max_output_tokens)):
                break
            self.waiting.popleft()
            self._start(req)

    def leaving(self, sched: SchedulerOutput, done: list[Request]) -> list[Request]:
        for req, pos in sched.pads.items():  # a pad row's context grows within its reservation
            self.pad_positions[req] = min(pos + 1, len(req.block_ids) * self.kv.block_size - 1)
        for req in done:
            self.pad_positions[req] = req.num_tokens - 1  # its last token is not computed yet
        if self.running and all(r in self.pad_positions for r in self.running):
            leaving = list(self.running)
            self.pad_positions.clear()
            return leaving
        return []

    def finish(self, req: Request, reason: str) -> None:
        self.pad_positions.pop(req, None)
        super().finish(req, reason)
