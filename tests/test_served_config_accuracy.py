"""The configuration we serve (bf16 weights, the AVX512-BF16 GEMV, the C++ decode attention)
held to transformers' fp32 forward of the same weights, teacher-forced over a few hundred
positions of the real model.

Every position is run as a decode (one row per forward pass: the GEMV and the paged decode
kernel, exactly as a served request's tokens are), and compared with the reference's
next-token distribution at that position:
- top-1 agreement >= 0.95: bf16 keeps 8 mantissa bits (relative rounding 2^-9 per op), which
  flips the argmax only where the reference's top two are nearly tied. Measured 0.975 on this
  text (276 positions); the bound leaves room for other CPUs' rounding order.
- mean KL(fp32 || ours) <= 0.01 nats (measured 0.001).
- per layer, the mean relative error of the residual stream <= 0.03 (measured 0.004 after
  the first layer, growing slowly with depth to 0.012 as rounding error accumulates).
"""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from engine import EngineConfig, LLMEngine
from engine.attention_backends import Seq

TEXT = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling after decades of "
    "salt and wind. Every evening the keeper climbed the spiral stairs, one hundred and twelve of them, "
    "to light the lamp that warned ships away from the rocks below. In the village, people said he had "
    "not missed a single night in forty years. When the storm of the century arrived, the power failed "
    "across the whole coast, but the keeper had prepared for this: he lit the old oil lamp by hand and "
    "turned the lens himself, hour after hour, until dawn. Three fishing boats came home safely that "
    "night. Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide "
    "to make glucose and oxygen. It takes place mainly in the leaves, inside structures called "
    "chloroplasts, which contain the pigment chlorophyll. To bake bread, mix flour, water, salt and "
    "yeast, knead the dough for ten minutes, let it rise for an hour, shape it, and bake it in a hot "
    "oven until the crust is golden brown. The three largest planets in our solar system are Jupiter, "
    "Saturn and Uranus; Jupiter alone is more than twice as massive as all the others combined. def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n"
)


@pytest.fixture(scope="module")
def served_engine():
    engine = LLMEngine(EngineConfig(model="smollm2-135m-instruct", num_kv_blocks=64, block_size=16, max_model_len=1024))
    assert engine.config.dtype == "bfloat16" and engine.runner.attention.name == "cpu"
    return engine


def _decode_one_by_one(engine: LLMEngine, ids: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Teacher-forced logits [n, vocab] and each layer's residual stream [n, hidden], one
    token per forward pass over the paged cache (blocks 0.. in order: the engine is idle)."""
    runner, model, bs = engine.runner, engine.runner.model, engine.config.block_size
    streams: list[list[torch.Tensor]] = [[] for _ in model.layers]
    for i, layer in enumerate(model.layers):
        def capture(*args, _forward=layer.forward, _i=i):
            h, residual = _forward(*args)
            streams[_i].append((h.float() + residual.float()).squeeze(0))
            return h, residual
        layer.forward = capture
    block_ids = list(range(-(-len(ids) // bs)))
    logits = []
    try:
        for pos, tok in enumerate(ids):
            seq = Seq(block_ids, context_len=pos + 1, num_tokens=1, start=0)
            t = lambda x: torch.tensor([x])  # noqa: E731
            meta = runner.attention.build_metadata(t(pos), [seq], [])
            hidden = model(t(tok), t(pos), meta, runner.kv_caches, runner.attention)
            logits.append(model.compute_logits(hidden)[0])
    finally:
        for layer in model.layers:
            del layer.forward
    return torch.stack(logits), [torch.stack(s) for s in streams]


def test_bf16_served_configuration_agrees_with_transformers_fp32(served_engine, real_model_dir):
    engine = served_engine
    assert engine.runner.model.layers[0].self_attn.qkv_proj._gemv is not None, "the GEMV kernel is not in use"
    ids = engine.tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) >= 250
    ours, our_streams = _decode_one_by_one(engine, ids)

    hf = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    ref = out.logits[0].float()

    agreement = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(ours, -1), F.log_softmax(ref, -1), log_target=True,
                  reduction="none").sum(-1).mean().item()
    layer_errors = [((s - r[0]).norm(dim=-1) / r[0].norm(dim=-1)).mean().item()
                    for s, r in zip(our_streams, out.hidden_states[1:])]
    print(f"\n{len(ids)} positions: top-1 agreement {agreement:.4f}, mean KL {kl:.5f} nats, "
          f"per-layer relative error {[round(e, 4) for e in layer_errors[:-1]]}")
    assert agreement >= 0.95
    assert kl <= 0.01
    # The last hidden state HF reports is after the final norm; ours before: compare all but it.
    assert max(layer_errors[:-1]) <= 0.03, layer_errors
