"""Building blocks shared by the model families: linear (prepacked on CPU), RMSNorm (and
Gemma's variant), RoPE, and the paged self-attention block (q/k/v in one projection,
optional per-head q/k norms, an optional sliding window)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine_kernels.quant import QuantizedWeight


class Linear(nn.Module):
    """y = x W^T (+ b). On CPU in bf16/fp16 the weight is prepacked for oneDNN once at load,
    which makes the small-batch (decode) matmuls about 1.7x faster than F.linear. With the
    C++ kernels on an AVX512-BF16 CPU, decode-sized batches (up to GEMV_MAX_ROWS rows) go
    through our own weight-streaming kernel instead (`use_gemv`).

    A quantized weight (`qweight`, engine_kernels/quant.py: a GGUF's own blocks or int8) replaces
    the dense one and runs on `quant_kernels`; `weight` is then empty."""

    GEMV_MAX_ROWS = 64  # measured: faster than oneDNN up to about 64 rows, slower beyond

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self._packed: torch.Tensor | None = None
        self._gemv = None  # (kernel, weight in the kernel's layout)
        self.qweight: QuantizedWeight | None = None
        self.quant_kernels = None  # kernels.quant.QuantizedLinearKernels, set with qweight

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
        """Back to a dense weight (devices without the quantized kernels)."""
        assert self.qweight is not None
        self.weight = nn.Parameter(self.qweight.dequantize(dtype).to(self.weight.device), requires_grad=False)
        self.qweight = None

    def prepack(self) -> None:
        w = self.weight
        if (self.qweight is None and w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16)
                and torch.backends.mkldnn.is_available()):
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w, None)

    def use_gemv(self, kernel, packed_weight: torch.Tensor) -> None:
        self._gemv = (kernel, packed_weight)

    def cpp_weights(self, ops):
        """This layer for the C++ fused decode path (ops.LinearWeights), or None when it runs
        on neither C++ kernel."""
        bias = None if self.bias is None else self.bias.data
        if self.qweight is not None and getattr(self.quant_kernels, "ops", None) is not None:
            w = self.qweight
            return ops.LinearWeights(w.codes, w.scales, w.mins, w.bits, w.block, bias)
        if self.qweight is None and self._gemv is not None:
            none = torch.empty(0)
            return ops.LinearWeights(self._gemv[1], none, none, 16, 0, bias)
        return None

    def kernel_names(self) -> list[str]:
        """What runs this layer: the quantized kernel's name, or "avx512_bf16_gemv" (decode)
        and "onednn"/"torch" (the rest) for a dense weight."""
        if self.qweight is not None:
            return [self.quant_kernels.name()]
        return (["avx512_bf16_gemv"] if self._gemv is not None else []) + \
            ["onednn" if self._packed is not None else "torch"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return self.quant_kernels(x, self.qweight, self.bias)
        if self._gemv is not None and x.shape[0] <= self.GEMV_MAX_ROWS:
            kernel, packed = self._gemv
            return kernel(x, packed, self.bias)
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as transformers' LlamaRMSNorm: normalize in fp32, scale in the model dtype.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual)."""
        residual = x + residual
        return self.forward(residual), residual


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: scale by (1 + weight), in fp32, then cast (as transformers does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


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
        """[T] positions -> cos, sin of shape [T, 1, head_dim] in `dtype`."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D], half-split (non-interleaved) layout as in transformers' Llama."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class SelfAttention(nn.Module):
    """q/k/v in one projection -> (per-head q/k RMSNorm: Qwen3, Gemma 3) -> RoPE -> K/V into
    the paged cache -> attention over the cache (within `window` tokens when set) -> o_proj."""

    def __init__(self, cfg, scale: float, window: int | None = None, norm_cls: type[RMSNorm] = RMSNorm) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.scale, self.window = scale, window
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size)
        self.q_norm = norm_cls(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = norm_cls(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def _qk_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """The q and k heads of qkv as one [T, H + Hkv, D] view, normalized in place if the
        family norms them."""
        T = qkv.shape[0]
        qk = qkv[:, :self.q_size + self.kv_size].view(T, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            qk[:, :self.num_heads] = self.q_norm(qk[:, :self.num_heads])
            qk[:, self.num_heads:] = self.k_norm(qk[:, self.num_heads:])
        return qk

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta, attention) -> torch.Tensor:
        T = h.shape[0]
        qkv = self.qkv_proj(h)
        qk = apply_rope(self._qk_heads(qkv), cos, sin)
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        v = qkv[:, self.q_size + self.kv_size:].view(T, self.num_kv_heads, self.head_dim)
        attention.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        o = attention.attend(q, k, v, k_cache, v_cache, meta, self.scale, self.window)
        return self.o_proj(o.reshape(T, self.q_size))

    def forward_fused(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, meta, attention, ops) -> torch.Tensor:
        """Same computation with the C++ CPU kernels (RoPE writes K/V itself)."""
        T = h.shape[0]
        qkv = self.qkv_proj(h)
        if self.q_norm is not None:
            self._qk_heads(qkv)
        q = ops.rope_and_write_kv(qkv, cos, sin, k_cache, v_cache, meta.slot_mapping,
                                  self.num_heads, self.num_kv_heads, self.head_dim)
        k = v = None
        if meta.prefills and k_cache.dtype != torch.uint8:  # prefills read this step's K/V from qkv
            k = k_cache.view(-1, self.num_kv_heads, self.head_dim)[meta.slot_mapping]
            v = qkv[:, self.q_size + self.kv_size:].view(T, self.num_kv_heads, self.head_dim)
        o = attention.attend(q, k, v, k_cache, v_cache, meta, self.scale, self.window)
        return self.o_proj(o.view(T, self.q_size))

    def load(self, get, prefix: str) -> None:
        """From transformers' names under `prefix` (e.g. 'model.layers.3.self_attn.')."""
        self.qkv_proj.load([get(prefix + f"{n}_proj.weight") for n in "qkv"])
        if self.qkv_proj.bias is not None:
            self.qkv_proj.bias.copy_(torch.cat([get(prefix + f"{n}_proj.bias") for n in "qkv"]))
        self.o_proj.load([get(prefix + "o_proj.weight")])
        if self.q_norm is not None:
            self.q_norm.weight.copy_(get(prefix + "q_norm.weight"))
            self.k_norm.weight.copy_(get(prefix + "k_norm.weight"))
