"""Quantized linear weights: one packed form and its plain-torch references (the C++ kernel
is engine_kernels/csrc/quant_ops.cpp; engine/platform.py puts a weight on it).

The form: w[n, k] = scale[n, k // block] * code[n, k] + min[n, k // block], with unsigned
codes of 4 or 8 bits. GGUF's Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K and Q6_K and per-channel int8 all
map onto it exactly (engine/gguf_weights.py packs them), so one kernel serves them all.

Layout, in panels of 16 output rows (the kernel's 16 lanes are output rows, so no
horizontal sums): codes [N/16, K*bits/32, 64] uint8, where in panel p, group g, byte
4r + t holds row 16p + r at k = 4g + t (8-bit), or k = 8g + t in its low nibble and
k = 8g + 4 + t in its high one (4-bit); scales and mins [N/16, K/block, 16].

Invariants: N % 16 == 0, K % block == 0, block 32 (or 16 with 8-bit codes); scales and
mins fp16 where that is exact (Q4_0, Q4_1, Q8_0: their own fp16), fp32 otherwise.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

PANEL = 16  # output rows per panel


@dataclass
class QuantizedWeight:
    codes: torch.Tensor   # uint8 [N/16, K*bits/32, 64]
    scales: torch.Tensor  # [N/16, K/block, 16], fp16 or fp32
    mins: torch.Tensor    # like scales
    bits: int
    block: int
    format: str           # where it came from: "q4_1", "q8_0", "int8", ...

    def __post_init__(self) -> None:
        assert self.bits in (4, 8) and self.block in (16, 32) and (self.block == 32 or self.bits == 8)
        assert self.codes.dtype == torch.uint8 and self.codes.dim() == 3 and self.codes.shape[2] == 64
        assert self.scales.shape == self.mins.shape and self.scales.dtype == self.mins.dtype
        assert self.scales.shape[2] == PANEL and self.scales.shape[0] == self.codes.shape[0]
        assert self.codes.shape[1] * 32 == self.in_features * self.bits, "codes and scales disagree on K"

    @classmethod
    def from_rows(cls, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bits: int, block: int,
                  fmt: str) -> QuantizedWeight:
        """From row-major codes [N, K] (values < 2**bits) and scales/mins [N, K/block]."""
        N, K = codes.shape
        if N % PANEL:
            raise ValueError(f"quantized weights need a multiple of {PANEL} output rows, got {N}")
        codes = codes.to(torch.uint8)
        if bits == 8:
            packed = codes.view(N // PANEL, PANEL, K // 4, 4).permute(0, 2, 1, 3).reshape(N // PANEL, K // 4, 64)
        else:
            halves = codes.view(N // PANEL, PANEL, K // 8, 2, 4).permute(0, 2, 3, 1, 4)
            packed = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(N // PANEL, K // 8, 64)

        def panels(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(N // PANEL, PANEL, -1).transpose(1, 2).contiguous()

        return cls(packed.contiguous(), panels(scales), panels(mins), bits, block, fmt)

    @functools.cached_property
    def code_kind(self) -> int:
        """What the kernels may assume of the codes (AVX2's byte dot products saturate at 16
        bits; engine_kernels/csrc/quant_ops.cpp): 4 for 4-bit codes; for 8-bit ones 7 if
        every code is below 128 (Q6_K, Q5_K), 8 if every code is in [1, 255] of a weight
        whose min is -128 * scale (Q8_0, int8: code - 128 is a signed value), else 9."""
        if self.bits == 4:
            return 4
        lo, hi = torch.aminmax(self.codes)
        if int(hi) < 128:
            return 7
        symmetric = torch.equal(self.mins.float(), -128.0 * self.scales.float())
        return 8 if int(lo) >= 1 and symmetric else 9

    @property
    def out_features(self) -> int:
        return self.codes.shape[0] * PANEL

    @property
    def in_features(self) -> int:
        return self.scales.shape[1] * self.block

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins))

    def row_codes(self) -> torch.Tensor:
        """Codes [N, K], row-major."""
        P, N, K = self.codes.shape[0], self.out_features, self.in_features
        if self.bits == 8:
            return self.codes.view(P, K // 4, PANEL, 4).permute(0, 2, 1, 3).reshape(N, K)
        halves = torch.stack([self.codes & 0x0F, self.codes >> 4], dim=2).view(P, K // 8, 2, PANEL, 4)
        return halves.permute(0, 3, 1, 2, 4).reshape(N, K)

    def row_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales and mins [N, K/block], row-major."""
        return tuple(t.transpose(1, 2).reshape(self.out_features, -1) for t in (self.scales, self.mins))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] (plain torch: the reference for the kernels). Computed in fp32,
        as the kernels do, then rounded once to `dtype`."""
        s, m = (t.float().repeat_interleave(self.block, dim=1) for t in self.row_scales())
        return (self.row_codes().float() * s + m).to(dtype)

    def rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The same weight with its output rows reordered (GGUF's q/k head permutation)."""
        s, m = self.row_scales()
        return QuantizedWeight.from_rows(self.row_codes()[index], s[index], m[index], self.bits, self.block,
                                         self.format)

    def widened(self, bits: int, block: int) -> QuantizedWeight:
        """The same values with wider codes and/or smaller blocks (lossless), so weights of
        two layouts can be fused (Q4_K_M files mix Q4_K and Q6_K within a layer)."""
        assert bits >= self.bits and self.block % block == 0
        if (bits, block) == (self.bits, self.block):
            return self
        rep = self.block // block
        s, m = (t.repeat_interleave(rep, dim=1) for t in self.row_scales())
        return QuantizedWeight.from_rows(self.row_codes(), s, m, bits, block, self.format)

    @staticmethod
    def cat(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Stack along the output dimension (fused q/k/v and gate/up projections), in the
        widest codes and smallest block among the parts."""
        if len({p.in_features for p in parts}) > 1:
            raise ValueError("fused weights need one input size: " + ", ".join(str(p.in_features) for p in parts))
        bits, block = max(p.bits for p in parts), min(p.block for p in parts)
        parts = [p.widened(bits, block) for p in parts]
        dtype = torch.float32 if len({p.scales.dtype for p in parts}) > 1 else parts[0].scales.dtype
        formats = "+".join(dict.fromkeys(p.format for p in parts))
        return QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scales.to(dtype) for p in parts]),
                               torch.cat([p.mins.to(dtype) for p in parts]), bits, block, formats)


def quantize_int8(w: torch.Tensor) -> QuantizedWeight:
    """Weight-only int8, one symmetric scale per output channel: w ~ s * q, q in [-127, 127],
    held as codes q + 128 with min -128 s (the common form)."""
    w = w.float()
    s = w.abs().amax(dim=1, keepdim=True) / 127.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(w / s).clamp(-127, 127)
    nb = w.shape[1] // 32
    assert w.shape[1] % 32 == 0, "int8 weights need K % 32 == 0"
    scales = s.expand(-1, nb)
    return QuantizedWeight.from_rows((q + 128).to(torch.uint8), scales, -128.0 * scales, 8, 32, "int8")


def quantize_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 codes [M, K], dx [M, K/block], sum of dequantized x [M, K/block]):
    the kernel's activation quantization (per 32 values, round half to even)."""
    M, K = x.shape
    xb = x.float().view(M, K // 32, 32)
    d = xb.abs().amax(dim=2) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv.unsqueeze(2))
    per = 32 // block
    sums = q.view(M, K // 32, per, block).sum(dim=3) * d.unsqueeze(2)
    return q.to(torch.int8).view(M, K), d.repeat_interleave(per, dim=1), sums.view(M, K // block)


def linear_reference(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize, then matmul in fp32: what the weights mean."""
    y = x.float() @ w.dequantize().T
    return (y if bias is None else y + bias.float()).to(x.dtype)


def linear_int8_reference(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The decode kernel's arithmetic in plain torch: x quantized per 32 values, exact
    integer dots per weight block, scaled by scale * dx, plus the min term."""
    qx, dx, sx = quantize_activations(x, w.block)
    M, K = qx.shape
    nb = K // w.block
    scales, mins = w.row_scales()
    dots = torch.einsum("mbk,nbk->mnb", qx.view(M, nb, w.block).double(),
                        w.row_codes().view(-1, nb, w.block).double())
    y = (dots * (scales.double().unsqueeze(0) * dx.double().unsqueeze(1))).sum(2) + sx.double() @ mins.double().T
    return (y if bias is None else y + bias.double()).to(x.dtype)
