"""Triton paged-attention kernels on a GPU, on a Llama-3-8B-shaped layer (32 query heads,
8 KV heads, head_dim 128, bf16, block size 16).

    python -m benchmarks.kernels [--batches 1,8,32,128,256] [--contexts 512,2048,8192,32768]

Decode: achieved GB/s of K/V read against this card's measured device-to-device copy
bandwidth. Prefill: causal attention TFLOP/s. Needs CUDA (the interpreter is far too slow).
"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.report import markdown_table, write

H, HKV, D, BS = 32, 8, 128, 16


def time_ms(fn, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def copy_bandwidth_gbs() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (time_ms(lambda: dst.copy_(src)) / 1e3) / 1e9


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32,128,256")
    ap.add_argument("--contexts", default="512,2048,8192,32768")
    ap.add_argument("--prefill-lens", default="1024,4096")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.kernels needs a CUDA GPU; the kernels' correctness tests run on CPU in the interpreter")
    from engine_kernels.triton_attention import paged_attention

    copy_gbs = copy_bandwidth_gbs()
    rows, data = [], {"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs, "decode": [], "prefill": []}
    for ctx in map(int, args.contexts.split(",")):
        for batch in map(int, args.batches.split(",")):
            blocks = batch * ctx // BS
            if blocks * BS * HKV * D * 2 * 2 > 0.6 * torch.cuda.mem_get_info()[0]:
                continue
            k_cache = torch.randn(blocks, BS, HKV, D, dtype=torch.bfloat16, device="cuda")
            v_cache = torch.randn_like(k_cache)
            tables = torch.randperm(blocks, device="cuda", dtype=torch.int32).view(batch, ctx // BS)
            q = torch.randn(batch, H, D, dtype=torch.bfloat16, device="cuda")
            starts = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
            lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
            ms = time_ms(lambda: paged_attention(q, k_cache, v_cache, starts, lens, tables, D ** -0.5, 1, ctx))
            gbs = 2 * batch * ctx * HKV * D * 2 / (ms / 1e3) / 1e9
            data["decode"].append({"batch": batch, "context": ctx, "ms": ms, "gbs": gbs})
            rows.append(["decode", batch, ctx, ms, gbs, 100 * gbs / copy_gbs])
            del k_cache, v_cache
    for n in map(int, args.prefill_lens.split(",")):
        blocks = n // BS
        k_cache = torch.randn(blocks, BS, HKV, D, dtype=torch.bfloat16, device="cuda")
        v_cache = torch.randn_like(k_cache)
        tables = torch.arange(blocks, dtype=torch.int32, device="cuda").view(1, blocks)
        q = torch.randn(n, H, D, dtype=torch.bfloat16, device="cuda")
        starts = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        lens = torch.tensor([n], dtype=torch.int32, device="cuda")
        ms = time_ms(lambda: paged_attention(q, k_cache, v_cache, starts, lens, tables, D ** -0.5, n, n), 5)
        tflops = 4 * n * n / 2 * H * D / (ms / 1e3) / 1e12
        data["prefill"].append({"tokens": n, "ms": ms, "tflops": tflops})
        rows.append(["prefill", 1, n, ms, f"{tflops:.1f} TFLOP/s", ""])
    table = markdown_table(["kind", "batch", "context", "ms", "GB/s of K/V (decode)", "% of copy bandwidth"], rows)
    write("kernels", f"Triton paged attention on {data['device']} (copy bandwidth {copy_gbs:.0f} GB/s)", table, data)
    return data


if __name__ == "__main__":
    main()
