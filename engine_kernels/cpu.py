"""The C++ CPU kernels (engine_kernels/csrc/), built on first use and cached by torch under
~/.cache/torch_extensions.

One build holds every ISA level: level_<isa>.cpp compiles the same kernel sources for its
level under GCC's target pragma (avx512: AVX-512 F/BW/VL/DQ + VNNI + BF16; avx2: AVX2 +
FMA + F16C), level_generic.cpp for the compiler's baseline (SSE2 on x86-64, NEON on
aarch64), and bindings.cpp, the one file that includes torch, dispatches to a level's
table at run time. So the build's baseline stays the architecture's minimum: nothing in it
runs an instruction the machine lacks unless the platform (engine/platform.py, which
checks the CPU) asks for that level. Without GCC on x86-64 (clang), or on another
architecture, only the generic level is built.

`load(isa)` returns the kernels of that level (`Kernels`), or None when they cannot be
built (no compiler, or ENGINE_CPU_KERNELS=0): the engine then runs the plain-torch paths.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / name for name in ("bindings.cpp", "level_avx512.cpp", "level_avx2.cpp", "level_generic.cpp")]
# included sources: in the digest, so a change rebuilds
_INCLUDED = [_CSRC / name for name in ("table.h", "prelude.h", "level.h", "vec.h", "elementwise.h", "attention.h",
                                       "kv_int8.h", "quant.h", "gemv_bf16.h", "sampling.h")]
_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]

ISA_LEVELS = ("avx512", "avx2", "generic")  # best first


@functools.cache
def module():
    """The built extension (every level it holds: `module().levels()`), or None."""
    if os.environ.get("ENGINE_CPU_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load as load_ext
        digest = hashlib.sha1(b"".join(p.read_bytes() for p in _SOURCES + _INCLUDED) + " ".join(_FLAGS).encode())
        name = f"engine_cpu_ops_{digest.hexdigest()[:10]}"
        _clear_stale_build_lock(name)
        log.info("building the C++ CPU kernels (once per machine, about a minute)")
        return load_ext(name=name, sources=[str(p) for p in _SOURCES], extra_cflags=_FLAGS,
                        extra_ldflags=["-fopenmp"], extra_include_paths=[str(_CSRC)], verbose=False)
    except Exception as exc:  # no compiler, no ninja: the torch paths
        log.warning("C++ CPU kernels unavailable (%s); using the torch reference paths", exc)
        return None


@functools.cache
def load(isa: str):
    """The kernels of ISA level `isa` ("avx512", "avx2", "generic"), or None. The caller
    vouches that the CPU runs the level (engine/platform.py)."""
    if isa not in ISA_LEVELS:
        raise ValueError(f"unknown ISA level {isa!r}; one of {', '.join(ISA_LEVELS)}")
    ext = module()
    if ext is None:
        return None
    if isa not in ext.levels():
        log.warning("the C++ CPU kernels were built without the %s level (built: %s)", isa, ", ".join(ext.levels()))
        return None
    kernels = ext.Kernels(isa)
    assert kernels.isa_level() == isa
    return kernels


_STALE_LOCK_S = 15 * 60  # a build takes about a minute here


def _clear_stale_build_lock(name: str) -> None:
    """torch holds a `lock` file in the build folder while it compiles, and a process killed
    mid-build leaves it behind: every later start then waits on it forever, silently. A lock
    older than any build is removed (with a warning)."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > _STALE_LOCK_S:
        log.warning("removing a stale build lock left %.0f min ago by an interrupted build: %s", age / 60, lock)
        lock.unlink(missing_ok=True)
