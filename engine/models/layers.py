"""Building blocks of every family: the linear layer, RMSNorm, RoPE tables, and the one
decoder layer whose forward serves Llama, Qwen and Gemma 3 alike.

A decoder layer's forward calls the step's `ops` (an attention backend: engine/
attention_backends.py), which the platform picked: the C++ kernels on CPU, the plain-torch
references, or Triton on CUDA. The families differ in flags, not in code: per-head q/k
norms (Qwen3, Gemma 3), Gemma's norms (1 + w, fp32) and its extra norms after attention
and after the MLP, the gated activation (SiLU or tanh-GELU), a sliding window. Where the
platform has the whole layer as one fused op (`fused`, the C++ DecodeLayer: the same
kernels in the same order), decode-only steps take it.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine_kernels.quant import QuantizedWeight


class Linear(nn.Module):
    """y = x W^T (+ b). The platform sets `kernel` (and `kernel_name`) once the weights are
    loaded (engine/platform.py); until then F.linear. A quantized weight (`qweight`,
    engine_kernels/quant.py: a GGUF's own blocks or int8) replaces the dense one; `weight` is
    then empty."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.qweight: QuantizedWeight | None = None
        self.kernel: Callable[[torch.Tensor], torch.Tensor] = lambda x: F.linear(x, self.weight, self.bias)
        self.kernel_name = "torch"
        self.cpp = None  # this layer for the C++ DecodeLayer (ops.LinearWeights), when it has a C++ kernel
        self.max_fused_rows: int | None = None  # rows the C++ kernel takes best, when bounded (the bf16 GEMV)

    def load(self, parts: list) -> None:
        """The weight from one or more row blocks (fused q/k/v, gate/up): dense tensors, or
        QuantizedWeights, which stay quantized when every part is one."""
        if all(isinstance(p, QuantizedWeight) for p in parts):
            self.set_quantized(parts[0] if len(parts) == 1 else QuantizedWeight.cat(parts))
            return
        dense = [p.dequantize() if isinstance(p, QuantizedWeight) else p for p in parts]
        self.weight.copy_(torch.cat(dense) if len(dense) > 1 else dense[0])

    def set_quantized(self, qweight: QuantizedWeight) -> None:
        assert (qweight.out_features, qweight.in_features) == (self.out_features, self.in_features), "weight shape"
        self.qweight = qweight
        self.weight = nn.Parameter(torch.empty(0, self.in_features, device=self.weight.device), requires_grad=False)

    def dequantize(self, dtype: torch.dtype) -> None:
        """Back to a dense weight (where no quantized kernel runs)."""
        assert self.qweight is not None
        self.weight = nn.Parameter(self.qweight.dequantize(dtype).to(self.weight.device), requires_grad=False)
        self.qweight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x)


class RMSNorm(nn.Module):
    """The weight and eps of one RMSNorm; `gemma`: Gemma's form (scale by 1 + w in fp32).
    The arithmetic is the step's ops' (engine_kernels/reference.py is the reference)."""

    def __init__(self, dim: int, eps: float, gemma: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim), requires_grad=False)
        self.eps, self.gemma = eps, gemma


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "llama3":
        # Llama 3.1 frequency-dependent scaling (same formula as transformers).
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type != "default":
        raise ValueError(f"unsupported rope scaling type {rope_type!r}")
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, looked up once per step for the whole batch."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] positions -> cos, sin of shape [T, head_dim] in `dtype`."""
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


