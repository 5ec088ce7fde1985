"""Quantized weights served natively: GGUF blocks packed without loss, the kernel of every ISA
level against its plain-torch references, and GGUF files (the default model's own
included) running on their own blocks end to end."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from engine import LLM, SamplingParams
from engine.gguf_weights import NATIVE_TYPES, pack_block, read_quantized_linears
from engine.loader import gguf_source, resolve_model_dir
from engine_kernels.quant import QuantizedWeight, linear_int8_reference, linear_reference, quantize_int8
from tiny_models import save_tiny, write_gguf

_SCALE_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
                 "Q5_K": [0, 2], "Q6_K": [208]}  # fp16 byte offsets


def random_gguf_rows(kind: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """n rows of k values of GGUF type `kind`: random codes, sane fp16 scales."""
    rng = np.random.default_rng(seed)
    block, size = quants.GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    raw = rng.integers(0, 256, (n, k // block * size), dtype=np.uint8)
    blocks = raw.reshape(n, -1, size)
    for at in _SCALE_FIELDS[kind]:
        blocks[:, :, at:at + 2] = np.float16(rng.uniform(0.001, 0.05, (n, k // block))).view(np.uint8).reshape(n, -1, 2)
    return raw


@pytest.mark.parametrize("kind", NATIVE_TYPES)
def test_gguf_blocks_pack_to_exactly_ggmls_values(kind):
    raw = random_gguf_rows(kind, 32, 512)
    w = pack_block(kind, raw)
    expected = quants.dequantize(raw, GGMLQuantizationType[kind]).reshape(32, 512)
    assert w.format == kind.lower() and w.out_features == 32 and w.in_features == 512
    np.testing.assert_array_equal(w.dequantize().numpy(), expected)


def test_fusing_mixed_layouts_keeps_every_value():
    """Q4_K_M files mix Q4_K (4-bit, 32-blocks) and Q6_K (8-bit codes, 16-blocks) in one layer."""
    parts = [pack_block("Q4_K", random_gguf_rows("Q4_K", 16, 512, 1)), pack_block("Q6_K", random_gguf_rows("Q6_K", 32, 512, 2))]
    fused = QuantizedWeight.cat(parts)
    assert (fused.bits, fused.block, fused.format) == (8, 16, "q4_k+q6_k")
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    index = torch.randperm(48)
    assert torch.equal(fused.rows(index).dequantize(), fused.dequantize()[index])


def test_int8_is_per_channel_within_half_a_step():
    w = torch.randn(64, 256) * torch.linspace(0.01, 3, 64)[:, None]
    q = quantize_int8(w)
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    assert q.bits == 8 and q.format == "int8"


def test_code_kinds_tell_the_kernels_what_the_codes_allow():
    """AVX2's byte products saturate at 16 bits: each weight says which form is exact."""
    assert pack_block("Q4_1", random_gguf_rows("Q4_1", 16, 256)).code_kind == 4
    assert pack_block("Q6_K", random_gguf_rows("Q6_K", 16, 256)).code_kind == 7  # codes < 64
    assert pack_block("Q5_0", random_gguf_rows("Q5_0", 16, 256)).code_kind == 7  # codes < 32
    assert quantize_int8(torch.randn(16, 256)).code_kind == 8  # symmetric: codes in [1, 255]
    codes = torch.randint(0, 256, (16, 64))
    codes[0, 0] = 0
    assert QuantizedWeight.from_rows(codes, torch.ones(16, 2), torch.zeros(16, 2), 8, 32, "x").code_kind == 9


