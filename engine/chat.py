"""A small terminal chat on the engine: `python -m engine.chat` (what `make run` starts).

Interactive when stdin is a terminal; otherwise answers one prompt (`--prompt`) and exits.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from engine import EngineConfig, LLMEngine, SamplingParams


def stream_reply(engine: LLMEngine, messages: list[dict], params: SamplingParams) -> str:
    req = engine.add_request(engine.apply_chat_template(messages), params)
    start = time.perf_counter()
    while not req.is_finished:
        engine.step()
        out = engine.make_output(req, delta=True)
        print(out.outputs[0].text, end="", flush=True)
    seconds = time.perf_counter() - start
    print(f"\n[{req.num_output_tokens} tokens, {req.num_output_tokens / seconds:.1f} tokens/s, "
          f"{req.metrics.num_cached_tokens} prompt tokens from the prefix cache]", file=sys.stderr)
    return req.output_text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompt", default="In two sentences, what is continuous batching in LLM serving?")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"loading {args.model} ...", file=sys.stderr)
    engine = LLMEngine(EngineConfig(model=args.model))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    messages: list[dict] = []
    if not sys.stdin.isatty():
        print(f"> {args.prompt}")
        stream_reply(engine, [{"role": "user", "content": args.prompt}], params)
        return
    print("Chat with the local model (empty line or Ctrl-D to quit).", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        messages.append({"role": "assistant", "content": stream_reply(engine, messages, params)})


if __name__ == "__main__":
    main()
