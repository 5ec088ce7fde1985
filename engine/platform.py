"""Where things run: the one place that looks at the hardware (vLLM's `current_platform`).

From the device and the CPU's instruction set it decides, once:
- the CPU's ISA level: "avx512" (AVX-512 F/BW/VL/DQ + VNNI), "avx2" (AVX2 + FMA + F16C) or
  "generic" (nothing assumed: SSE2 on x86-64, NEON on ARM). `ENGINE_CPU_ISA=auto|avx512|
  avx2|generic` caps it, so every level's kernels run on an AVX-512 machine too; a level
  the machine lacks is refused. A capped level sees only its own instructions (an avx2
  platform on a Zen 4 is a Zen 3 as far as the engine can tell).
- the activation dtype: bfloat16 only where the hardware computes it natively (AVX512-BF16
  or AMX on CPU, bf16 on CUDA), float32 elsewhere. An explicit bfloat16 where the machine
  cannot run it is refused at config time.
- the kernels behind each op: the C++ module built for the level (engine_kernels/cpu.py),
  or the plain-torch references without one, Triton on CUDA. Models, the sampler and the
  runner ask the platform; none of them looks for kernels itself.
"""
from __future__ import annotations

import functools
import logging
import os
import platform as _platform
from pathlib import Path

import torch

from engine_kernels import cpu as cpu_kernels
from engine_kernels.cpu import ISA_LEVELS

log = logging.getLogger(__name__)

ISA_ENV = "ENGINE_CPU_ISA"
# What each level needs of the CPU (the names /proc/cpuinfo uses)
_LEVEL_NEEDS = {
    "avx512": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx2", "fma", "f16c"}),
    "avx2": frozenset({"avx2", "fma", "f16c"}),
    "generic": frozenset(),
}
# Features a level uses when the machine has them
_LEVEL_EXTRAS = {"avx512": ("avx512_bf16",), "avx2": (), "generic": ()}
# bf16 computed natively: AVX512-BF16 (Zen 4, Cooper Lake+), AMX (Sapphire Rapids+); the generic level
# runs fp32 (its kernels widen bf16 element by element)
_NATIVE_BF16 = {"avx512": ("avx512_bf16", "amx_bf16"), "avx2": (), "generic": ()}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, as Linux names them (/proc/cpuinfo); elsewhere what torch's
    own dispatch found (AVX512 or AVX2)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):  # x86, ARM
                return frozenset(value.split())
    except OSError:
        pass
    cap = torch.backends.cpu.get_cpu_capability()
    return _LEVEL_NEEDS["avx512"] if cap.startswith("AVX512") else _LEVEL_NEEDS["avx2"] if cap == "AVX2" else frozenset()


def machine_isa(flags: frozenset[str] | None = None) -> str:
    """The best level this CPU runs."""
    flags = cpu_flags() if flags is None else flags
    return next(level for level in ISA_LEVELS if _LEVEL_NEEDS[level] <= flags)


def supported_isas() -> list[str]:
    """Every level the engine may run here, best first: the machine's, from the one
    ENGINE_CPU_ISA caps it at (so a capped AVX-512 machine looks like an AVX2 one)."""
    return list(ISA_LEVELS[ISA_LEVELS.index(requested_isa()):])


def requested_isa() -> str:
    """The level ENGINE_CPU_ISA asks for (auto: the machine's best); a level the machine
    lacks is a ValueError that says what it has."""
    want = os.environ.get(ISA_ENV, "auto").strip().lower() or "auto"
    best = machine_isa()
    if want == "auto":
        return best
    if want not in ISA_LEVELS:
        raise ValueError(f"{ISA_ENV}={want!r}: expected auto, {', '.join(ISA_LEVELS)}")
    if ISA_LEVELS.index(want) < ISA_LEVELS.index(best):
        missing = sorted(_LEVEL_NEEDS[want] - cpu_flags())
        raise ValueError(f"{ISA_ENV}={want}: this CPU ({cpu_model()}, {_platform.machine()}) lacks "
                         f"{', '.join(missing)}; it runs {', '.join(ISA_LEVELS[ISA_LEVELS.index(best):])}")
    return want


