"""The int8 KV cache's row format and its plain-torch reference (kernels/csrc/kv_int8_ops.cpp
is the fast form; tests hold the two to the same codes).

A head's row is `head_dim` bytes of codes, then its scale as fp32 (`head_dim + 4` bytes, one
uint8 tensor), so a cache stays one tensor per layer and block copies, swaps and prefix
sharing move scales with their codes:

    value[d] = (code[d] - 128) * scale,  scale = amax / 127,  code = round(value / scale) + 128

Codes are offset by 128 because the AVX-512 VNNI dot product takes one operand unsigned. A
row of zeros (scale 0) reads as zeros, so a zeroed cache is an empty one.
"""
from __future__ import annotations

import torch

SCALE_BYTES = 4


def row_bytes(head_dim: int) -> int:
    return head_dim + SCALE_BYTES


def quantize_kv(x: torch.Tensor) -> torch.Tensor:
    """[..., D] (any float dtype) -> uint8 rows [..., D + 4]; fp32 arithmetic, round half to
    even, as the C++ kernel."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    codes = ((xf * inv).round().clamp(-127, 127) + 128).to(torch.uint8)
    return torch.cat([codes, scale.view(torch.uint8)], dim=-1)


def dequantize_kv(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 rows [..., D + 4] -> values [..., D] in `dtype`."""
    head_dim = rows.shape[-1] - SCALE_BYTES
    scale = rows[..., head_dim:].contiguous().view(torch.float32)
    return ((rows[..., :head_dim].float() - 128) * scale).to(dtype)
