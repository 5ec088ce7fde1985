"""Multi-turn agent traffic with and without automatic prefix caching: every model call
re-sends the shared system prompt, the tool declarations and the conversation so far.

    python -m benchmarks agent [--sessions 8] [--turns 4]

Reports prompt tokens sent, prompt tokens actually computed (prefill), and wall time.
"""
from __future__ import annotations

import argparse
import time

from benchmarks.report import keep_partial_results, markdown_table, write
from benchmarks.workloads import AGENT_SYSTEM_PROMPT, agent_sessions
from engine import LLM, SamplingParams
from engine.config import DEFAULT_MODEL


def run(model: str, sessions: int, turns: int, max_tokens: int, caching: bool, **engine_options) -> dict:
    llm = LLM(model, enable_prefix_caching=caching, **engine_options)
    engine = llm.engine
    histories = [[{"role": "system", "content": AGENT_SYSTEM_PROMPT}] for _ in range(sessions)]
    questions = agent_sessions(sessions, turns)
    sent = computed = 0
    start = time.perf_counter()
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    for t in range(turns):  # each turn: every session makes one model call, all in one batch
        for s in range(sessions):
            histories[s].append({"role": "user", "content": questions[s][t]})
        outs = llm.chat(histories, params)
        for s, out in enumerate(outs):
            sent += len(out.prompt_token_ids)
            computed += len(out.prompt_token_ids) - out.metrics.num_cached_tokens
            histories[s].append({"role": "assistant", "content": out.outputs[0].text})
    return {"prefix_caching": caching, "prompt_tokens_sent": sent, "prefill_tokens_computed": computed,
            "seconds": time.perf_counter() - start, "hit_rate": engine.stats()["prefix_cache_hits"] /
            max(1, engine.stats()["prefix_cache_queries"])}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    data: dict = {}

    def report(interrupted: bool = False) -> dict:
        rows = [[k, r["prompt_tokens_sent"], r["prefill_tokens_computed"], r["hit_rate"], r["seconds"]]
                for k, r in data.items() if k in ("off", "on")]
        table = markdown_table(["prefix caching", "prompt tokens sent", "prefill tokens computed",
                                "prefix-cache hit rate", "seconds"], rows)
        if "on" in data:
            data["prefill_cut"] = 1 - data["on"]["prefill_tokens_computed"] / data["off"]["prefill_tokens_computed"]
            table += f"\n\nPrefix caching cut the prefill tokens computed by {100 * data['prefill_cut']:.0f}%."
        write("agent_prefix", f"Multi-turn agent workload ({args.sessions} sessions x {args.turns} turns)", table,
              data, interrupted)
        return data

    with keep_partial_results(report):
        for key, caching in (("off", False), ("on", True)):
            data[key] = run(args.model, args.sessions, args.turns, args.max_tokens, caching)
    return report()


if __name__ == "__main__":
    main()
