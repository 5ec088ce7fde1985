"""Prometheus metrics with vLLM's names, fed by the engine's step listener."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engine import AsyncLLM

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0)


class EngineMetrics:
    """One registry per app; one set of series per served model (label model_name)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, label = self.registry, ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", label,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between consecutive output tokens", label,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency", label,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Time from arrival to first schedule", label,
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("vllm:num_requests_running", "Requests in the batch", label, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled", label, registry=r)
        self.swapped = Gauge("vllm:num_requests_swapped", "Requests swapped out to CPU memory", label, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use", label, registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Preemptions", label, registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      label, registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", label,
                                   registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", label, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", label, registry=r)
        self.finished = Counter("vllm:request_success", "Finished requests", ["model_name", "finished_reason"],
                                registry=r)
        # agent programs' KV kept across tool calls (docs/agent-scheduling.md); not vLLM's
        self.kv_pinned = Gauge("engine:kv_blocks_pinned", "KV blocks kept for agent programs' next calls", label,
                               registry=r)
        self.kv_pinned_swapped = Gauge("engine:kv_blocks_pinned_swapped",
                                       "CPU swap blocks holding agent programs' KV for their next calls", label,
                                       registry=r)
        self.kv_pins = Counter("engine:kv_pins", "Program KV pins: made, how they ended, swaps to CPU and back",
                               ["model_name", "outcome"], registry=r)
        self.prompts_continued = Counter("engine:program_prompts_continued",
                                         "Programs' next calls that took their last call's own tokens", label,
                                         registry=r)
        self.jump_forward_tokens = Counter("engine:jump_forward_tokens",
                                           "Output tokens a grammar forced, computed without a decode step each",
                                           label, registry=r)
        self._last: dict[str, dict] = {}

    def attach(self, model: str, engine: AsyncLLM) -> None:
        for metric in (self.ttft, self.itl, self.e2e, self.queue, self.running, self.waiting, self.swapped,
                       self.kv_usage, self.preemptions, self.prefix_queries, self.prefix_hits, self.prompt_tokens,
                       self.generation_tokens, self.kv_pinned, self.kv_pinned_swapped, self.prompts_continued,
                       self.jump_forward_tokens):
            metric.labels(model)  # every series exists (at 0) from the first scrape
        pins_counted: dict[str, int] = {}  # by outcome
        last_token: dict[str, float] = {}
        counters = {"num_preemptions": self.preemptions, "prefix_cache_queries": self.prefix_queries,
                    "prefix_cache_hits": self.prefix_hits, "prompt_tokens_total": self.prompt_tokens,
                    "generation_tokens_total": self.generation_tokens,
                    "program_prompts_continued": self.prompts_continued,
                    "jump_forward_tokens_total": self.jump_forward_tokens}
        counted = dict.fromkeys(counters, 0)

        def on_step(step) -> None:  # runs on the engine's step thread, with its StepOutput
            now = time.time()
            for req in step.updated:
                rid, m = req.request_id, req.metrics
                if req.num_output_tokens == 1 and m.first_token_time is not None and rid not in last_token:
                    self.ttft.labels(model).observe(m.time_to_first_token)
                    self.queue.labels(model).observe(m.time_in_queue or 0.0)
                elif rid in last_token:
                    self.itl.labels(model).observe(now - last_token[rid])
                last_token[rid] = now
                if req.is_finished:
                    last_token.pop(rid, None)
                    if m.e2e_latency is not None:
                        self.e2e.labels(model).observe(m.e2e_latency)
                    self.finished.labels(model, req.finish_reason or "unknown").inc()
            if len(last_token) > 1024:  # forget requests aborted between steps (silent for a minute)
                for rid in [r for r, t in last_token.items() if now - t > 60]:
                    del last_token[rid]
            stats = engine.stats()
            self.running.labels(model).set(stats["num_running"])
            self.waiting.labels(model).set(stats["num_waiting"])
            self.swapped.labels(model).set(stats["num_swapped"])
            self.kv_usage.labels(model).set(stats["kv_cache_usage"])
            for key, counter in counters.items():
                if stats[key] > counted[key]:
                    counter.labels(model).inc(stats[key] - counted[key])
                    counted[key] = stats[key]
            self.kv_pinned.labels(model).set(stats["kv_blocks_pinned"])
            self.kv_pinned_swapped.labels(model).set(stats["kv_blocks_pinned_swapped"])
            for outcome, n in stats["kv_pins"].items():
                if n > pins_counted.get(outcome, 0):
                    self.kv_pins.labels(model, outcome).inc(n - pins_counted.get(outcome, 0))
                    pins_counted[outcome] = n

        engine.step_listeners.append(on_step)
