"""CUDA graphs for decode steps, captured per batch-size bucket as vLLM captures them.

A decode step launches about ten kernels per layer; at small batches the launches, not the
math, bound the step. So each bucket (1, 2, 4, then every 8 up to `max_num_seqs`, at most
`MAX_CAPTURE_SIZE`) is captured once at start-up over persistent input buffers, and a step
of n decodes pads to the smallest bucket >= n, copies its inputs into the buffers and
replays the bucket's graph. Padding rows compute and are dropped: token 0 at position 0,
KV slot -1 (the KV write skips negative slots), a context of one token. A graph's kernel
shapes are fixed at capture, so every bucket attends as if its rows were `max_model_len`
long (the rows' own `seq_lens` bound the work inside the kernel). Prompt chunks and batches
above the largest bucket run eagerly; `EngineConfig.enforce_eager` turns graphs off.

The buckets, the padding and the buffers are plain torch on any device: on a CPU the padded
step runs eagerly (`DecodeGraphs.run` before or without `capture`), which is what the CPU
tests compare token for token with the unpadded step. Capture and replay need a GPU.
"""
from __future__ import annotations

import bisect
import gc
from typing import Callable

import torch

from engine.attention import AttentionMetadata
from engine.attention_backends import AttentionRows, padded_table

MAX_CAPTURE_SIZE = 256
PAD_SLOT = -1


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes captured: 1, 2, 4, 8, 16, ... every 8, and max_num_seqs itself so
    that every decode batch the scheduler can form fits one, up to MAX_CAPTURE_SIZE."""
    top = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = {s for s in (1, 2, 4) if s <= top} | set(range(8, top + 1, 8)) | {top}
    return sorted(sizes)


def bucket_for(num_rows: int, sizes: list[int]) -> int | None:
    """The smallest captured size that holds num_rows; None above the largest."""
    assert num_rows >= 1
    i = bisect.bisect_left(sizes, num_rows)
    return sizes[i] if i < len(sizes) else None


class DecodeInputs:
    """The persistent buffers a captured decode step reads, sized for the largest bucket."""

    def __init__(self, max_rows: int, max_blocks_per_seq: int, device: torch.device) -> None:
        self.max_rows, self.max_blocks = max_rows, max_blocks_per_seq
        i32, i64 = dict(dtype=torch.int32, device=device), dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(max_rows, **i64)
        self.positions = torch.zeros(max_rows, **i64)
        self.slot_mapping = torch.full((max_rows,), PAD_SLOT, **i64)
        self.block_tables = torch.zeros(max_rows, max_blocks_per_seq, **i32)
        self.seq_lens = torch.ones(max_rows, **i32)
        self.query_start_loc = torch.arange(max_rows + 1, **i32)  # one query row per sequence

    def fill(self, input_ids: list[int], positions: list[int], slots: list[int], rows: list[AttentionRows],
             block_size: int, bucket: int) -> None:
        """This step's n decode rows into rows [0, n), padding into [n, bucket). Columns of
        a block table past the widest sequence's blocks are left as they are: never read."""
        n = len(input_ids)
        assert 1 <= n <= bucket <= self.max_rows and len(positions) == len(slots) == len(rows) == n
        width = max(-(-r.context_len // block_size) for r in rows)  # as the Triton backend's metadata
        assert width <= self.max_blocks, "a sequence longer than max_model_len"
        self.input_ids[:n].copy_(torch.tensor(input_ids), non_blocking=True)
        self.positions[:n].copy_(torch.tensor(positions), non_blocking=True)
        self.slot_mapping[:n].copy_(torch.tensor(slots), non_blocking=True)
        self.seq_lens[:n].copy_(torch.tensor([r.context_len for r in rows], dtype=torch.int32), non_blocking=True)
        tables = torch.tensor([padded_table(r.block_ids, width) for r in rows], dtype=torch.int32)
        self.block_tables[:n, :width].copy_(tables, non_blocking=True)
        if bucket > n:
            self.input_ids[n:bucket] = 0
            self.positions[n:bucket] = 0
            self.slot_mapping[n:bucket] = PAD_SLOT
            self.seq_lens[n:bucket] = 1

    def metadata(self, bucket: int, max_seq_len: int) -> AttentionMetadata:
        """Views of the first `bucket` rows, as the Triton backend's metadata."""
        return AttentionMetadata(slot_mapping=self.slot_mapping[:bucket], num_decodes=bucket, decode_block_tables=None,
                                 decode_seq_lens=None, decode_mask=None, prefills=[],
                                 query_start_loc=self.query_start_loc[:bucket + 1], seq_lens=self.seq_lens[:bucket],
                                 block_tables=self.block_tables[:bucket], max_query_len=1, max_seq_len=max_seq_len)


Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


class DecodeGraphs:
    """Decode steps through the buckets' graphs (after `capture`, CUDA only) or, before
    capture, through the same padded buffers eagerly."""

    def __init__(self, forward: Forward, max_num_seqs: int, max_model_len: int, block_size: int,
                 device: torch.device) -> None:
        self.forward = forward  # (input_ids, positions, metadata) -> hidden states [rows, hidden]
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len, self.block_size = max_model_len, block_size
        self.inputs = DecodeInputs(self.sizes[-1], -(-max_model_len // block_size), device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _step(self, bucket: int) -> torch.Tensor:
        i = self.inputs
        return self.forward(i.input_ids[:bucket], i.positions[:bucket], i.metadata(bucket, self.max_model_len))

    @torch.inference_mode()
    def capture(self) -> None:
        """One graph per bucket, largest first, sharing one memory pool. The buffers hold
        padding only while capturing: nothing is written to the KV cache.

        Other engines may serve in this process meanwhile (the ADK registry holds several), so:
        - the capture stream is this engine's own, warmed up before each capture: the cuBLAS
          workspace torch binds to a stream is then allocated outside any graph's pool (on the
          stream torch shares between captures, it lay in the pool of a graph since freed, and
          the next engine's capture failed with CUBLAS_STATUS_INTERNAL_ERROR on an H200);
        - capture errors are thread-local: another thread's allocations do not void it;
        - no garbage collection runs inside a capture (freeing CUDA memory there voids it).
        """
        assert self.inputs.input_ids.is_cuda, "CUDA graphs need a CUDA device"
        stream = torch.cuda.Stream(self.inputs.input_ids.device)
        stream.wait_stream(torch.cuda.current_stream())
        pool, collecting = None, gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.stream(stream):
                for bucket in reversed(self.sizes):
                    self._step(bucket)  # warm-up: Triton compiles, cuBLAS binds its workspace
                    stream.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                        out = self._step(bucket)
                    pool = graph.pool()
                    self.graphs[bucket] = (graph, out)
        finally:
            if collecting:
                gc.enable()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def fits(self, num_rows: int) -> bool:
        return num_rows <= self.sizes[-1]

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], slots: list[int],
            rows: list[AttentionRows]) -> torch.Tensor:
        """Hidden states of the n decode rows [n, hidden]."""
        bucket = bucket_for(len(input_ids), self.sizes)
        assert bucket is not None, "a decode batch above the largest bucket runs eagerly"
        self.inputs.fill(input_ids, positions, slots, rows, self.block_size, bucket)
        captured = self.graphs.get(bucket)
        if captured is None:
            return self._step(bucket)[:len(input_ids)]
        graph, out = captured
        graph.replay()
        return out[:len(input_ids)]
