"""Continuous vs static batching on the mixed chat workload, and single-request decode.

    python -m benchmarks.throughput [--limit N] [--max-num-seqs 32] [--skip-transformers]

Every request produces exactly its `max_tokens` (ignore_eos), so all systems do the same
useful work; throughput is useful output tokens per second.
"""
from __future__ import annotations

import argparse

from benchmarks.report import cost_rows, markdown_table, write
from benchmarks.systems import run_engine, run_transformers_single, run_transformers_static
from benchmarks.workloads import load_workload
from engine import LLM
from engine.loader import resolve_model_dir


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--workload", default="mixed_chat_128")
    ap.add_argument("--limit", type=int, default=None, help="first N requests only")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--single-tokens", type=int, default=256)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--hour-usd", "--gpu-hour-usd", dest="hour_usd", type=float, default=1.0,
                    help="price of one machine (GPU) hour, for the cost table")
    ap.add_argument("--target-rps", type=float, default=10.0, help="request rate the replicas must sustain")
    args = ap.parse_args(argv)

    items = load_workload(args.workload, args.limit)
    results = {}
    llm = None
    for policy in ("continuous", "static"):
        llm = LLM(args.model, scheduling_policy=policy, max_num_seqs=args.max_num_seqs)
        prompts = [llm.tokenizer.encode(llm.engine.apply_chat_template(it.messages), add_special_tokens=False)
                   for it in items]
        max_tokens = [it.max_tokens for it in items]
        llm.generate(prompts[:2], None)  # warm-up
        results[policy] = run_engine(llm, prompts, max_tokens, f"engine, {policy} batching")
    single_prompt = prompts[0]
    llm.engine.config.scheduling_policy = "continuous"
    single = run_engine(llm, [single_prompt], [args.single_tokens], "engine, one request")
    rows = [["engine, continuous batching", results["continuous"].output_tokens_per_s, 1.0],
            ["engine, static batching", results["static"].output_tokens_per_s,
             results["continuous"].output_tokens_per_s / results["static"].output_tokens_per_s]]
    data = {k: v.as_dict() for k, v in results.items()} | {"single": single.as_dict()}
    if not args.skip_transformers:
        model_dir = resolve_model_dir(args.model)
        hf = run_transformers_static(model_dir, prompts, max_tokens, args.max_num_seqs)
        data["transformers_static"] = hf.as_dict()
        rows.append(["transformers static batching", hf.output_tokens_per_s,
                     results["continuous"].output_tokens_per_s / hf.output_tokens_per_s])
        hf_single = run_transformers_single(model_dir, single_prompt, args.single_tokens // 2)
        data["transformers_single"] = hf_single.as_dict()
    table = markdown_table([f"{args.workload} ({len(items)} requests, max_num_seqs={args.max_num_seqs})",
                            "output tokens/s", "continuous is x faster"], rows)
    single_rows = [["engine", single.output_tokens_per_s]]
    if "transformers_single" in data:
        single_rows.append(["transformers", data["transformers_single"]["output_tokens_per_s"]])
    table += "\n\n" + markdown_table([f"one request, {args.single_tokens} tokens", "output tokens/s"], single_rows)
    runs = {"engine, continuous": data["continuous"], "engine, static": data["static"]}
    if "transformers_static" in data:
        runs["transformers static"] = data["transformers_static"]
    table += "\n\n" + markdown_table(
        ["system", "requests/s per replica", f"replicas for {args.target_rps:g} requests/s",
         f"USD per million output tokens at {args.hour_usd:g} USD/hour"],
        cost_rows(runs, args.hour_usd, args.target_rps))
    write("throughput", "Throughput: continuous vs static batching", table, data)
    return data


if __name__ == "__main__":
    main()
