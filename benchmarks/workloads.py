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
