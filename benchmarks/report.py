"""Writes a benchmark's results: a Markdown table on stdout and in a file, plus JSON."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:,.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write(name: str, title: str, table: str, data: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    md = f"## {title}\n\nMachine: {machine()}\n\n{table}\n"
    print("\n" + md)
    (RESULTS_DIR / f"{name}.md").write_text(md)
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2))
    return path
