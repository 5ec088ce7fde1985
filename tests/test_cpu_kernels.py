"""The C++ CPU kernels equal their plain-torch references."""
import os

import pytest
import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata, torch_paged_attention
from engine.models.layers import RMSNorm, apply_rope
from engine_kernels.cpu import load

ops = load()
if ops is None and os.environ.get("CI") == "true":  # CI machines have a compiler: never skip silently there
    raise RuntimeError("the C++ CPU kernels failed to build")
pytestmark = pytest.mark.skipif(ops is None, reason="no C++ compiler for the CPU kernels")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norms_match_reference(dtype):
    x, r = torch.randn(7, 96, dtype=dtype), torch.randn(7, 96, dtype=dtype)
    norm = RMSNorm(96, 1e-5).to(dtype)
    norm.weight.data = torch.rand(96, dtype=dtype) + 0.5
    torch.testing.assert_close(ops.rms_norm(x, norm.weight, 1e-5), norm(x), atol=TOL[dtype], rtol=TOL[dtype])
    ref_h, ref_r = norm.add_forward(x, r)
    h, res = x.clone(), r.clone()
    ops.fused_add_rms_norm(h, res, norm.weight, 1e-5)
    torch.testing.assert_close(res, ref_r, atol=0, rtol=0)
    torch.testing.assert_close(h, ref_h, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_kv_write_match_reference(dtype):
    T, H, Hkv, D, bs = 5, 6, 2, 32, 4
    qkv = torch.randn(T, (H + 2 * Hkv) * D, dtype=dtype)
    cos, sin = torch.randn(T, D, dtype=dtype), torch.randn(T, D, dtype=dtype)
    kc, vc = torch.zeros(8, bs, Hkv, D, dtype=dtype), torch.zeros(8, bs, Hkv, D, dtype=dtype)
    slots = torch.tensor([3, 9, 10, 30, 0])
    q = ops.rope_and_write_kv(qkv, cos, sin, kc, vc, slots, H, Hkv, D)
    qk = apply_rope(qkv[:, :(H + Hkv) * D].view(T, H + Hkv, D), cos.unsqueeze(1), sin.unsqueeze(1))
    torch.testing.assert_close(q, qk[:, :H], atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(kc.view(-1, Hkv, D)[slots], qk[:, H:], atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(vc.view(-1, Hkv, D)[slots], qkv[:, (H + Hkv) * D:].view(T, Hkv, D))
    assert kc.view(-1, Hkv, D)[1].abs().sum() == 0  # untouched slots stay untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_reference(dtype):
    x = torch.randn(9, 2 * 80, dtype=dtype) * 3
    torch.testing.assert_close(ops.silu_and_mul(x), F.silu(x[:, :80]) * x[:, 80:], atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gqa", [1, 3, 4])
@pytest.mark.parametrize("D", [64, 128, 256, 80])  # 80: not a bf16 tiled size (the per-row AVX-512 loop)
@pytest.mark.parametrize("bs", [16, 5])  # 5: a 16-row tile spans several blocks
def test_paged_decode_attention_matches_reference(dtype, gqa, D, bs):
    Hkv = 2
    H = Hkv * gqa
    lens = torch.tensor([1, 16, 17, 100, 33, 300])  # empty tails, full blocks, block-boundary crossings
    maxb = int(-(-lens.max() // bs))
    nblocks = maxb * len(lens)
    kc, vc = torch.randn(nblocks, bs, Hkv, D, dtype=dtype), torch.randn(nblocks, bs, Hkv, D, dtype=dtype)
    perm = torch.randperm(nblocks)
    tables = torch.stack([perm[i * maxb:(i + 1) * maxb] for i in range(len(lens))])
    q = torch.randn(len(lens), H, D, dtype=dtype)
    mask = (torch.arange(maxb * bs)[None, :] < lens[:, None]).view(len(lens), 1, 1, -1)
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), num_decodes=len(lens),
                             decode_block_tables=tables, decode_seq_lens=lens, decode_mask=mask, prefills=[])
    ref = torch_paged_attention(q.float(), None, None, kc.float(), vc.float(), meta, 0.125)
    out = ops.paged_decode_attention(q, kc, vc, tables, lens, 0.125)
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_engine_on_cpu_kernels_equals_engine_on_torch_reference():
    from engine import EngineConfig, LLMEngine, SamplingParams

    def run(backend):
        eng = LLMEngine(EngineConfig(model="dummy-tiny", dtype="float32", num_kv_blocks=64, max_model_len=256,
                                     max_num_batched_tokens=16, attention_backend=backend))
        reqs = [eng.add_request(list(range(5 + i, 30 + 3 * i)), SamplingParams(temperature=0, max_tokens=12,
                                                                             ignore_eos=True)) for i in range(4)]
        while eng.has_unfinished():
            eng.step()
        return [r.output_token_ids for r in reqs], eng.runner.attention.name

    fused, name = run(None)
    assert name == "cpu"  # the default on CPU
    reference, name = run("torch")
    assert name == "torch"
    assert fused == reference


gemv = pytest.mark.skipif(ops is None or not ops.has_bf16_gemv(), reason="CPU without AVX512-BF16")


@gemv
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 17, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_gemv_matches_fp32_linear(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    # K = 70: not a multiple of the kernel's 32-wide pass; N = 192: three packed column blocks
    x = torch.randn(rows, 70, generator=g).bfloat16()
    w = torch.randn(192, 70, generator=g).bfloat16()
    b = torch.randn(192, generator=g).bfloat16() if with_bias else None
    out = ops.gemv_bf16(x, ops.pack_for_gemv(w), b)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 192)
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=1e-2)  # bf16 output rounding


@gemv
def test_gemv_refuses_shapes_it_cannot_pack():
    assert not ops.gemv_supported(100, 64) and not ops.gemv_supported(128, 63)
    with pytest.raises(RuntimeError, match="N % 64"):
        ops.pack_for_gemv(torch.zeros(100, 64, dtype=torch.bfloat16))


@gemv
def test_bf16_model_decodes_through_gemv_and_matches_onednn():
    from engine.config import EngineConfig
    from engine.loader import load_model
    from engine.models.layers import Linear

    model = load_model(EngineConfig(model="dummy-tiny", dtype="bfloat16")).model
    x = torch.randn(3, model.cfg.hidden_size).bfloat16()
    onednn = model.lm_head(x)
    model.use_cpu_kernels(ops)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(m._gemv is not None for m in linears)  # every dummy-tiny shape is supported
    torch.testing.assert_close(model.lm_head(x).float(), onednn.float(), atol=0.02, rtol=1e-2)


@pytest.mark.parametrize("vocab", [49152, 1000, 37])
def test_token_bitmask_kernel_matches_reference(vocab):
    from engine.structured_output import apply_token_bitmask_ref
    torch.manual_seed(0)
    words = -(-vocab // 32)
    bitmask = torch.randint(-2**31, 2**31 - 1, (6, words), dtype=torch.int32)
    bitmask[1] = -1         # everything allowed
    bitmask[2] = 0          # nothing allowed
    bitmask[3, 5:] = 0      # a few words of a real grammar state
    logits = torch.randn(6, vocab)
    rows = [0, 1, 2, 3, 5]  # row 4 is unconstrained and must stay as it was
    ours, ref = logits.clone(), logits.clone()
    ops.apply_token_bitmask(ours, bitmask, torch.tensor(rows))
    apply_token_bitmask_ref(ref, bitmask, rows)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    assert torch.equal(ours[4], logits[4]) and torch.equal(ours[1], logits[1])
    assert torch.isneginf(ours[2]).all()
    allowed0 = [j for j in range(vocab) if (int(bitmask[0, j // 32]) >> (j % 32)) & 1]
    assert torch.isfinite(ours[0]).nonzero().flatten().tolist() == allowed0


@gemv
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_fused_decode_layer_gives_the_per_op_path_tokens(quantization):
    """The one-call C++ decoder layer runs the same kernels in the same order as the per-op
    path: the same tokens, bit for bit (bf16 GEMV weights, and int8 weights)."""
    from engine import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [list(range(100, 140)), [7, 8, 9], list(range(300, 317))]
    fused = LLM(model="dummy-tiny", dtype="bfloat16", quantization=quantization, num_kv_blocks=64, max_model_len=512)
    layers = fused.engine.runner.model.layers
    assert all(layer.decode_layer is not None for layer in layers)
    got = [o.outputs[0].token_ids for o in fused.generate(prompts, params)]
    for layer in layers:
        layer.decode_layer = None
    assert [o.outputs[0].token_ids for o in fused.generate(prompts, params)] == got


@pytest.mark.parametrize("vocab", [5, 16, 49152 + 7])
def test_argmax_kernel_matches_torch_including_ties_inf_and_nan(vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=g)
    x[1] = float("-inf")                       # a fully masked row: index 0, as torch
    x[2, vocab // 3] = x[2, vocab - 1] = 50.0  # a tie: the first index wins
    x[3, : vocab // 2] = float("-inf")
    x[4, vocab // 2] = float("nan")            # torch's argmax returns the NaN
    x[5] = torch.round(x[5])                   # many ties
    assert torch.equal(ops.argmax_rows(x), x.argmax(dim=-1))
    assert torch.equal(ops.argmax_rows(x[:, : vocab - 1]), x[:, : vocab - 1].argmax(dim=-1))  # strided rows


def test_a_build_lock_left_by_a_killed_build_is_cleared_not_waited_on(tmp_path, monkeypatch):
    """A process killed while compiling leaves torch's `lock` file; the next start must not
    wait on it forever (it did: the engine hung with no message)."""
    import time

    from engine_kernels import cpu

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build = tmp_path / "engine_cpu_ops_test"
    build.mkdir()
    lock = build / "lock"
    lock.touch()
    cpu._clear_stale_build_lock("engine_cpu_ops_test")
    assert lock.exists()  # a fresh lock: a build may be running
    old = time.time() - cpu._STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    cpu._clear_stale_build_lock("engine_cpu_ops_test")
    assert not lock.exists()


def _longest_stall_of_another_thread_during(call) -> tuple[float, float]:
    """(the longest a pure-Python thread went without running a line while `call` ran on
    this one, how long `call` took), in seconds."""
    import threading
    import time
    longest, stop, started = [0.0], threading.Event(), threading.Event()

    def spin():
        last = time.perf_counter()
        started.set()
        while not stop.is_set():
            now = time.perf_counter()
            longest[0] = max(longest[0], now - last)
            last = now

    t = threading.Thread(target=spin)
    t.start()
    started.wait()
    time.sleep(0.05)
    longest[0] = 0.0
    begin = time.perf_counter()
    call()
    took = time.perf_counter() - begin
    stop.set()
    t.join()
    return longest[0], took


def test_kernels_release_the_gil_so_the_server_loop_runs_beside_a_step():
    """A step on the engine thread is mostly these calls; an event loop streaming tokens on
    another thread must not wait for the GIL until each returns (measured before: AsyncLLM
    decode steps 1.6-1.9x longer than LLMEngine's at 80 streams)."""
    from engine_kernels.quant import quantize_int8
    B, L, H, Hkv, D, bs = 64, 6000, 8, 2, 128, 16
    nb = B * L // bs
    kc, vc = torch.randn(nb, bs, Hkv, D, dtype=torch.bfloat16), torch.randn(nb, bs, Hkv, D, dtype=torch.bfloat16)
    tables, lens = torch.arange(nb).view(B, -1), torch.full((B,), L)
    q = torch.randn(B, H, D, dtype=torch.bfloat16)
    calls = [lambda: ops.paged_decode_attention(q, kc, vc, tables, lens, 0.1)]
    if ops.has_quant_kernels():
        w, x = quantize_int8(torch.randn(4096, 4096)), torch.randn(2048, 4096)
        calls.append(lambda: ops.quant_linear(x, w.codes, w.scales, w.mins, w.bits, w.block, None))
    for call in calls:
        stall, took = _longest_stall_of_another_thread_during(call)
        assert took > 0.02 and stall < took / 2, (stall, took)  # holding the GIL: stall ~ took
