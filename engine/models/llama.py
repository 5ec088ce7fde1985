"""Our Llama-family decoder (Llama 2/3, SmolLM2, Qwen2, Mistral) over one flattened batch.

There is no padding and no batch dimension: every step runs T tokens from many requests
as one [T, hidden] tensor. Attention reads and writes the paged KV cache through the
step's `AttentionMetadata`, built once per step by the model runner.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata
from engine.config import ModelConfig
from engine.models.layers import Linear, RMSNorm, RotaryEmbedding, apply_rope



class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        self.scale = cfg.head_dim ** -0.5
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv_proj = Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.intermediate_size = cfg.intermediate_size
        self.cpu_ops = None  # kernels.cpu module when the fused CPU path is on

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                attention) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cpu_ops is not None:
            return self._forward_fused(h, residual, cos, sin, k_cache, v_cache, meta, attention)
        if residual is None:
            residual = h
            h = self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm.add_forward(h, residual)
        T = h.shape[0]
        qkv = self.qkv_proj(h)
        qk = qkv[:, :self.q_size + self.kv_size].view(T, self.num_heads + self.num_kv_heads, self.head_dim)
        qk = apply_rope(qk, cos, sin)
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        v = qkv[:, self.q_size + self.kv_size:].view(T, self.num_kv_heads, self.head_dim)
        attention.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        o = attention.attend(q, k, v, k_cache, v_cache, meta, self.scale)
        h = self.o_proj(o.reshape(T, self.q_size))
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        gate_up = self.gate_up_proj(h)
        h = F.silu(gate_up[:, :self.intermediate_size]) * gate_up[:, self.intermediate_size:]
        return self.down_proj(h), residual

    def _forward_fused(self, h, residual, cos, sin, k_cache, v_cache, meta, attention):
        """Same computation with the C++ CPU kernels: fewer, fused ops per layer."""
        ops, eps = self.cpu_ops, self.input_layernorm.eps
        if residual is None:
            residual = h
            h = ops.rms_norm(h, self.input_layernorm.weight, eps)
        else:
            ops.fused_add_rms_norm(h, residual, self.input_layernorm.weight, eps)
        T = h.shape[0]
        qkv = self.qkv_proj(h)
        q = ops.rope_and_write_kv(qkv, cos, sin, k_cache, v_cache, meta.slot_mapping,
                                  self.num_heads, self.num_kv_heads, self.head_dim)
        k = v = None
        if meta.prefills:  # prefill attention reads this step's K/V straight from qkv
            k = k_cache.view(-1, self.num_kv_heads, self.head_dim)[meta.slot_mapping]
            v = qkv[:, self.q_size + self.kv_size:].view(T, self.num_kv_heads, self.head_dim)
        o = attention.attend(q, k, v, k_cache, v_cache, meta, self.scale)
        h = self.o_proj(o.view(T, self.q_size))
        ops.fused_add_rms_norm(h, residual, self.post_attention_layernorm.weight, eps)
        h = ops.silu_and_mul(self.gate_up_proj(h))
        return self.down_proj(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.head_dim, max(max_positions, 1), cfg.rope_theta, cfg.rope_scaling)

    def prepack(self) -> None:
        for m in self.modules():
            if isinstance(m, Linear):
                m.prepack()

    def use_cpu_kernels(self, ops) -> None:
        for layer in self.layers:
            layer.cpu_ops = ops
        if self.embed_tokens.weight.dtype == torch.bfloat16 and ops.has_bf16_gemv():
            self._pack_for_gemv(ops)

    def _pack_for_gemv(self, ops) -> None:
        """Copy every supported linear's weight, in the gemv kernel's layout, into one buffer
        on huge pages, in the order a step reads them."""
        linears = [m for m in self.modules() if isinstance(m, Linear) and ops.gemv_supported(*m.weight.shape)]
        arena = torch.empty(sum(m.weight.numel() for m in linears), dtype=torch.bfloat16)
        ops.advise_huge_pages(arena)
        offset = 0
        for m in linears:
            packed = ops.pack_for_gemv(m.weight)
            view = arena[offset:offset + packed.numel()].view(packed.shape)
            view.copy_(packed)
            offset += packed.numel()
            m.use_gemv(ops.gemv_bf16, view)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], attention) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary.lookup(positions, h.dtype)
        if self.layers[0].cpu_ops is not None:
            cos, sin = cos.squeeze(1), sin.squeeze(1)
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            # .forward: skip nn.Module's hook machinery, ~30 calls per step on the hot path
            h, residual = layer.forward(h, residual, cos, sin, k_cache, v_cache, meta, attention)
        h, _ = self.norm.add_forward(h, residual)
        return h

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # -- weights ---------------------------------------------------------------------------
    def load_hf_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Load transformers-named Llama weights, fusing q/k/v and gate/up projections."""
        cfg = self.cfg
        get = lambda name: weights.pop(name)  # noqa: E731 - pop so the caller's copy can be freed
        with torch.no_grad():
            self.embed_tokens.weight.copy_(get("model.embed_tokens.weight"))
            self.norm.weight.copy_(get("model.norm.weight"))
            if cfg.tie_word_embeddings:
                weights.pop("lm_head.weight", None)
            else:
                self.lm_head.weight.copy_(get("lm_head.weight"))
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                layer.input_layernorm.weight.copy_(get(p + "input_layernorm.weight"))
                layer.post_attention_layernorm.weight.copy_(get(p + "post_attention_layernorm.weight"))
                layer.qkv_proj.weight.copy_(torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"]))
                if layer.qkv_proj.bias is not None:
                    layer.qkv_proj.bias.copy_(torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"]))
                layer.o_proj.weight.copy_(get(p + "self_attn.o_proj.weight"))
                layer.gate_up_proj.weight.copy_(torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]))
                layer.down_proj.weight.copy_(get(p + "mlp.down_proj.weight"))
        leftover = [k for k in weights if not k.endswith("rotary_emb.inv_freq")]
        if leftover:
            raise ValueError(f"unexpected weights in checkpoint: {leftover[:5]}")

    def init_random(self, seed: int, std: float = 0.02) -> None:
        g = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=g)
