"""Plain-torch references for the Triton kernels: slow, obvious, and the ground truth in tests."""
from __future__ import annotations

import torch


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                        scale: float, window: int | None = None) -> torch.Tensor:
    """q: [T, H, D] for a varlen batch (sequence i owns rows query_start_loc[i]:[i+1], which are
    its last tokens); caches [num_blocks, block_size, Hkv, D]; causal, and with `window` a
    query at position p sees only keys p - window + 1 .. p. fp32 math."""
    T, H, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for i in range(len(seq_lens)):
        s, e, L = int(query_start_loc[i]), int(query_start_loc[i + 1]), int(seq_lens[i])
        if e == s:
            continue
        nb = -(-L // bs)
        blocks = block_tables[i, :nb].long()
        k = k_cache[blocks].reshape(-1, Hkv, D)[:L].float().repeat_interleave(H // Hkv, dim=1)
        v = v_cache[blocks].reshape(-1, Hkv, D)[:L].float().repeat_interleave(H // Hkv, dim=1)
        qi = q[s:e].float()
        scores = torch.einsum("qhd,khd->hqk", qi, k) * scale
        q_pos = torch.arange(L - (e - s), L)[:, None]
        kv_pos = torch.arange(L)[None, :]
        hidden = (kv_pos > q_pos) | ((kv_pos <= q_pos - window) if window else False)
        scores = scores.masked_fill(hidden, float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out


def write_kv_ref(k_cache, v_cache, k, v, slot_mapping) -> None:
    """Stores k, v [T, Hkv, D] at slot_mapping (negative slots are padding: skipped)."""
    keep = slot_mapping >= 0
    k_cache.view(-1, *k.shape[1:])[slot_mapping[keep]] = k[keep]
    v_cache.view(-1, *v.shape[1:])[slot_mapping[keep]] = v[keep]


def copy_blocks_ref(caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    for c in caches:
        c[dst.long()] = c[src.long()]
