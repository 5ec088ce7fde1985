"""Latency under load into AsyncLLM, continuous vs static batching: Poisson arrivals at
rising rates (or a closed loop of N clients), and a search for the highest rate at which
continuous batching keeps p99 time to first token under a bound.

    python -m benchmarks latency [--rates 1,2,4,8,16,32] [--requests 48] [--ttft-bound 1.0]
    python -m benchmarks latency --concurrency 1,4,16,32

For each point: TTFT, inter-token latency, time per output token, end-to-end latency and
queue time (mean, p50, p90, p99), batch size, KV usage, preemptions. Writes
benchmarks/results/latency.{md,json,png}. Ctrl-C keeps what was measured.
"""
from __future__ import annotations

import argparse

from benchmarks.report import keep_partial_results, markdown_table, plot_lines, write
from benchmarks.systems import run_async_engine
from benchmarks.workloads import load_workload, poisson_arrivals
from engine import AsyncLLM, EngineConfig

POLICIES = ("continuous", "static")


def _point(engine: AsyncLLM, prompts, max_tokens, x: float, mode: str, seed: int) -> dict:
    if mode == "rate":
        run = run_async_engine(engine, prompts, max_tokens, f"rate {x:g}/s", poisson_arrivals(len(prompts), x, seed))
    else:
        run = run_async_engine(engine, prompts, max_tokens, f"{int(x)} clients", concurrency=int(x))
    return {mode: x} | run.as_dict()


def highest_passing(points: list[dict], key: str, bound: float) -> tuple[float | None, float | None]:
    """(highest measured rate whose p99 TTFT is under `bound`, lowest rate above it that is not)."""
    ok = [p[key] for p in points if p["latency"]["ttft"]["p99"] < bound]
    best = max(ok, default=None)
    above = [p[key] for p in points if p["latency"]["ttft"]["p99"] >= bound and (best is None or p[key] > best)]
    return best, min(above, default=None)


def measure(args, data: dict) -> None:
    items = load_workload(args.workload, args.requests)
    xs = [float(x) for x in (args.rates if args.mode == "rate" else args.concurrency).split(",")]
    for policy in POLICIES:
        engine = AsyncLLM(EngineConfig(model=args.model, scheduling_policy=policy, max_num_seqs=args.max_num_seqs))
        try:
            prompts = [engine.engine.apply_chat_template(it.messages) for it in items]
            max_tokens = [it.max_tokens for it in items]
            run_async_engine(engine, prompts[:2], [4, 4], "warm-up", progress=False)
            points = data["points"].setdefault(policy, [])
            for x in xs:
                points.append(_point(engine, prompts, max_tokens, x, args.mode, args.seed))
            if args.mode != "rate":
                continue
            search = data["search"]
            if policy == "continuous":  # bisect between the last passing and the first failing rate
                lo, hi = highest_passing(points, "rate", args.ttft_bound)
                for _ in range(args.search_steps if lo is not None and hi is not None else 0):
                    mid = round((lo + hi) / 2, 2)
                    points.append(_point(engine, prompts, max_tokens, mid, "rate", args.seed))
                    lo, hi = highest_passing(points, "rate", args.ttft_bound)
                search["rate"], search["all_passed"] = lo, hi is None
            elif search.get("rate") is not None and search["rate"] not in xs:
                points.append(_point(engine, prompts, max_tokens, search["rate"], "rate", args.seed))
            points.sort(key=lambda p: p["rate"])
        finally:
            engine.shutdown()


def report(args, data: dict, interrupted: bool = False) -> dict:
    key = args.mode
    rows = [[policy, p[key], p["output_tokens_per_s"], p["latency"]["ttft"]["p50"], p["latency"]["ttft"]["p99"],
             p["latency"]["itl"]["p50"], p["latency"]["itl"]["p99"], p["latency"]["e2e"]["p50"],
             p["latency"]["e2e"]["p99"], p["latency"]["queue"]["p99"], p["engine"]["batch_size_mean"],
             p["engine"]["kv_usage_peak"], p["engine"]["preemptions"]]
            for policy, points in data["points"].items() for p in points]
    xlabel = "requests/s" if key == "rate" else "clients"
    table = markdown_table(["policy", xlabel, "output tokens/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
                            "e2e p50", "e2e p99", "queue p99", "batch mean", "KV peak", "preemptions"], rows)
    search = data.get("search") or {}
    rate = search.get("rate")
    at = {policy: next((p for p in points if p.get("rate") == rate), None) for policy, points in data["points"].items()}
    c, s = at.get("continuous"), at.get("static")
    if rate is not None and c is not None:
        line = (f"\n\nHighest rate measured with continuous batching's p99 TTFT under {args.ttft_bound:g} s: "
                f"**{rate:g} requests/s**{' (every rate passed: raise --rates)' if search.get('all_passed') else ''}"
                f" (p99 TTFT {c['latency']['ttft']['p99']:.3g} s)")
        if s:
            ratio = s["latency"]["ttft"]["p99"] / c["latency"]["ttft"]["p99"]
            line += f"; static batching at that rate: p99 TTFT {s['latency']['ttft']['p99']:.3g} s, {ratio:.0f}x higher."
        table += line
    elif data["points"].get("continuous") and args.mode == "rate":
        table += f"\n\nNo measured rate kept continuous batching's p99 TTFT under {args.ttft_bound:g} s: lower --rates."
    series = {}
    for policy, points in data["points"].items():
        xs = [p[key] for p in points]
        series[f"{policy} TTFT p99"] = (xs, [p["latency"]["ttft"]["p99"] for p in points])
        series[f"{policy} e2e p50"] = (xs, [p["latency"]["e2e"]["p50"] for p in points])
    if series:
        plot_lines("latency", f"load ({xlabel})", "seconds", series, log_y=True,
                   title=f"{args.workload} ({args.requests} requests), max_num_seqs={args.max_num_seqs}")
    title = (f"Latency under {'Poisson' if key == 'rate' else 'closed-loop'} load ({args.model}, {args.requests} "
             f"requests of {args.workload}, max_num_seqs={args.max_num_seqs}, seconds)")
    write("latency", title, table, data, interrupted)
    return data


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--workload", default="mixed_chat_128")
    ap.add_argument("--rates", default="1,2,4,8,16,32", help="Poisson request rates (requests/s)")
    ap.add_argument("--concurrency", default=None, help="closed loop instead: numbers of clients, e.g. 1,4,16")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--ttft-bound", type=float, default=1.0, help="p99 TTFT bound (s) for the rate search")
    ap.add_argument("--search-steps", type=int, default=2, help="bisection steps between measured rates")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.mode = "concurrency" if args.concurrency else "rate"
    data = {"model": args.model, "mode": args.mode, "points": {}, "search": {}}
    with keep_partial_results(lambda interrupted: report(args, data, interrupted)):
        measure(args, data)
    return report(args, data)


if __name__ == "__main__":
    main()
