"""Gemma 3 (text) over one flattened batch, on the shared blocks of `engine.models.layers`.

What differs from Llama: embeddings scaled by sqrt(hidden); RMSNorm scales by (1 + w) in
fp32; each layer norms before and after both attention and the MLP (four norms); per-head
q/k norms; a GeGLU MLP (tanh GELU); queries scaled by query_pre_attn_scalar^-0.5; and
interleaved layers: most attend within a sliding window with a local RoPE base, every
few attend globally with the global base (and its scaling). Each layer type has its own
RoPE table, looked up once per step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata
from engine.config import ModelConfig
from engine.models.layers import GemmaRMSNorm, Linear, RotaryEmbedding, SelfAttention
from engine.models.llama import CausalLM


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None) -> None:
        super().__init__()
        norm = lambda: GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.self_attn = SelfAttention(cfg, cfg.query_pre_attn_scalar ** -0.5, window, norm_cls=GemmaRMSNorm)
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.intermediate_size = cfg.intermediate_size
        self.is_sliding = window is not None

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, attention) -> torch.Tensor:
        a = self.self_attn.forward(self.input_layernorm(h), cos, sin, k_cache, v_cache, meta, attention)
        h = h + self.post_attention_layernorm(a)
        gate_up = self.gate_up_proj(self.pre_feedforward_layernorm(h))
        m = F.gelu(gate_up[:, :self.intermediate_size], approximate="tanh") * gate_up[:, self.intermediate_size:]
        return h + self.post_feedforward_layernorm(self.down_proj(m))

    def load(self, get, prefix: str) -> None:
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            getattr(self, name).weight.copy_(get(prefix + name + ".weight"))
        self.self_attn.load(get, prefix + "self_attn.")
        self.gate_up_proj.load([get(prefix + "mlp.gate_proj.weight"), get(prefix + "mlp.up_proj.weight")])
        self.down_proj.load([get(prefix + "mlp.down_proj.weight")])


class Gemma3ForCausalLM(CausalLM):
    norm_cls = GemmaRMSNorm

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__(cfg)
        assert cfg.query_pre_attn_scalar is not None and cfg.layer_types is not None
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, cfg.layer_window(i)) for i in range(cfg.num_layers))
        positions = max(max_positions, 1)
        self.rotary_global = RotaryEmbedding(cfg.head_dim, positions, cfg.rope_theta, cfg.rope_scaling)
        self.rotary_local = RotaryEmbedding(cfg.head_dim, positions, cfg.local_rope_theta or cfg.rope_theta, None)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], attention) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        h = h * torch.tensor(self.cfg.hidden_size ** 0.5, dtype=h.dtype)  # rounded to the model dtype, as transformers
        rope = {True: self.rotary_local.lookup(positions, h.dtype), False: self.rotary_global.lookup(positions, h.dtype)}
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            h = layer.forward(h, *rope[layer.is_sliding], k_cache, v_cache, meta, attention)
        return self.norm(h)