class DecoderLayer(nn.Module):
    """norm -> q/k/v -> (q/k norms) -> RoPE, K/V into the cache -> attention -> o_proj ->
    (norm) -> residual add, norm -> gate/up -> act * up -> down -> (norm). Names of the
    modules are transformers' where the families agree; Llama's post_attention_layernorm
    (the norm before the MLP) is `pre_mlp_norm` here, Gemma's norm of the attention output
    `post_attention_norm`."""

    def __init__(self, cfg, scale: float, window: int | None, gemma: bool = False) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        norm = lambda dim=cfg.hidden_size: RMSNorm(dim, eps, gemma)  # noqa: E731
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.scale, self.window, self.gelu = scale, window, gemma
        self.input_norm = norm()
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.q_norm = norm(cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = norm(cfg.head_dim) if cfg.qk_norm else None
        self.o_proj = Linear(self.q_size, cfg.hidden_size)
        self.post_attention_norm = norm() if gemma else None
        self.pre_mlp_norm = norm()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.post_mlp_norm = norm() if gemma else None
        self.fused = None  # the C++ DecodeLayer, set by the platform where every linear has a C++ kernel
        self.max_fused_rows: int | None = None

    def linears(self) -> list[Linear]:
        return [self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj]

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta, ops) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, the residual stream before it): the next layer's
        norm adds them, so one add serves both."""
        T = h.shape[0]
        if self.fused is not None and not meta.prefills and (self.max_fused_rows is None or T <= self.max_fused_rows):
            return self.fused.run(h, residual, cos, sin, k_cache, v_cache, meta.slot_mapping,
                                  meta.decode_block_tables, meta.decode_seq_lens)
        n = self.input_norm
        if residual is None:
            residual, h = h, ops.rms_norm(h, n.weight, n.eps, n.gemma)
        else:
            ops.add_rms_norm_(h, residual, n.weight, n.eps, n.gemma)
        qkv = self.qkv_proj(h)
        if self.q_norm is not None:
            ops.head_rms_norm_(qkv, self.q_norm.weight, self.k_norm.weight, self.num_heads, self.num_kv_heads,
                               self.head_dim, n.eps, n.gemma)
        q = ops.rope_and_write_kv(qkv, cos, sin, k_cache, v_cache, meta.slot_mapping, self.num_heads,
                                  self.num_kv_heads, self.head_dim)
        a = self.o_proj(ops.attend(q, k_cache, v_cache, meta, self.scale, self.window).reshape(T, self.q_size))
        if self.post_attention_norm is not None:
            a = ops.rms_norm(a, self.post_attention_norm.weight, n.eps, n.gemma)
        ops.add_rms_norm_(a, residual, self.pre_mlp_norm.weight, n.eps, n.gemma)
        m = self.down_proj(ops.act_and_mul(self.gate_up_proj(a), self.gelu))
        if self.post_mlp_norm is not None:
            m = ops.rms_norm(m, self.post_mlp_norm.weight, n.eps, n.gemma)
        return m, residual

    def load(self, get, prefix: str) -> None:
        """From transformers' names under `prefix` (e.g. 'model.layers.3.')."""
        attn = prefix + "self_attn."
        self.qkv_proj.load([get(attn + f"{n}_proj.weight") for n in "qkv"])
        if self.qkv_proj.bias is not None:
            self.qkv_proj.bias.copy_(torch.cat([get(attn + f"{n}_proj.bias") for n in "qkv"]))
        self.o_proj.load([get(attn + "o_proj.weight")])
        if self.q_norm is not None:
            self.q_norm.weight.copy_(get(attn + "q_norm.weight"))
            self.k_norm.weight.copy_(get(attn + "k_norm.weight"))
        self.gate_up_proj.load([get(prefix + "mlp.gate_proj.weight"), get(prefix + "mlp.up_proj.weight")])
        self.down_proj.load([get(prefix + "mlp.down_proj.weight")])
        norms = {"input_norm": "input_layernorm"}
        if self.post_attention_norm is not None:  # Gemma: four norms
            norms |= {"post_attention_norm": "post_attention_layernorm", "pre_mlp_norm": "pre_feedforward_layernorm",
                      "post_mlp_norm": "post_feedforward_layernorm"}
        else:
            norms |= {"pre_mlp_norm": "post_attention_layernorm"}
        for ours, theirs in norms.items():
            getattr(self, ours).weight.copy_(get(prefix + theirs + ".weight"))
