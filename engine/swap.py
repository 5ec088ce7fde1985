"""Swap preemption: a preempted request's KV blocks move to a CPU pool and come back later.

The scheduler plans and the model runner moves the data, as in vLLM V1. `SwapSpace` (the
scheduler's) decides which CPU blocks a request's KV goes to when it is preempted and which
device blocks it comes back into, and frees or takes the device blocks in the same plan;
`CpuKVPool` (the runner's) holds the CPU copies and moves the bytes, before the step's
forward pass: the scheduler may already have given a swapped-out request's device blocks to
another request, whose new KV that pass writes. The pool is allocated once (`swap_space`
bytes; pinned when the cache lives on CUDA so copies run at full speed). When it is full,
the scheduler falls back to recompute.

The pool also keeps agent programs' KV between calls (docs/agent-scheduling.md): a pin that
must yield its device blocks to memory pressure, or whose time to live on the device is
over, comes here instead of being dropped, and the program's next call brings it back (a
copy instead of recomputing its prefix; blocks still cached on the device are shared, not
copied). Swapped pins give way to swapped requests, oldest first, their partial last blocks
before any whole pin: a running request's KV matters more. Swapped pins share their full
blocks by name (hash and tokens), as the device's prefix cache does: an agent's programs
open with the same instruction and tools, kept in the pool once, not once a pin. CPU blocks
that a swap-in reads are reused from the next plan on only, since a plan's swap-outs run
before its swap-ins.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from engine.kv_cache_manager import KVCacheManager, Pin, awaited_last
from engine.request import Request

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]
BlockName = tuple[int, tuple[int, ...]]  # a full block's hash and token ids


def cpu_blocks_for(swap_space: int, kv_caches: KVCaches) -> int:
    """How many whole KV blocks (every layer's K and V) fit in `swap_space` bytes."""
    k0 = kv_caches[0][0]
    return swap_space // (2 * len(kv_caches) * k0[0].numel() * k0.element_size())


@dataclass
class SwappedPin:
    """A program's pinned KV, in CPU blocks, with what names each block in the prefix cache."""
    cpu_blocks: list[int]  # the full blocks', then the partial last block's (where `tail`)
    names: list[BlockName]  # of each full block, in order
    until: float
    pinned_at: float
    tail: tuple[int, ...] | None = None  # the tokens computed in the partial last block


class SwapSpace:
    """The CPU pool's bookkeeping: which CPU blocks hold which swapped-out request, or which
    program's pinned KV."""

    def __init__(self, kv: KVCacheManager, num_cpu_blocks: int) -> None:
        self.kv = kv
        self.num_cpu_blocks = num_cpu_blocks
        self.free_cpu_blocks = list(range(num_cpu_blocks))
        self.swapped: dict[str, list[int]] = {}  # request id -> its CPU blocks, in order
        self.pins: OrderedDict[str, SwappedPin] = OrderedDict()  # program -> its KV; oldest first
        self._read_this_plan: list[int] = []  # freed by this plan's swap-ins: free from the next
        self._read_now: set[int] = set()  # read by this plan's swap-ins (a block freed later in the plan waits too)
        # swapped pins' full blocks, shared by name: its CPU block, and how many pins hold it
        self.by_name: dict[BlockName, int] = {}
        self.named: dict[int, tuple[BlockName, int]] = {}  # CPU block -> (its name, its holders)
        self.num_swap_outs = 0
        self.num_swap_ins = 0
        kv.spill = []  # pins that yield come here (swap_out_pins)

    def begin_plan(self) -> None:
        """A new step's plan: the last plan's swap-ins have run."""
        self.free_cpu_blocks += self._read_this_plan
        self._read_this_plan = []
        self._read_now.clear()

    def _take_cpu_blocks(self, n: int) -> list[int] | None:
        while n > len(self.free_cpu_blocks) and self.pins:  # swapped pins give way, oldest first
            self._give_way()
        if n > len(self.free_cpu_blocks):
            return None
        return [self.free_cpu_blocks.pop() for _ in range(n)]

    def swap_out(self, req: Request) -> list[tuple[int, int]] | None:
        """Plans moving the blocks that hold `req`'s computed tokens to CPU and frees them on
        the device: (device block, CPU block) pairs. None (nothing done) when the CPU pool
        has no room: recompute instead."""
        n = self.kv.blocks_for(req.num_computed_tokens)
        cpu_ids = self._take_cpu_blocks(n) if n else None
        if cpu_ids is None:
            return None
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
        if not self.kv.allocate(req, 0):  # (pins yield to it)
            return None
        pairs = list(zip(cpu_ids, req.block_ids))
        self._read_this_plan += self.swapped.pop(req.request_id)
        self.num_swap_ins += 1
        return pairs

    def discard(self, req: Request) -> None:
        self.free_cpu_blocks.extend(self.swapped.pop(req.request_id, []))

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    # -- programs' pinned KV -------------------------------------------------------------
    def swap_out_pins(self) -> list[tuple[int, int]]:
        """Plans moving the pins that yielded this step (kv.spill) to CPU: (device block,
        CPU block) pairs. A pin the pool has no room for is dropped (counted as yielded or
        expired, as it left the device)."""
        pairs: list[tuple[int, int]] = []
        for pin in self.kv.spill:
            names = [(h, t) for _, h, t in pin.blocks]
            held = [self._hold(name) for name in names]  # in the pool already: shared, not copied
            device_ids = [block_id for (block_id, _, _), cpu in zip(pin.blocks, held) if cpu is None]
            device_ids += [pin.tail[0]] if pin.tail else []
            fresh = self._take_cpu_blocks(len(device_ids))
            if fresh is None:
                self._release([cpu for cpu in held if cpu is not None], self.free_cpu_blocks)
                self.kv.pin_counts[pin.outcome] += 1
                continue
            self.drop_pin(pin.key)  # (a program has one pin)
            pairs += list(zip(device_ids, fresh))
            copies, cpu_ids = iter(fresh), []
            for name, cpu in zip(names, held):
                if cpu is None:
                    cpu = next(copies)
                    self.by_name[name], self.named[cpu] = cpu, (name, 1)
                cpu_ids.append(cpu)
            cpu_ids += copies  # the partial last block's, where there is one
            self.pins[pin.key] = SwappedPin(cpu_ids, names, pin.until, pin.pinned_at, pin.tail[1] if pin.tail else None)
            self.kv.pin_counts["swapped_out"] += 1
        self.kv.spill.clear()
        return pairs

    def _hold(self, name: BlockName) -> int | None:
        """One more holder of the pool's block named `name`; None where the pool has none."""
        cpu = self.by_name.get(name)
        if cpu is not None:
            self.named[cpu] = (name, self.named[cpu][1] + 1)
        return cpu

    def _release(self, cpu_ids: list[int], into: list[int]) -> None:
        """One holder fewer of each of `cpu_ids`: a block no pin holds any more goes to `into`
        (free), or, where this plan's swap-ins read it, to the next plan's free blocks."""
        for cpu in cpu_ids:
            if cpu in self.named:
                name, holders = self.named[cpu]
                if holders > 1:
                    self.named[cpu] = (name, holders - 1)
                    continue
                del self.named[cpu], self.by_name[name]
            (self._read_this_plan if cpu in self._read_now else into).append(cpu)

    def swap_in_pin(self, key: str, req: Request) -> list[tuple[int, int]]:
        """Brings back the part of `key`'s swapped KV that starts `req`'s prompt (the
        program's next call), as a device pin that the call then takes: (CPU block, device
        block) pairs, none for blocks still cached on the device. Other pins yield for it, as
        they would for computing the prefix again (which takes as many blocks); nothing (the
        swapped KV stays) when even that leaves too few blocks free; nothing and the swapped
        KV let go when the call does not start with it, or when the program has KV pinned on
        the device already (a later call's)."""
        pin, pool = self.pins[key], self.kv.pool
        if key in self.kv.pins:
            self.drop_pin(key, "yielded")
            return []
        names = []
        for name, wanted in zip(pin.names, self.kv.prefix_names(req)):
            if name != wanted:
                break
            names.append(name)
        if not names:  # the call does not start with it: of no use (as a device pin, taken and let go)
            self.drop_pin(key, "taken")
            return []
        found = [pool.lookup(h, t) for h, t in names]
        hits = [b for b in found if b is not None]
        for b in hits:  # first, so that neither pins yielding nor the allocations below evict them
            pool.share(b)
        # the blocks to copy back and the rest of the prompt: what computing it again would take
        if not self.kv.make_room(self.kv.blocks_for(req.num_tokens) - len(hits)):
            for b in hits:
                pool.release(b)
            return []
        blocks, pairs = [], []
        for (h, t), block, cpu in zip(names, found, pin.cpu_blocks):
            if block is None:
                block = pool.allocate()
                pool.register(block, h, t)
                pairs.append((cpu, block.block_id))
            blocks.append(block)
        tail = None
        if pin.tail is not None and len(names) == len(pin.names):  # the call continues every full block
            tail = (pool.allocate(), pin.tail)  # (room made above: the prompt's blocks include it)
            pairs.append((pin.cpu_blocks[len(names)], tail[0].block_id))
        del self.pins[key]
        self._read_now.update(cpu for cpu, _ in pairs)
        self._release(pin.cpu_blocks, self.free_cpu_blocks)
        self.kv.pins[key] = Pin(blocks, pin.until, pin.pinned_at, tail)
        self.kv.pin_counts["swapped_in"] += 1
        return pairs

    def _give_way(self) -> None:
        """Frees CPU blocks of swapped pins, which are lost then (the pool is their last
        stop): the oldest pin's partial last block (it saves its next call fewer tokens than
        any full block), or, when no pin has one left, the oldest pin whole (yielded)."""
        key = next((k for k, pin in self.pins.items() if pin.tail is not None), None)
        if key is None:
            self.drop_pin(next(iter(self.pins)), "yielded")
            return
        pin = self.pins[key]
        self.free_cpu_blocks.append(pin.cpu_blocks.pop())  # (the partial block's, last)
        pin.tail = None

    def drop_pin(self, key: str, why: str | None = None) -> None:
        pin = self.pins.pop(key, None)
        if pin is not None:
            self._release(pin.cpu_blocks, self.free_cpu_blocks)
            if why is not None:
                self.kv.pin_counts[why] += 1

    def expire_pins(self, now: float, awaited: set[str] = frozenset()) -> None:
        """Once a step: swapped pins past their time go, but `awaited` programs' (awaited_last)."""
        for key in awaited_last(self.pins, now, awaited):
            self.drop_pin(key, "expired")

    @property
    def num_pinned_blocks(self) -> int:
        """CPU blocks the swapped pins hold (a shared one once)."""
        return len(self.named) + sum(pin.tail is not None for pin in self.pins.values())


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
