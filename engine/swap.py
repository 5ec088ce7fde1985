"""Swap preemption: a preempted request's KV blocks move to a CPU pool and come back later.

The scheduler plans and the model runner moves the data, as in vLLM V1. `SwapSpace` (the
scheduler's) decides which CPU blocks a request's KV goes to when it is preempted and which
device blocks it comes back into, and frees or takes the device blocks in the same plan;
`CpuKVPool` (the runner's) holds the CPU copies and moves the bytes, before the step's
forward pass: the scheduler may already have given a swapped-out request's device blocks to
another request, whose new KV that pass writes. The pool is allocated once (`swap_space`
bytes; pinned when the cache lives on CUDA so copies run at full speed). When it is full,
the scheduler falls back to recompute.
"""
from __future__ import annotations

import torch

from engine.kv_cache_manager import KVCacheManager
from engine.request import Request

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def cpu_blocks_for(swap_space: int, kv_caches: KVCaches) -> int:
    """How many whole KV blocks (every layer's K and V) fit in `swap_space` bytes."""
    k0 = kv_caches[0][0]
    return swap_space // (2 * len(kv_caches) * k0[0].numel() * k0.element_size())


class SwapSpace:
    """The CPU pool's bookkeeping: which CPU blocks hold which swapped-out request."""

    def __init__(self, kv: KVCacheManager, num_cpu_blocks: int) -> None:
        self.kv = kv
        self.num_cpu_blocks = num_cpu_blocks
        self.free_cpu_blocks = list(range(num_cpu_blocks))
        self.swapped: dict[str, list[int]] = {}  # request id -> its CPU blocks, in order
        self.num_swap_outs = 0
        self.num_swap_ins = 0

    def swap_out(self, req: Request) -> list[tuple[int, int]] | None:
        """Plans moving the blocks that hold `req`'s computed tokens to CPU and frees them on
        the device: (device block, CPU block) pairs. None (nothing done) when the CPU pool
        has no room: recompute instead."""
        n = self.kv.blocks_for(req.num_computed_tokens)
        if n == 0 or n > len(self.free_cpu_blocks):
            return None
        cpu_ids = [self.free_cpu_blocks.pop() for _ in range(n)]
        pairs = list(zip(req.block_ids[:n], cpu_ids))
        self.kv.free(req)
        self.swapped[req.request_id] = cpu_ids
        self.num_swap_outs += 1
        return pairs

    def swap_in(self, req: Request) -> list[tuple[int, int]] | None:
        """Takes fresh device blocks for `req`'s swapped KV: (CPU block, device block) pairs.
        None when the device pool is short."""
        cpu_ids = self.swapped[req.request_id]
        assert not req.block_ids and self.kv.blocks_for(req.num_computed_tokens) == len(cpu_ids)
        if len(cpu_ids) > self.kv.num_free_blocks or not self.kv.allocate(req, 0):
            return None
        pairs = list(zip(cpu_ids, req.block_ids))
        self.discard(req)
        self.num_swap_ins += 1
        return pairs

    def discard(self, req: Request) -> None:
        self.free_cpu_blocks.extend(self.swapped.pop(req.request_id, []))

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)


class CpuKVPool:
    """The CPU copies of swapped-out blocks, and the copies both ways."""

    def __init__(self, kv_caches: KVCaches, num_cpu_blocks: int) -> None:
        self.kv_caches = kv_caches
        k0 = kv_caches[0][0]
        pin = k0.device.type == "cuda"
        shape = (num_cpu_blocks,) + tuple(k0.shape[1:])
        self.cpu_caches = [(torch.empty(shape, dtype=k0.dtype, pin_memory=pin),
                            torch.empty(shape, dtype=k0.dtype, pin_memory=pin)) for _ in kv_caches]

    def swap(self, out: list[tuple[int, int]], back: list[tuple[int, int]]) -> None:
        """Swap-outs (device, CPU) first, then swap-ins (CPU, device): a block freed by one
        may be taken by the other in the same plan."""
        if out:
            _copy(self.kv_caches, self.cpu_caches, out)
        if back:
            _copy(self.cpu_caches, self.kv_caches, back)


def _copy(src: KVCaches, dst: KVCaches, pairs: list[tuple[int, int]]) -> None:
    s = torch.tensor([a for a, _ in pairs], device=src[0][0].device)
    d = torch.tensor([b for _, b in pairs], device=dst[0][0].device)
    for (sk, sv), (dk, dv) in zip(src, dst):
        dk.index_copy_(0, d, sk.index_select(0, s).to(dk.device, non_blocking=True))
        dv.index_copy_(0, d, sv.index_select(0, s).to(dv.device, non_blocking=True))
