"""`python -m benchmarks <scenario> [options]`; `python -m benchmarks <scenario> -h` for each."""
from __future__ import annotations

import importlib
import sys

SCENARIOS = {
    "throughput": ("benchmarks.throughput", "continuous vs static vs transformers on mixed_chat_128"),
    "latency": ("benchmarks.latency", "TTFT and e2e latency vs Poisson request rate, continuous vs static"),
    "agent": ("benchmarks.agent_prefix", "multi-turn agent workload, prefix caching on vs off"),
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
    module.main(sys.argv[2:])


if __name__ == "__main__":
    main()
