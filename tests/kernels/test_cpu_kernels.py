"""The C++ CPU kernels of every ISA level this CPU runs (avx512, avx2, generic) equal their
plain-torch references (engine_kernels/reference.py, engine/attention.py). The `kernels`
fixture (conftest.py) runs each test once per level."""
import os

import pytest
import torch

from engine.attention import AttentionMetadata, PrefillSeq, torch_paged_attention, torch_prefills
from engine_kernels import reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemma", [False, True], ids=["llama-norm", "gemma-norm"])
def test_rms_norms_match_reference(kernels, dtype, gemma):
    x, r = torch.randn(7, 96, dtype=dtype), torch.randn(7, 96, dtype=dtype)
    w = torch.rand(96, dtype=dtype) + 0.5
    tol = TOL[dtype]
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5, gemma), reference.rms_norm(x, w, 1e-5, gemma),
                               atol=tol, rtol=tol)
    ref_h, ref_r = x.clone(), r.clone()
    reference.add_rms_norm_(ref_h, ref_r, w, 1e-5, gemma)
    h, res = x.clone(), r.clone()
    kernels.fused_add_rms_norm(h, res, w, 1e-5, gemma)
    torch.testing.assert_close(res, ref_r, atol=0, rtol=0)
    torch.testing.assert_close(h, ref_h, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_head_qk_norms_match_reference_and_leave_v_alone(kernels, dtype):
    T, H, Hkv, D = 5, 6, 2, 32
    qkv = torch.randn(T, (H + 2 * Hkv) * D, dtype=dtype)
    qw, kw = torch.rand(D, dtype=dtype) + 0.5, torch.rand(D, dtype=dtype)
    ours, ref = qkv.clone(), qkv.clone()
    kernels.head_rms_norm(ours, qw, kw, H, Hkv, D, 1e-6, True)
    reference.head_rms_norm_(ref, qw, kw, H, Hkv, D, 1e-6, True)
    torch.testing.assert_close(ours, ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(ours[:, (H + Hkv) * D:], qkv[:, (H + Hkv) * D:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_and_kv_write_match_reference(kernels, dtype):
    T, H, Hkv, D, bs = 5, 6, 2, 32, 4
    qkv = torch.randn(T, (H + 2 * Hkv) * D, dtype=dtype)
    cos, sin = torch.randn(T, D, dtype=dtype), torch.randn(T, D, dtype=dtype)
    kc, vc = torch.zeros(8, bs, Hkv, D, dtype=dtype), torch.zeros(8, bs, Hkv, D, dtype=dtype)
    slots = torch.tensor([3, 9, 10, 30, 0])
    q = kernels.rope_and_write_kv(qkv, cos, sin, kc, vc, slots, H, Hkv, D)
    qk = reference.apply_rope(qkv[:, :(H + Hkv) * D].view(T, H + Hkv, D), cos, sin)
    torch.testing.assert_close(q, qk[:, :H], atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(kc.view(-1, Hkv, D)[slots], qk[:, H:], atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(vc.view(-1, Hkv, D)[slots], qkv[:, (H + Hkv) * D:].view(T, Hkv, D))
    assert kc.view(-1, Hkv, D)[1].abs().sum() == 0  # untouched slots stay untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gelu", [False, True], ids=["silu", "gelu-tanh"])
def test_gated_activation_matches_reference(kernels, dtype, gelu):
    x = torch.randn(9, 2 * 80, dtype=dtype) * 3
    torch.testing.assert_close(kernels.act_and_mul(x, gelu), reference.act_and_mul(x, gelu), atol=TOL[dtype],
                               rtol=TOL[dtype])


def _decode_meta(lens: torch.Tensor, bs: int, nblocks: int):
    maxb = int(-(-lens.max() // bs))
    tables = torch.randperm(nblocks)[:maxb * len(lens)].view(len(lens), maxb)
    mask = (torch.arange(maxb * bs)[None, :] < lens[:, None]).view(len(lens), 1, 1, -1)
    return tables, AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), num_decodes=len(lens),
                                     decode_block_tables=tables, decode_seq_lens=lens, decode_mask=mask, prefills=[])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gqa", [1, 3, 4])
@pytest.mark.parametrize("D", [64, 128, 256, 80])  # 80: not a 16-lane size (the loop form)
@pytest.mark.parametrize("bs,window", [(16, None), (5, None), (16, 37)])  # 5: a 16-row tile spans blocks
def test_paged_decode_attention_matches_reference(kernels, dtype, gqa, D, bs, window):
    Hkv = 2
    # empty tails, full blocks, block-boundary crossings; past 256 rows a sequence is split into
    # tasks of 256 (600: three, the last partial; 270 with the window: its first visible row in
    # the first, and a tile of the second)
    lens = torch.tensor([1, 16, 17, 100, 33, 300, 270, 600])
    nblocks = int(-(-lens.max() // bs)) * len(lens)
    kc, vc = torch.randn(nblocks, bs, Hkv, D, dtype=dtype), torch.randn(nblocks, bs, Hkv, D, dtype=dtype)
    tables, meta = _decode_meta(lens, bs, nblocks)
    q = torch.randn(len(lens), Hkv * gqa, D, dtype=dtype)
    ref = torch_paged_attention(q.float(), kc.float(), vc.float(), meta, 0.125, window)
    out = kernels.paged_decode_attention(q, kc, vc, tables, lens, 0.125, window or 0)
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("gqa,D", [(1, 64), (3, 64), (4, 128), (4, 256)])
@pytest.mark.parametrize("bs,window", [(16, None), (5, None), (16, 37)])  # 5: a 16-row tile spans blocks
@pytest.mark.parametrize("n,cached", [(1, 0), (16, 0), (37, 0), (100, 1000), (5, 300), (33, 17)])
def test_paged_prefill_attention_matches_reference(kernels, gqa, D, bs, window, n, cached):
    """A prompt chunk of n rows after `cached` positions: 16 query positions to a task (37: a
    partial last block of positions; 100 after 1,000: the call after a tool call)."""
    if not kernels.prefill_attention_supported(torch.bfloat16, D):
        assert kernels.isa_level() != "avx512" or not kernels.has_bf16_gemv()  # AVX512-BF16 runs it
        pytest.skip(f"no prefill kernel at the {kernels.isa_level()} level on this CPU (torch's SDPA runs it)")
    Hkv, C = 2, cached + n
    nblocks = -(-C // bs) + 4
    kc, vc = torch.randn(nblocks, bs, Hkv, D).bfloat16(), torch.randn(nblocks, bs, Hkv, D).bfloat16()
    table = torch.randperm(nblocks)[:-(-C // bs)]
    q = torch.randn(n, Hkv * gqa, D).bfloat16()
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), num_decodes=0, decode_block_tables=None,
                             decode_seq_lens=None, decode_mask=None, prefills=[PrefillSeq(0, n, C, table)])
    ref = torch.empty(n, Hkv * gqa, D)
    torch_prefills(ref, q.float(), kc.float(), vc.float(), meta, D ** -0.5, window)
    out = kernels.paged_prefill_attention(q, kc, vc, table, C, D ** -0.5, window or 0)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_paged_prefill_attention_refuses_what_it_does_not_run(kernels):
    q, cache, table = torch.zeros(4, 2, 64), torch.zeros(2, 16, 1, 64), torch.arange(2)
    with pytest.raises(RuntimeError, match="bf16"):
        kernels.paged_prefill_attention(q, cache, cache, table, 4, 0.125, 0)  # float32
    if kernels.prefill_attention_supported(torch.bfloat16, 64):
        with pytest.raises(RuntimeError, match="context_len >= n"):
            kernels.paged_prefill_attention(q.bfloat16(), cache.bfloat16(), cache.bfloat16(), table, 3, 0.125, 0)
        with pytest.raises(RuntimeError, match="positions"):  # two blocks of 16 hold 32
            kernels.paged_prefill_attention(q.bfloat16(), cache.bfloat16(), cache.bfloat16(), table, 40, 0.125, 0)


@pytest.mark.parametrize("kv", ["model dtype", "int8"])
def test_a_sequences_decode_attention_is_the_same_bits_alone_or_in_any_batch(kernels, kv):
    """Long sequences are split into tasks of 256 rows at fixed positions, so that a batch of
    one keeps both cores busy; the split must not depend on the rest of the batch. Nor may
    the batch's choice of KV heads a task (a short sequence alone: one each; in a batch: all)."""
    from engine_kernels import kv_quant
    Hkv, G, D, bs = 3, 3, 64, 16
    lens = torch.tensor([700, 5, 300, 1000, 40])
    nblocks = int(-(-lens.max() // bs)) * len(lens)
    if kv == "int8":
        kc, vc = (torch.zeros(kv_quant.cache_shape(nblocks, bs, Hkv, D), dtype=torch.uint8) for _ in range(2))
        slots = torch.arange(nblocks * bs)
        kv_quant.write(kc, torch.randn(nblocks * bs, Hkv, D), slots, "k")
        kv_quant.write(vc, torch.randn(nblocks * bs, Hkv, D), slots, "v")
    else:
        kc, vc = torch.randn(nblocks, bs, Hkv, D).bfloat16(), torch.randn(nblocks, bs, Hkv, D).bfloat16()
    tables, _ = _decode_meta(lens, bs, nblocks)
    q = torch.randn(len(lens), Hkv * G, D).bfloat16()
    batch = kernels.paged_decode_attention(q, kc, vc, tables, lens, 0.125, 0)
    for i in range(len(lens)):
        alone = kernels.paged_decode_attention(q[i:i + 1], kc, vc, tables[i:i + 1], lens[i:i + 1], 0.125, 0)
        assert torch.equal(alone[0], batch[i]), f"sequence {i} ({int(lens[i])} tokens)"
    reordered = kernels.paged_decode_attention(q.flip(0), kc, vc, tables.flip(0), lens.flip(0), 0.125, 0)
    assert torch.equal(reordered.flip(0), batch)


def test_engine_on_cpu_kernels_equals_engine_on_torch_reference(cpu_isa):
    from engine import EngineConfig, LLMEngine
    from helpers import greedy_tokens

    def run(backend):
        eng = LLMEngine(EngineConfig(model="dummy-tiny", dtype="float32", num_kv_blocks=64, max_model_len=256,
                                     max_num_batched_tokens=16, attention_backend=backend))
        return greedy_tokens(eng, [list(range(5 + i, 30 + 3 * i)) for i in range(4)], 12), eng.stats()["platform"]

    fused, platform = run(None)
    assert platform["isa"] == cpu_isa and platform["kernels"]["decode_layer"] == "fused_cpp"  # the default on CPU
    reference_tokens, platform = run("torch")
    assert platform["kernels"]["norms"] == "torch"
    assert fused == reference_tokens


def test_bf16_gemv_matches_fp32_linear(kernels):
    if not kernels.has_bf16_gemv():
        pytest.skip(f"the {kernels.isa_level()} level has no bf16 GEMV (AVX512-BF16 only)")
    for rows in (1, 3, 4, 5, 17, 64):
        for with_bias in (False, True):
            g = torch.Generator().manual_seed(rows)
            # K = 70: not a multiple of the kernel's 32-wide pass; N = 192: three packed column blocks
            x = torch.randn(rows, 70, generator=g).bfloat16()
            w = torch.randn(192, 70, generator=g).bfloat16()
            b = torch.randn(192, generator=g).bfloat16() if with_bias else None
            out = kernels.gemv_bf16(x, kernels.pack_for_gemv(w), b)
            ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
            assert out.dtype == torch.bfloat16 and out.shape == (rows, 192)
            torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=1e-2)  # bf16 output rounding
    assert not kernels.gemv_supported(100, 64) and not kernels.gemv_supported(128, 63)
    with pytest.raises(RuntimeError, match="N % 64"):
        kernels.pack_for_gemv(torch.zeros(100, 64, dtype=torch.bfloat16))


@pytest.mark.parametrize("vocab", [49152, 1000, 37])
def test_token_bitmask_kernel_matches_reference(kernels, vocab):
    torch.manual_seed(0)
    words = -(-vocab // 32)
    bitmask = torch.randint(-2**31, 2**31 - 1, (6, words), dtype=torch.int32)
    bitmask[1] = -1         # everything allowed
    bitmask[2] = 0          # nothing allowed
    bitmask[3, 5:] = 0      # a few words of a real grammar state
    logits = torch.randn(6, vocab)
    rows = [0, 1, 2, 3, 5]  # row 4 is unconstrained and must stay as it was
    ours, ref = logits.clone(), logits.clone()
    kernels.apply_token_bitmask(ours, bitmask, torch.tensor(rows))
    reference.apply_token_bitmask_ref(ref, bitmask, rows)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    assert torch.equal(ours[4], logits[4]) and torch.equal(ours[1], logits[1])
    assert torch.isneginf(ours[2]).all()
    allowed0 = [j for j in range(vocab) if (int(bitmask[0, j // 32]) >> (j % 32)) & 1]
    assert torch.isfinite(ours[0]).nonzero().flatten().tolist() == allowed0


@pytest.mark.parametrize("vocab", [5, 16, 49152 + 7])
def test_argmax_kernel_matches_torch_including_ties_inf_and_nan(kernels, vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=g)
    x[1] = float("-inf")                       # a fully masked row: index 0, as torch
    x[2, vocab // 3] = x[2, vocab - 1] = 50.0  # a tie: the first index wins
    x[3, : vocab // 2] = float("-inf")
    x[4, vocab // 2] = float("nan")            # torch's argmax returns the NaN
    x[5] = torch.round(x[5])                   # many ties
    assert torch.equal(kernels.argmax_rows(x), x.argmax(dim=-1))
    assert torch.equal(kernels.argmax_rows(x[:, : vocab - 1]), x[:, : vocab - 1].argmax(dim=-1))  # strided rows


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_fused_decode_layer_gives_the_per_op_path_tokens(cpu_isa, quantization):
    """The one-call C++ decoder layer runs the same kernels in the same order as the per-op
    path: the same tokens, bit for bit (the level's dtype and linear kernels; and int8)."""
    from engine import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [list(range(100, 140)), [7, 8, 9], list(range(300, 317))]
    fused = LLM(model="dummy-tiny", quantization=quantization, num_kv_blocks=64, max_model_len=512)
    layers = fused.engine.runner.model.layers
    assert all(layer.fused is not None for layer in layers)
    got = [o.outputs[0].token_ids for o in fused.generate(prompts, params)]
    for layer in layers:
        layer.fused = None
    assert [o.outputs[0].token_ids for o in fused.generate(prompts, params)] == got


def test_a_builder_killed_midway_leaves_nothing_a_later_start_waits_on(tmp_path):
    """A process killed while compiling held the build's lock; the next start must take it at
    once (torch's lock file outlived a killed build, and every later start hung on it)."""
    import subprocess
    import sys
    import time

    from engine_kernels import cpu

    flock = tmp_path / "build.flock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from engine_kernels.cpu import _exclusive\n"
                               f"with _exclusive(Path({str(flock)!r})):\n print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own
        holder.wait()
    begin = time.perf_counter()
    with cpu._exclusive(flock):
        pass
    assert time.perf_counter() - begin < 1.0


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


def test_kernels_release_the_gil_so_the_server_loop_runs_beside_a_step(kernels):
    """A step on the engine thread is mostly these calls; an event loop streaming tokens on
    another thread must not wait for the GIL until each returns (measured before: AsyncLLM
    decode steps 1.6-1.9x longer than LLMEngine's at 80 streams)."""
    from engine_kernels.quant import quantize_int8
    B, L, H, Hkv, D, bs = 64, 6000, 8, 2, 128, 16
    nb = B * L // bs
    kc, vc = torch.randn(nb, bs, Hkv, D), torch.randn(nb, bs, Hkv, D)
    tables, lens = torch.arange(nb).view(B, -1), torch.full((B,), L)
    q = torch.randn(B, H, D)
    w, x = quantize_int8(torch.randn(4096, 4096)), torch.randn(512, 4096)
    for call in (lambda: kernels.paged_decode_attention(q, kc, vc, tables, lens, 0.1, 0),
                 lambda: kernels.quant_linear(x, w.codes, w.scales, w.mins, w.bits, w.block, w.code_kind, None)):
        stall, took = _longest_stall_of_another_thread_during(call)
        assert took > 0.02 and stall < took / 2, (stall, took)  # holding the GIL: stall ~ took
