"""The int8 KV cache (`kv_cache_dtype="int8"`): its row format, the C++ kernels against the
plain-torch reference (kernels/kv_quant.py), and the engine's block moves (swap, prefix
sharing) carrying scales with their codes. Quality on the real model is held in
test_served_config_accuracy.py."""
import os

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.attention import AttentionMetadata, torch_paged_attention
from engine.config import num_kv_blocks
from engine.loader import DUMMY_SHAPES
from engine.models.layers import apply_rope
from helpers import assert_all_blocks_free
from kernels import kv_quant
from kernels.cpu import load

ops = load()
if ops is None and os.environ.get("CI") == "true":
    raise RuntimeError("the C++ CPU kernels failed to build")
kernels = pytest.mark.skipif(ops is None or not ops.int8_attention_supported(64), reason="CPU without AVX512-VNNI")


def test_quantized_rows_read_back_within_half_a_step_and_zero_rows_as_zeros():
    x = torch.randn(50, 3, 64) * torch.logspace(-3, 2, 50)[:, None, None]
    x[7] = 0
    rows = kv_quant.quantize_kv(x)
    assert rows.dtype == torch.uint8 and rows.shape == (50, 3, 68)
    back = kv_quant.dequantize_kv(rows, torch.float32)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((back - x).abs() <= step / 2 * (1 + 1e-5)).all()
    assert (back[7] == 0).all() and (rows[7, :, :64] == 128).all()
    assert (kv_quant.dequantize_kv(torch.zeros(2, 68, dtype=torch.uint8), torch.float32) == 0).all()


@kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_writes_the_reference_codes_into_an_int8_cache(dtype):
    T, H, Hkv, D, bs = 6, 6, 2, 64, 4
    qkv = torch.randn(T, (H + 2 * Hkv) * D, dtype=dtype) * 3
    cos, sin = torch.randn(T, D, dtype=dtype), torch.randn(T, D, dtype=dtype)
    kc, vc = (torch.zeros(8, bs, Hkv, D + 4, dtype=torch.uint8) for _ in range(2))
    slots = torch.tensor([3, 9, 10, 30, 0, 31])
    q = ops.rope_and_write_kv(qkv, cos, sin, kc, vc, slots, H, Hkv, D)
    qk = apply_rope(qkv[:, :(H + Hkv) * D].view(T, H + Hkv, D), cos.unsqueeze(1), sin.unsqueeze(1))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(q, qk[:, :H], atol=tol, rtol=tol)
    # the codes of the kernel's own rotated K (rounded to dtype as the bf16 cache stores it)
    kb, vb = (torch.zeros(8, bs, Hkv, D, dtype=dtype) for _ in range(2))
    ops.rope_and_write_kv(qkv, cos, sin, kb, vb, slots, H, Hkv, D)
    assert torch.equal(kc.view(-1, Hkv, D + 4)[slots], kv_quant.quantize_kv(kb.view(-1, Hkv, D)[slots]))
    assert torch.equal(vc.view(-1, Hkv, D + 4)[slots], kv_quant.quantize_kv(qkv[:, (H + Hkv) * D:].view(T, Hkv, D)))
    assert kc.view(-1, Hkv, D + 4)[1].sum() == 0  # untouched slots stay untouched


@kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gqa", [1, 3])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("bs", [16, 5])  # 5: a 16-row tile spans several blocks
def test_int8_decode_attention_matches_the_reference_over_the_dequantized_cache(dtype, gqa, D, bs):
    Hkv = 2
    lens = torch.tensor([1, 16, 17, 100, 33, 300, 1100])  # 1100: several int32 flushes of P.V
    maxb = int(-(-lens.max() // bs))
    nblocks = maxb * len(lens)
    kc = kv_quant.quantize_kv(torch.randn(nblocks, bs, Hkv, D))
    vc = kv_quant.quantize_kv(torch.randn(nblocks, bs, Hkv, D) * torch.rand(nblocks, bs, Hkv, 1) * 4)
    perm = torch.randperm(nblocks)
    tables = torch.stack([perm[i * maxb:(i + 1) * maxb] for i in range(len(lens))])
    q = (torch.randn(len(lens), Hkv * gqa, D) * 2).to(dtype)
    mask = (torch.arange(maxb * bs)[None, :] < lens[:, None]).view(len(lens), 1, 1, -1)
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), num_decodes=len(lens),
                             decode_block_tables=tables, decode_seq_lens=lens, decode_mask=mask, prefills=[])
    ref = torch_paged_attention(q.float(), None, None, kc, vc, meta, D ** -0.5)  # the torch path dequantizes
    out = ops.paged_decode_attention(q, kc, vc, tables, lens, D ** -0.5)
    # q is quantized to int8 per head in the kernel: its scores carry that rounding
    err = (out.float() - ref).abs()
    assert err.max() <= 0.03 * ref.abs().max()  # measured up to 0.016
    assert err.mean() <= 0.02 * ref.abs().mean()  # measured up to 0.008
    one_token = ops.paged_decode_attention(q[:1], kc, vc, tables[:1], lens[:1], D ** -0.5)[0]
    its_v = kv_quant.dequantize_kv(vc[tables[0, 0], 0], torch.float32).repeat_interleave(gqa, 0)
    torch.testing.assert_close(one_token.float(), its_v, atol=1e-3, rtol=1e-2 if dtype == torch.bfloat16 else 1e-4)


def test_int8_cache_holds_about_twice_the_tokens_of_bf16_in_the_same_budget():
    mcfg = DUMMY_SHAPES["dummy-smollm2-135m"]
    def blocks(kv):
        cfg = EngineConfig(model="dummy-smollm2-135m", kv_cache_memory=64 << 20, kv_cache_dtype=kv)
        return num_kv_blocks(cfg, mcfg, 512, torch.device("cpu"))
    assert blocks("int8") == int((64 << 20) // (2 * 30 * 3 * 68 * 16))
    assert blocks("int8") / blocks("auto") == pytest.approx(128 / 68, rel=0.01)


def test_int8_cache_is_refused_on_triton_and_unknown_kv_dtypes_are_named():
    with pytest.raises(ValueError, match="kv_cache_dtype 'int8' runs on the 'cpu' and 'torch'"):
        EngineConfig(model="dummy-tiny", kv_cache_dtype="int8", attention_backend="triton")
    with pytest.raises(ValueError, match="kv_cache_dtype must be 'auto' or 'int8', got 'fp8'"):
        EngineConfig(model="dummy-tiny", kv_cache_dtype="fp8")


BASE = dict(model="dummy-tiny", dtype="float32", max_model_len=128, max_num_batched_tokens=256, max_num_seqs=256,
            kv_cache_dtype="int8")


def _prompts(n):
    return [[3 + (i * 13 + j) % 400 for j in range(10 + i % 30)] for i in range(n)]


def _params(i):
    return SamplingParams(temperature=0, max_tokens=10 + i % 25, ignore_eos=True)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preempted_requests_on_an_int8_cache_resume_to_the_same_tokens(mode):
    free = LLM(**BASE, num_kv_blocks=1024)
    assert free.stats()["weights"]["kv_cache_dtype"] == "int8"
    expected = [o.outputs[0].token_ids for o in free.generate(_prompts(60), [_params(i) for i in range(60)])]
    tight = LLM(**BASE, num_kv_blocks=24, preemption_mode=mode)
    outs = tight.generate(_prompts(60), [_params(i) for i in range(60)])
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert tight.stats()["num_preemptions"] > 0
    if mode == "swap":
        assert tight.engine.scheduler.swapper.num_swap_ins > 0
    assert_all_blocks_free(tight.engine)


def test_a_prefix_cache_hit_on_an_int8_cache_gives_the_tokens_of_a_fresh_prefill():
    prefix = list(range(5, 69))  # four full blocks
    prompts = [prefix + [100 + i, 200 + i] for i in range(3)]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    cold = LLM(**BASE, num_kv_blocks=256, enable_prefix_caching=False)
    expected = [cold.generate([p], sp)[0].outputs[0].token_ids for p in prompts]
    warm = LLM(**BASE, num_kv_blocks=256)
    got = [warm.generate([p], sp)[0].outputs[0].token_ids for p in prompts]
    assert got == expected
    assert warm.stats()["prefix_cache_hits"] >= 2 * 64  # tokens