class Platform:
    """One device and, on CPU, one ISA level: what runs where. Made by `current_platform`."""

    def __init__(self, device_type: str, isa: str | None) -> None:
        assert device_type in ("cpu", "cuda") and (isa in ISA_LEVELS) == (device_type == "cpu")
        self.device_type = device_type
        self.isa = isa
        # the machine's flags as the level sees them: its own and its optional extras
        self.features = (frozenset(f for f in _LEVEL_EXTRAS[isa] + _NATIVE_BF16[isa] if f in cpu_flags())
                         if isa else frozenset())

    def __repr__(self) -> str:
        return f"Platform({self.device_type}{', ' + self.isa if self.isa else ''})"

    @property
    def native_bf16(self) -> bool:
        if self.device_type == "cuda":
            return torch.cuda.is_bf16_supported()
        return any(f in self.features for f in _NATIVE_BF16[self.isa])

    @functools.cached_property
    def ops(self):
        """The C++ kernels built for this level, or None (on CUDA; without a compiler; with
        ENGINE_CPU_KERNELS=0)."""
        if self.device_type != "cpu":
            return None
        return cpu_kernels.load(self.isa)

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.native_bf16 else torch.float32

    def check_dtype(self, dtype: torch.dtype) -> None:
        """Refuses an activation dtype this platform cannot compute, saying why."""
        if self.device_type == "cuda" or dtype == torch.float32:
            return
        if dtype == torch.float16:
            raise ValueError("EngineConfig.dtype 'float16' is not supported on CPU: its matmul and attention "
                             "kernels run in bfloat16 or float32; use dtype='auto'")
        # bf16: natively, or where oneDNN emulates it with AVX-512 BW/VL/DQ (the avx512 level)
        if not (self.native_bf16 or self.isa == "avx512"):
            raise ValueError(f"EngineConfig.dtype 'bfloat16' needs a CPU that computes bf16 (AVX512-BF16, AMX, or "
                             f"AVX-512 for oneDNN's emulation); this one runs at the {self.isa} level "
                             f"(ENGINE_CPU_ISA={os.environ.get(ISA_ENV, 'auto')}); use dtype='auto' (float32 here)")

    def resolve_dtype(self, name: str) -> str:
        """'auto' -> this platform's activation dtype; anything else checked and kept."""
        from engine.config import DTYPES
        if name == "auto":
            return str(self.default_dtype()).removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {name!r}")
        self.check_dtype(DTYPES[name])
        return str(DTYPES[name]).removeprefix("torch.")

    def uses_cuda_graphs(self, attention_backend: str, enforce_eager: bool) -> bool:
        """Decode steps replay CUDA graphs (engine/cuda_graphs.py) on CUDA with the Triton
        kernels, unless told to run eagerly."""
        return self.device_type == "cuda" and attention_backend == "triton" and not enforce_eager

    def describe(self) -> dict:
        """For stats() and benchmark reports: device, level, CPU."""
        out = {"device": self.device_type, "isa": self.isa, "cpu": cpu_model()}
        if self.isa:
            out["features"] = sorted(self.features)
            out["cpu_kernels"] = "built" if self.ops is not None else "unavailable (torch paths)"
        return out

    # -- kernels the engine asks for ------------------------------------------------------
    def prepare_model(self, model, dtype: torch.dtype, backend) -> None:
        """Puts every linear of a loaded model on its kernel and, where the step's ops are the
        C++ ones (the cpu backend), gives each layer the fused C++ DecodeLayer when all its
        linears run in C++. Quantized weights run on the C++ kernel of this level; without
        C++ kernels (CUDA; no compiler) they are dequantized once to `dtype`. Dense bf16
        weights decode through the bf16 GEMV where the level has it (up to GEMV_MAX_ROWS rows;
        oneDNN beyond), else oneDNN prepacked; fp32 ones through ATen (MKL)."""
        ops = self.ops
        linears = model.linears()
        for m in linears:
            if m.qweight is not None and ops is None:
                m.dequantize(dtype)
        quantized = [m for m in linears if m.qweight is not None]
        if quantized:  # one huge-page buffer, in the order a step reads them
            parts = [(m.qweight, name) for m in quantized for name in ("codes", "scales", "mins")]
            views = _copy_into_huge_pages(ops, [getattr(w, n).nbytes for w, n in parts], (getattr(w, n) for w, n in parts))
            for (w, name), view in zip(parts, views):
                setattr(w, name, view)
        gemv = [m for m in linears if m.qweight is None and dtype == torch.bfloat16 and ops is not None
                and ops.gemv_supported(*m.weight.shape)]
        packed = dict(zip(gemv, _copy_into_huge_pages(ops, [m.weight.nbytes for m in gemv],
                                                      (ops.pack_for_gemv(m.weight) for m in gemv))))
        for m in linears:
            _place_linear(m, ops, packed.get(m))
        if backend.name != "cpu":
            return
        for layer in model.layers:
            if all(m.cpp is not None for m in layer.linears()):
                layer.fused = _decode_layer(ops, layer)
                bounds = [m.max_fused_rows for m in layer.linears() if m.max_fused_rows is not None]
                layer.max_fused_rows = min(bounds) if bounds else None


    def argmax_rows(self, logits: torch.Tensor) -> torch.Tensor:
        """Row-wise argmax of fp32 logits (the C++ kernel on CPU: 4.5x torch's at 64 x 49k)."""
        if self.ops is not None and logits.dtype == torch.float32 and logits.stride(-1) == 1:
            return self.ops.argmax_rows(logits)
        return logits.argmax(dim=-1)

    def apply_token_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """logits[r, j] = -inf where bit j of bitmask[r] is 0, for r in rows."""
        if logits.is_cuda:
            import xgrammar as xgr
            xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                            vocab_size=logits.shape[-1], indices=rows)
        elif self.ops is not None:  # xgrammar's CPU kernel is ~10x slower on real masks
            self.ops.apply_token_bitmask(logits, bitmask, torch.tensor(rows, dtype=torch.int64))
        else:
            from engine_kernels.reference import apply_token_bitmask_ref
            apply_token_bitmask_ref(logits, bitmask, rows)

    def release_openmp_pool(self) -> None:  # noqa: D401
        """Ends the OpenMP workers that loading the model started on the caller's thread.
        The step thread runs every kernel; with a second pool alive the process has more
        OpenMP threads than two cores, libgomp stops all workers spin-waiting between
        regions, and every kernel pays a futex wake-up (measured: decode steps 1.5-1.9x
        longer than the same engine stepped on the thread that loaded it)."""
        if self.ops is not None:
            self.ops.release_openmp_pool()


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return _platform.processor() or _platform.machine()


