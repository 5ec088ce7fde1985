"""Attention over the paged KV cache for one flattened varlen batch.

The batch puts all single-token decodes first, then prefill chunks. Metadata is built
once per step (`AttentionMetadata`) and shared by every layer. Backends:
- `torch`: the reference and CPU path. Decodes are vectorized across sequences (one
  gather of their blocks, one SDPA call); each prefill chunk is one SDPA call over its
  cached context plus its own tokens.
- `triton`: kernels in `kernels/` (GPU; the interpreter in tests).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    """Store new K/V ([T, Hkv, D]) into caches [num_blocks, block_size, Hkv, D] by slot."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def torch_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D] (already written to the cache). Returns [T, H, D]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        bt = meta.decode_block_tables
        # [B, max_blocks, block_size, Hkv, D] -> [B, Hkv, L, D]
        kd = k_cache[bt].flatten(1, 2).transpose(1, 2)
        vd = v_cache[bt].flatten(1, 2).transpose(1, 2)
        qd = q[:nd].unsqueeze(2)  # [B, H, 1, D]
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale,
                                            enable_gqa=True)
        out[:nd] = od.squeeze(2)
    for p in meta.prefills:
        rows = slice(p.start, p.start + p.num_tokens)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if p.context_len == p.num_tokens:  # no earlier context: plain causal attention on fresh K/V
            kp, vp = k[rows], v[rows]
            mask, causal = None, True
        else:
            kp = k_cache[p.block_table].flatten(0, 1)[:p.context_len]
            vp = v_cache[p.block_table].flatten(0, 1)[:p.context_len]
            q_pos = torch.arange(p.context_len - p.num_tokens, p.context_len, device=q.device)
            mask = torch.arange(p.context_len, device=q.device)[None, :] <= q_pos[:, None]
            causal = False
        op = F.scaled_dot_product_attention(qp, kp.transpose(0, 1).unsqueeze(0), vp.transpose(0, 1).unsqueeze(0),
                                            attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
        out[rows] = op.squeeze(0).transpose(0, 1)
    return out
