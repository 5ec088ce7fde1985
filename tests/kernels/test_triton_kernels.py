"""Triton kernels against their torch references, in the interpreter on CPU (real GPU runs
are the same tests without TRITON_INTERPRET). Small shapes: the interpreter is slow."""
import itertools
import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
from engine_kernels import reference  # noqa: E402
from engine_kernels import triton_attention as ta  # noqa: E402
from engine_kernels import triton_ops  # noqa: E402
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


def test_triton_backend_runs_every_layer_op_as_a_triton_kernel():
    from engine.attention_backends import TritonBackend
    backend = TritonBackend(16, torch.device(DEVICE))
    assert set(backend.kernel_names(torch.bfloat16, 128, 4, "auto").values()) == {"triton"}
    assert backend.add_rms_norm_ is triton_ops.add_rms_norm_
    assert backend.rope_and_write_kv is triton_ops.rope_and_write_kv


# -- the layer's element-wise ops (triton_ops) against engine_kernels/reference.py ---------------
# RoPE + K/V write and the residual add round exactly where the references do: bit-exact. Two
# differences are left, bounded in ulps of the output dtype (measured in the interpreter over 12
# seeds: norms 2/2/4 for bf16/fp16/fp32, activations 0/2/4):
# - norms: the fp32 sum of squares adds in another order than torch's, which can move the fp32
#   scale by an ulp (on a GPU torch's rsqrt is rsqrtf: up to 2 more). bf16/fp16: the normalized
#   value's rounding to the dtype can land on the neighbour, and Llama's product with the weight
#   rounds once more: 2 ulps. fp32: the scale's ulps through the two products after it: 8.
# - activations: exp (and tanh from it) is correctly rounded neither here nor in torch (on a GPU
#   exp2 is ex2.approx: 2^-22 relative, 2-4 fp32 ulps). bf16/fp16: the activation's rounding to
#   the dtype can land on the neighbour, then the product rounds: 2 ulps. fp32: exp's error
#   through 1 + e and the division: 8. tanh-GELU where tanh is near -1: 1 + tanh cancels, and two
#   fp32 tanh an ulp apart (2^-24) differ there by up to 2^-23 in 1 + tanh, so the output by
#   |x * up| 2^-23 (torch's own error there is as large): allowed up to |x * up| 2^-22 beyond.
NORM_ULPS = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 8}
ACT_ULPS = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 8}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their dtype lie between a and b (+0 and -0: none)."""
    assert a.dtype == b.dtype
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    low = -(1 << (8 * a.element_size() - 1))

    def ordered(x):
        i = x.cpu().contiguous().view(ints).long()
        return torch.where(i < 0, low - i, i)
    return (ordered(a) - ordered(b)).abs()


def assert_within_ulps(out: torch.Tensor, ref: torch.Tensor, ulps: int, slack: torch.Tensor | None = None) -> None:
    apart = ulps_apart(out, ref)
    ok = apart <= ulps
    if slack is not None:
        ok |= (out.cpu().float() - ref.cpu().float()).abs() <= slack.cpu()
    assert bool(ok.all()), f"{int((~ok).sum())} of {ok.numel()} values past {ulps} ulps (worst {int(apart.max())})"


def randn(*shape, dtype, scale=1.0, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("n", [576, 640, 9000])  # SmolLM2, Gemma 3 270M; past MAX_ROW_TILE: two passes
def test_norms_match_reference(dtype, gemma, n):
    assert (n > triton_ops.MAX_ROW_TILE) == (n == 9000)
    x, residual = randn(5, n, dtype=dtype, scale=3.0), randn(5, n, dtype=dtype, seed=1)
    w = randn(n, dtype=dtype, scale=0.5, seed=2) + (0 if gemma else 1)
    assert_within_ulps(triton_ops.rms_norm(x, w, 1e-6, gemma), reference.rms_norm(x, w, 1e-6, gemma),
                       NORM_ULPS[dtype])
    x2, r2, x_ref, r_ref = x.clone(), residual.clone(), x.clone(), residual.clone()
    triton_ops.add_rms_norm_(x2, r2, w, 1e-6, gemma)
    reference.add_rms_norm_(x_ref, r_ref, w, 1e-6, gemma)
    assert torch.equal(r2, r_ref)  # the residual sum: one rounding, as torch's
    assert_within_ulps(x2, x_ref, NORM_ULPS[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D, H, Hkv, gemma", [(64, 9, 3, False), (128, 8, 2, False), (256, 4, 1, True)])
def test_head_norms_match_reference_and_leave_v_alone(dtype, D, H, Hkv, gemma):
    qkv = randn(7, (H + 2 * Hkv) * D, dtype=dtype, scale=2.0)
    q_w, k_w = randn(D, dtype=dtype, scale=0.5, seed=1), randn(D, dtype=dtype, scale=0.5, seed=2)
    got, want = qkv.clone(), qkv.clone()
    triton_ops.head_rms_norm_(got, q_w, k_w, H, Hkv, D, 1e-6, gemma)
    reference.head_rms_norm_(want, q_w, k_w, H, Hkv, D, 1e-6, gemma)
    assert_within_ulps(got, want, NORM_ULPS[dtype])
    assert torch.equal(got[:, (H + Hkv) * D:], qkv[:, (H + Hkv) * D:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D, H, Hkv", [(64, 9, 3), (128, 8, 2), (256, 4, 1), (128, 4, 4), (96, 6, 2)])
def test_rope_and_kv_write_match_reference_bit_for_bit(dtype, D, H, Hkv):
    """GQA, MQA and plain multi-head; head dim 96 pads its half to 64 lanes; padded slots (-1)
    write nothing."""
    from engine.models.layers import RotaryEmbedding
    T = 7
    qkv = randn(T, (H + 2 * Hkv) * D, dtype=dtype, scale=2.0)
    positions = torch.tensor([0, 1, 5, 17, 300, 1000, 4095], device=DEVICE)
    cos, sin = RotaryEmbedding(D, 4096, 500000.0, None).to(DEVICE).lookup(positions, dtype)
    slots = torch.tensor([3, -1, 17, 63, -1, 40, 0], device=DEVICE)
    k_cache = randn(4, 16, Hkv, D, dtype=dtype, seed=1)  # random: a stray write shows
    v_cache = randn(4, 16, Hkv, D, dtype=dtype, seed=2)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q = triton_ops.rope_and_write_kv(qkv, cos, sin, k_cache, v_cache, slots, H, Hkv, D)
    qk = reference.apply_rope(qkv[:, :(H + Hkv) * D].view(T, H + Hkv, D), cos, sin)
    write_kv_ref(k_ref, v_ref, qk[:, H:], qkv[:, (H + Hkv) * D:].view(T, Hkv, D), slots)
    assert q.shape == (T, H, D) and q.is_contiguous() and torch.equal(q, qk[:, :H])
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("d", [96, 1500])  # several tokens a program; two column tiles a token
def test_act_and_mul_matches_reference(dtype, gelu, d):
    x = randn(5, 2 * d, dtype=dtype, scale=3.0)  # reaches GELU's tails, where tanh is near -1
    slack = (x[:, :d].float() * x[:, d:].float()).abs() * 2.0 ** -22 if gelu else None
    assert_within_ulps(triton_ops.act_and_mul(x, gelu), reference.act_and_mul(x, gelu), ACT_ULPS[dtype], slack)
