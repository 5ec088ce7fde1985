"""Latency against concurrency, read from the spans the server exports (the picture a Cloud
Trace query draws, made locally).

    python -m benchmarks spans [--model smollm2-135m-instruct] [--levels 1 2 4 8 16 32]

The server runs as a subprocess on 127.0.0.1 with only OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
set, pointing at an OTLP receiver in this process. At each concurrency level C, C clients
each send `--rounds` chat requests back to back (64 tokens each); every request's e2e
latency, queue time and TTFT come from its `llm_request` span. With continuous batching
the latency grows far less than the concurrency: the plot shows it beside the line a
one-at-a-time server would follow (C x the latency at C = 1).
Bounded in count: it stops by itself.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

from benchmarks.otlp_receiver import OtlpReceiver
from benchmarks.report import markdown_table, percentile, plot_lines, write
from benchmarks.systems import served
from engine.config import DEFAULT_MODEL


async def _level(url: str, model: str, concurrency: int, rounds: int, max_tokens: int) -> list[str]:
    """Runs the level; returns the response ids' usage-checked count per client."""
    async with httpx.AsyncClient(timeout=300) as client:
        async def one_client(c: int) -> int:
            done = 0
            for r in range(rounds):
                resp = await client.post(url + "/v1/chat/completions", json={
                    "model": model, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Client {c}, round {r}: tell me a story."}]})
                resp.raise_for_status()
                done += 1
            return done
        return await asyncio.gather(*(one_client(c) for c in range(concurrency)))


def run(model: str, levels: list[int], rounds: int, max_tokens: int) -> dict:
    receiver = OtlpReceiver()
    results = {}
    try:
        with served(model, "--agents-dir", "agents", "--max-num-seqs", str(max(levels)),
                    env={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url + "/v1/traces",
                         "OTEL_BSP_SCHEDULE_DELAY": "200"}) as (url, _):
            for level in levels:
                seen = len(receiver.spans)
                start = time.time()
                asyncio.run(_level(url, model, level, rounds, max_tokens))
                expected = level * rounds
                deadline = time.time() + 30
                while sum(s["name"] == "llm_request" for s in receiver.spans[seen:]) < expected:
                    assert time.time() < deadline, "spans were not exported"
                    time.sleep(0.1)
                spans = [s["attributes"] for s in receiver.spans[seen:] if s["name"] == "llm_request"]
                e2e = sorted(a["gen_ai.latency.e2e"] for a in spans)
                results[level] = {
                    "requests": len(spans), "seconds": time.time() - start,
                    "e2e_p50": statistics.median(e2e), "e2e_p90": percentile(e2e, 90),
                    "ttft_p50": statistics.median(a["gen_ai.response.time_to_first_chunk"] for a in spans),
                    "queue_p50": statistics.median(a["gen_ai.latency.time_in_queue"] for a in spans),
                    "tokens_per_s": sum(a["gen_ai.usage.output_tokens"] for a in spans) / (time.time() - start)}
                print(f"concurrency {level}: e2e p50 {results[level]['e2e_p50']:.2f} s", flush=True)
    finally:
        receiver.close()
    return results


def report(model: str, results: dict, max_tokens: int) -> None:
    levels = sorted(results)
    base = results[levels[0]]["e2e_p50"]
    rows = [[c, r["requests"], r["e2e_p50"], r["e2e_p90"], r["ttft_p50"], r["queue_p50"],
             r["e2e_p50"] / base, float(c), r["tokens_per_s"]] for c, r in sorted(results.items())]
    table = markdown_table(["concurrency", "requests", "e2e p50 (s)", "e2e p90 (s)", "TTFT p50 (s)",
                            "queue p50 (s)", "e2e vs C=1", "concurrency vs C=1", "tokens/s"], rows)
    write("span_latency", f"e2e latency against concurrency, from exported spans ({model}, {max_tokens} tokens)",
          table, {"model": model, "results": {str(k): v for k, v in results.items()}})
    plot_lines("span_latency", "concurrent clients", "e2e latency (s), from spans", {
        "this engine, p50": (levels, [results[c]["e2e_p50"] for c in levels]),
        "this engine, p90": (levels, [results[c]["e2e_p90"] for c in levels]),
        "one at a time (C x latency at C=1)": (levels, [base * c for c in levels])},
        log_y=True, title="Latency grows far less than concurrency (continuous batching)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    report(args.model, run(args.model, args.levels, args.rounds, args.max_tokens), args.max_tokens)


if __name__ == "__main__":
    main()
