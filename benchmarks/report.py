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


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values."""
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v) -> str:
        if not isinstance(v, float):
            return str(v)
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
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


def plot_lines(name: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]],
               log_y: bool = False) -> Path:
    """A small PNG line chart in benchmarks/results/<name>.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS_DIR / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def cost_rows(runs: dict[str, dict], hour_usd: float, target_rps: float) -> list[list]:
    """Per system: replicas needed for `target_rps` and cost per million output tokens, from
    each run's measured throughput (RunResult.as_dict()) at `hour_usd` per machine-hour."""
    import math
    rows = []
    for name, r in runs.items():
        rps = r["num_requests"] / r["seconds"]
        per_million = hour_usd / (r["output_tokens_per_s"] * 3600) * 1e6
        rows.append([name, rps, math.ceil(target_rps / rps), per_million])
    return rows
