"""Throughput of every system on the mixed chat workload, in one run.

    python -m benchmarks throughput [--limit N] [--max-num-seqs 32] [--skip-transformers] [--skip-http]

Systems: our engine with continuous batching (offline `LLM`, online `AsyncLLM`, and through
the HTTP server), the same engine with `scheduling_policy="static"`, transformers' own
static batching, and the one-request-at-a-time loop; plus single-request decode and a
fixed-length workload (where static batching wastes nothing). Every request produces
exactly its `max_tokens` (ignore_eos), so all systems do the same useful work; throughput
is useful output tokens per second.

Writes benchmarks/results/throughput.{md,json} and throughput.png (tokens/s per system),
batch_size.png (batch size over time, continuous vs static). Ctrl-C keeps what was measured.
"""
from __future__ import annotations

import argparse
import gc

from benchmarks.report import cost_rows, keep_partial_results, markdown_table, plot_bars, plot_lines, write
from benchmarks.systems import (run_async_engine, run_engine, run_http, run_sequential, run_transformers_single,
                                run_transformers_static, served)
from benchmarks.workloads import fixed_length, load_workload
from engine import LLM, AsyncLLM, EngineConfig
from engine.loader import resolve_model_dir
from engine.config import DEFAULT_MODEL

LABELS = {"continuous": "engine, continuous batching (LLM)",
          "online": "engine, continuous batching (AsyncLLM)",
          "http": "engine, continuous batching (HTTP server)",
          "static": "engine, static batching",
          "transformers_static": "transformers static batching",
          "sequential": "engine, one request at a time"}


def _tokenize(llm: LLM, items) -> tuple[list[list[int]], list[int]]:
    prompts = [llm.tokenizer.encode(llm.engine.apply_chat_template(it.messages), add_special_tokens=False)
               for it in items]
    return prompts, [it.max_tokens for it in items]


def measure(args, data: dict) -> None:
    runs, fixed = data["runs"], data["fixed"]
    items = load_workload(args.workload, args.limit)
    fixed_items = fixed_length(args.fixed_requests)
    for policy in ("continuous", "static"):
        llm = LLM(args.model, scheduling_policy=policy, max_num_seqs=args.max_num_seqs)
        prompts, max_tokens = _tokenize(llm, items)
        llm.generate(prompts[:2], None)  # warm-up
        runs[policy] = run_engine(llm, prompts, max_tokens, LABELS[policy]).as_dict()
        fixed[policy] = run_engine(llm, *_tokenize(llm, fixed_items), f"fixed length, {policy}").as_dict()
        if policy == "continuous":
            data["single"]["engine"] = run_engine(llm, [prompts[0]], [args.single_tokens],
                                                  "engine, one request").as_dict()
            n = args.sequential_requests
            runs["sequential"] = run_sequential(llm, prompts[:n], max_tokens[:n]).as_dict()
        del llm
        gc.collect()
    online = AsyncLLM(EngineConfig(model=args.model, max_num_seqs=args.max_num_seqs))
    try:
        run_async_engine(online, prompts[:2], [4, 4], "warm-up", progress=False)
        runs["online"] = run_async_engine(online, prompts, max_tokens, LABELS["online"]).as_dict()
    finally:
        online.shutdown()
    if not args.skip_http:
        with served(args.model, "--max-num-seqs", str(args.max_num_seqs)) as (url, _):
            run_http(url, args.model, prompts[:2], [4, 4], "warm-up")
            runs["http"] = run_http(url, args.model, prompts, max_tokens, LABELS["http"]).as_dict()
    if not args.skip_transformers:
        model_dir = resolve_model_dir(args.model)
        runs["transformers_static"] = run_transformers_static(model_dir, prompts, max_tokens, args.max_num_seqs,
                                                              system=LABELS["transformers_static"]).as_dict()
        data["single"]["transformers"] = run_transformers_single(model_dir, prompts[0], args.single_tokens // 2
                                                                 ).as_dict()


def _lat(run: dict, metric: str, q: str):
    s = (run.get("latency") or {}).get(metric)
    return s[q] if s else "-"


def _eng(run: dict, key: str):
    e = run.get("engine")
    return e[key] if e else "-"


