"""The C++ CPU kernels (engine_kernels/csrc/), built on first use and cached under torch's
extensions folder (~/.cache/torch_extensions), one binary per sources, flags, torch and Python.

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

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / name for name in ("bindings.cpp", "level_avx512.cpp", "level_avx2.cpp", "level_generic.cpp")]
# included sources: in the digest, so a change rebuilds
_INCLUDED = [_CSRC / name for name in ("table.h", "prelude.h", "level.h", "vec.h", "elementwise.h", "attention.h",
                                       "prefill_attention.h", "kv_int8.h", "quant.h", "gemv_bf16.h", "sampling.h")]
_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]

ISA_LEVELS = ("avx512", "avx2", "generic")  # best first


@functools.cache
def module():
    """The built extension (every level it holds: `module().levels()`), or None."""
    if os.environ.get("ENGINE_CPU_KERNELS", "1") == "0":
        return None
    try:
        import torch
        # What the binary depends on: sources, flags, torch's ABI and Python's; never where it was built
        key = b"".join(p.read_bytes() for p in _SOURCES + _INCLUDED) + \
            " ".join(_FLAGS + [torch.__version__, sys.version, platform.machine()]).encode()
        return _cached_build(f"engine_cpu_ops_{hashlib.sha1(key).hexdigest()[:10]}")
    except Exception as exc:  # no compiler, no ninja: the torch paths
        log.warning("C++ CPU kernels unavailable (%s); using the torch reference paths", exc)
        return None


def _cached_build(name: str):
    """The extension `name` from the cache, or built into a private folder and moved there
    whole. Builders take turns on an flock, which the kernel drops when a process dies: a
    build killed midway leaves nothing a later start waits on (torch's own `lock` file did,
    and every later process waited on it forever, silently)."""
    from torch.utils.cpp_extension import _get_build_directory, load as load_ext
    cache = Path(_get_build_directory(name, False))
    built = cache / f"{name}.so"
    with _exclusive(cache / "build.flock"):
        if not built.is_file():
            log.info("building the C++ CPU kernels (once per machine, about a minute)")
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                ext = load_ext(name=name, sources=[str(p) for p in _SOURCES], extra_cflags=_FLAGS,
                               extra_ldflags=["-fopenmp"], extra_include_paths=[str(_CSRC)], build_directory=tmp,
                               verbose=False)
                os.replace(Path(tmp) / f"{name}.so", built)  # loaded already; the next process finds it
                return ext
    spec = importlib.util.spec_from_file_location(name, built)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    return ext


@contextlib.contextmanager
def _exclusive(path: Path):
    """Held by one process at a time (POSIX flock; elsewhere no lock: a duplicate build at worst)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
