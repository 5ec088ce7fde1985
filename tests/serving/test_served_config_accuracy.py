"""Every way the default model's weights can be served, at every ISA level this CPU runs
(avx512, avx2, generic: ENGINE_CPU_ISA), held to transformers' fp32 forward of the same
weights, teacher-forced over a few hundred positions of the real model:

- "gguf" (the default): the GGUF's own Q4_1/Q8_0 blocks through the level's quantized
  kernel, which quantizes activations to int8 per 32 values as llama.cpp does, in the
  level's activation dtype (bf16 on avx512, fp32 elsewhere). The reference is fp32 over
  the GGUF's dequantized values, so the measured error is the kernel's alone.
- "int8": per-channel int8 of the dense checkpoint; the reference is that checkpoint in
  fp32, so the error includes quantizing the weights.
- "bf16" (quantization="none", avx512 only: bf16 needs it): bf16 weights, the AVX512-BF16 GEMV.
- "gguf, int8 KV cache": the default weights over `kv_cache_dtype="int8"` (K and V rows
  quantized per head, decode attention in int8: engine_kernels/csrc/kv_int8.h).

Every position is run as a decode (one row per forward pass over the paged cache, exactly
as a served request's tokens are) and compared with the reference's next-token
distribution: top-1 agreement and mean KL(fp32 || ours). The bounds are docs/quantization.md's stated
guarantees; the measured figures (this machine kind, 276 positions) are in GUARANTEES.
Per layer, the mean relative error of the residual stream is bounded too, so an error in
one layer cannot hide behind a robust argmax.
"""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import isa_param
from helpers import TEXT, decode_one_by_one
from engine import EngineConfig, LLMEngine
from engine.platform import Platform, supported_isas
from engine_kernels.cpu import ISA_LEVELS



# path: (engine options, min top-1 agreement, max mean KL in nats, max per-layer relative error)
GUARANTEES = {
    "bf16": (dict(quantization="none"), 0.95, 0.01, 0.03),  # measured 0.967, 0.0011, 0.012
    "gguf": (dict(), 0.93, 0.01, 0.05),                     # measured 0.953, 0.0037, 0.024
    "int8": (dict(quantization="int8"), 0.92, 0.02, 0.06),  # measured 0.946, 0.0082, 0.036
    "gguf, int8 KV cache": (dict(kv_cache_dtype="int8"), 0.92, 0.01, 0.05),  # measured 0.982, 0.0048, 0.030
}


# Every path on this CPU's best level (bf16 where the level has it); below it, the default
# and the int8 KV cache (int8 weights run the same kernel forms there, held per level in
# tests/engine/test_quantized_weights.py).
_BEST = supported_isas()[0]
_CASES = [pytest.param((level, path), id=f"{level}-{path}", marks=isa_param(level).marks)
          for level in ISA_LEVELS for path in GUARANTEES
          if (level == _BEST and (path != "bf16" or Platform("cpu", level).native_bf16))
          or path in ("gguf", "gguf, int8 KV cache")]


@pytest.fixture(scope="module", params=_CASES)
def served_engine(request, real_model_dir):
    level, path = request.param
    options = GUARANTEES[path][0]
    model = str(real_model_dir) if path == "int8" else "smollm2-135m-instruct"  # int8: of the dense copy
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGINE_CPU_ISA", level)
        engine = LLMEngine(EngineConfig(model=model, num_kv_blocks=64, block_size=16, max_model_len=1024, **options))
    platform = engine.stats()["platform"]
    assert platform["isa"] == level and engine.runner.attention.name == "cpu"
    assert engine.config.dtype == str(engine.platform.default_dtype()).removeprefix("torch.")
    return path, engine


@pytest.fixture(scope="module")
def transformers_reference(real_model_dir):
    """transformers' fp32 forward of the text, once per module: logits and hidden states."""
    hf = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    cache = {}

    def run(ids: list[int]):
        if tuple(ids) not in cache:
            with torch.no_grad():
                cache[tuple(ids)] = hf(torch.tensor([ids]), output_hidden_states=True)
        return cache[tuple(ids)]
    return run


def test_each_served_weight_format_agrees_with_transformers_fp32(served_engine, transformers_reference):
    path, engine = served_engine
    _, min_agreement, max_kl, max_layer_error = GUARANTEES[path]
    linear = engine.runner.model.layers[0].qkv_proj
    weights, platform = engine.stats()["weights"], engine.stats()["platform"]
    assert weights["decode_path"] == "fused", weights
    assert weights["kv_cache_dtype"] == ("int8" if "int8 KV" in path else engine.config.dtype), weights
    if path == "bf16":
        assert linear.kernel_name == "avx512_bf16_gemv+onednn" and linear.qweight is None, "the bf16 GEMV is not in use"
    else:
        quant_kernel = {"avx512": "avx512_vnni", "avx2": "avx2_maddubs", "generic": "generic"}[platform["isa"]]
        assert linear.qweight is not None and weights["linear_kernels"] == [quant_kernel], weights
        assert linear.qweight.format == ("int8" if path == "int8" else "q4_1")
    ids = engine.tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) >= 250
    ours, our_streams = decode_one_by_one(engine, ids)

    out = transformers_reference(ids)
    ref = out.logits[0].float()

    agreement = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(ours, -1), F.log_softmax(ref, -1), log_target=True,
                  reduction="none").sum(-1).mean().item()
    layer_errors = [((s - r[0]).norm(dim=-1) / r[0].norm(dim=-1)).mean().item()
                    for s, r in zip(our_streams, out.hidden_states[1:])]
    print(f"\n{platform['isa']} {path}: {len(ids)} positions: top-1 agreement {agreement:.4f}, mean KL {kl:.5f} nats, "
          f"per-layer relative error {[round(e, 4) for e in layer_errors[:-1]]}")
    assert agreement >= min_agreement
    assert kl <= max_kl
    # The last hidden state HF reports is after the final norm; ours before: compare all but it.
    assert max(layer_errors[:-1]) <= max_layer_error, layer_errors