def report(args, data: dict, interrupted: bool = False) -> dict:
    runs = {k: data["runs"][k] for k in LABELS if k in data["runs"]}
    base = runs.get("continuous", {}).get("output_tokens_per_s")
    n_items = runs["continuous"]["num_requests"] if "continuous" in runs else "?"
    rows = [[LABELS[k] + (f" (first {r['num_requests']} requests)" if k == "sequential" else ""),
             r["output_tokens_per_s"], r["total_tokens_per_s"], r["requests_per_s"],
             base / r["output_tokens_per_s"] if base else "-"] for k, r in runs.items()]
    table = markdown_table([f"{args.workload} ({n_items} requests, max_num_seqs={args.max_num_seqs})",
                            "output tokens/s", "total tokens/s", "requests/s", "continuous (LLM) is x faster"], rows)
    lat_rows = [[LABELS[k], _lat(r, "ttft", "p50"), _lat(r, "ttft", "p99"), _lat(r, "itl", "p50"),
                 _lat(r, "itl", "p99"), _lat(r, "tpot", "p50"), _lat(r, "e2e", "p50"), _lat(r, "e2e", "p99"),
                 _lat(r, "queue", "p50"), _eng(r, "batch_size_peak"), _eng(r, "batch_size_mean"),
                 _eng(r, "kv_usage_peak"), _eng(r, "preemptions"), _eng(r, "prefix_cache_hit_rate")]
                for k, r in runs.items()]
    table += "\n\nSeconds; every request arrives at time 0, so TTFT includes waiting for a batch slot.\n\n"
    table += markdown_table(["system", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "TPOT p50", "e2e p50",
                             "e2e p99", "queue p50", "batch peak", "batch mean", "KV peak", "preemptions",
                             "prefix hit rate"], lat_rows)
    single = data["single"]
    if single:
        table += "\n\n" + markdown_table([f"one request, {args.single_tokens} tokens", "output tokens/s"],
                                         [[k, v["output_tokens_per_s"]] for k, v in single.items()])
    fixed = data["fixed"]
    if fixed:
        f_rows = [[k, v["output_tokens_per_s"], fixed["continuous"]["output_tokens_per_s"] / v["output_tokens_per_s"]]
                  for k, v in fixed.items()]
        table += "\n\n" + markdown_table([f"fixed length ({args.fixed_requests} requests, same prompt and output "
                                          "length)", "output tokens/s", "continuous is x faster"], f_rows)
    cost_runs = {LABELS[k]: runs[k] for k in ("continuous", "static", "transformers_static") if k in runs}
    if cost_runs:
        table += "\n\n" + markdown_table(
            ["system", "requests/s per replica", f"replicas for {args.target_rps:g} requests/s",
             f"USD per million output tokens at {args.hour_usd:g} USD/hour"],
            cost_rows(cost_runs, args.hour_usd, args.target_rps))
    if runs:
        plot_bars("throughput", "output tokens/s", {LABELS[k]: r["output_tokens_per_s"] for k, r in runs.items()},
                  title=f"{args.workload}, {args.model}")
    timelines = {k: runs[k]["engine"]["timeline"] for k in ("continuous", "static") if k in runs}
    if timelines:
        plot_lines("batch_size", "seconds since start", "requests in the forward pass",
                   {f"{k} batching": ([t for t, _ in tl], [b for _, b in tl]) for k, tl in timelines.items()},
                   markers=False, title=f"Batch size over time ({args.workload}, max_num_seqs={args.max_num_seqs})")
    write("throughput", "Throughput: every system on the same requests", table, data, interrupted)
    return data


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--workload", default="mixed_chat_128")
    ap.add_argument("--limit", type=int, default=None, help="first N requests only")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--single-tokens", type=int, default=256)
    ap.add_argument("--sequential-requests", type=int, default=16,
                    help="the one-at-a-time loop runs the first N requests (its rate does not depend on N)")
    ap.add_argument("--fixed-requests", type=int, default=64)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--hour-usd", "--gpu-hour-usd", dest="hour_usd", type=float, default=1.0,
                    help="price of one machine (GPU) hour, for the cost table")
    ap.add_argument("--target-rps", type=float, default=10.0, help="request rate the replicas must sustain")
    args = ap.parse_args(argv)
    data = {"model": args.model, "workload": args.workload, "max_num_seqs": args.max_num_seqs,
            "runs": {}, "single": {}, "fixed": {}}
    with keep_partial_results(lambda interrupted: report(args, data, interrupted)):
        measure(args, data)
    return report(args, data)


if __name__ == "__main__":
    main()
