"""Every Triton kernel the engine can launch, compiled ahead of time for a named GPU (sm_89:
L4, the Cloud Run GPU; sm_90: H100) on a machine without one, with the ptxas Triton ships.
The interpreter (TRITON_INTERPRET=1, how the kernels run on CPU) hides what only a real
compile shows: tl.dot's minimum tile of 16, shared memory past the block limit, register
spills. `compile_all()` reports each configuration's shared memory, registers and stack (spills);
`problems()` names what breaks a limit. Run it in a process without TRITON_INTERPRET
(`python -m benchmarks gpu-compile`).
"""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from engine_kernels import GPU_BLOCK_SIZES, triton_attention, triton_ops
from engine_kernels.triton_attention import MAX_KV_SPLITS, kv_tile, tile_rows

# Shared memory one block may use (bytes, the opt-in maximum): CUDA's compute capability tables
TARGETS = {"sm_89": (89, 99 * 1024), "sm_90": (90, 227 * 1024)}
# Spills go to local memory. Up to 32 words per thread is register pressure at the edge: a few
# values stored once per KV block and read back from L1. Past it the tile is too big for the
# register file (block 32 spills up to 296 bytes in the prefill tile at head dim 256)
MAX_SPILL_BYTES = 128
HEAD_DIMS = (64, 128, 256)
DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
BLOCK_SIZES = GPU_BLOCK_SIZES  # what EngineConfig lets the triton backend use on CUDA
# The norm's tile follows the hidden size (a row in registers up to triton_ops.MAX_ROW_TILE, then
# two passes): SmolLM2-135M 576, Gemma 3 270M 640, Llama 3 8B 4096, 70B 8192, larger rows
NORM_SIZES = {576: "SmolLM2", 640: "Gemma 3 270M", 4096: "Llama 3 8B", 8192: "Llama 3 70B", 16384: "two passes"}


@dataclass(frozen=True)
class KernelConfig:
    kernel: str       # the launcher's name: paged_attention, merge_splits, write_kv, copy_blocks, rms_norm, ...
    variant: str      # prefill | decode | split-KV, or the sizes
    dtype: str
    signature: tuple  # ((name, type), ...)
    constexprs: tuple  # ((name, value), ...)
    options: tuple = ()  # compile options the launcher passes: ((name, value), ...)

    @property
    def name(self) -> str:
        return f"{self.kernel}[{self.variant}, {self.dtype}]"


@dataclass(frozen=True)
class Compiled:
    config: KernelConfig
    target: str
    shared_bytes: int
    registers: int
    spill_bytes: int


