"""The int8 KV cache's layout and its plain-torch reference (engine_kernels/csrc/kv_int8_ops.cpp is
the fast form; tests hold the two to the same bytes).

Each head row (one token's K or V for one KV head) is quantized on its own:

    value[d] = code[d] * scale,  scale = amax / 127,  code = round(value / scale) in [-127, 127]

A layer's cache is one uint8 tensor [num_blocks, num_kv_heads, block_size // 16, TILE_BYTES]:
a block holds, per KV head, tiles of 16 consecutive positions, each 16 * head_dim bytes of
codes then the 16 rows' fp32 scales (so block copies, swaps and prefix sharing move scales
with their codes, and a zeroed cache reads as zeros). Inside a tile the codes are laid out
for the AVX-512 VNNI dot product (4 bytes x 16 lanes per instruction), so decode attention
needs no shuffles and no horizontal sums:

- K: byte (d // 4) * 64 + i * 4 + d % 4 holds row i's code d, offset by 128 (unsigned: the
  instruction takes one operand unsigned): one 64-byte load is 4 dims of all 16 rows.
- V: byte (i // 4) * 4 * head_dim + (d // 16) * 64 + (d % 16) * 4 + i % 4 holds it as a
  signed byte: one 64-byte load is 16 dims of 4 rows.
"""
from __future__ import annotations

import functools

import torch

TILE = 16          # positions per tile; block_size must be a multiple
SCALE_BYTES = 4


def tile_bytes(head_dim: int) -> int:
    return TILE * (head_dim + SCALE_BYTES)


def cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    assert block_size % TILE == 0, "an int8 cache's block holds whole 16-position tiles"
    return (num_blocks, num_kv_heads, block_size // TILE, tile_bytes(head_dim))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] (any float dtype) -> (int32 codes [..., D], fp32 scales [...]); fp32
    arithmetic, round half to even, as the C++ kernel."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (xf * inv).round().clamp(-127, 127).to(torch.int32), scale.squeeze(-1)


@functools.cache
def _code_offsets(kind: str, head_dim: int) -> torch.Tensor:
    """[16, D]: the byte of row i's code d inside a tile."""
    i = torch.arange(TILE)[:, None]
    d = torch.arange(head_dim)[None, :]
    if kind == "k":
        return (d // 4) * 64 + i * 4 + d % 4
    return (i // 4) * 4 * head_dim + (d // 16) * 64 + (d % 16) * 4 + i % 4


def write(cache: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor, kind: str) -> None:
    """Quantizes x [T, Hkv, D] (kind "k" or "v") into `cache` at the slots."""
    _, num_kv_heads, tiles, tb = cache.shape
    head_dim = x.shape[-1]
    block_size = tiles * TILE
    codes, scale = quantize_rows(x)
    blk, pos = slot_mapping // block_size, slot_mapping % block_size
    heads = torch.arange(num_kv_heads, device=cache.device)
    base = ((blk[:, None] * num_kv_heads + heads[None, :]) * tiles + (pos // TILE)[:, None]) * tb  # [T, Hkv]
    row = pos % TILE
    code_at = base[..., None] + _code_offsets(kind, head_dim).to(cache.device)[row][:, None, :]  # [T, Hkv, D]
    stored = (codes + 128) if kind == "k" else codes.remainder(256)  # u8, or an int8's two's complement
    flat = cache.view(-1)
    flat[code_at.reshape(-1)] = stored.reshape(-1).to(torch.uint8)
    scale_at = (base + TILE * head_dim + row[:, None] * SCALE_BYTES)[..., None] + torch.arange(SCALE_BYTES,
                                                                                                device=cache.device)
    flat[scale_at.reshape(-1)] = scale.contiguous().view(torch.uint8).reshape(-1)


def read(blocks: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """Blocks of a cache [n, Hkv, tiles, TILE_BYTES] -> values [n, block_size, Hkv, D] in `dtype`."""
    n, num_kv_heads, tiles, tb = blocks.shape
    head_dim = tb // TILE - SCALE_BYTES
    raw = blocks[..., :TILE * head_dim]
    if kind == "k":  # [.., D/4, 16 rows, 4] -> [.., 16 rows, D]
        codes = raw.view(n, num_kv_heads, tiles, head_dim // 4, TILE, 4).transpose(3, 4).float() - 128
    else:  # [.., 4 row groups, D/16, 16 dims, 4 rows] -> [.., 16 rows, D]
        codes = raw.view(torch.int8).view(n, num_kv_heads, tiles, 4, head_dim // 16, 16, 4)
        codes = codes.permute(0, 1, 2, 3, 6, 4, 5).float()
    codes = codes.reshape(n, num_kv_heads, tiles, TILE, head_dim)
    scale = blocks[..., TILE * head_dim:].contiguous().view(torch.float32)  # [n, Hkv, tiles, 16]
    values = codes * scale[..., None]
    return values.reshape(n, num_kv_heads, tiles * TILE, head_dim).transpose(1, 2).to(dtype)
