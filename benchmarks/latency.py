"""Latency under load: Poisson arrivals at rising rates into AsyncLLM, continuous vs static
batching. Time to first token and end-to-end latency (p50, p99) against request rate.

    python -m benchmarks latency [--rates 1,2,4,6] [--requests 64]

Writes benchmarks/results/latency.{md,json,png}.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from benchmarks.report import markdown_table, percentile, plot_lines, write
from benchmarks.workloads import load_workload, poisson_arrivals
from engine import AsyncLLM, EngineConfig, SamplingParams


async def _run_at_rate(engine: AsyncLLM, prompts, max_tokens, rate: float, seed: int) -> dict:
    arrivals = poisson_arrivals(len(prompts), rate, seed)
    start = time.perf_counter()

    async def one(i):
        await asyncio.sleep(max(0.0, arrivals[i] - (time.perf_counter() - start)))
        last = None
        async for out in engine.generate(prompts[i], SamplingParams(temperature=0, max_tokens=max_tokens[i],
                                                                    ignore_eos=True)):
            last = out
        return last.metrics

    metrics = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    seconds = time.perf_counter() - start
    ttft = [m.time_to_first_token for m in metrics]
    e2e = [m.e2e_latency for m in metrics]
    return {"rate": rate, "seconds": seconds, "output_tokens_per_s": sum(max_tokens) / seconds,
            "ttft_p50": statistics.median(ttft), "ttft_p99": percentile(ttft, 99),
            "e2e_p50": statistics.median(e2e), "e2e_p99": percentile(e2e, 99),
            "queue_p50": statistics.median(m.time_in_queue for m in metrics)}


def run(model: str, rates: list[float], num_requests: int, max_num_seqs: int, seed: int = 0,
        workload: str = "mixed_chat_128", **engine_options) -> dict:
    items = load_workload(workload, num_requests)
    results = {}
    for policy in ("continuous", "static"):
        engine = AsyncLLM(EngineConfig(model=model, scheduling_policy=policy, max_num_seqs=max_num_seqs,
                                       **engine_options))
        try:
            prompts = [engine.engine.apply_chat_template(it.messages) for it in items]
            max_tokens = [it.max_tokens for it in items]
            results[policy] = [asyncio.run(_run_at_rate(engine, prompts, max_tokens, r, seed)) for r in rates]
        finally:
            engine.shutdown()
    return results


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rates", default="1,2,4,6")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    results = run(args.model, rates, args.requests, args.max_num_seqs)
    rows = [[policy, r["rate"], r["output_tokens_per_s"], r["ttft_p50"], r["ttft_p99"], r["e2e_p50"], r["e2e_p99"]]
            for policy, runs in results.items() for r in runs]
    table = markdown_table(["policy", "requests/s", "output tokens/s", "TTFT p50 s", "TTFT p99 s", "e2e p50 s",
                            "e2e p99 s"], rows)
    plot_lines("latency", "request rate (requests/s)", "seconds",
               {f"{p} TTFT p99": ([r["rate"] for r in runs], [r["ttft_p99"] for r in runs])
                for p, runs in results.items()} |
               {f"{p} e2e p50": ([r["rate"] for r in runs], [r["e2e_p50"] for r in runs])
                for p, runs in results.items()}, log_y=True)
    write("latency", f"Latency under Poisson load ({args.model}, {args.requests} requests of "
                     f"mixed_chat_128, max_num_seqs={args.max_num_seqs})", table, {"results": results})
    return results


if __name__ == "__main__":
    main()