@functools.cache
def _platform_for(device_type: str, isa: str | None) -> Platform:
    return Platform(device_type, isa)


def current_platform(device: str | torch.device | None = None) -> Platform:
    """The platform of `device` (default: cuda if present, else cpu) at the ISA level
    ENGINE_CPU_ISA asks for, read at each call (tests switch it); one object per pair."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device {kind!r} is not supported: cpu or cuda")
    return _platform_for(kind, requested_isa() if kind == "cpu" else None)


GEMV_MAX_ROWS = 64  # the bf16 GEMV: measured faster than oneDNN up to about 64 rows, slower beyond


def _place_linear(m, ops, gemv_weight: torch.Tensor | None) -> None:
    """m.kernel, m.kernel_name and m.cpp (its C++ DecodeLayer form) for one Linear."""
    bias = None if m.bias is None else m.bias.data
    none = torch.empty(0)
    if m.qweight is not None:
        w, kind = m.qweight, m.qweight.code_kind
        m.kernel = lambda x: ops.quant_linear(x, w.codes, w.scales, w.mins, w.bits, w.block, kind, bias)
        m.kernel_name = ops.quant_kernel_name()
        m.cpp = ops.LinearWeights(w.codes, w.scales, w.mins, w.bits, w.block, kind, bias)
        return
    weight = m.weight
    if weight.device.type != "cpu":
        m.kernel, m.kernel_name = (lambda x: torch.nn.functional.linear(x, weight, bias)), "torch"
        return
    if weight.dtype in (torch.bfloat16, torch.float16) and torch.backends.mkldnn.is_available():
        # prepacked for oneDNN once: small-batch (decode) matmuls about 1.7x faster than F.linear
        onednn = torch.ops.mkldnn._reorder_linear_weight(weight, None)

        def dense(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x, onednn, bias, "none", [], "")
        m.kernel, m.kernel_name = dense, "onednn"
    else:
        m.kernel, m.kernel_name = (lambda x: torch.nn.functional.linear(x, weight, bias)), "torch"
        if ops is not None and weight.dtype == torch.float32:
            m.cpp = ops.LinearWeights(weight, none, none, 32, 0, 0, bias)  # ATen's linear, from C++
    if gemv_weight is not None:
        slow = m.kernel

        def gemv(x: torch.Tensor) -> torch.Tensor:
            return ops.gemv_bf16(x, gemv_weight, bias) if x.shape[0] <= GEMV_MAX_ROWS else slow(x)
        m.kernel, m.kernel_name = gemv, "avx512_bf16_gemv+onednn"
        m.cpp, m.max_fused_rows = ops.LinearWeights(gemv_weight, none, none, 16, 0, 0, bias), GEMV_MAX_ROWS


def _decode_layer(ops, layer):
    opt = lambda norm: None if norm is None else norm.weight.data  # noqa: E731
    return ops.DecodeLayer(layer.input_norm.weight.data, layer.pre_mlp_norm.weight.data,
                           opt(layer.post_attention_norm), opt(layer.post_mlp_norm), opt(layer.q_norm),
                           opt(layer.k_norm), layer.input_norm.eps, layer.input_norm.gemma, layer.gelu,
                           *(m.cpp for m in layer.linears()), layer.num_heads, layer.num_kv_heads, layer.head_dim,
                           layer.scale, layer.window or 0)


def _copy_into_huge_pages(ops, sizes: list[int], tensors) -> list[torch.Tensor]:
    """Copies `tensors` (made one at a time; their byte sizes known up front) into one buffer
    on huge pages, in order, 64-byte aligned; returns the copies. Weights streamed through
    4 KiB pages cost about 10% of decode speed in TLB misses."""
    aligned = [-(-n // 64) * 64 for n in sizes]
    arena = torch.empty(sum(aligned), dtype=torch.uint8)
    if aligned:
        ops.advise_huge_pages(arena)
    views, offset = [], 0
    for n, step, t in zip(sizes, aligned, tensors):
        assert t.nbytes == n, "a tensor's size changed while it was being packed"
        view = arena[offset:offset + t.nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        views.append(view)
        offset += step
    return views
