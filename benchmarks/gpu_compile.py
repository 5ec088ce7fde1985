"""`python -m benchmarks gpu-compile`: every Triton kernel configuration the engine can launch,
compiled ahead of time for an L4 (sm_89) and an H100 (sm_90) on this machine, GPU or not;
a table of shared memory, registers and stack (spills) per configuration, and what breaks a
limit. Exits 1 if anything fails to compile or breaks a limit."""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks gpu-compile", description=__doc__)
    ap.add_argument("--targets", nargs="*", default=None, help="sm_89, sm_90 (default: both)")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # the interpreter compiles nothing
    import triton
    from tqdm import tqdm

    from engine_kernels import triton_compile as tc
    targets = tuple(args.targets or tc.TARGETS)
    configs = tc.kernel_configs()
    with tqdm(total=len(configs) * len(targets), desc="compiling", file=sys.stderr) as bar:
        done, failures = tc.compile_all(configs, targets, progress=bar.update)
    print(f"Triton {triton.__version__}, targets {', '.join(targets)}; shared memory limit per block: "
          + ", ".join(f"{t} {tc.TARGETS[t][1] // 1024} KB" for t in targets) + "\n")
    print("| kernel | configuration | dtype | target | shared (KB) | registers | stack (B) |")
    print("|---|---|---|---|---:|---:|---:|")
    for r in done:
        print(f"| {r.config.kernel} | {r.config.variant} | {r.config.dtype} | {r.target} | "
              f"{r.shared_bytes / 1024:.1f} | {r.registers} | {r.spill_bytes} |")
    print(f"\n{len(done)} compiled, {len(failures)} problems")
    for failure in failures:
        print("-", failure)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
