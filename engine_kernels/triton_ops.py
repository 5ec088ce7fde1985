"""Triton kernels for a decoder layer's element-wise ops, one launch per op: RMSNorm (with the
residual add fused in, and per-head over the q/k heads of a packed qkv), RoPE with the K/V
cache write, and the gated activation. In plain torch each of these is 2-10 small kernels,
each reading and writing the whole activation; here a program loads its rows once, keeps
them in registers and writes each result once.

Numerics are the references' (engine_kernels/reference.py), rounding point for rounding
point: fp32 math, rounded to the model dtype exactly where torch rounds (the residual sum,
a Llama norm's normalized value before the weight, each RoPE product and their sum, the
activation before the product), to nearest even. `_round` does that rounding with integer
ops for bf16, because the interpreter (TRITON_INTERPRET=1, how these run on CPU) truncates
a plain fp32 -> bf16 cast; on a GPU it costs a few integer ops on memory-bound kernels.
Launches disable FMA contraction (`enable_fp_fusion=False`): torch rounds a product before
the sum, and an fp32 RoPE fused into FMAs would not. What still differs from torch is
the order of a norm's fp32 sum of squares and the exp/tanh of the activations (the tests'
tolerances say how far that goes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROW_TILE = 8192  # a row's elements held in registers at once; longer rows take two passes over tiles
TILE_ELEMENTS = 2048  # a program's elements where rows are short (heads, small hidden sizes): several rows
ACT_BLOCK = 1024  # a program's elements of the gated activation
# every launch: IEEE rounding after each op, as torch (no FMA contraction)
EXACT_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 x rounded to DTYPE's precision (to nearest even), still fp32."""
    if DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return tl.where(x == x, u.to(tl.float32, bitcast=True), x)  # NaN stays NaN
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _load_rows(x_rows, r_rows, cols, ok, RESIDUAL: tl.constexpr, DTYPE: tl.constexpr):
    """A tile of x in fp32; with RESIDUAL, residual += x (stored, in the model dtype) instead."""
    h = tl.load(x_rows + cols, mask=ok, other=0.0).to(tl.float32)
    if RESIDUAL:
        h = _round(h + tl.load(r_rows + cols, mask=ok, other=0.0).to(tl.float32), DTYPE)
        tl.store(r_rows + cols, h.to(DTYPE), mask=ok)
    return h


