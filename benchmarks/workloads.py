"""Workload loading, shared by every benchmark."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

WORKLOAD_DIR = Path(__file__).parent / "workloads"


@dataclass
class WorkItem:
    id: str
    messages: list[dict]
    max_tokens: int


def load_workload(name: str = "mixed_chat_128", limit: int | None = None) -> list[WorkItem]:
    """Items of `benchmarks/workloads/<name>.jsonl` (or a path to a .jsonl file)."""
    path = Path(name) if name.endswith(".jsonl") else WORKLOAD_DIR / f"{name}.jsonl"
    items = [WorkItem(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return items[:limit] if limit else items


def synthetic(n: int, seed: int = 0, prompt_median: int = 60, output_median: int = 100,
              max_output: int = 512) -> list[WorkItem]:
    """Log-normal prompt and output lengths (a rough shape of chat traffic), reproducible by seed."""
    import random
    rng = random.Random(seed)
    items = []
    for i in range(n):
        words = max(1, int(rng.lognormvariate(0, 0.6) * prompt_median / 1.3))
        out = min(max_output, max(4, int(rng.lognormvariate(0, 0.9) * output_median)))
        text = " ".join(rng.choice(["river", "stone", "light", "paper", "cloud", "garden", "signal", "engine"])
                        for _ in range(words))
        items.append(WorkItem(id=f"s{i}", messages=[{"role": "user", "content": f"Summarize: {text}"}],
                              max_tokens=out))
    return items


def fixed_length(n: int, prompt_words: int = 48, output_tokens: int = 128) -> list[WorkItem]:
    """Every request the same size: the one case where static batching wastes nothing."""
    text = " ".join(["river", "stone", "light", "paper", "cloud", "garden", "signal", "engine"] * prompt_words)
    text = " ".join(text.split()[:prompt_words])
    return [WorkItem(id=f"f{i}", messages=[{"role": "user", "content": f"Request {i:03d}. Summarize: {text}"}],
                     max_tokens=output_tokens) for i in range(n)]


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Arrival offsets in seconds for n requests at `rate` requests/s (exponential gaps)."""
    import random
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def agent_sessions(num_sessions: int, turns: int, seed: int = 0) -> list[list[str]]:
    """Multi-turn agent traffic: every session shares one long system prompt with tool
    declarations and asks `turns` questions; each model call re-sends the whole history."""
    import random
    rng = random.Random(seed)
    topics = ["invoices", "shipping", "refunds", "accounts", "passwords", "orders", "warranty", "returns"]
    return [[f"Question {t + 1} about {rng.choice(topics)} for customer {s}." for t in range(turns)]
            for s in range(num_sessions)]


AGENT_SYSTEM_PROMPT = (
    "You are a support agent for an online shop. Be brief and polite. You can call these tools: "
    + " ".join(f'{{"name": "tool_{i}", "description": "Looks up {w} records by id", "parameters": '
               f'{{"type": "object", "properties": {{"id": {{"type": "string"}}}}}}}}'
               for i, w in enumerate(["order", "invoice", "customer", "shipment", "refund", "product"])))
