"""The int8 KV cache (`kv_cache_dtype="int8"`): its layout, the C++ kernels against the
plain-torch reference (engine_kernels/kv_quant.py), and the engine's block moves (swap, prefix
sharing) carrying scales with their codes. Quality on the real model is held in
test_served_config_accuracy.py."""
import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.attention import AttentionMetadata, torch_paged_attention
from engine.config import num_kv_blocks
from engine.loader import DUMMY_SHAPES
from engine_kernels.reference import apply_rope
from helpers import assert_all_blocks_free
from engine_kernels import kv_quant


def _cache(num_blocks, block_size, num_kv_heads, head_dim):
    return torch.zeros(kv_quant.cache_shape(num_blocks, block_size, num_kv_heads, head_dim), dtype=torch.uint8)


def test_written_rows_read_back_within_half_a_step_at_their_slots_and_nothing_else_moves():
    bs, Hkv, D = 32, 3, 64
    cache = _cache(6, bs, Hkv, D)
    slots = torch.tensor([0, 15, 16, 17, 40, 191, 100])
    x = torch.randn(len(slots), Hkv, D) * torch.logspace(-3, 2, len(slots))[:, None, None]
    x[2] = 0
    for kind in ("k", "v"):
        cache.zero_()
        kv_quant.write(cache, x, slots, kind)
        back = kv_quant.read(cache, kind, torch.float32).reshape(-1, Hkv, D)
        step = x.abs().amax(-1, keepdim=True) / 127
        assert ((back[slots] - x).abs() <= step / 2 * (1 + 1e-5)).all()
        assert (back[2] == 0).all()
        untouched = torch.ones(6 * bs, dtype=torch.bool)
        untouched[slots] = False
        assert (back[untouched] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_writes_the_reference_bytes_into_an_int8_cache(kernels, dtype):
    T, H, Hkv, D, bs = 7, 6, 2, 64, 32
    qkv = torch.randn(T, (H + 2 * Hkv) * D, dtype=dtype) * 3
    cos, sin = torch.randn(T, D, dtype=dtype), torch.randn(T, D, dtype=dtype)
    kc, vc = _cache(4, bs, Hkv, D), _cache(4, bs, Hkv, D)
    slots = torch.tensor([3, 9, 16, 31, 0, 100, 64])
    q = kernels.rope_and_write_kv(qkv, cos, sin, kc, vc, slots, H, Hkv, D)
    qk = apply_rope(qkv[:, :(H + Hkv) * D].view(T, H + Hkv, D), cos, sin)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(q, qk[:, :H], atol=tol, rtol=tol)
    # the kernel's own rotated K, as its bf16 cache holds it, written by the reference
    kb, vb = (torch.zeros(4, bs, Hkv, D, dtype=dtype) for _ in range(2))
    kernels.rope_and_write_kv(qkv, cos, sin, kb, vb, slots, H, Hkv, D)
    k_ref, v_ref = _cache(4, bs, Hkv, D), _cache(4, bs, Hkv, D)
    kv_quant.write(k_ref, kb.view(-1, Hkv, D)[slots], slots, "k")
    kv_quant.write(v_ref, qkv[:, (H + Hkv) * D:].view(T, Hkv, D), slots, "v")
    assert torch.equal(kc, k_ref) and torch.equal(vc, v_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gqa", [1, 3, 6])  # 6: query heads in two groups of the kernel
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("bs,window", [(16, None), (48, None), (16, 37)])  # 48: blocks of three tiles
def test_int8_decode_attention_matches_the_reference_over_the_dequantized_cache(kernels, dtype, gqa, D, bs, window):
    Hkv = 2
    # a partial tile, whole tiles, block crossings; tasks of 256 rows (270 with the window: split
    # after its first visible row)
    lens = torch.tensor([1, 16, 17, 100, 33, 300, 1100, 270])
    maxb = int(-(-lens.max() // bs))
    nblocks = maxb * len(lens)
    kc, vc = _cache(nblocks, bs, Hkv, D), _cache(nblocks, bs, Hkv, D)
    slots = torch.arange(nblocks * bs)
    kv_quant.write(kc, torch.randn(nblocks * bs, Hkv, D), slots, "k")
    kv_quant.write(vc, torch.randn(nblocks * bs, Hkv, D) * torch.rand(nblocks * bs, Hkv, 1) * 4, slots, "v")
    perm = torch.randperm(nblocks)
    tables = torch.stack([perm[i * maxb:(i + 1) * maxb] for i in range(len(lens))])
    q = (torch.randn(len(lens), Hkv * gqa, D) * 2).to(dtype)
    mask = (torch.arange(maxb * bs)[None, :] < lens[:, None]).view(len(lens), 1, 1, -1)
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), num_decodes=len(lens),
                             decode_block_tables=tables, decode_seq_lens=lens, decode_mask=mask, prefills=[])
    ref = torch_paged_attention(q.float(), kc, vc, meta, D ** -0.5, window)  # the torch path dequantizes
    out = kernels.paged_decode_attention(q, kc, vc, tables, lens, D ** -0.5, window or 0)
    # The kernel quantizes q per head to int8 and a tile's weights to u8: its error is theirs.
    err = (out.float() - ref).abs()
    assert err.max() <= 0.03 * ref.abs().max()  # measured up to 0.013
    assert err.mean() <= 0.02 * ref.abs().mean()  # measured up to 0.008
    one_token = kernels.paged_decode_attention(q[:1], kc, vc, tables[:1], lens[:1], D ** -0.5, 0)[0]
    its_v = kv_quant.read(vc[tables[0, :1]], "v", torch.float32)[0, 0].repeat_interleave(gqa, 0)
    torch.testing.assert_close(one_token.float(), its_v, atol=1e-3, rtol=1e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_block_dequantize_kernel_equals_the_reference_bit_for_bit(kernels, dtype, D):
    cache = _cache(12, 32, 3, D)
    for kind in ("k", "v"):
        kv_quant.write(cache, torch.randn(12 * 32, 3, D) * 3, torch.arange(12 * 32), kind)
        ids = torch.tensor([7, 2, 11, 2])
        assert torch.equal(kernels.dequantize_kv_blocks(cache, ids, kind == "k", dtype),
                           kv_quant.read(cache.index_select(0, ids), kind, dtype))


def test_cpu_backend_attends_prompt_chunks_over_an_int8_cache_as_the_torch_path_does(kernels):
    from engine.attention_backends import CpuBackend, AttentionRows, TorchBackend
    bs, H, Hkv, D = 16, 6, 2, 64
    kc, vc = _cache(40, bs, Hkv, D), _cache(40, bs, Hkv, D)
    kv_quant.write(kc, torch.randn(40 * bs, Hkv, D), torch.arange(40 * bs), "k")
    kv_quant.write(vc, torch.randn(40 * bs, Hkv, D), torch.arange(40 * bs), "v")
    # two decodes, a chunk after 70 cached tokens (a prefix hit), a chunk with no context
    seqs = [AttentionRows([3, 9, 1], 40, 1, 0), AttentionRows([5], 7, 1, 1), AttentionRows([10, 11, 12, 13, 14, 15], 90, 20, 2),
            AttentionRows([20, 21], 25, 25, 22)]
    meta = TorchBackend(bs, torch.device("cpu")).build_metadata(torch.zeros(47, dtype=torch.long), seqs[:2], seqs[2:])
    q = torch.randn(47, H, D, dtype=torch.bfloat16)
    ours = CpuBackend(bs, torch.device("cpu"), kernels).attend(q, kc, vc, meta, D ** -0.5)
    ref = torch_paged_attention(q, kc, vc, meta, D ** -0.5)
    assert torch.equal(ours[2:], ref[2:])  # the prompt rows read the same values into the same SDPA
    torch.testing.assert_close(ours[:2].float(), ref[:2].float(), atol=0.05, rtol=0.05)  # decodes: q in int8


def test_int8_cache_holds_about_twice_the_tokens_of_bf16_in_the_same_budget():
    """Per 64-dim head row: 68 bytes (codes and a scale) against 128 (bf16) or 256 (fp32)."""
    mcfg = DUMMY_SHAPES["dummy-smollm2-135m"]
    cfg = EngineConfig(model="dummy-smollm2-135m", kv_cache_memory=64 << 20, kv_cache_dtype="int8")
    assert num_kv_blocks(cfg, mcfg, 512, torch.device("cpu")) == (64 << 20) // (2 * 30 * 3 * 68 * 16)
    int8 = mcfg.kv_bytes_per_token(torch.float32, "int8")
    assert mcfg.kv_bytes_per_token(torch.bfloat16, "auto") / int8 == pytest.approx(128 / 68)
    assert mcfg.kv_bytes_per_token(torch.float32, "auto") / int8 == pytest.approx(256 / 68)


def test_int8_cache_is_refused_on_triton_and_unknown_kv_dtypes_are_named():
    with pytest.raises(ValueError, match="kv_cache_dtype 'int8' runs on the 'cpu' and 'torch'"):
        EngineConfig(model="dummy-tiny", kv_cache_dtype="int8", attention_backend="triton")
    with pytest.raises(ValueError, match="kv_cache_dtype must be 'auto' or 'int8', got 'fp8'"):
        EngineConfig(model="dummy-tiny", kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="block_size must be a multiple of 16 with kv_cache_dtype='int8', got 8"):
        EngineConfig(model="dummy-tiny", kv_cache_dtype="int8", block_size=8)


def test_an_int8_cache_on_cuda_takes_the_torch_backend_unless_one_is_named():
    """Seen on an H200: EngineConfig(kv_cache_dtype="int8") with no backend named was refused
    there, the default (triton) not reading int8 caches."""
    from engine.attention_backends import check_backend, default_backend
    assert default_backend("cuda") == "triton" and default_backend("cuda", "int8") == "torch"
    check_backend(None, "cuda", torch.bfloat16, "int8")
    with pytest.raises(ValueError, match="kv_cache_dtype 'int8' runs on the 'cpu' and 'torch'"):
        check_backend("triton", "cuda", torch.bfloat16, "int8")


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
        assert tight.engine.scheduler.swap_space.num_swap_ins > 0
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
