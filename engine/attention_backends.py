"""Attention backends: each builds its step metadata and owns its forward variant.

- `torch`: the plain-torch reference (any device).
- `cpu`: the torch path with decodes in the C++ kernel, and the model's layers on their
  fused C++ ops (RoPE writes K/V itself). The default on CPU when the kernels build.
- `triton`: engine_kernels/triton_attention.py over one varlen description of the batch (GPU; the
  interpreter in tests).

A backend is chosen once, by name, device and dtype; `check_dtype` refuses a dtype a
backend cannot run before any weights load.
"""
from __future__ import annotations

import torch

from engine import attention as torch_attention
from engine.attention import AttentionMetadata, PrefillSeq

# Which devices and dtypes each backend runs. float16 on CPU: oneDNN's fp16 matmuls and
# our kernels are bf16/fp32 only.
_SUPPORT = {
    "torch": {"cpu": (torch.bfloat16, torch.float32), "cuda": (torch.bfloat16, torch.float16, torch.float32)},
    "cpu": {"cpu": (torch.bfloat16, torch.float32)},
    "triton": {"cuda": (torch.bfloat16, torch.float16, torch.float32),
               "cpu": (torch.bfloat16, torch.float32)},  # TRITON_INTERPRET=1 only
}


def check_dtype(name: str | None, device: str, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> None:
    kind = torch.device(device).type
    name = name or ("triton" if kind == "cuda" else "cpu")
    if kv_cache_dtype == "int8" and name == "triton":
        raise ValueError("EngineConfig.kv_cache_dtype 'int8' runs on the 'cpu' and 'torch' attention backends; "
                         "the 'triton' kernels read caches in the model dtype")
    devices = _SUPPORT.get(name)
    if devices is None:
        raise ValueError(f"EngineConfig.attention_backend must be one of {sorted(_SUPPORT)}, got {name!r}")
    if kind not in devices:
        raise ValueError(f"attention backend {name!r} does not run on {kind}")
    if dtype not in devices[kind]:
        why = (": its matmul and attention kernels run in bfloat16 or float32; use dtype='bfloat16'"
               if dtype == torch.float16 and kind == "cpu" else "")
        raise ValueError(f"EngineConfig.dtype {str(dtype).removeprefix('torch.')!r} is not supported "
                         f"by the {name!r} attention backend on {kind.upper()}{why}")


class Seq:
    """One scheduled sequence as attention sees it."""
    __slots__ = ("block_ids", "context_len", "num_tokens", "start")

    def __init__(self, block_ids: list[int], context_len: int, num_tokens: int, start: int) -> None:
        self.block_ids = block_ids      # its block table (at least ceil(context_len / block_size))
        self.context_len = context_len  # tokens in the cache after this step
        self.num_tokens = num_tokens    # query tokens this step (1 for a decode)
        self.start = start              # its first row in the flattened batch


class TorchBackend:
    name = "torch"
    fused_kv_write = False  # the layer writes K/V before attending

    def __init__(self, block_size: int, device: torch.device) -> None:
        self.block_size = block_size
        self.device = device

    def _tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def prepare_model(self, model) -> None:
        pass

    def build_metadata(self, slot_mapping: torch.Tensor, decodes: list[Seq], prefills: list[Seq]) -> AttentionMetadata:
        bs = self.block_size
        meta = AttentionMetadata(slot_mapping=slot_mapping, num_decodes=len(decodes), decode_block_tables=None,
                                 decode_seq_lens=None, decode_mask=None,
                                 prefills=[PrefillSeq(s.start, s.num_tokens, s.context_len,
                                                      self._tensor(s.block_ids[:-(-s.context_len // bs)]))
                                           for s in prefills])
        if decodes:
            width = max(-(-s.context_len // bs) for s in decodes)
            meta.decode_block_tables = self._tensor([_padded(s.block_ids, width) for s in decodes])
            meta.decode_seq_lens = self._tensor([s.context_len for s in decodes])
            meta.decode_mask = (torch.arange(width * bs, device=self.device)[None, :]
                                < meta.decode_seq_lens[:, None]).view(len(decodes), 1, 1, width * bs)
        return meta

    write_kv = staticmethod(torch_attention.write_kv)
    attend = staticmethod(torch_attention.torch_paged_attention)


class CpuBackend(TorchBackend):
    name = "cpu"
    fused_kv_write = True  # the layer's fused RoPE kernel writes K/V

    def __init__(self, block_size: int, device: torch.device, ops) -> None:
        super().__init__(block_size, device)
        self.ops = ops

    def prepare_model(self, model) -> None:
        model.use_cpu_kernels(self.ops)

    write_kv = staticmethod(torch_attention.write_kv)  # for layers without the fused path
    attend = staticmethod(torch_attention.cpu_paged_attention)


class TritonBackend(TorchBackend):
    name = "triton"

    def __init__(self, block_size: int, device: torch.device) -> None:
        super().__init__(block_size, device)
        from engine_kernels import triton_attention as kernels  # imports triton: only when chosen
        self.kernels = kernels
        self.write_kv = kernels.write_kv

    def build_metadata(self, slot_mapping: torch.Tensor, decodes: list[Seq], prefills: list[Seq]) -> AttentionMetadata:
        rows = decodes + prefills  # one varlen description of all rows, in row order
        meta = AttentionMetadata(slot_mapping=slot_mapping, num_decodes=len(decodes), decode_block_tables=None,
                                 decode_seq_lens=None, decode_mask=None, prefills=[])
        width = max(-(-s.context_len // self.block_size) for s in rows)
        meta.block_tables = self._tensor([_padded(s.block_ids, width) for s in rows], torch.int32)
        meta.seq_lens = self._tensor([s.context_len for s in rows], torch.int32)
        starts = [0]
        for s in rows:
            starts.append(starts[-1] + s.num_tokens)
        meta.query_start_loc = self._tensor(starts, torch.int32)
        meta.max_query_len = max(s.num_tokens for s in rows)
        meta.max_seq_len = max(s.context_len for s in rows)
        return meta

    def attend(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float,
               window: int | None = None) -> torch.Tensor:
        return self.kernels.paged_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens,
                                           meta.block_tables, scale, meta.max_query_len, meta.max_seq_len,
                                           window=window)


def _padded(block_ids: list[int], width: int) -> list[int]:
    row = block_ids[:width]
    return row + [0] * (width - len(row))


def make_backend(name: str | None, block_size: int, device: torch.device, dtype: torch.dtype,
                 kv_cache_dtype: str = "auto", head_dim: int = 64) -> TorchBackend:
    """The named backend; None picks triton on CUDA, else cpu when the C++ kernels build
    (else torch). An int8 KV cache (check_dtype refused it on triton) needs the C++
    int8 attention (AVX512-VNNI) for cpu; without it None picks torch."""
    from engine_kernels.cpu import load as cpu_kernels
    check_dtype(name, str(device), dtype)
    ops = cpu_kernels() if device.type == "cpu" else None
    int8_ok = kv_cache_dtype != "int8" or (ops is not None and ops.int8_attention_supported(head_dim))
    if name is None:
        name = "triton" if device.type == "cuda" else ("cpu" if ops and int8_ok else "torch")
    if name == "cpu" and ops is not None and not int8_ok:
        raise ValueError("kv_cache_dtype 'int8' on the 'cpu' attention backend needs AVX512-VNNI and head_dim "
                         f"64, 128 or 256 (here head_dim {head_dim}); use attention_backend='torch'")
    if name == "triton":
        return TritonBackend(block_size, device)
    if name == "cpu":
        if ops is None:
            raise ValueError("attention backend 'cpu' needs the C++ CPU kernels, which did not build "
                             "(see the log); use attention_backend='torch'")
        return CpuBackend(block_size, device, ops)
    return TorchBackend(block_size, device)
