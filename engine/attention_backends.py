"""The step's ops: each backend builds its step's attention metadata and runs the ops a
decoder layer calls (norms, RoPE with the K/V write, attention, the gated activation).

- `torch`: the plain-torch references (engine_kernels/reference.py, engine/attention.py),
  any device.
- `cpu`: the C++ kernels the platform built for its ISA level (engine_kernels/csrc/):
  every op, decodes' attention included; prompt chunks attend on the torch path.
- `triton`: engine_kernels/triton_attention.py over one varlen description of the batch,
  and each of the layer's other ops as one fused launch (engine_kernels/triton_ops.py); GPU,
  the interpreter in tests.

`make_backend` chooses one from the name, the device and the platform; `check_backend`
refuses a combination that cannot run, before any weights load.
"""
from __future__ import annotations

import torch

from engine import attention as torch_attention
from engine.attention import AttentionMetadata, PrefillSeq
from engine_kernels import reference
from engine_kernels import GPU_BLOCK_SIZES

# Which devices and dtypes each backend runs (what the platform allows on top: engine/platform.py)
_SUPPORT = {
    "torch": {"cpu": (torch.bfloat16, torch.float32), "cuda": (torch.bfloat16, torch.float16, torch.float32)},
    "cpu": {"cpu": (torch.bfloat16, torch.float32)},
    "triton": {"cuda": (torch.bfloat16, torch.float16, torch.float32),
               "cpu": (torch.bfloat16, torch.float32)},  # TRITON_INTERPRET=1 only
}


def default_backend(device_type: str, kv_cache_dtype: str = "auto") -> str:
    """triton on CUDA (torch for an int8 KV cache, which the Triton kernels do not read), else cpu."""
    if device_type == "cuda":
        return "torch" if kv_cache_dtype == "int8" else "triton"
    return "cpu"


# Block sizes the Triton kernels compile for within a GPU's limits (`python -m benchmarks gpu-compile`)
TRITON_BLOCK_SIZES = GPU_BLOCK_SIZES


def check_backend(name: str | None, device: str, dtype: torch.dtype, kv_cache_dtype: str = "auto",
                  block_size: int = 16) -> None:
    kind = torch.device(device).type
    name = name or default_backend(kind, kv_cache_dtype)
    if kv_cache_dtype == "int8" and name == "triton":
        raise ValueError("EngineConfig.kv_cache_dtype 'int8' runs on the 'cpu' and 'torch' attention backends; "
                         "the 'triton' kernels read caches in the model dtype")
    devices = _SUPPORT.get(name)
    if devices is None:
        raise ValueError(f"EngineConfig.attention_backend must be one of {sorted(_SUPPORT)}, got {name!r}")
    if kind not in devices:
        raise ValueError(f"attention backend {name!r} does not run on {kind}")
    if dtype not in devices[kind]:
        raise ValueError(f"EngineConfig.dtype {str(dtype).removeprefix('torch.')!r} is not supported "
                         f"by the {name!r} attention backend on {kind.upper()}")
    if name == "triton" and kind == "cuda" and block_size not in TRITON_BLOCK_SIZES:
        raise ValueError(f"EngineConfig.block_size {block_size} with the 'triton' attention backend on CUDA: its "
                         f"kernels compile within the GPU's shared-memory and register limits at block_size "
                         f"{', '.join(map(str, TRITON_BLOCK_SIZES))} only")


class AttentionRows:
    """One scheduled sequence as attention sees it."""
    __slots__ = ("block_ids", "context_len", "num_tokens", "start")

    def __init__(self, block_ids: list[int], context_len: int, num_tokens: int, start: int) -> None:
        self.block_ids = block_ids      # its block table (at least ceil(context_len / block_size))
        self.context_len = context_len  # tokens in the cache after this step
        self.num_tokens = num_tokens    # query tokens this step (1 for a decode)
        self.start = start              # its first row in the flattened batch


