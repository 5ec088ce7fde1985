"""KV block accounting: a pool of fixed-size blocks with ref counts, an LRU free list, and
automatic prefix caching.

A full block is named by a chained hash of (parent block's hash, its token ids), so equal
hashes mean equal prefixes. Freed blocks keep their hash and stay reusable until the pool
hands them out again (least recently freed first); a request whose prompt starts with
cached blocks shares them (ref count + 1) and computes only the rest.

A finished call of an agent program can leave its blocks pinned for the program's next
call (`pin`): its full blocks, and its partial last block with the tokens computed in it,
which the prefix cache cannot name (a hash names a full block) but the program's next call
continues (its previous prompt, the reply, then the tool's result), so that call recomputes
none of them (`find_cached_prefix`). Pinned blocks are held by a reference of their own, so
no other traffic evicts them, until the next call takes them, the front end learns the call
ended in no tool call (the scheduler's `release_program_kv`), the pin expires, or an
allocation would fail without them (pins yield to memory pressure, oldest first, and
without a swap pool partial blocks before any whole pin: pinning never refuses or preempts
anyone). A pin whose program's next call is already waiting does not expire and yields
last (`expire_pins`). Where a CPU swap pool exists (engine/swap.py), a yielding or expiring
pin is handed to it (`spill`) instead of dropped.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from engine.request import Request


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order: the front was freed longest ago.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> Block:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_count == 0
        if block.hash is not None:  # evict its cached content
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = block.token_ids = None
        block.ref_count = 1
        return block

    def share(self, block: Block) -> None:
        if block.ref_count == 0:
            del self.free[block.block_id]
        block.ref_count += 1

    def release(self, block: Block) -> None:
        assert block.ref_count > 0, f"block {block.block_id} released more often than taken"
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free[block.block_id] = None

    def lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> Block | None:
        block_id = self.cached.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        return block if block.token_ids == token_ids else None  # guard against hash collisions

    def register(self, block: Block, block_hash: int, token_ids: tuple[int, ...]) -> None:
        if block.hash is not None:
            return
        block.hash, block.token_ids = block_hash, token_ids
        self.cached.setdefault(block_hash, block.block_id)


def awaited_last(pins: OrderedDict, now: float, awaited: set[str]) -> list[str]:
    """Moves the pins of `awaited` programs (whose next call is waiting: about to take them)
    to the back of `pins`' yield order (oldest first); returns the keys of the others that
    are past their time (each pin has an `until`)."""
    for key in [k for k in pins if k in awaited]:
        pins.move_to_end(key)
    return [k for k, pin in pins.items() if pin.until <= now and k not in awaited]


class Pin(NamedTuple):
    """A program's KV kept on the device for its next call."""
    blocks: list[Block]  # full blocks, in the prefix cache
    until: float       # when it expires
    pinned_at: float   # when its call finished
    # the call's partial last block and the tokens computed in it (the next call may continue them)
    tail: tuple[Block, tuple[int, ...]] | None = None

    @property
    def held(self) -> list[Block]:
        """Every block the pin holds a reference to: its full blocks, then its partial one."""
        return self.blocks + ([self.tail[0]] if self.tail else [])


@dataclass
class SpilledPin:
    """A pin that left the device this step for the CPU pool (it yielded to memory pressure,
    or expired), as it was: its blocks may be handed out again before the step's forward
    pass, their data is still there until then."""
    key: str
    blocks: list[tuple[int, int, tuple[int, ...]]]  # (block id, hash, token ids), in order
    until: float       # when it expires in the pool
    pinned_at: float
    outcome: str       # what it counts as (yielded, expired) where the pool has no room for it
    tail: tuple[int, tuple[int, ...]] | None = None  # the partial last block's id and computed tokens


