"""llama.cpp through llama-cpp-python, on a GGUF file.

Job: {"model": path.gguf, "threads": n, "single_prompt": [ids], "single_tokens": n,
"repeats": n, "prompts": [[ids]], "max_tokens": [n]}. One stream: decode tokens/s after the
first token (median of `repeats`). Mixed workload: llama-cpp-python holds one sequence, so
the requests run one after another, each for exactly its max_tokens (EOS not honoured, as
our engine's ignore_eos).
"""
import json
import statistics
import sys
import time

import llama_cpp
from llama_cpp import Llama


def generate(llm: Llama, prompt: list[int], n: int) -> tuple[float, float]:
    """(seconds to the first token, seconds for the rest) for exactly n tokens, greedy."""
    start = time.perf_counter()
    first = None
    count = 0
    for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        count += 1
        if count == 1:
            first = time.perf_counter()
        if count >= n:
            break
    return first - start, time.perf_counter() - first


def main() -> None:
    job = json.loads(sys.stdin.read())
    llm = Llama(model_path=job["model"], n_ctx=4096, n_threads=job["threads"], n_threads_batch=job["threads"],
                n_batch=512, verbose=False, seed=0)
    generate(llm, job["single_prompt"], 8)  # warm-up
    rates = []
    for _ in range(job["repeats"]):
        _, rest = generate(llm, job["single_prompt"], job["single_tokens"])
        rates.append((job["single_tokens"] - 1) / rest)
    start = time.perf_counter()
    for prompt, n in zip(job["prompts"], job["max_tokens"]):
        generate(llm, prompt, n)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "system": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
        "kernels": "ggml CPU, native GGUF blocks",
        "one_stream_tok_s": statistics.median(rates), "one_stream_runs": rates,
        "mixed_output_tok_s": sum(job["max_tokens"]) / seconds, "mixed_seconds": seconds,
        "mixed_note": "sequential (one sequence in llama-cpp-python)",
    }))


if __name__ == "__main__":
    main()
