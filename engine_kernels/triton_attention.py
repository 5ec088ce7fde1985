"""Triton kernels: paged attention over a mixed varlen batch, split-KV decode attention
with a log-sum-exp merge, KV write by slot mapping, and batched block copy.

Layout: caches are [num_blocks, block_size, num_kv_heads, head_dim]; q is [T, H, D] with
sequence i owning rows query_start_loc[i]:query_start_loc[i+1] (its newest tokens, so a
decode is one row and a prefill chunk many, with earlier context already in the cache).
Each program takes one KV head and the G = H / Hkv query heads that share it, so every K/V
tile loaded from the cache serves G heads. Accumulation is fp32 whatever the input dtype.

Matmul precision, chosen per dtype (tl.dot's default on fp32 inputs is TF32, which would
round fp32 attention to 10 mantissa bits on a GPU without a word): on a GPU, bf16/fp16
q.K^T and P.V run on their own dtype's tensor cores (products exact in fp32; P rounded to
the value dtype, as FlashAttention does: about 2^-8 relative for bf16, below the bf16
output's own rounding); fp32 runs IEEE fp32 (`input_precision="ieee"`), as the reference
does. The interpreter cannot multiply bf16 (numpy has no such type), so on CPU every dtype
takes the fp32 IEEE path; the GPU's bf16 path is compiled (triton_compile.py), not run, here.
On CPU these run under TRITON_INTERPRET=1 (set before triton is imported).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, query_start_ptr, seq_lens_ptr,
    scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
    G: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr, KV_TILE: tl.constexpr, ROWS: tl.constexpr,
    TOKENS_PER_TILE: tl.constexpr,
    KV_SPLIT_LEN: tl.constexpr, part_out_ptr, part_lse_ptr, NUM_SPLITS: tl.constexpr, window,
    HALF_DOT: tl.constexpr,  # bf16/fp16 matmuls on their tensor cores (a GPU), else IEEE fp32
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    tile = tl.program_id(2)  # a tile of query tokens, or (split-KV decode) a slice of the context
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_before = seq_len - q_len

    rows = tl.arange(0, ROWS)
    if NUM_SPLITS > 1:
        tok = rows // G
        tile_tok0 = 0
    else:
        tok = tile * TOKENS_PER_TILE + rows // G
        tile_tok0 = tile * TOKENS_PER_TILE
    grp = rows % G
    row_ok = (rows < TOKENS_PER_TILE * G) & (tok < q_len)
    d = tl.arange(0, D)
    head = kvh * G + grp
    q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    q_pos = ctx_before + tok  # absolute position of each row's token

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)

    if NUM_SPLITS > 1:
        kv_lo = tile * KV_SPLIT_LEN
        kv_hi = tl.minimum(seq_len, kv_lo + KV_SPLIT_LEN)
    else:
        kv_lo = 0
        # causal: this tile's last token sees up to its own position
        kv_hi = tl.minimum(seq_len, ctx_before + tile_tok0 + TOKENS_PER_TILE)
    if window > 0:  # sliding window: start at the block holding the tile's oldest visible key
        oldest = tl.maximum(ctx_before + tile_tok0 - window + 1, 0)
        kv_lo = tl.maximum(kv_lo, (oldest // BLOCK_SIZE) * BLOCK_SIZE)
    offs = tl.arange(0, KV_TILE)
    for start in range(kv_lo, kv_hi, KV_TILE):  # KV_TILE positions (whole blocks) at a time
        pos = start + offs
        kv_ok = pos < kv_hi
        # int64: a large cache's element offset passes 2^31 (an 8B model's 256 x 32k contexts)
        if KV_TILE == BLOCK_SIZE:  # one block (a scalar: fewer registers in the prefill tile)
            block = tl.load(block_tables_ptr + seq * stride_bt + start // BLOCK_SIZE).to(tl.int64)
            kv_off = block * stride_kb + offs[:, None] * stride_ks + kvh * stride_kh + d[None, :]
        else:  # each position's block: KV_TILE / BLOCK_SIZE table entries, each read from L1
            block = tl.load(block_tables_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=kv_ok, other=0)
            kv_off = (block.to(tl.int64)[:, None] * stride_kb + (pos % BLOCK_SIZE)[:, None] * stride_ks
                      + kvh * stride_kh + d[None, :])
        k = tl.load(k_cache_ptr + kv_off, mask=kv_ok[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_ok[:, None], other=0.0)
        if HALF_DOT:
            s = tl.dot(q, tl.trans(k)) * scale
        else:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        visible = kv_ok[None, :] & (pos[None, :] <= q_pos[:, None]) & row_ok[:, None]
        visible = visible & ((pos[None, :] > q_pos[:, None] - window) | (window == 0))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(tl.where(m_i == float("-inf"), float("-inf"), m_i - m_safe))
        l_i = l_i * alpha + tl.sum(p, 1)
        if HALF_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        m_i = m_new

    if NUM_SPLITS > 1:  # partial result of this slice: unnormalized out and its log-sum-exp
        lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
        part = (seq * (G * tl.num_programs(1)) + head) * NUM_SPLITS + tile
        tl.store(part_out_ptr + part[:, None] * D + d[None, :], acc / tl.where(l_i > 0, l_i, 1.0)[:, None],
                 mask=row_ok[:, None])
        tl.store(part_lse_ptr + part, lse, mask=row_ok)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, query_start_ptr, stride_ot, stride_oh,
                         H: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """out = sum_i exp(lse_i - max) * o_i / sum_i exp(lse_i - max) over the KV slices."""
    seq = tl.program_id(0)
    h = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, D)
    base = (seq * H + h) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + splits)
    m = tl.max(lse, 0)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - m))
    o = tl.load(part_out_ptr + (base + splits)[:, None] * D + d[None, :])
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    row = tl.load(query_start_ptr + seq)
    tl.store(out_ptr + row * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_kt, stride_vt,
                     ROW: tl.constexpr, ROW_POW2: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:  # negative slots are padding
        i = tl.arange(0, ROW_POW2)
        ok = i < ROW
        tl.store(k_cache_ptr + slot * ROW + i, tl.load(k_ptr + t * stride_kt + i, mask=ok), mask=ok)
        tl.store(v_cache_ptr + slot * ROW + i, tl.load(v_ptr + t * stride_vt + i, mask=ok), mask=ok)


@triton.jit
def _copy_blocks_kernel(cache_ptr, src_ptr, dst_ptr, LAYER_STRIDE: tl.constexpr, BLOCK_NUMEL: tl.constexpr,
                        CHUNK: tl.constexpr):
    """One program per (block pair, cache tensor): all layers' K and V caches are views of
    one buffer [num_layers * 2, num_blocks, ...], so one launch copies every pair everywhere."""
    pair = tl.program_id(0)
    base = cache_ptr + tl.program_id(1).to(tl.int64) * LAYER_STRIDE
    src = tl.load(src_ptr + pair).to(tl.int64)
    dst = tl.load(dst_ptr + pair).to(tl.int64)
    for start in range(0, BLOCK_NUMEL, CHUNK):
        i = start + tl.arange(0, CHUNK)
        ok = i < BLOCK_NUMEL
        tl.store(base + dst * BLOCK_NUMEL + i, tl.load(base + src * BLOCK_NUMEL + i, mask=ok), mask=ok)


# -- launchers -------------------------------------------------------------------------------
import functools  # noqa: E402

import torch  # noqa: E402


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


MAX_KV_SPLITS = 16
MIN_SPLIT_LEN = 256  # positions: a slice shorter than four KV tiles costs more to merge than it saves


def kv_tile(block_size: int, head_dim: int, elem_bytes: int, decode: bool) -> int:
    """KV positions per loop iteration, whole blocks. A decode program streams a whole
    context (or slice) one tile after another, so a bigger tile keeps more bytes in flight
    (one 16-position block per iteration reached 63% of an H200's copy bandwidth); up to
    8 KB of K a tile: past it the K and V tiles spill registers (triton_compile.py measures
    it). Prefill tiles keep one block: their query tiles already fill the shared memory."""
    if not decode:
        return block_size
    return max(block_size, min(64, 8192 // (head_dim * elem_bytes)))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    # off a GPU (the interpreter) a nominal one between an L4 (58) and an H100 (132)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 64


def kv_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Slices of each context for a decode-only batch (flash-decoding): doubled until the
    programs (sequence x KV head x slice) cover twice the GPU's multiprocessors, each slice
    at least MIN_SPLIT_LEN positions. One program per sequence and KV head left most of an
    H200 idle below batch 64 (batch 1 at 4k: 5% of its copy bandwidth)."""
    splits, wanted = 1, 2 * _multiprocessors(device)
    while (splits < MAX_KV_SPLITS and num_seqs * num_kv_heads * splits < wanted
           and max_seq_len >= 2 * splits * MIN_SPLIT_LEN):
        splits *= 2
    return splits


def tile_rows(group: int, head_dim: int, decode: bool) -> int:
    """Query rows per program (tokens x the G heads sharing a KV head). Prefill tiles of 64
    rows, 32 at head dim 256: 64 rows of fp32 at D=256 need 103 KB of shared memory, past
    an L4's 99 KB per block (engine_kernels/triton_compile.py measures it)."""
    if decode:
        return max(16, _pow2(group))
    return max(64 if head_dim <= 128 else 32, _pow2(group))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, max_query_len: int,
                    max_seq_len: int, num_kv_splits: int | None = None, out: torch.Tensor | None = None,
                    window: int | None = None) -> torch.Tensor:
    """Causal paged attention for a varlen batch mixing prefill chunks and decodes; with
    `window`, a query at position p sees keys p - window + 1 .. p (sliding-window layers).
    Decode-only batches over long contexts split the KV range (flash-decoding) and merge
    the slices by log-sum-exp; `num_kv_splits` forces the number of slices (1: off)."""
    T, H, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    G = H // Hkv
    num_seqs = seq_lens.shape[0]
    out = torch.empty_like(q) if out is None else out
    decode = max_query_len == 1
    if num_kv_splits is None:
        num_kv_splits = kv_splits(num_seqs, Hkv, max_seq_len, q.device) if decode else 1
    common = dict(scale=scale, stride_qt=q.stride(0), stride_qh=q.stride(1), stride_ot=out.stride(0),
                  stride_oh=out.stride(1), stride_kb=k_cache.stride(0), stride_ks=k_cache.stride(1),
                  stride_kh=k_cache.stride(2), stride_bt=block_tables.stride(0), G=G, D=D, BLOCK_SIZE=block_size,
                  KV_TILE=kv_tile(block_size, D, k_cache.element_size(), decode), window=window or 0,
                  HALF_DOT=q.is_cuda and q.dtype != torch.float32)
    if num_kv_splits > 1:
        assert max_query_len == 1, "split-KV is for decode-only batches"
        assert num_kv_splits == _pow2(num_kv_splits)
        split_len = -(-max_seq_len // num_kv_splits)
        split_len = -(-split_len // block_size) * block_size  # whole blocks per slice
        part_out = torch.empty(num_seqs * H * num_kv_splits, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs * H * num_kv_splits, dtype=torch.float32, device=q.device)
        _paged_attention_kernel[(num_seqs, Hkv, num_kv_splits)](
            q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, ROWS=tile_rows(G, D, decode=True),
            TOKENS_PER_TILE=1, KV_SPLIT_LEN=split_len, part_out_ptr=part_out, part_lse_ptr=part_lse,
            NUM_SPLITS=num_kv_splits, **common)
        _merge_splits_kernel[(num_seqs, H)](part_out, part_lse, out, query_start_loc, out.stride(0), out.stride(1),
                                            H=H, D=D, NUM_SPLITS=num_kv_splits)
        return out
    rows = tile_rows(G, D, decode=max_query_len == 1)
    tokens_per_tile = rows // G
    grid = (num_seqs, Hkv, -(-max_query_len // tokens_per_tile))
    _paged_attention_kernel[grid](q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, ROWS=rows,
                                  TOKENS_PER_TILE=tokens_per_tile, KV_SPLIT_LEN=0, part_out_ptr=out,
                                  part_lse_ptr=out, NUM_SPLITS=1, **common)
    return out


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Stores k, v [T, Hkv, D] into the caches at slot_mapping; negative slots are skipped."""
    T = k.shape[0]
    if T == 0:
        return
    assert k.stride(2) == 1 and k.stride(1) == k.shape[2] and v.stride(1) == v.shape[2]
    row = k.shape[1] * k.shape[2]
    _write_kv_kernel[(T,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), ROW=row,
                           ROW_POW2=_pow2(row))


def copy_blocks(kv_buffer: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copies blocks src[i] -> dst[i] in every layer's K and V cache, in one launch.
    kv_buffer: [num_layers * 2, num_blocks, block_size, Hkv, D], contiguous."""
    if src.numel() == 0:
        return
    assert kv_buffer.is_contiguous() and src.shape == dst.shape
    block_numel = kv_buffer[0, 0].numel()
    _copy_blocks_kernel[(src.numel(), kv_buffer.shape[0])](kv_buffer, src, dst, LAYER_STRIDE=kv_buffer[0].numel(),
                                                          BLOCK_NUMEL=block_numel, CHUNK=min(1024, _pow2(block_numel)))
