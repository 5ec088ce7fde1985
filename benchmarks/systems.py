"""One runner per system under test. Each takes token-id prompts and exact output lengths
(ignore_eos) so that every system does identical work, and returns a RunResult with
throughput, per-request latency summaries and, for our engine, engine-side figures.

Systems: our engine offline (`LLM`, either scheduling policy), online (`AsyncLLM`, all at
once or at given arrival times), through the HTTP server (a subprocess speaking the
OpenAI API), one request at a time, and transformers' own static batching.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.report import (client_latencies, engine_figures, engine_mark, request_latencies, summary,
                               token_times_from_steps)
from engine import LLM, AsyncLLM, SamplingParams

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RunResult:
    system: str
    num_requests: int
    output_tokens: int
    prompt_tokens: int
    seconds: float
    latency: dict | None = None   # report.request_latencies(): ttft, tpot, itl, e2e, queue
    engine: dict | None = None    # report.engine_figures(): batch size, KV usage, preemptions, hit rate
    extra: dict = field(default_factory=dict)

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    def as_dict(self) -> dict:
        return asdict(self) | {"output_tokens_per_s": self.output_tokens_per_s,
                               "total_tokens_per_s": (self.output_tokens + self.prompt_tokens) / self.seconds,
                               "requests_per_s": self.num_requests / self.seconds}


def exact_params(max_tokens: list[int]) -> list[SamplingParams]:
    return [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]


def check_exact(produced: list[int], max_tokens: list[int]) -> None:
    assert produced == list(max_tokens), "every request must produce exactly max_tokens"


def _offline_result(system: str, engine, mark: dict, outs, max_tokens: list[int], seconds: float) -> RunResult:
    produced = [len(o.outputs[0].token_ids) for o in outs]
    check_exact(produced, max_tokens)
    decode_times = token_times_from_steps(engine.step_history, [o.request_id for o in outs])
    token_times = [[o.metrics.first_token_time] + t[:n - 1] for o, t, n in zip(outs, decode_times, produced)]
    return RunResult(system, len(outs), sum(produced), sum(len(o.prompt_token_ids) for o in outs), seconds,
                     latency=request_latencies([o.metrics for o in outs], produced, token_times),
                     engine=engine_figures(engine, mark))


def run_engine(llm: LLM, prompts: list[list[int]], max_tokens: list[int], system: str) -> RunResult:
    """Offline: all requests handed to `LLM.generate` at once."""
    engine = llm.engine
    mark = engine_mark(engine)
    start = time.perf_counter()
    outs = llm.generate(prompts, exact_params(max_tokens), use_tqdm=True)
    seconds = time.perf_counter() - start
    return _offline_result(system, engine, mark, outs, max_tokens, seconds)


def run_sequential(llm: LLM, prompts: list[list[int]], max_tokens: list[int],
                   system: str = "engine, one request at a time") -> RunResult:
    """The loop many agent apps start with: each request waits for the previous one."""
    engine = llm.engine
    mark = engine_mark(engine)
    outs = []
    start = time.perf_counter()
    for prompt, params in zip(tqdm(prompts, desc=system), exact_params(max_tokens)):
        outs.extend(llm.generate([prompt], params, use_tqdm=False))
    seconds = time.perf_counter() - start
    return _offline_result(system, engine, mark, outs, max_tokens, seconds)


async def _run_async(engine: AsyncLLM, prompts, max_tokens, arrivals, concurrency, progress: bool):
    start = time.perf_counter()
    bar = tqdm(total=len(prompts), desc="AsyncLLM", disable=not progress)
    clients = asyncio.Semaphore(concurrency or len(prompts))

    async def one(i: int):
        if arrivals is not None:
            await asyncio.sleep(max(0.0, arrivals[i] - (time.perf_counter() - start)))
        times, last = [], None
        async with clients:
            sent = time.time()
            async for out in engine.generate(prompts[i], exact_params([max_tokens[i]])[0]):
                times.extend([time.time()] * len(out.outputs[0].token_ids))  # client-side, as a caller sees them
                last = out
        bar.update()
        return last, (sent, times, time.time())

    results = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    bar.close()
    return time.perf_counter() - start, results


def run_async_engine(engine: AsyncLLM, prompts: list[list[int]] | list[str], max_tokens: list[int], system: str,
                     arrivals: list[float] | None = None, concurrency: int | None = None,
                     progress: bool = True, measure_from: float = 0.0) -> RunResult:
    """Online: every request is its own `AsyncLLM.generate` stream, all at once; with
    `arrivals` (offsets in seconds) each at its own time (Poisson load); with `concurrency`
    a closed loop of that many clients, each sending its next request when one finishes.
    `measure_from`: latency figures count only requests arriving from that offset on (the
    warm-up before it still loads the engine)."""
    mark = engine_mark(engine.engine)
    seconds, results = asyncio.run(_run_async(engine, prompts, max_tokens, arrivals, concurrency, progress))
    produced = [len(times) for _, (_, times, _) in results]
    check_exact(produced, max_tokens)
    prompt_tokens = sum(len(last.prompt_token_ids) for last, _ in results)
    counted = [i for i in range(len(results)) if arrivals is None or arrivals[i] >= measure_from]
    latency = client_latencies([(*results[i][1], produced[i]) for i in counted])  # as for a peer measured from outside
    latency["queue"] = summary(results[i][0].metrics.time_in_queue for i in counted)
    return RunResult(system, len(prompts), sum(produced), prompt_tokens, seconds, latency=latency,
                     engine=engine_figures(engine.engine, mark), extra={"measured_requests": len(counted)})


# -- through the HTTP server -------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(model: str, *args: str, start_timeout: float = 300.0, env: dict | None = None,
           launcher: list[str] | None = None, log_file: Path | None = None):
    """`python -m adk_backend serve` (or `launcher serve`, a script path) as a subprocess on
    127.0.0.1, with `env` added to ours; yields (base url, pid). SIGTERM at the end. The
    server's output goes to `log_file` when given (kept), else to a temporary file."""
    with served_together(1, model, *args, start_timeout=start_timeout, env=env, launcher=launcher,
                         log_files=[log_file]) as servers:
        yield servers[0]


