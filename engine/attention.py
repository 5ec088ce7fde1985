"""Attention over the paged KV cache for one flattened varlen batch: the torch paths (the
torch backend's, and the cpu backend's for prompt chunks).

The batch puts all single-token decodes first, then prefill chunks. Metadata is built
once per step (`AttentionMetadata`, by the step's backend, see `engine.attention_backends`)
and shared by every layer. Decodes are vectorized across sequences (one gather of their
blocks, one SDPA call); each prefill chunk is one SDPA call over its cached context plus
its own tokens. A sliding-window layer (Gemma 3) passes `window`: a query at position p
then sees keys p - window + 1 .. p only. An int8 cache (uint8 tiles, engine_kernels/kv_quant.py) is
dequantized where it is read, prompt chunks included: every token attends to the values
stored, as the later decodes will.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F

from engine_kernels import kv_quant


@dataclass
class PrefillSeq:
    start: int          # first row of this chunk in the flattened batch
    num_tokens: int     # query tokens in this chunk
    context_len: int    # tokens in the cache after this step (earlier context + chunk)
    block_table: torch.Tensor  # [num_blocks] int64


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor          # [T] int64, cache slot of each new token
    num_decodes: int                    # rows [0, num_decodes) are decodes
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int64
    decode_seq_lens: torch.Tensor | None      # [num_decodes] int64 (context incl. the new token)
    decode_mask: torch.Tensor | None          # [num_decodes, 1, 1, max_blocks*block_size] bool
    prefills: list[PrefillSeq]
    # Varlen form used by the Triton kernels (all rows, decodes included).
    query_start_loc: torch.Tensor | None = None  # [B+1] int32
    seq_lens: torch.Tensor | None = None         # [B] int32
    block_tables: torch.Tensor | None = None     # [B, max_blocks] int32
    max_query_len: int = 0
    max_seq_len: int = 0


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new K/V ([T, Hkv, D]) into caches [num_blocks, block_size, Hkv, D] by slot (an
    int8 cache: quantized into its tiles, engine_kernels/kv_quant.py)."""
    if k_cache.dtype == torch.uint8:
        kv_quant.write(k_cache, k, slot_mapping, "k")
        kv_quant.write(v_cache, v, slot_mapping, "v")
        return
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def read_cache(cache: torch.Tensor, block_ids: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """These blocks of the K ("k") or V ("v") cache as values [n, block_size, Hkv, D] in
    `dtype` (an int8 cache dequantized)."""
    blocks = cache.index_select(0, block_ids)
    return kv_quant.read(blocks, kind, dtype) if cache.dtype == torch.uint8 else blocks


def torch_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: AttentionMetadata, scale: float, window: int | None = None) -> torch.Tensor:
    """q: [T, H, D]; the step's K/V already in the caches. Returns [T, H, D]."""
    out = torch.empty_like(q)
    if meta.num_decodes:
        out[:meta.num_decodes] = _torch_decode(q[:meta.num_decodes], k_cache, v_cache, meta, scale, window)
    torch_prefills(out, q, k_cache, v_cache, meta, scale, window)
    return out


def _torch_decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None) -> torch.Tensor:
    """All decodes at once: gather each sequence's blocks, one masked SDPA call."""
    bt = meta.decode_block_tables
    n = bt.shape[0]
    # index_select is several times faster than advanced indexing here.
    kd = read_cache(k_cache, bt.view(-1), "k", q.dtype).flatten(0, 1).unflatten(0, (n, -1)).transpose(1, 2)
    vd = read_cache(v_cache, bt.view(-1), "v", q.dtype).flatten(0, 1).unflatten(0, (n, -1)).transpose(1, 2)
    mask = meta.decode_mask
    if window is not None:
        kv_pos = torch.arange(mask.shape[-1], device=q.device)
        mask = mask & (kv_pos[None, :] > meta.decode_seq_lens[:, None] - 1 - window).view(mask.shape)
    od = F.scaled_dot_product_attention(q.unsqueeze(2), kd, vd, attn_mask=mask, scale=scale,
                                        enable_gqa=True)
    return od.squeeze(2)


def torch_prefills(out, q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                   window: int | None = None, read=read_cache) -> None:
    """Each prompt chunk: causal attention over its cached context plus its own tokens, all
    read from the cache (its own K/V were written there first; an int8 cache is read back,
    so every token attends to the values stored, as the later decodes will)."""
    for p in meta.prefills:
        rows = slice(p.start, p.start + p.num_tokens)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        kp = read(k_cache, p.block_table, "k", q.dtype).flatten(0, 1)[:p.context_len]
        vp = read(v_cache, p.block_table, "v", q.dtype).flatten(0, 1)[:p.context_len]
        if p.context_len == p.num_tokens and window is None:  # plain causal attention
            mask, causal = None, True
        else:
            q_pos = torch.arange(p.context_len - p.num_tokens, p.context_len, device=q.device)[:, None]
            kv_pos = torch.arange(p.context_len, device=q.device)[None, :]
            mask = kv_pos <= q_pos
            if window is not None:
                mask = mask & (kv_pos > q_pos - window)
            causal = False
        op = F.scaled_dot_product_attention(qp, kp.transpose(0, 1).unsqueeze(0), vp.transpose(0, 1).unsqueeze(0),
                                            attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
        out[rows] = op.squeeze(0).transpose(0, 1)
