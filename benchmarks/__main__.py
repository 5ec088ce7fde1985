"""`python -m benchmarks <scenario> [options]`; `python -m benchmarks <scenario> -h` for each."""
from __future__ import annotations

import importlib
import sys

SCENARIOS = {
    "readme": ("benchmarks.readme", "all of README's figures and plots, in one run (about 30 minutes)"),
    "throughput": ("benchmarks.throughput", "every system on mixed_chat_128: continuous, static, transformers, ..."),
    "latency": ("benchmarks.latency", "latency vs Poisson rate or clients, continuous vs static; p99 TTFT rate search"),
    "agent": ("benchmarks.agent_prefix", "multi-turn agent workload, prefix caching on vs off"),
    "tools": ("benchmarks.tool_calling", "tool-call accuracy per tool_choice, constrained vs not; grammar cost"),
    "adk": ("benchmarks.adk_concurrency", "ADK sessions one by one vs asyncio.gather at 1-64"),
    "kernels": ("benchmarks.kernels", "Triton paged attention on a GPU"),
    "soak": ("benchmarks.soak", "reliability soak against the live server"),
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in SCENARIOS:
        print(__doc__)
        for name, (_, what) in SCENARIOS.items():
            print(f"  {name:12s} {what}")
        sys.exit(0 if len(sys.argv) < 2 else 2)
    module = importlib.import_module(SCENARIOS[sys.argv[1]][0])
    try:
        module.main(sys.argv[2:])
    except KeyboardInterrupt:
        print("stopped; what was measured is in benchmarks/results/", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
