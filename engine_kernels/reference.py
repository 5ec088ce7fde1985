"""Plain-torch references for the kernels (Triton, and the C++ CPU ones): slow, obvious, and the
ground truth in tests. The torch attention backend runs the layer ops from here."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


# -- the C++ CPU kernels' references (engine_kernels/csrc/elementwise.cpp, sampling.cpp) ---------
# Rounding points as transformers': a Llama-style norm scales in the model dtype, a Gemma-style
# one (1 + w) in fp32; RoPE rounds each product and the sum to the model dtype.

def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (h * (1.0 + w.float())).to(x.dtype)
    return w * h.to(x.dtype)


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool = False) -> None:
    """In place: residual += x, then x = rms_norm(residual)."""
    residual.add_(x)
    x.copy_(rms_norm(residual, w, eps, gemma))


def head_rms_norm_(qkv: torch.Tensor, q_w: torch.Tensor, k_w: torch.Tensor, num_heads: int, num_kv_heads: int,
                   head_dim: int, eps: float, gemma: bool = False) -> None:
    """In place on qkv [T, (H + 2 Hkv) D]: each q head normed by q_w, each k head by k_w."""
    T = qkv.shape[0]
    qk = qkv[:, :(num_heads + num_kv_heads) * head_dim].view(T, num_heads + num_kv_heads, head_dim)
    qk[:, :num_heads] = rms_norm(qk[:, :num_heads], q_w, eps, gemma)
    qk[:, num_heads:] = rms_norm(qk[:, num_heads:], k_w, eps, gemma)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D], half-split (non-interleaved) layout as transformers' Llama; cos, sin
    [T, D] in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def act_and_mul(x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """act(x[:, :d]) * x[:, d:]: SiLU, or tanh-approximated GELU (Gemma)."""
    d = x.shape[-1] // 2
    g = F.gelu(x[:, :d], approximate="tanh") if gelu else F.silu(x[:, :d])
    return g * x[:, d:]


_BITS = 1 << torch.arange(32, dtype=torch.int32)


def apply_token_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """logits[r, j] = -inf where bit j of bitmask[r] is 0 (token ids past the bitmask are
    masked too)."""
    idx = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    allowed = (bitmask[idx].unsqueeze(-1) & _BITS.to(bitmask.device)).ne(0).view(len(rows), -1)
    vocab = logits.shape[1]
    if allowed.shape[1] < vocab:
        allowed = torch.cat([allowed, allowed.new_zeros(len(rows), vocab - allowed.shape[1])], dim=1)
    logits[idx] = logits[idx].masked_fill(~allowed[:, :vocab], float("-inf"))
