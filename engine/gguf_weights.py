"""A GGUF file's quantized linear weights in the kernels' packed form, never dequantized.

GGUF block layouts (ggml's, per block of `block` values along K):
  Q4_0  (32): fp16 d, 16 bytes of nibbles           w = d * (q - 8)
  Q4_1  (32): fp16 d, fp16 m, 16 bytes of nibbles   w = d * q + m
  Q8_0  (32): fp16 d, 32 int8                       w = d * q
  Q4_K (256): fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles;
              per 32 values: w = d * sc * q - dmin * m
  Q6_K (256): 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales, fp16 d;
              per 16 values: w = d * sc * (q - 32)
Each becomes scale * code + min with unsigned codes (engine_kernels/quant.py); the values are the
ones ggml computes, to the last bit except Q6_K (one fp32 rounding, as ggml's order differs).
Other tensor types (F32/F16/BF16 and the quantizations not listed) come from the
dequantized safetensors copy, as before.

Names map to transformers' (blk.3.attn_q -> model.layers.3.self_attn.q_proj), and the
llama architecture's q/k rows are un-permuted as transformers does (convert_hf_to_gguf
interleaves them for ggml's RoPE).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from engine_kernels.quant import QuantizedWeight

_LINEAR_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
NATIVE_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


def hf_name(gguf_name: str) -> str | None:
    """transformers' name of a GGUF linear weight, or None for tensors that are not one
    (token_embd is the LM head only in a file without output.weight: the caller decides)."""
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _LINEAR_NAMES:
        return f"model.layers.{parts[1]}.{_LINEAR_NAMES[parts[2]]}.weight"
    return None


def _f16(raw: np.ndarray, at: int) -> np.ndarray:
    return raw[:, :, at:at + 2].copy().view(np.float16)[..., 0]


def _nibbles(qs: np.ndarray, group: int) -> torch.Tensor:
    """[N, blocks, bytes] of nibbles -> codes [N, K]: ggml stores each run of `group` bytes
    as 2 * group values, value j in the low nibble of byte j, value group + j in the high."""
    runs = qs.reshape(qs.shape[0], -1, group)
    return torch.from_numpy(np.concatenate([runs & 0x0F, runs >> 4], axis=2).reshape(qs.shape[0], -1))


def pack_block(kind: str, raw: np.ndarray) -> QuantizedWeight:
    """raw: uint8 [N, bytes per row] of one GGUF tensor of type `kind` -> QuantizedWeight."""
    N = raw.shape[0]
    if kind in ("Q4_0", "Q4_1", "Q8_0"):
        size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
        blocks = raw.reshape(N, -1, size)
        d = torch.from_numpy(_f16(blocks, 0))
        if kind == "Q8_0":
            q = blocks[:, :, 2:].view(np.int8).astype(np.int16) + 128
            codes = torch.from_numpy(q.astype(np.uint8).reshape(N, -1))
            mins = -128.0 * d.float()
            if torch.isfinite(mins.half()).all():
                return QuantizedWeight.from_rows(codes, d, mins.half(), 8, 32, "q8_0")
            return QuantizedWeight.from_rows(codes, d.float(), mins, 8, 32, "q8_0")
        qs = blocks[:, :, 4:] if kind == "Q4_1" else blocks[:, :, 2:]
        mins = torch.from_numpy(_f16(blocks, 2)) if kind == "Q4_1" else (-8.0 * d.float()).half()
        return QuantizedWeight.from_rows(_nibbles(qs, 16), d, mins, 4, 32, kind.lower())
    if kind in ("Q5_0", "Q5_1"):
        blocks = raw.reshape(N, -1, 22 if kind == "Q5_0" else 24)
        at = 2 if kind == "Q5_0" else 4
        d = torch.from_numpy(_f16(blocks, 0))
        qh = blocks[:, :, at:at + 4].copy().view("<u4")[..., 0]  # bit j: the 5th bit of value j
        high = (qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1
        codes = _nibbles(blocks[:, :, at + 4:], 16).view(N, -1, 32) | torch.from_numpy((high << 4).astype(np.uint8))
        if kind == "Q5_1":
            return QuantizedWeight.from_rows(codes.reshape(N, -1), d, torch.from_numpy(_f16(blocks, 2)), 8, 32, "q5_1")
        mins = -16.0 * d.float()
        exact = torch.isfinite(mins.half()).all()
        return QuantizedWeight.from_rows(codes.reshape(N, -1), d if exact else d.float(),
                                         mins.half() if exact else mins, 8, 32, "q5_0")
    if kind == "Q5_K":
        blocks = raw.reshape(N, -1, 176)
        d, dmin = _f16(blocks, 0).astype(np.float32), _f16(blocks, 2).astype(np.float32)
        sc, m = _k4_scales_mins(blocks[:, :, 4:16])
        high = (blocks[:, :, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, None, :, None]) & 1  # [N, nb, 8, 32]
        codes = _nibbles(blocks[:, :, 48:], 32).view(N, -1, 8, 32) | torch.from_numpy((high << 4).astype(np.uint8))
        scales = torch.from_numpy(d[..., None] * sc).reshape(N, -1)
        mins = torch.from_numpy(-(dmin[..., None] * m)).reshape(N, -1)
        return QuantizedWeight.from_rows(codes.reshape(N, -1), scales, mins, 8, 32, "q5_k")
    if kind == "Q4_K":
        blocks = raw.reshape(N, -1, 144)
        d, dmin = _f16(blocks, 0).astype(np.float32), _f16(blocks, 2).astype(np.float32)
        sc, m = _k4_scales_mins(blocks[:, :, 4:16])
        scales = torch.from_numpy(d[..., None] * sc).reshape(N, -1)
        mins = torch.from_numpy(-(dmin[..., None] * m)).reshape(N, -1)
        return QuantizedWeight.from_rows(_nibbles(blocks[:, :, 16:], 32), scales, mins, 4, 32, "q4_k")
    if kind == "Q6_K":
        blocks = raw.reshape(N, -1, 210)
        ql, qh = blocks[:, :, :128].astype(np.uint8), blocks[:, :, 128:192].astype(np.uint8)
        sc = blocks[:, :, 192:208].view(np.int8).astype(np.float32)
        d = _f16(blocks, 208).astype(np.float32)
        q = np.empty((N, blocks.shape[1], 256), dtype=np.uint8)
        for half in range(2):  # two 128-value halves, each from 64 bytes of ql and 32 of qh
            l, h, out = ql[:, :, 64 * half:64 * half + 64], qh[:, :, 32 * half:32 * half + 32], 128 * half
            q[:, :, out:out + 32] = (l[:, :, :32] & 0x0F) | ((h & 3) << 4)
            q[:, :, out + 32:out + 64] = (l[:, :, 32:] & 0x0F) | (((h >> 2) & 3) << 4)
            q[:, :, out + 64:out + 96] = (l[:, :, :32] >> 4) | (((h >> 4) & 3) << 4)
            q[:, :, out + 96:out + 128] = (l[:, :, 32:] >> 4) | (((h >> 6) & 3) << 4)
        scales = torch.from_numpy(d[..., None] * sc).reshape(N, -1)
        return QuantizedWeight.from_rows(torch.from_numpy(q.reshape(N, -1)), scales, -32.0 * scales, 8, 16, "q6_k")
    raise ValueError(f"GGUF type {kind} has no native kernel (native: {', '.join(NATIVE_TYPES)})")


def _k4_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4)."""
    s = s.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), dtype=np.float32)
    m = np.empty_like(sc)
    sc[..., :4], m[..., :4] = s[..., 0:4] & 63, s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    m[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, m


def _unpermute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes convert_hf_to_gguf's q/k permutation (transformers' inverse)."""
    return torch.arange(n_rows).view(n_head, n_rows // n_head // 2, 2).transpose(1, 2).reshape(-1)


def cached_quantized_linears(path: Path, hf_config: dict, cache: Path) -> dict[str, QuantizedWeight]:
    """read_quantized_linears, packed once into `cache` (a safetensors file): parsing a GGUF's
    metadata takes seconds (its tokenizer's strings), loading the packed tensors does not."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if not cache.is_file():
        weights = read_quantized_linears(path, hf_config)
        tensors = {f"{name}.{part}": getattr(w, part) for name, w in weights.items()
                   for part in ("codes", "scales", "mins")}
        layouts = {name: [w.bits, w.block, w.format] for name, w in weights.items()}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        save_file(tensors, tmp, metadata={"layouts": json.dumps(layouts)})
        tmp.replace(cache)
        return weights
    with safe_open(cache, "pt") as f:
        layouts = json.loads(f.metadata()["layouts"])
        return {name: QuantizedWeight(f.get_tensor(f"{name}.codes"), f.get_tensor(f"{name}.scales"),
                                      f.get_tensor(f"{name}.mins"), bits, block, fmt)
                for name, (bits, block, fmt) in layouts.items()}


def read_quantized_linears(path: Path, hf_config: dict) -> dict[str, QuantizedWeight]:
    """Every linear weight of `path` stored in a native type, under transformers' names
    ("lm_head.weight" for a tied output, which GGUF shares with token_embd)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    heads = hf_config.get("num_attention_heads")
    kv_heads = hf_config.get("num_key_value_heads", heads)
    tensors = {t.name: t for t in reader.tensors}
    out: dict[str, QuantizedWeight] = {}
    tied = "output.weight" not in tensors  # then the LM head is token_embd's blocks
    for name, t in tensors.items():
        target = "lm_head.weight" if tied and name == "token_embd.weight" else hf_name(name)
        kind = t.tensor_type.name
        if target is None or kind not in NATIVE_TYPES:
            continue
        w = pack_block(kind, np.asarray(t.data).reshape(int(t.shape[1]), -1))
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            w = w.rows(_unpermute_rows(w.out_features, heads if ".attn_q." in name else kv_heads))
        out[target] = w
    return out
