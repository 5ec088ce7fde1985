"""Agent programs with tool calls, program scheduling off vs on: job completion time.

    python -m benchmarks programs [--short 12] [--long 4] [--tool-s 0.5]

Each program is one agent run: a system prompt and a question, then model calls separated
by tool calls (a sleep of --tool-s), each call's prompt the conversation so far plus the
tool's result. Short programs make 2 calls, long ones 6; all start together and share one
AsyncLLM, so the batch is full and calls queue. Reports each kind's job completion time
(mean, p90) and the prompt tokens the prefix cache held, with `program_scheduling` off
(first come, first served; LRU prefix cache) and on (attained service; KV kept across tool
calls). Same model, same calls, same seeds.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from benchmarks.report import keep_partial_results, machine, markdown_table, write
from benchmarks.workloads import AGENT_SYSTEM_PROMPT
from engine import AsyncLLM, SamplingParams
from engine.config import DEFAULT_MODEL


async def _program(llm: AsyncLLM, name: str, calls: int, tool_s: float, max_tokens: int) -> tuple[float, int, int]:
    """(seconds from start to its last token, prompt tokens sent, of them cached)."""
    start = time.perf_counter()
    ids = llm.engine.tokenizer.encode(f"{AGENT_SYSTEM_PROMPT}\nUser ({name}): plan the trip, step by step.\n")
    sent = cached = 0
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for call in range(calls):
        out = None
        async for out in llm.generate(ids, params, program=name):
            pass
        sent += len(out.prompt_token_ids)
        cached += out.metrics.num_cached_tokens
        if call + 1 < calls:  # the tool runs; its result joins the conversation
            await asyncio.sleep(tool_s)
            ids = ids + out.outputs[0].token_ids + llm.engine.tokenizer.encode(f"\nTool result {call}: ok.\n")
    return time.perf_counter() - start, sent, cached


async def _run(model: str, on: bool, short: int, long: int, tool_s: float, max_tokens: int, **options) -> dict:
    llm = AsyncLLM(model=model, program_scheduling=on, **options)
    try:
        jobs = [("long", f"long-{i}", 6) for i in range(long)] + [("short", f"short-{i}", 2) for i in range(short)]
        results = await asyncio.gather(*[_program(llm, name, calls, tool_s, max_tokens) for _, name, calls in jobs])
    finally:
        llm.shutdown()
    out: dict = {}
    for kind in ("short", "long"):
        times = sorted(r[0] for (k, _, _), r in zip(jobs, results) if k == kind)
        out[kind] = {"mean_s": statistics.mean(times), "p90_s": times[min(len(times) - 1, int(0.9 * len(times)))]}
    out["cached_share"] = sum(r[2] for r in results) / sum(r[1] for r in results)
    out["all_mean_s"] = statistics.mean(r[0] for r in results)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks programs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--short", type=int, default=12)
    ap.add_argument("--long", type=int, default=4)
    ap.add_argument("--tool-s", type=float, default=0.5)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-num-seqs", type=int, default=4, help="a small batch, so that calls queue")
    ap.add_argument("--num-kv-blocks", type=int, default=160, help="a small cache, so that eviction matters")
    args = ap.parse_args(argv)
    data: dict = {"machine": machine()}

    def report(interrupted: bool = False) -> dict:
        rows = [[k, r["short"]["mean_s"], r["short"]["p90_s"], r["long"]["mean_s"], r["long"]["p90_s"],
                 r["all_mean_s"], r["cached_share"]] for k, r in data.items() if k in ("off", "on")]
        table = markdown_table(["program scheduling", "short: mean JCT (s)", "short: p90", "long: mean JCT (s)",
                                "long: p90", "all: mean", "prompt tokens cached"], rows)
        write("agent_programs", f"Agent programs ({args.short} short x 2 calls, {args.long} long x 6 calls, "
              f"tools {args.tool_s} s, batch {args.max_num_seqs})", table, data, interrupted)
        return data

    with keep_partial_results(report):
        for key, on in (("off", False), ("on", True)):
            data[key] = asyncio.run(_run(args.model, on, args.short, args.long, args.tool_s, args.max_tokens,
                                         max_num_seqs=args.max_num_seqs, num_kv_blocks=args.num_kv_blocks,
                                         max_model_len=min(2048, 16 * args.num_kv_blocks)))
            print(key, data[key], flush=True)
    return report()


if __name__ == "__main__":
    main()