class KVCacheManager:
    """Which blocks each request owns; the scheduler's only view of KV memory."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0     # of those, tokens found cached
        self.pins: OrderedDict[str, Pin] = OrderedDict()  # program -> its pin; oldest first
        # taken: by the next call; released: the call ended in no tool call (no next call
        # comes); yielded: dropped under memory pressure; swapped_out/_in: to the CPU pool
        # instead, and back for the next call (engine/swap.py)
        self.pin_counts = {"made": 0, "taken": 0, "released": 0, "expired": 0, "yielded": 0,
                           "swapped_out": 0, "swapped_in": 0}
        self.spill: list[SpilledPin] | None = None  # set where a swap pool takes yielding and expiring pins

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_tokens(self, req: Request, index: int) -> tuple[int, ...]:
        bs = self.block_size
        return tuple(req.all_token_ids[index * bs:(index + 1) * bs])

    def _hash(self, req: Request, index: int, parent: int | None) -> int:
        return hash((parent, self._block_tokens(req, index)))

    def prefix_names(self, req: Request) -> Iterator[tuple[int, tuple[int, ...]]]:
        """(hash, token ids) of the blocks a prefix-cache hit can give `req`, in order, as
        they are asked for: its full blocks but the one holding its last token (at least one
        token must be computed to sample from)."""
        parent = None
        for i in range((req.num_tokens - 1) // self.block_size):
            parent = self._hash(req, i, parent)
            yield parent, self._block_tokens(req, i)

    def find_cached_prefix(self, req: Request) -> tuple[list[Block], int]:
        """Cached blocks matching the start of a request that holds no blocks yet, and how
        many of its tokens they hold: full blocks named by hash, then, where `req` continues
        its program's pinned KV past the last of them, the pin's partial last block (the
        request takes it over and writes its own tokens after those it shares)."""
        assert not req.block_ids
        if not self.enable_prefix_caching:
            return [], 0
        self.prefix_cache_queries += req.num_tokens
        hits: list[Block] = []
        for block_hash, token_ids in self.prefix_names(req):
            block = self.pool.lookup(block_hash, token_ids)
            if block is None:
                break
            hits.append(block)
        num_tokens = len(hits) * self.block_size
        pin = self.pins.get(req.program) if req.program is not None else None
        if pin is not None and pin.tail is not None and len(hits) == len(pin.blocks) and \
                (not hits or hits[-1].hash == pin.blocks[-1].hash):
            block, computed = pin.tail
            limit = min(len(computed), req.num_tokens - 1 - num_tokens)  # one token left to compute
            shared = 0
            while shared < limit and req.all_token_ids[num_tokens + shared] == computed[shared]:
                shared += 1
            if shared:
                hits.append(block)
                num_tokens += shared
        self.prefix_cache_hits += num_tokens
        return hits, num_tokens

    def allocate(self, req: Request, num_new_tokens: int, cached_prefix: list[Block] = ()) -> bool:
        """Give `req` blocks for `num_new_tokens` more tokens after its computed ones (a new
        request first takes `cached_prefix`, find_cached_prefix's blocks). All or nothing:
        False, changing nothing, when the pool is short."""
        # req.num_computed_tokens already counts the cached prefix's tokens.
        cached_prefix = list(cached_prefix)
        have = len(req.block_ids) + len(cached_prefix)
        need = self.blocks_for(req.num_computed_tokens + num_new_tokens) - have
        # Cached blocks sitting in the free list stop being free once shared.
        def short() -> bool:
            return need > self.pool.num_free - sum(1 for b in cached_prefix if b.ref_count == 0)
        while short() and self.pins:  # pins yield to memory pressure, oldest first
            self._yield_oldest_pin()
        if short():
            return False
        for block in cached_prefix:
            self.pool.share(block)
            req.block_ids.append(block.block_id)
            if block.hash is not None:  # (a pin's partial block, last, has none until the request fills it)
                req.block_hashes.append(block.hash)
        for _ in range(max(need, 0)):
            req.block_ids.append(self.pool.allocate().block_id)
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's newly completed full blocks for reuse by later requests."""
        if not self.enable_prefix_caching:
            return
        num_full = req.num_computed_tokens // self.block_size
        parent = req.block_hashes[-1] if req.block_hashes else None
        for i in range(len(req.block_hashes), num_full):
            h = self._hash(req, i, parent)
            self.pool.register(self.pool.blocks[req.block_ids[i]], h, self._block_tokens(req, i))
            req.block_hashes.append(h)
            parent = h

    def fork(self, parent: Request, child: Request) -> list[tuple[int, int]] | None:
        """Parallel sampling: `child` (holding no blocks) shares `parent`'s full blocks and
        gets a fresh block for the partial last one. Returns the (source, destination) block
        copies the caller must make, or None (nothing changed) when the pool is short."""
        assert not child.block_ids
        full, partial = divmod(parent.num_computed_tokens, self.block_size)
        if partial and self.pool.num_free == 0:
            return None
        for block_id in parent.block_ids[:full]:
            self.pool.share(self.pool.blocks[block_id])
        child.block_ids = parent.block_ids[:full]
        child.block_hashes = parent.block_hashes[:full]
        if not partial:
            return []
        block = self.pool.allocate()
        child.block_ids.append(block.block_id)
        return [(parent.block_ids[full], block.block_id)]

    def pin(self, key: str, req: Request, until: float, now: float) -> None:
        """Keeps `req`'s blocks (about to be freed) for `key`'s next call: the full ones, in
        the prefix cache, and the partial last one with the tokens computed in it."""
        self.unpin(key)
        if not self.enable_prefix_caching:
            return
        full = len(req.block_hashes)
        assert full == req.num_computed_tokens // self.block_size, "every computed full block is cached"
        blocks = [self.pool.blocks[b] for b in req.block_ids[:full]]
        tail = None
        if req.num_computed_tokens > full * self.block_size:
            tail = (self.pool.blocks[req.block_ids[full]],
                    tuple(req.all_token_ids[full * self.block_size:req.num_computed_tokens]))
        pin = Pin(blocks, until, now, tail)
        for block in pin.held:
            self.pool.share(block)
        if pin.held:
            self.pins[key] = pin
            self.pin_counts["made"] += 1

    @property
    def num_pinned_blocks(self) -> int:
        """Blocks the pins hold (a prefix that programs share, once)."""
        return len({block.block_id for pin in self.pins.values() for block in pin.held})

    def blocks_held_alone(self, req: Request) -> tuple[int, int]:
        """What `req`'s KV costs the memory if pinned: the blocks a pin of it would keep that
        no other request or pin holds (its full blocks and its partial last one), and its
        full blocks that another holds too (a common prefix, such as an agent's instruction
        and tools, which is in memory once)."""
        full = len(req.block_hashes)
        shared = sum(self.pool.blocks[b].ref_count > 1 for b in req.block_ids[:full])
        return full - shared + (req.num_computed_tokens > full * self.block_size), shared

    def unpin(self, key: str, why: str | None = None) -> float | None:
        """Lets `key`'s pinned blocks go (evictable again, still cached), counted under `why`
        (taken, expired, yielded); returns when it was pinned."""
        pin = self.pins.pop(key, None)
        if pin is None:
            return None
        if why is not None:
            self.pin_counts[why] += 1
        for block in reversed(pin.held):
            self.pool.release(block)
        return pin.pinned_at

    def make_room(self, num_blocks: int) -> bool:
        """Lets pins yield, oldest first, until `num_blocks` blocks are free; whether they are."""
        while num_blocks > self.pool.num_free and self.pins:
            self._yield_oldest_pin()
        return num_blocks <= self.pool.num_free

    def _yield_oldest_pin(self) -> None:
        """Gives up one pinned block or more: the oldest pin whole (counted as yielded), to
        the swap pool where there is one; without one, first the oldest pin's partial last
        block (a partial block saves the next call fewer tokens than any full block), and a
        whole pin only when no pin has a partial block left."""
        key = None if self.spill is not None else next((k for k, p in self.pins.items() if p.tail is not None), None)
        if key is not None:
            pin = self.pins[key]
            self.pool.release(pin.tail[0])
            self.pins[key] = pin._replace(tail=None)
            return
        key, pin = next(iter(self.pins.items()))
        self._leave(key, "yielded", pin.until)

    def _leave(self, key: str, outcome: str, until_swapped: float) -> None:
        """`key`'s pin leaves the device: to the swap pool where there is one (which counts it:
        swapped out, or `outcome` when it has no room), else counted as `outcome`."""
        pin = self.pins[key]
        if self.spill is None or not pin.blocks:  # (a partial block alone is not worth a swap)
            self.unpin(key, outcome)
            return
        tail = (pin.tail[0].block_id, pin.tail[1]) if pin.tail else None
        self.spill.append(SpilledPin(key, [(b.block_id, b.hash, b.token_ids) for b in pin.blocks], until_swapped,
                                     pin.pinned_at, outcome, tail))
        self.unpin(key)

    def expire_pins(self, now: float, awaited: set[str] = frozenset(),
                    swapped_ttl: Callable[[], float] | None = None) -> None:
        """Once a step: pins past their time go, but `awaited` programs' (awaited_last). With
        `swapped_ttl` and a swap pool, they go there for that long again (the program may
        still come back: a tool in the heavy tail; a copy in CPU memory costs the device
        nothing), else away (their blocks stay in the prefix cache until reused)."""
        for key in awaited_last(self.pins, now, awaited):
            if swapped_ttl is None:
                self.unpin(key, "expired")
            else:
                self._leave(key, "expired", now + swapped_ttl())

    def free(self, req: Request) -> None:
        # Release the tail first so that, among this request's blocks, the shared prefix
        # (most likely reused) is evicted last.
        for block_id in reversed(req.block_ids):
            self.pool.release(self.pool.blocks[block_id])
        req.block_ids = []
        req.block_hashes = []
