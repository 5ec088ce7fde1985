"""CUDA-graph decode (engine/cuda_graphs.py): buckets, padding and persistent buffers on
CPU, where the padded step runs eagerly through the Triton kernels in the interpreter;
capture and replay against eager on a GPU only."""
import asyncio
import gc
import os

import pytest
import torch

from engine import AsyncLLM, EngineConfig, LLMEngine, SamplingParams
from engine.attention_backends import AttentionRows
from engine.cuda_graphs import MAX_CAPTURE_SIZE, PAD_SLOT, DecodeInputs, bucket_for, capture_sizes
from engine.platform import Platform
from helpers import greedy_tokens


def test_buckets_are_1_2_4_then_every_8_and_the_batch_limit_itself():
    assert capture_sizes(1) == [1]
    assert capture_sizes(12) == [1, 2, 4, 8, 12]
    assert capture_sizes(256) == [1, 2, 4] + list(range(8, 257, 8))
    assert capture_sizes(1000)[-1] == MAX_CAPTURE_SIZE
    sizes = capture_sizes(64)
    assert [bucket_for(n, sizes) for n in (1, 3, 5, 9, 63, 64, 65)] == [1, 4, 8, 16, 64, 64, None]


def test_decode_inputs_hold_the_rows_then_padding_that_writes_no_kv():
    inputs = DecodeInputs(max_rows=8, max_blocks_per_seq=4, device=torch.device("cpu"))
    tables = [([2], 6), ([5, 6], 18), ([9, 10, 12], 41)]  # (block table, context length)
    rows = [AttentionRows(table, ctx, 1, i) for i, (table, ctx) in enumerate(tables)]
    inputs.fill([11, 12, 13], [5, 17, 40], [37, 81, 200], rows, block_size=16, bucket=4)
    assert inputs.input_ids[:4].tolist() == [11, 12, 13, 0] and inputs.positions[:4].tolist() == [5, 17, 40, 0]
    assert inputs.slot_mapping[:4].tolist() == [37, 81, 200, PAD_SLOT]
    assert inputs.seq_lens[:4].tolist() == [6, 18, 41, 1]
    assert inputs.block_tables[:3, :3].tolist() == [[2, 0, 0], [5, 6, 0], [9, 10, 12]]
    meta = inputs.metadata(4, max_seq_len=64)
    assert meta.num_decodes == 4 and meta.max_query_len == 1 and not meta.prefills
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 4] and meta.block_tables.shape == (4, 4)
    # the next, smaller step: its rows overwrite, the rows past it become padding again
    inputs.fill([21], [6], [38], [AttentionRows([2], 7, 1, 0)], block_size=16, bucket=2)
    assert inputs.input_ids[:2].tolist() == [21, 0] and inputs.slot_mapping[:2].tolist() == [38, PAD_SLOT]
    assert inputs.seq_lens[:2].tolist() == [7, 1]
    assert meta.seq_lens.data_ptr() == inputs.seq_lens.data_ptr()  # views: what a captured graph reads


def test_cuda_graphs_are_chosen_on_cuda_with_triton_unless_enforce_eager():
    assert Platform("cuda", None).uses_cuda_graphs("triton", enforce_eager=False)
    assert not Platform("cuda", None).uses_cuda_graphs("triton", enforce_eager=True)
    assert not Platform("cuda", None).uses_cuda_graphs("torch", enforce_eager=False)
    cpu = Platform("cpu", "generic")
    assert not cpu.uses_cuda_graphs("triton", enforce_eager=False)


def _triton_engine(**kw) -> LLMEngine:
    # max_model_len 2048: graphs attend as if every row were that long, which splits the
    # KV range in two (flash-decoding) where the eager step of short rows does not
    return LLMEngine(EngineConfig(model="dummy-tiny", dtype="float32", attention_backend="triton", num_kv_blocks=128,
                                  max_model_len=2048, max_num_batched_tokens=64, **kw))


