"""The `triton` attention backend: kernels/triton_attention.py on the engine's metadata."""
from __future__ import annotations

from engine.attention import AttentionBackend, AttentionMetadata
from kernels import triton_attention as kernels


def _attend(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    return kernels.paged_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                   scale, meta.max_query_len, meta.max_seq_len)


TRITON_BACKEND = AttentionBackend("triton", kernels.write_kv, _attend)
