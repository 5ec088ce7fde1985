"""Triton kernels against their torch references, in the interpreter on CPU (real GPU runs
are the same tests without TRITON_INTERPRET). Small shapes: the interpreter is slow."""
import itertools
import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
from engine_kernels import triton_attention as ta  # noqa: E402
from engine_kernels.reference import copy_blocks_ref, paged_attention_ref, write_kv_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_batch(query_lens, context_lens, Hkv, G, D, block_size, dtype, num_blocks=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    H = Hkv * G
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
    seq_lens = [c + q for q, c in zip(query_lens, context_lens)]
    max_blocks = max(-(-s // block_size) for s in seq_lens)
    perm = torch.randperm(num_blocks, generator=g)
    assert max_blocks * len(seq_lens) <= num_blocks
    tables = torch.stack([perm[i * max_blocks:(i + 1) * max_blocks] for i in range(len(seq_lens))]).int()
    starts = torch.tensor([0] + list(itertools.accumulate(query_lens)), dtype=torch.int32)
    q = torch.randn(int(starts[-1]), H, D, generator=g).to(dtype)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return (to(q), to(k_cache), to(v_cache), to(starts), to(torch.tensor(seq_lens, dtype=torch.int32)), to(tables),
            max(query_lens), max(seq_lens))


@pytest.mark.parametrize("G", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_prefill_and_decode_batch_matches_reference(G, dtype):
    # decodes over short and block-crossing contexts, a fresh prefill, a prefill chunk with
    # cached context, a full-block context and a one-token prompt
    query_lens = [1, 1, 7, 5, 1, 1]
    context_lens = [0, 16, 0, 20, 31, 32]
    q, kc, vc, starts, lens, tables, mq, ms = make_batch(query_lens, context_lens, 2, G, 64, 16, dtype)
    out = ta.paged_attention(q, kc, vc, starts, lens, tables, 0.125, mq, ms)
    ref = paged_attention_ref(q.cpu(), kc.cpu(), vc.cpu(), starts.cpu(), lens.cpu(), tables.cpu(), 0.125)
    torch.testing.assert_close(out.cpu().float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("D, block_size, dtype", [(128, 16, torch.float16), (64, 32, torch.float32),
                                                  (128, 32, torch.bfloat16), (256, 16, torch.float32)])
def test_head_dims_block_sizes_and_dtypes(D, block_size, dtype):
    # 11 query tokens: two prefill tiles at head dim 256 (32 rows = 8 tokens x G=4)
    q, kc, vc, starts, lens, tables, mq, ms = make_batch([11, 1], [block_size + 2, 2 * block_size], 1, 4, D,
                                                         block_size, dtype, num_blocks=16)
    out = ta.paged_attention(q, kc, vc, starts, lens, tables, D ** -0.5, mq, ms)
    ref = paged_attention_ref(q.cpu(), kc.cpu(), vc.cpu(), starts.cpu(), lens.cpu(), tables.cpu(), D ** -0.5)
    torch.testing.assert_close(out.cpu().float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_split_kv_decode_matches_reference(splits):
    q, kc, vc, starts, lens, tables, mq, ms = make_batch([1, 1, 1], [70, 5, 33], 2, 4, 64, 16, torch.float32)
    out = ta.paged_attention(q, kc, vc, starts, lens, tables, 0.125, mq, ms, num_kv_splits=splits)
    ref = paged_attention_ref(q.cpu(), kc.cpu(), vc.cpu(), starts.cpu(), lens.cpu(), tables.cpu(), 0.125)
    torch.testing.assert_close(out.cpu(), ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("window, splits", [(1, 1), (5, 1), (16, 1), (20, None), (20, 4)])
def test_sliding_window_matches_reference(window, splits):
    """Sliding-window layers (Gemma 3): a query sees only its last `window` keys, in prefill
    chunks with cached context, long decodes and split-KV decodes alike."""
    q, kc, vc, starts, lens, tables, mq, ms = make_batch([1, 7, 5, 1, 1], [70, 0, 20, 33, 3], 2, 2, 32, 16,
                                                         torch.float32)
    out = ta.paged_attention(q, kc, vc, starts, lens, tables, 0.125, mq, ms, window=window)
    ref = paged_attention_ref(q.cpu(), kc.cpu(), vc.cpu(), starts.cpu(), lens.cpu(), tables.cpu(), 0.125,
                              window=window)
    torch.testing.assert_close(out.cpu(), ref, atol=2e-4, rtol=2e-4)
    if splits:
        dq, dkc, dvc, dstarts, dlens, dtables, _, dms = make_batch([1, 1, 1], [70, 5, 33], 2, 2, 32, 16,
                                                                   torch.float32, seed=1)
        out = ta.paged_attention(dq, dkc, dvc, dstarts, dlens, dtables, 0.125, 1, dms, num_kv_splits=splits,
                                 window=window)
        ref = paged_attention_ref(dq.cpu(), dkc.cpu(), dvc.cpu(), dstarts.cpu(), dlens.cpu(), dtables.cpu(), 0.125,
                                  window=window)
        torch.testing.assert_close(out.cpu(), ref, atol=2e-4, rtol=2e-4)


def test_write_kv_skips_padded_slots():
    kc = torch.zeros(4, 16, 2, 8, device=DEVICE)
    vc = torch.zeros_like(kc)
    k, v = torch.randn(5, 2, 8, device=DEVICE), torch.randn(5, 2, 8, device=DEVICE)
    slots = torch.tensor([3, -1, 17, 63, -1], device=DEVICE)
    rk, rv = kc.clone().cpu(), vc.clone().cpu()
    ta.write_kv(kc, vc, k, v, slots)
    write_kv_ref(rk, rv, k.cpu(), v.cpu(), slots.cpu())
    assert torch.equal(kc.cpu(), rk) and torch.equal(vc.cpu(), rv)
    assert kc.view(-1, 2, 8)[[0, 1, 2, 4]].abs().sum() == 0


def test_copy_blocks_in_one_launch_over_all_layers():
    buf = torch.randn(3 * 2, 8, 4, 2, 8, device=DEVICE)  # 3 layers x (K, V)
    ref = buf.clone().cpu()
    src, dst = torch.tensor([0, 5, 2], device=DEVICE), torch.tensor([7, 1, 3], device=DEVICE)
    ta.copy_blocks(buf, src, dst)
    copy_blocks_ref(list(ref), src.cpu(), dst.cpu())
    assert torch.equal(buf.cpu(), ref)


def test_engine_on_triton_backend_gives_the_torch_backends_greedy_tokens():
    from engine import EngineConfig, LLMEngine
    from helpers import greedy_tokens

    def run(backend):
        eng = LLMEngine(EngineConfig(model="dummy-tiny", dtype="float32", num_kv_blocks=32, max_model_len=128,
                                     max_num_batched_tokens=12, attention_backend=backend))
        return greedy_tokens(eng, [list(range(5 + i, 12 + 5 * i)) for i in range(3)], 6)

    assert run("triton") == run("torch")
