"""Where a decode step's time goes, at batch sizes 1, 16 and 64 (SmolLM2 by default), on
both decode paths: "per-op" (each kernel called from Python) and "fused" (each decoder
layer one C++ call, `ops.DecodeLayer`). The step from `LLMEngine.step` is split into
building the batch (prepare), the decoder layers (per-op: of which linears and
attention; the rest is norms, RoPE + KV write, activations and the Python between them),
the LM head, and sampling plus bookkeeping. Every request decodes exactly --tokens
tokens after a prompt of --prompt-tokens; the prefill steps are not counted.

`--prefill-after 0,1000,2000` adds a table of prompt chunks: --prefill-tokens new tokens
after that many cached ones (a prefix-cache hit: the call after a tool call), the step's ms
split into attention, linears and the rest; median of 3.
"""
from __future__ import annotations

import argparse
import collections
import time

from benchmarks.report import markdown_table, write
from engine import LLM, SamplingParams
from engine.models.layers import Linear
from engine.config import DEFAULT_MODEL


class StepTimer:
    """Wraps the step's parts with perf_counter; totals per part, in seconds."""

    def __init__(self, llm: LLM) -> None:
        self.totals: dict[str, float] = collections.defaultdict(float)
        self.active = False
        engine = llm.engine
        runner, model = engine.runner, engine.runner.model
        self._wrap(engine, "step", "step")
        self._wrap(runner, "prepare", "prepare")
        self._wrap(runner, "sampler", "sample")
        self._wrap(model, "compute_logits", "lm_head")
        self._wrap(runner.attention, "attend", "attention")
        for m in model.linears():
            if m is not model.lm_head:
                self._wrap(m, "forward", "linears")
        for layer in model.layers:
            self._wrap(layer, "forward", "layers")
        self._wrap(model, "forward", "forward")

    def _wrap(self, obj, name: str, part: str) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            if not self.active:
                return inner(*args, **kwargs)
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.totals[part] += time.perf_counter() - start
        setattr(obj, name, timed)


def profile(llm: LLM, batch: int, tokens: int, fused: bool, prompt_tokens: int = 32) -> dict:
    layers = llm.engine.runner.model.layers
    fused_layers = [layer.fused for layer in layers]
    if not fused:
        for layer in layers:
            layer.fused = None
    timer = StepTimer(llm)
    prompts = [[1] + list(range(200 + i, 200 + prompt_tokens + i)) for i in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up (and the same prompts are then cached)
    engine = llm.engine
    # prefill alone first, then time only decode steps
    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True))
    while any(seqs[0].num_computed_tokens < seqs[0].num_prompt_tokens for seqs in engine.requests.values()):
        engine.step()
    timer.active = True
    steps = 0
    while engine.has_unfinished() and steps < tokens:
        engine.step()
        steps += 1
    timer.active = False
    while engine.has_unfinished():
        engine.step()
    for layer, fused_layer in zip(layers, fused_layers):
        del layer.forward  # the timer's wrapper
        layer.fused = fused_layer
    t = collections.defaultdict(float, {k: v / steps * 1e3 for k, v in timer.totals.items()})
    return {"path": "fused" if fused and fused_layers[0] is not None else "per-op", "batch": batch, "steps": steps,
            "step_ms": t["step"], "prepare": t["prepare"], "layers": t["layers"], "of_which_linears": t["linears"],
            "of_which_attention": t["attention"], "embed_and_final_norm": t["forward"] - t["layers"],
            "lm_head": t["lm_head"], "sample_and_bookkeeping": t["step"] - t["prepare"] - t["forward"] - t["lm_head"],
            "tokens_per_s": batch / t["step"] * 1e3}


def prefill_profile(llm: LLM, cached: int, new: int, reps: int = 3) -> dict:
    """One request's prompt of `new` tokens after `cached` ones already in the prefix cache."""
    timer = StepTimer(llm)
    params = SamplingParams(temperature=0, max_tokens=1)
    runs = []
    for rep in range(reps):
        base = [1] + [300 + (rep * 7919 + i) % 30000 for i in range(cached)]
        llm.generate([base], params, use_tqdm=False)  # now cached
        timer.totals.clear()
        timer.active = True
        llm.generate([base + [20000 + (rep * 104729 + i) % 9000 for i in range(new)]], params, use_tqdm=False)
        timer.active = False
        runs.append(dict(timer.totals))
    for layer in llm.engine.runner.model.layers:
        del layer.forward  # the timer's wrapper
    t = sorted(runs, key=lambda r: r["step"])[len(runs) // 2]
    return {"cached": cached, "new": new, "step_ms": t["step"] * 1e3, "attention": t["attention"] * 1e3,
            "linears": t["linears"] * 1e3, "rest": (t["step"] - t["attention"] - t["linears"]) * 1e3,
            "prefill_attention": llm.engine.stats()["platform"]["kernels"]["prefill_attention"]}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks step", description=__doc__)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--quantization", default=None, help="EngineConfig.quantization (default: the model's own)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="EngineConfig.kv_cache_dtype: auto or int8")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32, help="context before the timed steps")
    ap.add_argument("--prefill-after", default="", help="cached tokens before a timed prompt chunk, e.g. 0,1000")
    ap.add_argument("--prefill-tokens", type=int, default=100, help="the timed prompt chunk's new tokens")
    args = ap.parse_args(argv)
    llm = LLM(args.model, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype, max_num_seqs=256)
    weights = llm.engine.stats()["weights"]
    rows = [profile(llm, int(b), args.tokens, fused, args.prompt_tokens) for b in args.batches.split(",") for fused in (False, True)]
    keys = ["step_ms", "prepare", "layers", "of_which_linears", "of_which_attention", "embed_and_final_norm",
            "lm_head", "sample_and_bookkeeping", "tokens_per_s"]
    table = markdown_table(["path", "batch", *keys], [[r["path"], r["batch"], *(r[k] for k in keys)] for r in rows])
    kernels = (f"linears: {'+'.join(weights['bytes_by_format'])} on {', '.join(weights['linear_kernels'])}, "
               f"KV cache {weights['kv_cache_dtype']}")
    write("step_profile", f"Decode step breakdown, ms per step ({args.model}, {kernels})", table,
          {"rows": rows, "weights": weights})
    if args.prefill_after:
        chunks = [prefill_profile(llm, int(c), args.prefill_tokens) for c in args.prefill_after.split(",")]
        keys = ["cached", "new", "step_ms", "attention", "linears", "rest"]
        write("prefill_profile", f"A prompt chunk after cached tokens, ms ({args.model}, prefill attention: "
              f"{chunks[0]['prefill_attention']})", markdown_table(keys, [[c[k] for k in keys] for c in chunks]),
              {"rows": chunks, "weights": weights})
        rows += chunks
    return rows


if __name__ == "__main__":
    main()