class TorchBackend:
    name = "torch"

    def __init__(self, block_size: int, device: torch.device) -> None:
        self.block_size = block_size
        self.device = device

    def _tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def build_metadata(self, slot_mapping: torch.Tensor, decodes: list[AttentionRows],
                       prefills: list[AttentionRows]) -> AttentionMetadata:
        bs = self.block_size
        meta = AttentionMetadata(slot_mapping=slot_mapping, num_decodes=len(decodes), decode_block_tables=None,
                                 decode_seq_lens=None, decode_mask=None,
                                 prefills=[PrefillSeq(s.start, s.num_tokens, s.context_len,
                                                      self._tensor(s.block_ids[:-(-s.context_len // bs)]))
                                           for s in prefills])
        if decodes:
            width = max(-(-s.context_len // bs) for s in decodes)
            meta.decode_block_tables = self._tensor([padded_table(s.block_ids, width) for s in decodes])
            meta.decode_seq_lens = self._tensor([s.context_len for s in decodes])
            meta.decode_mask = (torch.arange(width * bs, device=self.device)[None, :]
                                < meta.decode_seq_lens[:, None]).view(len(decodes), 1, 1, width * bs)
        return meta

    # -- the layer's ops ----------------------------------------------------------------
    rms_norm = staticmethod(reference.rms_norm)
    add_rms_norm_ = staticmethod(reference.add_rms_norm_)
    head_rms_norm_ = staticmethod(reference.head_rms_norm_)
    act_and_mul = staticmethod(reference.act_and_mul)
    write_kv = staticmethod(torch_attention.write_kv)
    attend = staticmethod(torch_attention.torch_paged_attention)

    def rope_and_write_kv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, slots: torch.Tensor, num_heads: int, num_kv_heads: int,
                          head_dim: int) -> torch.Tensor:
        """Rotates q and k of qkv [T, (H + 2 Hkv) D], writes k and v into the caches at
        `slots`; returns q [T, H, D]."""
        T, H = qkv.shape[0], num_heads
        qk = reference.apply_rope(qkv[:, :(H + num_kv_heads) * head_dim].view(T, H + num_kv_heads, head_dim), cos, sin)
        v = qkv[:, (H + num_kv_heads) * head_dim:].view(T, num_kv_heads, head_dim)
        self.write_kv(k_cache, v_cache, qk[:, H:], v, slots)
        return qk[:, :H]

    def kernel_names(self, dtype: torch.dtype, head_dim: int, group: int, kv_cache_dtype: str) -> dict[str, str]:
        return {"norms": "torch", "rope_kv_write": "torch", "activation": "torch", "decode_attention": "torch_sdpa",
                "prefill_attention": "torch_sdpa"}


class CpuBackend(TorchBackend):
    name = "cpu"

    def __init__(self, block_size: int, device: torch.device, ops) -> None:
        super().__init__(block_size, device)
        self.ops = ops
        self.rms_norm = ops.rms_norm
        self.add_rms_norm_ = ops.fused_add_rms_norm
        self.head_rms_norm_ = ops.head_rms_norm
        self.rope_and_write_kv = ops.rope_and_write_kv
        self.act_and_mul = ops.act_and_mul

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, window: int | None = None) -> torch.Tensor:
        """Decodes by the C++ kernel; prompt chunks by the C++ prefill kernel where it runs
        (a bf16 cache on AVX512-BF16), else on the torch path (an int8 cache read by the C++
        dequantizer)."""
        nd = meta.num_decodes
        if nd and not meta.prefills:
            return self.ops.paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables,
                                                   meta.decode_seq_lens, scale, window or 0)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self.ops.paged_decode_attention(q[:nd], k_cache, v_cache, meta.decode_block_tables,
                                                       meta.decode_seq_lens, scale, window or 0)
        if self._prefill_kernel(q.dtype, q.shape[-1], k_cache.dtype):
            for p in meta.prefills:
                rows = slice(p.start, p.start + p.num_tokens)
                out[rows] = self.ops.paged_prefill_attention(q[rows], k_cache, v_cache, p.block_table,
                                                             p.context_len, scale, window or 0)
        else:
            torch_attention.torch_prefills(out, q, k_cache, v_cache, meta, scale, window, read=self._read_cache)
        return out

    def _prefill_kernel(self, dtype: torch.dtype, head_dim: int, cache_dtype: torch.dtype) -> bool:
        return cache_dtype == dtype and self.ops.prefill_attention_supported(dtype, head_dim)

    def _read_cache(self, cache: torch.Tensor, block_ids: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
        if cache.dtype != torch.uint8:
            return torch_attention.read_cache(cache, block_ids, kind, dtype)
        return self.ops.dequantize_kv_blocks(cache, block_ids, kind == "k", dtype)

    def kernel_names(self, dtype: torch.dtype, head_dim: int, group: int, kv_cache_dtype: str) -> dict[str, str]:
        isa = self.ops.isa_level()
        attention = (f"{isa}_int8_tiles" if kv_cache_dtype == "int8"
                     else self.ops.attention_kernel_name(dtype, head_dim, group))
        prefill = ("avx512_bf16_lanes" if kv_cache_dtype != "int8" and self._prefill_kernel(dtype, head_dim, dtype)
                   else "torch_sdpa")
        return {"norms": f"{isa}_cpp", "rope_kv_write": f"{isa}_cpp", "activation": f"{isa}_cpp",
                "decode_attention": attention, "prefill_attention": prefill}


class TritonBackend(TorchBackend):
    name = "triton"

    def __init__(self, block_size: int, device: torch.device) -> None:
        super().__init__(block_size, device)
        from engine_kernels import triton_attention as kernels  # imports triton: only when chosen
        from engine_kernels import triton_ops
        self.kernels = kernels
        self.write_kv = kernels.write_kv
        self.rms_norm = triton_ops.rms_norm
        self.add_rms_norm_ = triton_ops.add_rms_norm_
        self.head_rms_norm_ = triton_ops.head_rms_norm_
        self.rope_and_write_kv = triton_ops.rope_and_write_kv
        self.act_and_mul = triton_ops.act_and_mul

    def build_metadata(self, slot_mapping: torch.Tensor, decodes: list[AttentionRows],
                       prefills: list[AttentionRows]) -> AttentionMetadata:
        rows = decodes + prefills  # one varlen description of all rows, in row order
        meta = AttentionMetadata(slot_mapping=slot_mapping, num_decodes=len(decodes), decode_block_tables=None,
                                 decode_seq_lens=None, decode_mask=None, prefills=[])
        width = max(-(-s.context_len // self.block_size) for s in rows)
        meta.block_tables = self._tensor([padded_table(s.block_ids, width) for s in rows], torch.int32)
        meta.seq_lens = self._tensor([s.context_len for s in rows], torch.int32)
        starts = [0]
        for s in rows:
            starts.append(starts[-1] + s.num_tokens)
        meta.query_start_loc = self._tensor(starts, torch.int32)
        meta.max_query_len = max(s.num_tokens for s in rows)
        meta.max_seq_len = max(s.context_len for s in rows)
        return meta

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
               window: int | None = None) -> torch.Tensor:
        return self.kernels.paged_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens,
                                           meta.block_tables, scale, meta.max_query_len, meta.max_seq_len,
                                           window=window)

    def kernel_names(self, dtype: torch.dtype, head_dim: int, group: int, kv_cache_dtype: str) -> dict[str, str]:
        return {"norms": "triton", "rope_kv_write": "triton", "activation": "triton", "decode_attention": "triton",
                "prefill_attention": "triton"}


def padded_table(block_ids: list[int], width: int) -> list[int]:
    """A block table cut or zero-padded to `width` blocks."""
    row = block_ids[:width]
    return row + [0] * (width - len(row))


def make_backend(name: str | None, block_size: int, device: torch.device, dtype: torch.dtype, platform,
                 kv_cache_dtype: str = "auto", head_dim: int = 64) -> TorchBackend:
    """The named backend; None picks triton on CUDA, else cpu when the platform has C++
    kernels (else torch). An int8 KV cache on the cpu backend needs head_dim 64, 128 or 256
    (the C++ int8 attention); without it None picks torch."""
    check_backend(name, str(device), dtype, kv_cache_dtype)
    ops = platform.ops if device.type == "cpu" else None
    int8_ok = kv_cache_dtype != "int8" or (ops is not None and ops.int8_attention_supported(head_dim))
    if name is None:
        name = default_backend(device.type) if (ops is not None or device.type == "cuda") and int8_ok else "torch"
    if name == "cpu" and ops is not None and not int8_ok:
        raise ValueError("kv_cache_dtype 'int8' on the 'cpu' attention backend needs head_dim 64, 128 or 256 "
                         f"(here head_dim {head_dim}); use attention_backend='torch'")
    if name == "triton":
        return TritonBackend(block_size, device)
    if name == "cpu":
        if ops is None:
            raise ValueError("attention backend 'cpu' needs the C++ CPU kernels, which did not build "
                             "(see the log); use attention_backend='torch'")
        return CpuBackend(block_size, device, ops)
    return TorchBackend(block_size, device)