@pytest.mark.parametrize("graph_batch", [8, 2])  # 3 decodes: padded to a bucket of 4; above the largest (2): eager
def test_padded_decode_steps_give_the_unpadded_steps_tokens(graph_batch):
    prompts = [list(range(10, 15)), list(range(40, 61)), list(range(100, 133))]  # within a block, across, 2 blocks
    expected = greedy_tokens(_triton_engine(), prompts, 6)
    engine = _triton_engine()
    engine.runner.use_graphs(graph_batch, engine.max_model_len, capture=False)
    assert greedy_tokens(engine, prompts, 6) == expected
    inputs = engine.runner.graphs.inputs
    if graph_batch == 8:  # the last step went through the buffers: three rows and a padding row
        assert inputs.positions[:4].tolist() == [len(p) + 4 for p in prompts] + [0]
        assert inputs.slot_mapping[3].item() == PAD_SLOT
    else:
        assert inputs.positions.tolist() == [0, 0]  # never filled
    assert engine.kv.num_free_blocks == 128


GPU_PROMPTS = [list(range(10 + 7 * i, 30 + 11 * i)) for i in range(3)]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                               reason="CUDA graphs need an NVIDIA GPU (and compiled kernels, not the interpreter)")


@needs_gpu
def test_replayed_graphs_give_eager_tokens_on_a_gpu():
    prompts = [list(range(10 + 7 * i, 30 + 11 * i)) for i in range(5)]
    eager = LLMEngine(EngineConfig(model="dummy-tiny", dtype="bfloat16", enforce_eager=True, max_num_seqs=16))
    graphs = LLMEngine(EngineConfig(model="dummy-tiny", dtype="bfloat16", max_num_seqs=16))
    assert graphs.stats()["weights"]["cuda_graph_sizes"] == [1, 2, 4, 8, 16]
    assert greedy_tokens(graphs, prompts, 16) == greedy_tokens(eager, prompts, 16)


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_engine_captures_after_another_engines_graphs_were_freed(dtype):
    """Seen on an H200: the second fp32 engine of a process failed its capture
    (CUBLAS_STATUS_INTERNAL_ERROR), and the aborted capture broke every later random op."""
    first = LLMEngine(EngineConfig(model="dummy-tiny", dtype=dtype, max_num_seqs=8))
    expected = greedy_tokens(first, GPU_PROMPTS, 8)
    del first
    gc.collect()
    second = LLMEngine(EngineConfig(model="dummy-tiny", dtype=dtype, max_num_seqs=8))
    assert second.stats()["weights"]["cuda_graph_sizes"] == [1, 2, 4, 8]
    assert greedy_tokens(second, GPU_PROMPTS, 8) == expected
    torch.randn(4, device="cuda")  # the default generator is whole


@needs_gpu
def test_an_engine_captures_while_another_one_serves():
    serving = AsyncLLM(EngineConfig(model="dummy-tiny", dtype="bfloat16", max_num_seqs=8))
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=200, ignore_eos=True)

    async def sampled():  # the stream's outputs are deltas
        return [t async for o in serving.generate(list(range(5, 40)), params) for t in o.outputs[0].token_ids]

    async def serve_while_a_second_engine_starts():
        task = asyncio.ensure_future(sampled())
        await asyncio.sleep(0.05)  # the first engine is decoding
        second = await asyncio.to_thread(LLMEngine, EngineConfig(model="dummy-tiny", dtype="bfloat16",
                                                                max_num_seqs=8))
        return await task, await sampled(), second

    try:
        during, alone, second = asyncio.run(serve_while_a_second_engine_starts())
    finally:
        serving.shutdown()
    assert len(during) == 200 and during == alone  # a seeded request: the capture beside it changed nothing
    assert second.stats()["weights"]["cuda_graph_sizes"] == [1, 2, 4, 8]
    eager = LLMEngine(EngineConfig(model="dummy-tiny", dtype="bfloat16", max_num_seqs=8, enforce_eager=True))
    assert greedy_tokens(second, GPU_PROMPTS, 8) == greedy_tokens(eager, GPU_PROMPTS, 8)
