"""ADK sessions one after another (the "bad" loop) vs all at once (`asyncio.gather` over
`Runner.run_async`), through the in-process engine.

    python -m benchmarks.adk_concurrency [--levels 1,2,4,8,16,32,64] [--max-tokens 64]

Every session asks one question with SSE streaming; all of them land in the engine's one
shared batch. Prints output tokens/s and per-session end-to-end latency (p50, p99).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from tqdm.auto import tqdm

import adk_backend  # noqa: F401  (registers engine/ models)
from benchmarks.report import keep_partial_results, markdown_table, percentile, write
from google.adk.agents import LlmAgent
from google.adk.agents.run_config import RunConfig, StreamingMode
from google.adk.runners import InMemoryRunner
from google.genai import types

TOPICS = ["the moon", "bread", "rivers", "owls", "chess", "volcanoes", "tea", "bicycles", "glaciers", "music",
          "bees", "libraries", "deserts", "trains", "coral", "maps"]


async def one_session(runner: InMemoryRunner, i: int) -> tuple[float, int]:
    session = await runner.session_service.create_session(app_name="bench", user_id=f"u{i}")
    start, tokens = time.perf_counter(), 0
    msg = types.Content(role="user", parts=[types.Part(text=f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}.")])
    async for ev in runner.run_async(user_id=f"u{i}", session_id=session.id, new_message=msg,
                                     run_config=RunConfig(streaming_mode=StreamingMode.SSE, max_llm_calls=3)):
        if not ev.partial and ev.usage_metadata:
            tokens += ev.usage_metadata.candidates_token_count or 0
    return time.perf_counter() - start, tokens


async def sequential(runner, n: int):
    start = time.perf_counter()
    results = [await one_session(runner, i) for i in tqdm(range(n), desc="one by one")]
    return time.perf_counter() - start, results


async def concurrent(runner, n: int):
    start = time.perf_counter()
    results = await asyncio.gather(*(one_session(runner, i) for i in range(n)))
    return time.perf_counter() - start, results


def summarize(label: str, seconds: float, results) -> dict:
    lat = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {"label": label, "sessions": len(results), "seconds": seconds, "output_tokens": tokens,
            "tokens_per_s": tokens / seconds, "p50_latency_s": statistics.median(lat),
            "p99_latency_s": percentile(lat, 99)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="engine/smollm2-135m-instruct")
    ap.add_argument("--levels", default="1,2,4,8,16,32,64")
    ap.add_argument("--sequential-sessions", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    agent = LlmAgent(name="bench", model=args.model, instruction="You are a helpful assistant.",
                     generate_content_config=types.GenerateContentConfig(max_output_tokens=args.max_tokens))
    runner = InMemoryRunner(agent=agent, app_name="bench")
    asyncio.run(one_session(runner, 0))  # load the model and warm up
    data: dict = {"sequential": None, "concurrent": []}

    def report(interrupted: bool = False) -> dict:
        seq = data["sequential"]
        rows = [] if seq is None else [[seq["label"], 1, seq["tokens_per_s"], 1.0, seq["p50_latency_s"],
                                        seq["p99_latency_s"], 1.0]]
        rows += [[r["label"], r["concurrency"], r["tokens_per_s"], r["tokens_per_s"] / seq["tokens_per_s"],
                  r["p50_latency_s"], r["p99_latency_s"], r["p50_latency_s"] / seq["p50_latency_s"]]
                 for r in data["concurrent"]]
        table = markdown_table(["ADK sessions", "concurrency", "output tokens/s", "x sequential", "p50 e2e s",
                                "p99 e2e s", "p50 x sequential"], rows)
        write("adk_concurrency", f"ADK Runner.run_async through the engine ({args.model}, "
                                 f"max_output_tokens={args.max_tokens})", table, data, interrupted)
        return data

    with keep_partial_results(report):
        data["sequential"] = summarize("one after another", *asyncio.run(sequential(runner, args.sequential_sessions)))
        for level in tqdm([int(x) for x in args.levels.split(",")], desc="asyncio.gather"):
            res = summarize("asyncio.gather", *asyncio.run(concurrent(runner, level)))
            data["concurrent"].append(res | {"concurrency": level})
    return report()

if __name__ == "__main__":
    main()