@pytest.mark.parametrize("kind", NATIVE_TYPES + ("int8", "any-byte"))
@pytest.mark.parametrize("rows", [1, 5, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_the_torch_references(kernels, kind, rows, dtype):
    """Against the same arithmetic in torch (x quantized per 32, exact integer dots): equal
    to fp32 rounding; against dequantize-then-matmul: within the activation rounding."""
    N, K = 48, 512
    if kind == "int8":
        w = quantize_int8(torch.randn(N, K))
    elif kind == "any-byte":  # 8-bit codes of no special range, asymmetric mins
        w = QuantizedWeight.from_rows(torch.randint(0, 256, (N, K)), torch.rand(N, K // 32) * 0.01,
                                      torch.randn(N, K // 32), 8, 32, "any")
    else:
        w = pack_block(kind, random_gguf_rows(kind, N, K, rows))
    x = (torch.randn(rows, K) * torch.rand(K) * 3).to(dtype)
    bias = torch.randn(N)
    y = kernels.quant_linear(x, w.codes, w.scales, w.mins, w.bits, w.block, w.code_kind, bias)
    assert y.dtype == dtype and y.shape == (rows, N)
    same_math = linear_int8_reference(x, w, bias).float()
    exact = linear_reference(x, w, bias).float()
    scale = exact.abs().max()
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16 output: one rounding
    assert ((y.float() - same_math).abs().max() / scale) < tol
    assert ((y.float() - exact).abs().max() / scale) < 0.03


def test_kernel_refuses_inconsistent_shapes(kernels):
    w = pack_block("Q8_0", random_gguf_rows("Q8_0", 16, 256))
    with pytest.raises(RuntimeError, match="x must be"):
        kernels.quant_linear(torch.randn(1, 128), w.codes, w.scales, w.mins, w.bits, w.block, w.code_kind, None)
    with pytest.raises(RuntimeError, match="blocks of 32"):
        kernels.quant_linear(torch.randn(1, 256), w.codes, w.scales, w.mins, 4, 16, 4, None)
    with pytest.raises(RuntimeError, match="code kind"):
        kernels.quant_linear(torch.randn(1, 256), w.codes, w.scales, w.mins, w.bits, w.block, 4, None)


def test_the_default_model_runs_its_own_q4_1_and_q8_0_blocks(real_model_dir):
    """The embedded GGUF's linears are its own blocks (q/k rows un-permuted as transformers
    does), equal to the dequantized copy value for value, and the engine serves them."""
    import json

    from safetensors.torch import load_file

    source = gguf_source("smollm2-135m-instruct")
    blocks = read_quantized_linears(source, json.loads((real_model_dir / "config.json").read_text()))
    dense = load_file(real_model_dir / "model.safetensors")
    assert {w.format for w in blocks.values()} == {"q4_1", "q8_0"} and len(blocks) == 30 * 7 + 1
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight"):
        assert torch.equal(blocks[name].dequantize(), dense[name])
    assert torch.equal(blocks["lm_head.weight"].dequantize(), dense["model.embed_tokens.weight"])  # tied: token_embd's Q8_0


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    """A tiny Qwen3 GGUF with Q4_0, Q4_1 and Q8_0 tensors (mixed inside one fused projection),
    written and converted once for the module; (its path, the engine cache dir)."""
    root = tmp_path_factory.mktemp("mixed-gguf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGINE_CACHE_DIR", str(root / "cache"))
        # transformers reads no head size from a Qwen3 GGUF: it takes Qwen3's own, 128.
        hf_dir = save_tiny("qwen3", root / "hf", vocab_size=49152, head_dim=128)
        path = write_gguf("qwen3", hf_dir, root / "tiny-q.gguf",
                          quantize={"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "Q8_0",
                                    "ffn_gate": "Q4_1", "ffn_up": "Q4_1", "ffn_down": "Q4_0"})
        resolve_model_dir(str(path))  # converted once
    return path, root / "cache"


def test_a_quantized_gguf_serves_its_own_blocks_through_the_kernel(mixed_gguf, monkeypatch, cpu_isa):
    """A GGUF with Q4_0, Q4_1 and Q8_0 tensors (mixed inside one fused projection) runs on its
    own blocks: every linear call of a generation (prefill and decode) equals the kernel's
    arithmetic done in torch, within fp32 rounding. (Tokens are not compared with that
    torch run: this sharp random model's attention turns last-bit differences into
    different tokens.)"""
    path, cache = mixed_gguf
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(cache))
    llm = LLM(model=str(path), dtype="float32", num_kv_blocks=64, max_model_len=512)
    weights = llm.engine.stats()["weights"]
    quant_kernel = {"avx512": "avx512_vnni", "avx2": "avx2_maddubs", "generic": "generic"}[cpu_isa]
    assert weights["linear_kernels"] == sorted([quant_kernel, "torch"])  # torch: the float32 lm_head (F32 in the file)
    assert weights["decode_path"] == "fused"  # Qwen3's q/k norms included
    assert set(weights["bytes_by_format"]) == {"q4_0+q4_1+q8_0", "q8_0", "q4_1", "q4_0", "float32"}  # float32: lm_head
    errors = []
    for m in llm.engine.runner.model.linears():
        if m.qweight is not None:
            def checked(x, m=m, kernel=m.kernel):
                y = kernel(x)
                ref = linear_int8_reference(x, m.qweight, m.bias)
                errors.append(((y - ref).abs().max() / ref.abs().max()).item())
                return y
            m.kernel = checked
    for layer in llm.engine.runner.model.layers:
        layer.fused = None  # decode steps through the same linears
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([list(range(100, 140)), [7, 8, 9]], params)
    assert [len(o.outputs[0].token_ids) for o in outs] == [12, 12]
    assert len(errors) == 12 * 4 * 3 and max(errors) < 1e-6, max(errors)  # steps x linears x layers
    # the packed blocks are cached beside the converted copy, not in it: that folder stays a
    # checkpoint other tools load (vLLM reads every *.safetensors at its top level)
    converted = resolve_model_dir(str(path))
    assert [f.name for f in converted.glob("*.safetensors")] == ["model.safetensors"]

    dense = LLM(model=str(path), dtype="float32", quantization="none", num_kv_blocks=64, max_model_len=512)
    assert dense.engine.stats()["weights"]["bytes_by_format"].keys() == {"float32"}


def test_quantization_options_are_checked(real_model_dir):
    with pytest.raises(ValueError, match="own quantized format"):
        LLM(model="smollm2-135m-instruct", quantization="int8")
    with pytest.raises(ValueError, match="needs a GGUF model"):
        LLM(model=str(real_model_dir), quantization="gguf")
    with pytest.raises(ValueError, match="needs a GGUF model"):  # random weights are no GGUF either
        LLM(model="dummy-tiny", quantization="gguf")
    with pytest.raises(ValueError, match="quantization"):
        LLM(model="dummy-tiny", quantization="awq")
