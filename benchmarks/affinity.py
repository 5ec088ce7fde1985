"""Prefix-cache affinity across replicas: the same multi-turn agent conversations against two
replicas, routed round-robin (each turn to the next replica) or with session affinity (a
conversation sticks to one replica, as Cloud Run's session affinity cookie does).

    python -m benchmarks affinity [--model smollm2-135m-instruct] [--sessions 16] [--turns 4]

Each mode starts two fresh replicas (cold prefix caches) as subprocesses on 127.0.0.1.
Every turn re-sends the conversation so far (the shared system prompt with tool
declarations, then the turns); each replica's prefix cache can only serve what it has
seen. Reports the replicas' prefix-cache hit rate (from their /metrics) and the
client-side time to first token. Bounded in count: it stops by itself.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

from benchmarks.report import markdown_table, percentile, plot_bars, write
from benchmarks.soak import _metric
from benchmarks.systems import served_together
from benchmarks.workloads import AGENT_SYSTEM_PROMPT, agent_sessions
from engine.config import DEFAULT_MODEL


async def _turn(client: httpx.AsyncClient, url: str, model: str, messages: list[dict],
                max_tokens: int) -> tuple[float, str]:
    """One streamed chat call: (seconds to the first content, the reply)."""
    start, first, text = time.perf_counter(), None, ""
    async with client.stream("POST", url + "/v1/chat/completions", json={
            "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            if delta and first is None:
                first = time.perf_counter() - start
            text += delta
    return (first if first is not None else time.perf_counter() - start), text


async def _conversations(urls: list[str], model: str, sessions: int, turns: int, max_tokens: int,
                         affinity: bool) -> list[float]:
    histories = [[{"role": "system", "content": AGENT_SYSTEM_PROMPT}] for _ in range(sessions)]
    questions = agent_sessions(sessions, turns)
    ttfts = []
    async with httpx.AsyncClient(timeout=600) as client:
        for t in range(turns):  # every conversation takes its next turn, all at once
            routed = []
            for s in range(sessions):
                histories[s].append({"role": "user", "content": questions[s][t]})
                # affinity: a conversation stays on its replica; round robin: each of its turns
                # lands on the next replica after the one that served its previous turn
                routed.append(urls[s % len(urls)] if affinity else urls[(s + t) % len(urls)])
            results = await asyncio.gather(*(_turn(client, routed[s], model, histories[s], max_tokens)
                                             for s in range(sessions)))
            for s, (ttft, text) in enumerate(results):
                ttfts.append(ttft)
                histories[s].append({"role": "assistant", "content": text})
    return ttfts


def run_mode(model: str, affinity: bool, sessions: int, turns: int, max_tokens: int, replicas: int = 2) -> dict:
    with served_together(replicas, model, "--agents-dir", "agents") as servers:
        urls = [url for url, _ in servers]
        start = time.perf_counter()
        ttfts = asyncio.run(_conversations(urls, model, sessions, turns, max_tokens, affinity))
        seconds = time.perf_counter() - start
        scraped = [httpx.get(u + "/metrics", timeout=30).text for u in urls]
    queries = sum(_metric(m, "vllm:prefix_cache_queries_total") for m in scraped)
    hits = sum(_metric(m, "vllm:prefix_cache_hits_total") for m in scraped)
    prompt = sum(_metric(m, "vllm:prompt_tokens_total") for m in scraped)
    return {"routing": "session affinity" if affinity else "round robin", "calls": len(ttfts),
            "hit_rate": hits / max(1.0, queries), "prompt_tokens": prompt, "prefill_tokens_computed": prompt - hits,
            "ttft_p50": statistics.median(ttfts), "ttft_p90": percentile(sorted(ttfts), 90), "seconds": seconds}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    runs = [run_mode(args.model, affinity, args.sessions, args.turns, args.max_tokens) for affinity in (False, True)]
    rows = [[r["routing"], r["calls"], r["hit_rate"], r["prefill_tokens_computed"], r["ttft_p50"], r["ttft_p90"],
             r["seconds"]] for r in runs]
    table = markdown_table(["routing", "model calls", "prefix-cache hit rate", "prefill tokens computed",
                            "TTFT p50 (s)", "TTFT p90 (s)", "wall (s)"], rows)
    write("affinity", f"Two replicas, {args.sessions} conversations x {args.turns} turns ({args.model})", table,
          {"model": args.model, "runs": runs})
    plot_bars("affinity", "prefix-cache hit rate", {r["routing"]: r["hit_rate"] for r in runs},
              title="Prefix-cache hits across two replicas")
    return runs


if __name__ == "__main__":
    main()
