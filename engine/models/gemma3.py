"""Gemma 3 (text): the shared decoder (engine/models/llama.py, layers.py) with Gemma's flags.

What differs from Llama: embeddings scaled by sqrt(hidden); RMSNorm scales by (1 + w) in
fp32; each layer norms before and after both attention and the MLP (four norms); per-head
q/k norms; a GeGLU MLP (tanh GELU); queries scaled by query_pre_attn_scalar^-0.5; and
interleaved layers: most attend within a sliding window with a local RoPE base, every
few attend globally with the global base (and its scaling).
"""
from __future__ import annotations

from engine.config import ModelConfig
from engine.models.llama import CausalLM


class Gemma3ForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        assert cfg.query_pre_attn_scalar is not None and cfg.layer_types is not None and cfg.qk_norm
        super().__init__(cfg, max_positions, gemma=True)
        self.embed_scale = cfg.hidden_size ** 0.5

    @staticmethod
    def attention_scale(cfg: ModelConfig) -> float:
        return cfg.query_pre_attn_scalar ** -0.5