@triton.jit
def _scaled(h, inv, w_ptr, w2_ptr, cols, col_ok, first, GEMMA: tl.constexpr, DTYPE: tl.constexpr):
    """h * inv times the row's weight: w (rows where `first`) or w2; Llama's form rounds h * inv to
    the dtype and scales in it, Gemma's scales by 1 + w in fp32."""
    w = tl.where(first, tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :],
                 tl.load(w2_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :])
    h = h * inv[:, None]
    if GEMMA:
        y = h * (1.0 + w)
    else:
        y = _round(h, DTYPE) * w
    return _round(y, DTYPE).to(DTYPE)


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, w_ptr, w2_ptr, out_ptr, stride_xt, stride_rt, stride_ot, num_rows, heads,
                     split, n, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr, ONE_TILE: tl.constexpr,
                     RESIDUAL: tl.constexpr, GEMMA: tl.constexpr):
    """Rows of n elements: row r is head r % heads of token r // heads, at x + token * stride_xt
    + head * n (a hidden state: heads = 1; the q and k heads of a packed qkv: H + Hkv, the first
    `split` of each token scaled by w, the rest by w2). A program norms ROWS rows: in one tile
    held in registers (ONE_TILE), else in two passes over BLOCK-wide tiles (sum of squares,
    then scale), the second reading back from L2."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # int32 index math; int64 offsets
    row_ok = (rows < num_rows)[:, None]
    token, head = (rows // heads).to(tl.int64), rows % heads
    first = (head < split)[:, None]
    cols = tl.arange(0, BLOCK)
    x_rows = x_ptr + (token * stride_xt + head * n)[:, None]
    r_rows = residual_ptr + (token * stride_rt + head * n)[:, None]
    o_rows = out_ptr + (token * stride_ot + head * n)[:, None]
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    if ONE_TILE:
        ok = row_ok & (cols < n)[None, :]
        h = _load_rows(x_rows, r_rows, cols[None, :], ok, RESIDUAL, DTYPE)
        # torch: mean = sum / n, then rsqrt as 1 / sqrt, each IEEE-rounded
        inv = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(tl.sum(h * h, 1), n.to(tl.float32)) + eps))
        tl.store(o_rows + cols[None, :], _scaled(h, inv, w_ptr, w2_ptr, cols, cols < n, first, GEMMA, DTYPE),
                 mask=ok)
    else:
        acc = tl.zeros([ROWS, BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            c = start + cols
            h = _load_rows(x_rows, r_rows, c[None, :], row_ok & (c < n)[None, :], RESIDUAL, DTYPE)
            acc += h * h
        inv = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(tl.sum(acc, 1), n.to(tl.float32)) + eps))
        tl.debug_barrier()  # the residual written above, read back below
        for start in range(0, n, BLOCK):
            c = start + cols
            ok = row_ok & (c < n)[None, :]
            if RESIDUAL:
                h = tl.load(r_rows + c[None, :], mask=ok, other=0.0).to(tl.float32)
            else:
                h = tl.load(x_rows + c[None, :], mask=ok, other=0.0).to(tl.float32)
            tl.store(o_rows + c[None, :], _scaled(h, inv, w_ptr, w2_ptr, c, c < n, first, GEMMA, DTYPE), mask=ok)


@triton.jit
def _rope_write_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_qkv,
                          num_rows, num_heads, num_kv_heads, D: tl.constexpr, HALF: tl.constexpr,
                          ROWS: tl.constexpr):
    """Row r is head r % (H + 2 Hkv) of token r // (H + 2 Hkv) in the packed qkv (q heads, then
    k, then v). A program takes ROWS of them: rotates q and k (half-split layout), stores q
    into q [T, H, D] and k, v into the caches at the token's slot (skipped when negative:
    padding)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # int32 index math; int64 offsets
    token, h = (rows // (num_heads + 2 * num_kv_heads)).to(tl.int64), rows % (num_heads + 2 * num_kv_heads)
    d = tl.arange(0, HALF)
    d_ok = d < D // 2
    row_ok = rows < num_rows
    ok = row_ok[:, None] & d_ok[None, :]
    src = qkv_ptr + (token * stride_qkv + h * D)[:, None] + d[None, :]
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + D // 2, mask=ok, other=0.0).to(tl.float32)
    trig = (token * D)[:, None] + d[None, :]
    c1 = tl.load(cos_ptr + trig, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + trig + D // 2, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + trig, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + trig + D // 2, mask=ok, other=0.0).to(tl.float32)
    DTYPE: tl.constexpr = q_ptr.dtype.element_ty
    is_q = (h < num_heads)[:, None]
    is_v = (h >= num_heads + num_kv_heads)[:, None]
    # x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype (v rows: as they are)
    o1 = tl.where(is_v, x1, _round(_round(x1 * c1, DTYPE) - _round(x2 * s1, DTYPE), DTYPE)).to(DTYPE)
    o2 = tl.where(is_v, x2, _round(_round(x2 * c2, DTYPE) + _round(x1 * s2, DTYPE), DTYPE)).to(DTYPE)
    q_dst = q_ptr + ((token * num_heads + h) * D)[:, None] + d[None, :]
    tl.store(q_dst, o1, mask=ok & is_q)
    tl.store(q_dst + D // 2, o2, mask=ok & is_q)
    slot = tl.load(slot_ptr + token, mask=row_ok, other=-1)
    kv_head = tl.where(is_v, h[:, None] - num_heads - num_kv_heads, h[:, None] - num_heads)
    kv_dst = (slot[:, None] * num_kv_heads + kv_head) * D + d[None, :]
    kv_ok = ok & (slot >= 0)[:, None] & (h >= num_heads)[:, None]  # negative slots are padding
    tl.store(k_cache_ptr + kv_dst, o1, mask=kv_ok & (h < num_heads + num_kv_heads)[:, None])
    tl.store(k_cache_ptr + kv_dst + D // 2, o2, mask=kv_ok & (h < num_heads + num_kv_heads)[:, None])
    tl.store(v_cache_ptr + kv_dst, o1, mask=kv_ok & is_v)
    tl.store(v_cache_ptr + kv_dst + D // 2, o2, mask=kv_ok & is_v)


@triton.jit
def _exp(x):
    """exp(x) = 2^k 2^(r log2 e) with r = x - k ln 2, |r| <= ln 2 / 2 (ln 2 in two parts, the first
    exact in a product with k). A GPU's tl.exp is ex2.approx(x log2 e), and rounding that
    product costs |x| 2^-24 relative (14 ulps at x = 10); here ex2.approx sees |r log2 e| <= 1/2
    (its own error: 2^-22 relative), and 2^k is built exactly."""
    k = tl.minimum(tl.maximum(tl.floor(x * 1.4426950408889634 + 0.5), -126.0), 127.0)
    r = (x - k * 0.693145751953125) - k * 1.4286068203094173e-06
    return tl.exp2(r * 1.4426950408889634) * ((k.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _tanh(x):
    """tanh from exp (the interpreter has no libdevice): sign(x) (1 - e) / (1 + e), e = exp(-2|x|)."""
    e = _exp(tl.where(x < 0, 2.0 * x, -2.0 * x))
    t = tl.math.div_rn(1.0 - e, 1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, T, d, stride_xt, stride_ot, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                        GELU: tl.constexpr):
    """out[t, c] = act(x[t, c]) * x[t, d + c] over a tile of ROWS tokens x BLOCK columns; act is
    SiLU, or tanh-GELU, in torch's formulas, rounded to the dtype before the product."""
    t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = (t < T)[:, None] & (c < d)[None, :]
    t = t.to(tl.int64)
    src = x_ptr + (t * stride_xt)[:, None] + c[None, :]
    a = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(src + d, mask=ok, other=0.0).to(tl.float32)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    if GELU:
        g = 0.5 * a * (1.0 + _tanh(0.7978845608028654 * (a + 0.044715 * (a * a * a))))  # sqrt(2 / pi)
    else:
        g = tl.math.div_rn(a, 1.0 + _exp(-a))
    tl.store(out_ptr + (t * stride_ot)[:, None] + c[None, :], _round(_round(g, DTYPE) * b, DTYPE).to(DTYPE),
             mask=ok)


# -- launchers -------------------------------------------------------------------------------

def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def num_warps(elements: int) -> int:
    """Warps for a program of `elements` values: 8-16 a thread, 4 to 16 warps."""
    return min(16, max(4, elements // 512))


def norm_tiling(n: int) -> tuple[int, int]:
    """(ROWS, BLOCK) for rows of n elements: rows in one tile of up to TILE_ELEMENTS (a hidden
    state of 4096 is one row a program; per-head norms take several heads, of one token or
    more), a row in registers up to MAX_ROW_TILE, longer rows in two passes."""
    block = min(_pow2(n), MAX_ROW_TILE)
    return max(1, TILE_ELEMENTS // block), block


def rope_rows(head_dim: int) -> int:
    """Heads (q, k and v alike, of one token or more) per RoPE program."""
    return max(1, TILE_ELEMENTS // (2 * _pow2(head_dim // 2)))


def act_tiling(d: int) -> tuple[int, int]:
    """(ROWS, BLOCK) of the gated activation: tokens x columns, ACT_BLOCK elements a program."""
    block = min(_pow2(d), ACT_BLOCK)
    return ACT_BLOCK // block, block


def _norm(x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor, w2: torch.Tensor, out: torch.Tensor,
          tokens: int, heads: int, split: int, n: int, eps: float, gemma: bool) -> None:
    if tokens == 0:
        return
    assert x.stride(-1) == 1 and out.stride(-1) == 1 and w.is_contiguous() and w2.is_contiguous()
    assert w.numel() == n and w2.numel() == n and w.dtype == w2.dtype == x.dtype == out.dtype, "weights [n], dtype"
    rows, block = norm_tiling(n)
    res = x if residual is None else residual
    _rms_norm_kernel[(-(-tokens * heads // rows),)](
        x, res, w, w2, out, x.stride(0), res.stride(0), out.stride(0), tokens * heads, heads, split, n, eps,
        ROWS=rows, BLOCK=block, ONE_TILE=n <= block, RESIDUAL=residual is not None, GEMMA=gemma,
        num_warps=num_warps(rows * block), **EXACT_OPTIONS)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """reference.rms_norm of x [T, n], a new tensor."""
    assert x.dim() == 2
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _norm(x, None, w, w, out, x.shape[0], 1, 1, x.shape[1], eps, gemma)
    return out


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool = False) -> None:
    """In place: residual += x, then x = rms_norm(residual); x, residual [T, n]."""
    assert x.dim() == 2 and x.shape == residual.shape and residual.stride(-1) == 1 and residual.dtype == x.dtype
    _norm(x, residual, w, w, x, x.shape[0], 1, 1, x.shape[1], eps, gemma)


def head_rms_norm_(qkv: torch.Tensor, q_w: torch.Tensor, k_w: torch.Tensor, num_heads: int, num_kv_heads: int,
                   head_dim: int, eps: float, gemma: bool = False) -> None:
    """In place on qkv [T, (H + 2 Hkv) D]: each q head normed by q_w, each k head by k_w."""
    assert qkv.dim() == 2 and qkv.shape[1] >= (num_heads + num_kv_heads) * head_dim
    _norm(qkv, None, q_w, k_w, qkv, qkv.shape[0], num_heads + num_kv_heads, num_heads, head_dim, eps, gemma)


def rope_and_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slots: torch.Tensor, num_heads: int, num_kv_heads: int,
                      head_dim: int) -> torch.Tensor:
    """Rotates q and k of qkv [T, (H + 2 Hkv) D] by cos, sin [T, D] (qkv's dtype), writes k and
    v into the caches [blocks, block_size, Hkv, D] at `slots` (negative: skipped); returns q
    [T, H, D], a new tensor. One launch."""
    T = qkv.shape[0]
    q = torch.empty(T, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if T == 0:
        return q
    assert qkv.dim() == 2 and qkv.stride(1) == 1 and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim
    assert cos.is_contiguous() and sin.is_contiguous() and cos.shape == sin.shape == (T, head_dim)
    assert cos.dtype == sin.dtype == k_cache.dtype == qkv.dtype, "cos, sin and the caches in qkv's dtype"
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
    assert k_cache.shape[2:] == (num_kv_heads, head_dim) and slots.shape == (T,) and slots.is_contiguous()
    rows, half = rope_rows(head_dim), _pow2(head_dim // 2)
    num_rows = T * (num_heads + 2 * num_kv_heads)
    _rope_write_kv_kernel[(-(-num_rows // rows),)](
        qkv, cos, sin, q, k_cache, v_cache, slots, qkv.stride(0), num_rows, num_heads, num_kv_heads, D=head_dim,
        HALF=half, ROWS=rows, num_warps=num_warps(2 * rows * half), **EXACT_OPTIONS)
    return q


def act_and_mul(x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """act(x[:, :d]) * x[:, d:] for x [T, 2d]: SiLU, or tanh-approximated GELU (Gemma)."""
    assert x.dim() == 2 and x.stride(1) == 1 and x.shape[1] % 2 == 0
    T, d = x.shape[0], x.shape[1] // 2
    out = torch.empty(T, d, dtype=x.dtype, device=x.device)
    if T:
        rows, block = act_tiling(d)
        _act_and_mul_kernel[(-(-T // rows), -(-d // block))](x, out, T, d, x.stride(0), out.stride(0), ROWS=rows,
                                                            BLOCK=block, GELU=gelu, num_warps=num_warps(ACT_BLOCK),
                                                            **EXACT_OPTIONS)
    return out
