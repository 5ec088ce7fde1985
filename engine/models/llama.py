"""Our decoder over one flattened batch: the Llama family (Llama 2/3.x, SmolLM2, Qwen2, Qwen3,
Mistral), and through `CausalLM` every family.

There is no padding and no batch dimension: every step runs T tokens from many requests
as one [T, hidden] tensor. Attention reads and writes the paged KV cache through the
step's `AttentionMetadata`, built once per step by the model runner, and every op goes
through the step's `ops` (the platform's choice of kernels). `CausalLM` holds what every
family shares, the forward included: embeddings, the decoder layers
(engine/models/layers.py), the final norm, the LM head, loading. A family sets flags:
q/k/v biases (Qwen2), per-head q/k norms (Qwen3), llama3 RoPE scaling (Llama 3.1+);
Gemma 3's are in gemma3.py.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.attention import AttentionMetadata
from engine.config import ModelConfig
from engine.models.layers import DecoderLayer, Linear, RMSNorm, RotaryEmbedding
from engine_kernels.quant import QuantizedWeight, quantize_int8


class CausalLM(nn.Module):
    """A decoder-only LM; the forward of every family."""

    def __init__(self, cfg: ModelConfig, max_positions: int, gemma: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.embed_scale: float | None = None  # Gemma scales embeddings by sqrt(hidden)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, gemma)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.attention_scale(cfg), cfg.layer_window(i), gemma)
                                    for i in range(cfg.num_layers))
        positions = max(max_positions, 1)
        self.rotary = RotaryEmbedding(cfg.head_dim, positions, cfg.rope_theta, cfg.rope_scaling)
        # Gemma's sliding layers rotate with their own base (and no scaling)
        self.rotary_local = (RotaryEmbedding(cfg.head_dim, positions, cfg.local_rope_theta, None)
                             if cfg.local_rope_theta is not None else None)

    @staticmethod
    def attention_scale(cfg: ModelConfig) -> float:
        return cfg.head_dim ** -0.5

    def linears(self) -> list[Linear]:
        """Every linear layer, in the order a step runs them (the LM head last)."""
        return [m for layer in self.layers for m in layer.linears()] + [self.lm_head]

    def quantize_int8(self) -> None:
        """Weight-only per-channel int8 for every dense linear, the LM head included (the
        embedding lookup keeps its own dense copy)."""
        for m in self.linears():
            if m.qweight is None:
                m.set_quantized(quantize_int8(m.weight))

    def linear_kernels(self) -> list[str]:
        """What runs the linears (engine/platform.py names them)."""
        return sorted({m.kernel_name for m in self.linears()})

    def weight_formats(self) -> dict[str, int]:
        """Bytes of linear weights per format ("bfloat16", "q4_1", "int8", ...)."""
        out: dict[str, int] = {}
        for m in self.linears():
            fmt = m.qweight.format if m.qweight is not None else str(m.weight.dtype).removeprefix("torch.")
            nbytes = m.qweight.nbytes if m.qweight is not None else m.weight.numel() * m.weight.element_size()
            out[fmt] = out.get(fmt, 0) + nbytes
        return out

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], ops) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            h = h * torch.tensor(self.embed_scale, dtype=h.dtype)  # rounded to the model dtype, as transformers
        rope = self.rotary.lookup(positions, h.dtype)
        rope_local = self.rotary_local.lookup(positions, h.dtype) if self.rotary_local is not None else rope
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            cos, sin = rope_local if layer.window is not None else rope
            # .forward: skip nn.Module's hook machinery, ~30 calls per step on the hot path
            h, residual = layer.forward(h, residual, cos, sin, k_cache, v_cache, meta, ops)
        ops.add_rms_norm_(h, residual, self.norm.weight, self.norm.eps, self.norm.gemma)
        return h

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head.qweight is not None:  # fp32 in, fp32 out: no bf16 rounding of the logits, no copy
            hidden = hidden.float()
        logits = self.lm_head(hidden).float()
        cap = self.cfg.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def load_hf_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Load transformers-named weights, fusing q/k/v and gate/up projections."""
        get = lambda name: weights.pop(name)  # noqa: E731 - pop so the caller's copy can be freed
        with torch.no_grad():
            self.embed_tokens.weight.copy_(get("model.embed_tokens.weight"))
            self.norm.weight.copy_(get("model.norm.weight"))
            lm_head = weights.pop("lm_head.weight", None)
            if isinstance(lm_head, QuantizedWeight):  # a GGUF's own (for a tied head: token_embd's blocks)
                self.lm_head.load([lm_head])
            elif not self.cfg.tie_word_embeddings:
                if lm_head is None:
                    raise ValueError("checkpoint has no lm_head.weight and does not tie embeddings")
                self.lm_head.load([lm_head])
            for i, layer in enumerate(self.layers):
                layer.load(get, f"model.layers.{i}.")
        leftover = [k for k in weights if not k.endswith("rotary_emb.inv_freq")]
        if leftover:
            raise ValueError(f"unexpected weights in checkpoint: {leftover[:5]}")

    def init_random(self, seed: int, std: float = 0.02) -> None:
        g = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(0.0 if self.norm.gemma else 1.0)  # Gemma's norms scale by 1 + w
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=g)


class LlamaForCausalLM(CausalLM):
    pass
