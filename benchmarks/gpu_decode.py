"""`dummy-llama3-8b` end to end on a GPU: decode step time with and without CUDA graphs
against the weight-streaming bound, and continuous against static batching.

    python -m benchmarks gpu-e2e [--batches 1,2,4,8,64,256] [--requests 256]

A decode step of an 8B model must read every weight once (about 16 GB in bf16), so its
floor is weight bytes over the card's measured copy bandwidth; KV reads add a little at the
contexts used here. Each decode row: every request has a --context-token prompt, computed
first; then --steps decode steps are timed one by one (the step returns its tokens to the
host, so its wall time is the step's) and the median is reported. The mixed run: --requests
prompts of 64-1024 tokens answering 16-512 tokens each (seeded), output tokens/s of
`LLM.generate`, continuous (graphs and eager) and static (graphs). Needs CUDA.
"""
from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time

import torch

from benchmarks.kernels import copy_bandwidth_gbs
from benchmarks.report import markdown_table, write
from engine import LLM, SamplingParams
from engine.cuda_graphs import bucket_for

MODEL = "dummy-llama3-8b"


def make_llm(policy: str, eager: bool, max_num_seqs: int) -> LLM:
    # A fixed KV budget: the default (85% of free memory) would leave nothing for the next engine.
    return LLM(MODEL, dtype="bfloat16", kv_cache_memory=24 << 30, max_num_seqs=max_num_seqs,
               scheduling_policy=policy, enforce_eager=eager, enable_prefix_caching=False)


def random_prompt(llm: LLM, rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(1000, llm.engine.model_config.vocab_size) for _ in range(length)]


def decode_step_ms(llm: LLM, batch: int, context: int, steps: int) -> float:
    """Median wall time of a decode-only step at `batch` requests of `context` tokens."""
    engine, rng = llm.engine, random.Random(batch)
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    ids = [engine.add_request(random_prompt(llm, rng, context), params).request_id for _ in range(batch)]
    while any(r.num_computed_tokens < r.num_prompt_tokens for i in ids for r in engine.sequences(i)):
        engine.step()
    times = []
    while engine.has_unfinished() and len(times) < steps:
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    while engine.has_unfinished():
        engine.step()
    return statistics.median(times) * 1e3


def graph_replay_ms(llm: LLM, batch: int) -> float | None:
    """GPU time of the forward pass alone (the bucket's graph replayed), without the host's
    share of a step (scheduling, inputs, LM head launch, sampling, bookkeeping)."""
    graphs = llm.engine.runner.graphs
    bucket = bucket_for(batch, graphs.sizes) if graphs else None
    if bucket is None or bucket not in graphs.graphs:
        return None
    graph = graphs.graphs[bucket][0]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def mixed_tokens_per_s(llm: LLM, requests: int) -> float:
    rng = random.Random(0)
    prompts = [random_prompt(llm, rng, rng.randint(64, 1024)) for _ in range(requests)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(16, 512), ignore_eos=True) for _ in prompts]
    llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm-up: Triton's first compiles
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,4,8,16,64,256")
    ap.add_argument("--context", type=int, default=512, help="prompt tokens of each request before the timed steps")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--requests", type=int, default=256, help="requests of the mixed run (0: skip it)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.gpu_decode needs a CUDA GPU")
    batches = [int(b) for b in args.batches.split(",")]
    copy_gbs = copy_bandwidth_gbs()
    data: dict = {"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs, "decode": [], "mixed": []}
    step_ms: dict[tuple[int, bool], float] = {}
    forward_ms: dict[int, float | None] = {}
    for eager in (False, True):
        llm = make_llm("continuous", eager, max(batches))
        # what a decode step streams: every linear, the LM head included (the embedding is a lookup)
        data["weight_bytes"] = sum(llm.stats()["weights"]["bytes_by_format"].values())
        for b in batches:
            step_ms[b, eager] = decode_step_ms(llm, b, args.context, args.steps)
            if not eager:
                forward_ms[b] = graph_replay_ms(llm, b)
            print(f"batch {b} {'eager' if eager else 'graphs'}: {step_ms[b, eager]:.2f} ms"
                  f"{'' if eager else f' (forward alone {forward_ms[b]:.2f} ms)'}", flush=True)
        if args.requests:
            tps = mixed_tokens_per_s(llm, args.requests)
            data["mixed"].append({"policy": "continuous", "graphs": not eager, "tokens_per_s": tps})
            print(f"mixed continuous {'eager' if eager else 'graphs'}: {tps:.0f} tok/s", flush=True)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    if args.requests:
        llm = make_llm("static", False, max(batches))
        tps = mixed_tokens_per_s(llm, args.requests)
        data["mixed"].append({"policy": "static", "graphs": True, "tokens_per_s": tps})
        del llm
        gc.collect()
    bound_ms = data["weight_bytes"] / (copy_gbs * 1e9) * 1e3
    rows = []
    for b in batches:
        graphs, eager = step_ms[b, False], step_ms[b, True]
        data["decode"].append({"batch": b, "graphs_ms": graphs, "eager_ms": eager, "bound_ms": bound_ms,
                               "forward_ms": forward_ms[b]})
        rows.append([b, graphs, forward_ms[b], eager, eager / graphs, graphs / bound_ms, b / graphs * 1e3])
    table = markdown_table(["batch", "step ms (graphs)", "of which forward on the GPU", "step ms (eager)",
                            "graphs speed-up", "x weight-streaming bound", "tokens/s (graphs)"], rows)
    table += "\n\n" + markdown_table(["mixed run", "CUDA graphs", "output tokens/s"],
                                     [[m["policy"], m["graphs"], m["tokens_per_s"]] for m in data["mixed"]])
    write("gpu_e2e", f"{MODEL} on {data['device']}: decode steps at context {args.context} (weight-streaming "
          f"bound {bound_ms:.2f} ms: {data['weight_bytes'] / 1e9:.1f} GB at {copy_gbs:.0f} GB/s)", table, data)
    return data


if __name__ == "__main__":
    main()
