"""Swap preemption: a preempted request's KV blocks move to a CPU pool and come back later.

The CPU pool is allocated once (`swap_space` bytes; pinned when the cache lives on CUDA so
copies run at full speed). When it is full, the scheduler falls back to recompute.
"""
from __future__ import annotations

import torch

from engine.block_manager import KVCacheManager
from engine.request import Request


class Swapper:
    def __init__(self, kv: KVCacheManager, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], swap_space: int) -> None:
        self.kv = kv
        self.kv_caches = kv_caches
        k0 = kv_caches[0][0]
        per_block = 2 * len(kv_caches) * k0[0].numel() * k0.element_size()
        self.num_cpu_blocks = swap_space // per_block
        pin = k0.device.type == "cuda"
        shape = (self.num_cpu_blocks,) + tuple(k0.shape[1:])
        self.cpu_caches = [(torch.empty(shape, dtype=k0.dtype, pin_memory=pin),
                            torch.empty(shape, dtype=k0.dtype, pin_memory=pin)) for _ in kv_caches]
        self.free_cpu_blocks = list(range(self.num_cpu_blocks))
        self.swapped: dict[str, list[int]] = {}  # request id -> its CPU blocks, in order
        self.num_swap_outs = 0
        self.num_swap_ins = 0

    def _copy(self, src: list[tuple[torch.Tensor, torch.Tensor]], dst: list[tuple[torch.Tensor, torch.Tensor]],
              src_ids: list[int], dst_ids: list[int]) -> None:
        s = torch.tensor(src_ids, device=src[0][0].device)
        d = torch.tensor(dst_ids, device=dst[0][0].device)
        for (sk, sv), (dk, dv) in zip(src, dst):
            dk.index_copy_(0, d, sk.index_select(0, s).to(dk.device, non_blocking=True))
            dv.index_copy_(0, d, sv.index_select(0, s).to(dv.device, non_blocking=True))

    def swap_out(self, req: Request) -> bool:
        """Copies the blocks holding `req`'s computed tokens to CPU and frees them on the
        device. False (nothing done) when the CPU pool has no room: recompute instead."""
        n = self.kv.blocks_for(req.num_computed_tokens)
        if n == 0 or n > len(self.free_cpu_blocks):
            return False
        cpu_ids = [self.free_cpu_blocks.pop() for _ in range(n)]
        self._copy(self.kv_caches, self.cpu_caches, req.block_ids[:n], cpu_ids)
        self.kv.free(req)
        self.swapped[req.request_id] = cpu_ids
        self.num_swap_outs += 1
        return True

    def swap_in(self, req: Request) -> bool:
        """Brings `req`'s blocks back into fresh device blocks. False when the pool is short."""
        cpu_ids = self.swapped[req.request_id]
        if len(cpu_ids) > self.kv.num_free_blocks:
            return False
        saved = req.num_computed_tokens
        req.num_computed_tokens = 0
        ok = self.kv.allocate(req, len(cpu_ids) * self.kv.block_size)
        req.num_computed_tokens = saved
        assert ok and len(req.block_ids) == len(cpu_ids)
        self._copy(self.cpu_caches, self.kv_caches, cpu_ids, req.block_ids)
        self.discard(req)
        self.num_swap_ins += 1
        return True

    def discard(self, req: Request) -> None:
        self.free_cpu_blocks.extend(self.swapped.pop(req.request_id, []))

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)