def _attention(head_dim: int, dtype: str, block_size: int, group: int, mode: str) -> KernelConfig:
    """paged_attention's launch for one configuration, as the launcher chooses its tiles."""
    p, decode = DTYPES[dtype], mode != "prefill"
    rows = tile_rows(group, head_dim, decode)
    splits = MAX_KV_SPLITS if mode == "split-KV" else 1
    sig = (("q_ptr", p), ("k_cache_ptr", p), ("v_cache_ptr", p), ("out_ptr", p), ("block_tables_ptr", "*i32"),
           ("query_start_ptr", "*i32"), ("seq_lens_ptr", "*i32"), ("scale", "fp32"), *[(s, "i32") for s in (
               "stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb", "stride_ks", "stride_kh", "stride_bt")],
           ("G", "constexpr"), ("D", "constexpr"), ("BLOCK_SIZE", "constexpr"), ("KV_TILE", "constexpr"),
           ("ROWS", "constexpr"), ("TOKENS_PER_TILE", "constexpr"), ("KV_SPLIT_LEN", "constexpr"),
           ("part_out_ptr", "*fp32"), ("part_lse_ptr", "*fp32"), ("NUM_SPLITS", "constexpr"), ("window", "i32"),
           ("HALF_DOT", "constexpr"))
    consts = (("G", group), ("D", head_dim), ("BLOCK_SIZE", block_size),
              ("KV_TILE", kv_tile(block_size, head_dim, ELEMENT_BYTES[dtype], decode)), ("ROWS", rows),
              ("TOKENS_PER_TILE", 1 if mode == "split-KV" else rows // group),
              ("KV_SPLIT_LEN", 1024 if mode == "split-KV" else 0), ("NUM_SPLITS", splits),
              ("HALF_DOT", dtype != "fp32"))
    return KernelConfig("paged_attention", f"{mode}, D={head_dim}, block={block_size}, G={group}", dtype, sig, consts)


def _ops_options(elements: int) -> tuple:
    return (("num_warps", triton_ops.num_warps(elements)),) + tuple(triton_ops.EXACT_OPTIONS.items())


def _norm(n: int, dtype: str, residual: bool, gemma: bool, what: str) -> KernelConfig:
    """triton_ops' norm launch for rows of n: a hidden state (`residual`: add_rms_norm_), or
    per-head q/k norms (head_rms_norm_) at head dim n."""
    p = DTYPES[dtype]
    rows, block = triton_ops.norm_tiling(n)
    sig = (*[(s, p) for s in ("x_ptr", "residual_ptr", "w_ptr", "w2_ptr", "out_ptr")],
           *[(s, "i32") for s in ("stride_xt", "stride_rt", "stride_ot", "num_rows", "heads", "split", "n")],
           ("eps", "fp32"), *[(s, "constexpr") for s in ("ROWS", "BLOCK", "ONE_TILE", "RESIDUAL", "GEMMA")])
    consts = (("ROWS", rows), ("BLOCK", block), ("ONE_TILE", n <= block), ("RESIDUAL", residual), ("GEMMA", gemma))
    return KernelConfig("rms_norm", what + (", gemma" if gemma else ""), dtype, sig, consts,
                        _ops_options(rows * block))


def _ops(head_dims, dtypes) -> list[KernelConfig]:
    """triton_ops' launches: norms at each tile the hidden sizes take, per-head norms, RoPE with
    the K/V write at each head dim, the gated activation."""
    out = []
    for t in dtypes:
        p = DTYPES[t]
        out += [_norm(n, t, True, n == 640, f"add, n={n} ({model})") for n, model in NORM_SIZES.items()]
        out.append(_norm(5376, t, False, True, "n=5376 (Gemma 3 27B's extra norms)"))
        out += [_norm(d, t, False, d == 256, f"heads, D={d}") for d in head_dims]
        for d in head_dims:
            rows, half = triton_ops.rope_rows(d), d // 2
            out.append(KernelConfig("rope_write_kv", f"D={d}", t, (
                *[(s, p) for s in ("qkv_ptr", "cos_ptr", "sin_ptr", "q_ptr", "k_cache_ptr", "v_cache_ptr")],
                ("slot_ptr", "*i64"), *[(s, "i32") for s in ("stride_qkv", "num_rows", "num_heads", "num_kv_heads")],
                ("D", "constexpr"), ("HALF", "constexpr"), ("ROWS", "constexpr")),
                (("D", d), ("HALF", half), ("ROWS", rows)), _ops_options(2 * rows * half)))
        rows, block = triton_ops.act_tiling(14336)  # any d from ACT_BLOCK up: Llama 3 8B's
        for gelu in (False, True):
            out.append(KernelConfig("act_and_mul", "tanh-GELU" if gelu else "SiLU", t, (
                ("x_ptr", p), ("out_ptr", p), *[(s, "i32") for s in ("T", "d", "stride_xt", "stride_ot")],
                ("ROWS", "constexpr"), ("BLOCK", "constexpr"), ("GELU", "constexpr")),
                (("ROWS", rows), ("BLOCK", block), ("GELU", gelu)), _ops_options(triton_ops.ACT_BLOCK)))
    return out


def kernel_configs(head_dims=HEAD_DIMS, dtypes=tuple(DTYPES), block_sizes=BLOCK_SIZES, groups=(1, 4, 8),
                   modes=("prefill", "decode", "split-KV")) -> list[KernelConfig]:
    """Every launch the engine can make over these choices (sliding windows are a run-time
    argument of the same kernels)."""
    out = [_attention(d, t, b, g, m) for d, t, b, g, m in itertools.product(head_dims, dtypes, block_sizes, groups,
                                                                             modes)]
    for d, t in itertools.product(head_dims, dtypes):
        p = DTYPES[t]
        out.append(KernelConfig("merge_splits", f"D={d}, splits={MAX_KV_SPLITS}", t, (
            ("part_out_ptr", "*fp32"), ("part_lse_ptr", "*fp32"), ("out_ptr", p), ("query_start_ptr", "*i32"),
            ("stride_ot", "i32"), ("stride_oh", "i32"), ("H", "constexpr"), ("D", "constexpr"),
            ("NUM_SPLITS", "constexpr")), (("H", 32), ("D", d), ("NUM_SPLITS", MAX_KV_SPLITS))))
        row = 8 * d  # 8 KV heads
        out.append(KernelConfig("write_kv", f"row={row}", t, (
            ("k_ptr", p), ("v_ptr", p), ("k_cache_ptr", p), ("v_cache_ptr", p), ("slot_ptr", "*i64"),
            ("stride_kt", "i32"), ("stride_vt", "i32"), ("ROW", "constexpr"), ("ROW_POW2", "constexpr")),
            (("ROW", row), ("ROW_POW2", row))))
    for t in dtypes:
        out.append(KernelConfig("copy_blocks", "block of 16 x 8 x 128", t, (
            ("cache_ptr", DTYPES[t]), ("src_ptr", "*i64"), ("dst_ptr", "*i64"), ("LAYER_STRIDE", "constexpr"),
            ("BLOCK_NUMEL", "constexpr"), ("CHUNK", "constexpr")),
            (("LAYER_STRIDE", 1024 * 16 * 8 * 128), ("BLOCK_NUMEL", 16 * 8 * 128), ("CHUNK", 1024))))
    return out + _ops(head_dims, dtypes)


_KERNELS = {"paged_attention": triton_attention._paged_attention_kernel,
            "merge_splits": triton_attention._merge_splits_kernel, "write_kv": triton_attention._write_kv_kernel,
            "copy_blocks": triton_attention._copy_blocks_kernel, "rms_norm": triton_ops._rms_norm_kernel,
            "rope_write_kv": triton_ops._rope_write_kv_kernel, "act_and_mul": triton_ops._act_and_mul_kernel}


def compile_one(config: KernelConfig, target: str) -> Compiled:
    """Compiles `config` for `target` (a key of TARGETS); raises what the compiler raised."""
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "the interpreter compiles nothing: unset it"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arch, _ = TARGETS[target]
    kernel = triton.compile(ASTSource(_KERNELS[config.kernel], dict(config.signature),
                                      constexprs=dict(config.constexprs)),
                            target=GPUTarget("cuda", arch, 32), options=dict(config.options))
    registers, spills = _resource_usage(kernel.asm["cubin"])
    return Compiled(config, target, kernel.metadata.shared, registers, spills)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes: spills and local arrays), as the cuobjdump Triton
    ships reads them off the cubin."""
    import triton
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                               check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    assert match, usage
    return int(match.group(1)), int(match.group(2))


def problems(result: Compiled) -> list[str]:
    """What breaks a limit of the target: shared memory per block, spills."""
    _, smem_limit = TARGETS[result.target]
    out = []
    if result.shared_bytes > smem_limit:
        out.append(f"{result.config.name} on {result.target}: {result.shared_bytes} bytes of shared memory, "
                   f"over the {smem_limit} a block may use")
    if result.spill_bytes > MAX_SPILL_BYTES:
        out.append(f"{result.config.name} on {result.target}: spills {result.spill_bytes} bytes to local memory")
    return out


def compile_all(configs: list[KernelConfig], targets=tuple(TARGETS), progress=None) -> tuple[list[Compiled], list[str]]:
    """(what compiled, what failed or broke a limit), for every config on every target."""
    done, failures = [], []
    for config, target in itertools.product(configs, targets):
        try:
            result = compile_one(config, target)
        except Exception as exc:  # noqa: BLE001 - a compile error is the finding
            failures.append(f"{config.name} on {target}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        else:
            done.append(result)
            failures += problems(result)
        if progress is not None:
            progress()
    return done, failures