@contextlib.contextmanager
def served_together(count: int, model: str, *args: str, start_timeout: float = 300.0, env: dict | None = None,
                    launcher: list[str] | None = None, log_files: list[Path | None] | None = None):
    """`count` servers as `served` makes one, started at once (their start-ups overlap: most
    of one is imports and the model load); yields [(base url, pid), ...] once all answer."""
    import tempfile

    import httpx

    log_files = log_files or [None] * count
    procs: list[tuple[str, subprocess.Popen, object]] = []
    try:
        for log_file in log_files:
            port = free_port()
            log = open(log_file, "w+") if log_file else tempfile.TemporaryFile(mode="w+")
            proc = subprocess.Popen([sys.executable, *(launcher or ["-m", "adk_backend"]), "serve", "--model", model,
                                     "--port", str(port), *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
            procs.append((f"http://127.0.0.1:{port}", proc, log))
        deadline = time.time() + start_timeout
        for url, proc, log in procs:
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"the server exited during start-up (code {proc.returncode}):\n"
                                       f"{log.read()[-3000:]}")
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError("the server did not come up")
                time.sleep(0.2)
        yield [(url, proc.pid) for url, proc, _ in procs]
    finally:
        for _, proc, _ in procs:
            proc.terminate()
        for _, proc, log in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


async def _stream_completion(client, url: str, model: str, prompt: list[int], max_tokens: int):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = time.time()
    times, usage = [], None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.time())
    return sent, times, time.time(), usage


def run_http(url: str, model: str, prompts: list[list[int]], max_tokens: list[int],
             system: str = "engine, through the HTTP server") -> RunResult:
    """All requests at once as streaming `/v1/completions` calls. Latencies are what the
    client sees (a text chunk may carry more than one token when detokenization holds
    bytes back, so inter-token latency here is between text chunks)."""
    import httpx

    async def main():
        limits = httpx.Limits(max_connections=len(prompts) + 8)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            bar = tqdm(total=len(prompts), desc=system)

            async def one(p, m):
                res = await _stream_completion(client, url, model, p, m)
                bar.update()
                return res
            start = time.perf_counter()
            results = await asyncio.gather(*(one(p, m) for p, m in zip(prompts, max_tokens)))
            bar.close()
            return time.perf_counter() - start, results

    seconds, results = asyncio.run(main())
    produced = [usage["completion_tokens"] for _, _, _, usage in results]
    check_exact(produced, max_tokens)
    latency = client_latencies([(sent, times, done, n) for (sent, times, done, _), n in zip(results, produced)])
    return RunResult(system, len(prompts), sum(produced), sum(map(len, prompts)), seconds, latency=latency)


# -- transformers ------------------------------------------------------------------------
def run_transformers_static(model_dir, prompts: list[list[int]], max_tokens: list[int], batch_size: int,
                            dtype=torch.bfloat16, system: str = "transformers static") -> RunResult:
    """transformers' own static batching: left-padded batches run to their longest member."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    pad = model.generation_config.pad_token_id or 0
    model.generation_config.eos_token_id = None  # exactly max_new_tokens for every row
    start = time.perf_counter()
    for i in tqdm(range(0, len(prompts), batch_size), desc=system):
        batch, lens = prompts[i:i + batch_size], max_tokens[i:i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max(lens), pad_token_id=pad)
    seconds = time.perf_counter() - start
    # Only each request's own max_tokens are useful output; the rest of the batch is padding.
    return RunResult(system, len(prompts), sum(max_tokens), sum(map(len, prompts)), seconds)


def run_transformers_single(model_dir, prompt: list[int], max_tokens: int, dtype=torch.bfloat16) -> RunResult:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        model.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=0)  # warm-up
        start = time.perf_counter()
        model.generate(ids, do_sample=False, max_new_tokens=max_tokens, pad_token_id=0)
    return RunResult("transformers, one request", 1, max_tokens, len(prompt), time.perf_counter() - start)
