"""C++ CPU kernels (engine_kernels/csrc/: cpu_ops.cpp, quant_ops.cpp, kv_int8_ops.cpp), built on first use and cached by torch.

`load()` returns the compiled module, or None when no compiler is available, in which case
callers use the plain-torch reference paths. Set ENGINE_CPU_KERNELS=0 to force that.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("cpu_ops.cpp", "quant_ops.cpp", "kv_int8_ops.cpp")]
_HEADERS = [Path(__file__).parent / "csrc" / "vec.h"]  # in the digest: a change rebuilds


@functools.cache
def load():
    if os.environ.get("ENGINE_CPU_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load as load_ext
        import hashlib
        digest = hashlib.sha1(b"".join(p.read_bytes() for p in _SOURCES + _HEADERS)).hexdigest()[:10]
        name = f"engine_cpu_ops_{digest}"
        _clear_stale_build_lock(name)
        log.info("loading the C++ CPU kernels (compiled once per machine, about 30 s)")
        return load_ext(name=name, sources=[str(p) for p in _SOURCES],
                        extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
                        extra_ldflags=["-fopenmp"],
                        verbose=False)
    except Exception as exc:  # no compiler, no ninja: fall back to the torch reference
        log.warning("CPU kernels unavailable (%s); using the torch reference paths", exc)
        return None


_STALE_LOCK_S = 15 * 60  # a build takes about a minute here


def _clear_stale_build_lock(name: str) -> None:
    """torch holds a `lock` file in the build folder while it compiles, and a process killed
    mid-build leaves it behind: every later start then waits on it forever, silently. A lock
    older than any build is removed (with a warning)."""
    import time

    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > _STALE_LOCK_S:
        log.warning("removing a stale build lock left %.0f min ago by an interrupted build: %s", age / 60, lock)
        lock.unlink(missing_ok=True)
