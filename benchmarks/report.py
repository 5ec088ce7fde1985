"""Measures and writes a benchmark's results: latency summaries, engine-side figures from
the step history, a Markdown table on stdout and in a file, JSON, and PNG plots."""
from __future__ import annotations

import contextlib
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def machine() -> str:
    """The CPU, its ISA level as the engine sees it (ENGINE_CPU_ISA caps it), threads, torch."""
    from engine.platform import cpu_model, current_platform, machine_isa
    p = current_platform("cpu")
    level = p.isa if p.isa == machine_isa() else f"{p.isa} (ENGINE_CPU_ISA; the CPU runs {machine_isa()})"
    extras = f" + {', '.join(sorted(p.features))}" if p.features else ""
    return (f"{cpu_model()} ({platform.machine()}), ISA level {level}{extras}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values."""
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def summary(values: Iterable[float | None]) -> dict | None:
    """mean, p50, p90, p99 of the values that are not None (None when there are none)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99)}


def request_latencies(metrics: list, num_output_tokens: list[int],
                      token_times: list[list[float]] | None = None) -> dict:
    """Per-request latency summaries (seconds) from engine RequestMetrics: TTFT, time per
    output token after the first (TPOT), end-to-end, queue time; inter-token latency from
    each request's token timestamps when given."""
    def tpot(m, n):
        return None if n < 2 or m.finished_time is None else (m.finished_time - m.first_token_time) / (n - 1)
    out = {"ttft": summary(m.time_to_first_token for m in metrics),
           "tpot": summary(tpot(m, n) for m, n in zip(metrics, num_output_tokens)),
           "e2e": summary(m.e2e_latency for m in metrics),
           "queue": summary(m.time_in_queue for m in metrics)}
    if token_times:
        out["itl"] = summary(b - a for times in token_times for a, b in zip(times, times[1:]))
    return out


def client_latencies(requests: list[tuple[float, list[float], float, int]]) -> dict:
    """Latency summaries (seconds) as a caller sees them, from (send time, the time each
    streamed chunk arrived, end time, output tokens) per request: TTFT, end-to-end,
    inter-chunk latency (a chunk is a token except where a server holds bytes back) and time
    per output token after the first. One definition for every system measured from outside."""
    return {"ttft": summary(times[0] - sent for sent, times, _, _ in requests if times),
            "e2e": summary(done - sent for sent, _, done, _ in requests),
            "itl": summary(b - a for _, times, _, _ in requests for a, b in zip(times, times[1:])),
            "tpot": summary((done - times[0]) / (n - 1) for _, times, done, n in requests if n > 1 and times)}


def token_times_from_steps(step_history, request_ids: list[str]) -> list[list[float]]:
    """When each request got each output token, read off the engine's step history: a
    request gains a token in every step that schedules it after its prompt is done
    (static-batch pad rows after it finished are not its tokens; callers cut them by count)."""
    wanted = set(request_ids)
    times: dict[str, list[float]] = {rid: [] for rid in request_ids}
    for step in step_history:
        for rid, n in step.scheduled.items():
            if rid in wanted and n == 1:
                times[rid].append(step.time)
    return [times[rid] for rid in request_ids]


def engine_mark(engine) -> dict:
    """Where the engine stands before a run; engine_figures() reports what happened since."""
    stats = engine.stats()
    return {"step": engine.step_count, "hits": stats["prefix_cache_hits"], "queries": stats["prefix_cache_queries"]}


def engine_figures(engine, mark: dict) -> dict:
    """Batch size (peak, mean), KV usage (peak), preemptions and prefix-cache hit rate over
    the engine's steps since `mark` (engine_mark()), and the batch-size timeline for plots."""
    steps = [s for s in engine.step_history if s.step >= mark["step"]]
    total = engine.kv.num_blocks
    t0 = steps[0].time if steps else 0.0
    stats = engine.stats()
    queries = stats["prefix_cache_queries"] - mark["queries"]
    return {"steps": len(steps),
            "batch_size_peak": max((s.batch_size for s in steps), default=0),
            "batch_size_mean": statistics.fmean(s.batch_size for s in steps) if steps else 0.0,
            "kv_usage_peak": max((1 - s.num_free_blocks / total for s in steps), default=0.0),
            "preemptions": sum(len(s.preempted) for s in steps),
            "prefix_cache_hit_rate": (stats["prefix_cache_hits"] - mark["hits"]) / max(1, queries),
            "weights": stats["weights"], "platform": stats["platform"],
            "timeline": [[round(s.time - t0, 3), s.batch_size] for s in steps]}


def _first(data, key: str, field: str) -> dict | None:
    """The first dict under `key` holding `field`, anywhere in a report's data."""
    stack = [data]
    while stack:
        item = stack.pop(0)
        if isinstance(item, dict):
            found = item.get(key)
            if isinstance(found, dict) and field in found:
                return found
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def weights_line(data) -> str | None:
    """'Weights: ...' and 'Kernels: ...' lines for a report, from the first engine figures in its data."""
    lines = []
    w = _first(data, "weights", "linear_kernels")
    if w:
        lines.append(f"Weights: {' + '.join(w['bytes_by_format'])} linears on {', '.join(w['linear_kernels'])}, "
                     f"{w['decode_path']} decode layers")
    p = _first(data, "platform", "kernels")
    if p:
        lines.append(f"Kernels ({p['isa']} level, {p['dtype']}): "
                     + ", ".join(f"{op} {name}" for op, name in p["kernels"].items()))
    return "\n".join(lines) or None


@contextlib.contextmanager
def keep_partial_results(report: Callable[[bool], object]):
    """Run a benchmark's measurements; on Ctrl-C, or an error (a peer that dies after ours
    ran), write what was measured so far through `report(interrupted=True)`, then stop."""
    try:
        yield
    except (KeyboardInterrupt, Exception) as exc:
        print(f"\n{'interrupted' if isinstance(exc, KeyboardInterrupt) else f'stopped by {exc!r}'}: "
              "writing the results measured so far")
        report(True)
        raise


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v) -> str:
        if not isinstance(v, float):
            return str(v)
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write(name: str, title: str, table: str, data: dict, interrupted: bool = False) -> Path:
    """Markdown to stdout and results/<name>.md, JSON to results/<name>-<time>.json; an
    interrupted run (keep_partial_results) is marked as partial in both."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    title += " (interrupted: partial)" if interrupted else ""
    data = data | {"interrupted": interrupted}
    weights = weights_line(data)
    md = f"## {title}\n\nMachine: {machine()}\n" + (f"{weights}\n" if weights else "") + f"\n{table}\n"
    print("\n" + md)
    (RESULTS_DIR / f"{name}.md").write_text(md)
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2))
    return path


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    return plt, fig, ax


def _save(plt, fig, ax, name: str, xlabel: str, ylabel: str, title: str | None) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = RESULTS_DIR / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_lines(name: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]],
               log_y: bool = False, markers: bool = True, title: str | None = None) -> Path:
    """A small PNG line chart in benchmarks/results/<name>.png."""
    plt, fig, ax = _figure()
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if markers else None, linewidth=1.2 if markers else 0.8, label=label)
    if log_y:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    return _save(plt, fig, ax, name, xlabel, ylabel, title)


def plot_bars(name: str, ylabel: str, bars: dict[str, float], title: str | None = None) -> Path:
    """A small horizontal bar chart (one bar per system) in benchmarks/results/<name>.png."""
    plt, fig, ax = _figure()
    labels = list(bars)[::-1]
    values = [bars[k] for k in labels]
    ax.barh(labels, values, color="tab:blue")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
    ax.set_xlim(0, max(values) * 1.15)
    ax.tick_params(axis="y", labelsize=8)
    return _save(plt, fig, ax, name, ylabel, "", title)


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
