"""Tool calling on the default model: how often calls are schema-valid and correct, with and
without grammar-constrained decoding, and what constraining costs in throughput.

    python -m benchmarks tools [--limit N] [--throughput-limit N] [--repeats 2]

Accuracy: 36 single-call tasks of our own over six tools (benchmarks/workloads/
tool_tasks.json), each with its expected function and key arguments, in every OpenAI
tool_choice mode. "constrained" is this engine (the reply grammar of adk_backend.
reply_grammar), decoded a token a step or with jump-forward (the text the grammar forces,
such as the call's name and keys, appended in one step: engine/structured_output.py);
"unconstrained" is the same prompt decoded freely, as main did before grammars (required
and named calls were opened by a prompt prefix). Each mode's 36 tasks run as one batch;
its wall time and steps are reported. A call is schema-valid
when it names a declared tool and its arguments validate against that tool's JSON schema
(jsonschema); it is correct when it is also the expected function with the expected key
arguments (strings compared case-insensitively, numbers by value).

Throughput: mixed_chat_128 with half of its requests constrained to a JSON schema against
the same workload with none, interleaved in one run; every request produces exactly its
max_tokens in both (the schema cannot close sooner), so both do the same work.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jsonschema

from adk_backend.chat import render_chat_offline
from adk_backend.chat_format import TOOL_CALL_OPEN, parse_reply
from adk_backend.reply_grammar import ReplySpec, reply_grammar
from benchmarks.report import keep_partial_results, markdown_table, plot_bars, write
from benchmarks.workloads import WORKLOAD_DIR, load_workload
from engine import LLM, SamplingParams, StructuredOutputsParams
from engine.config import DEFAULT_MODEL

SYSTEM = "You are a helpful assistant. Use the tools to answer."
MODES = ("required", "named", "auto")
# Half of the throughput workload is held to this: many objects with free strings (the
# costliest masks), and more of them than any request's max_tokens can close.
LONG_SCHEMA = {"type": "array", "minItems": 200, "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "note": {"type": "string"},
                                     "score": {"type": "integer"}},
    "required": ["name", "note", "score"], "additionalProperties": False}}


def load_tasks(limit: int | None = None) -> tuple[list[dict], list[dict]]:
    data = json.loads(Path(WORKLOAD_DIR / "tool_tasks.json").read_text())
    return data["tools"], data["tasks"][:limit] if limit else data["tasks"]


def unconstrained_prefix(mode: str, name: str) -> str:
    """What main appended to the prompt for a forced call before grammars existed."""
    if mode == "named":
        return f'{TOOL_CALL_OPEN}\n{{"name": "{name}", "arguments": '
    return f'{TOOL_CALL_OPEN}\n{{"name": "' if mode == "required" else ""


def score(text: str, task: dict, schemas: dict[str, dict]) -> tuple[bool, bool, bool]:
    """(made a call, first call schema-valid, first call correct)."""
    calls = parse_reply(text, set(schemas)).tool_calls
    if not calls:
        return False, False, False
    call = calls[0]
    try:
        jsonschema.validate(call.arguments, schemas[call.name])
    except jsonschema.ValidationError:
        return True, False, False
    return True, True, call.name == task["function"] and all(
        _same(call.arguments.get(k), v) for k, v in task["arguments"].items())


def _same(got, want) -> bool:
    if isinstance(want, str):
        return isinstance(got, str) and got.strip().casefold() == want.casefold()
    return isinstance(got, (int, float)) and not isinstance(got, bool) and float(got) == float(want)


# how each mode's tasks are decoded: (name, held to the reply grammar, jump-forward)
DECODINGS = (("unconstrained", False, False), ("constrained, a token a step", True, False),
             ("constrained, jump-forward", True, True))


def accuracy(llm: LLM, tools: list[dict], tasks: list[dict], mode: str, decoding: str, max_tokens: int) -> dict:
    _, constrained, jump = next(d for d in DECODINGS if d[0] == decoding)
    configured, llm.engine.config.jump_forward = llm.engine.config.jump_forward, jump  # read every step
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    prompts, params, prefixes = [], [], []
    for task in tasks:
        base = render_chat_offline(llm.engine, [{"role": "system", "content": SYSTEM},
                                                {"role": "user", "content": task["question"]}], tools)
        spec = ReplySpec(tools=tools, mode="auto" if mode == "auto" else "required", parallel=False,
                         allowed=[task["function"]] if mode == "named" else None)
        prefix = "" if constrained else unconstrained_prefix(mode, task["function"])
        prompts.append(base + prefix)
        prefixes.append(prefix)
        params.append(SamplingParams(temperature=0, max_tokens=max_tokens,
                                     structured_outputs=reply_grammar(spec) if constrained else None))
    steps = llm.stats()["num_steps"]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    scores = [score(prefix + o.outputs[0].text, task, schemas) for prefix, o, task in zip(prefixes, outs, tasks)]
    n = len(tasks)
    llm.engine.config.jump_forward = configured
    return {"mode": mode, "decoding": decoding, "constrained": constrained, "tasks": n,
            "call_rate": sum(s[0] for s in scores) / n, "schema_valid_rate": sum(s[1] for s in scores) / n,
            "correct_rate": sum(s[2] for s in scores) / n, "seconds": seconds,
            "steps": llm.stats()["num_steps"] - steps,
            "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            "samples": [o.outputs[0].text[:200] for o in outs[:3]]}


def throughput(llm: LLM, items, repeats: int) -> dict:
    prompts = [llm.engine.apply_chat_template(it.messages) for it in items]
    max_tokens = [it.max_tokens for it in items]
    schema = StructuredOutputsParams(json=LONG_SCHEMA)

    def params(constrain_half: bool) -> list[SamplingParams]:
        return [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True,
                               structured_outputs=schema if constrain_half and i % 2 == 0 else None)
                for i, m in enumerate(max_tokens)]
    llm.generate(prompts[:4], params(True)[:4])  # warm-up; compiles the schema once
    runs: dict[str, list[float]] = {"none": [], "half": []}
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits both alike
        for key in ("none", "half"):
            start = time.perf_counter()
            outs = llm.generate(prompts, params(key == "half"), use_tqdm=True)
            seconds = time.perf_counter() - start
            produced = [len(o.outputs[0].token_ids) for o in outs]
            assert produced == max_tokens, "every request must produce exactly its max_tokens"
            if key == "half":
                for o in outs[::2]:
                    assert o.outputs[0].text.startswith("[{"), o.outputs[0].text[:80]
            runs[key].append(sum(produced) / seconds)
    none, half = statistics.median(runs["none"]), statistics.median(runs["half"])
    return {"tokens_per_s": runs, "median_none": none, "median_half": half, "ratio": half / none,
            "requests": len(items), "output_tokens": sum(max_tokens)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks tools", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--limit", type=int, default=None, help="first N tool tasks only")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--throughput-limit", type=int, default=None, help="first N requests of mixed_chat_128")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args(argv)
    data: dict = {"accuracy": [], "throughput": None}

    def report(interrupted: bool = False) -> dict:
        rows = [[r["mode"], r["decoding"], r["tasks"],
                 f"{100 * r['call_rate']:.0f}%", f"{100 * r['schema_valid_rate']:.0f}%",
                 f"{100 * r['correct_rate']:.0f}%", r["output_tokens"], r["steps"], r["seconds"]]
                for r in data["accuracy"]]
        table = markdown_table(["tool_choice", "decoding", "tasks", "replies with a call", "schema-valid call",
                                "correct call", "output tokens", "steps", "seconds"], rows)
        tp = data["throughput"]
        if tp:
            table += "\n\n" + markdown_table(
                ["workload (mixed_chat_128, offline)", "output tok/s (median)", "runs"],
                [["no request constrained", tp["median_none"], ", ".join(f"{v:.0f}" for v in tp["tokens_per_s"]["none"])],
                 ["half constrained to a JSON schema", tp["median_half"],
                  ", ".join(f"{v:.0f}" for v in tp["tokens_per_s"]["half"])]])
            table += f"\n\nConstrained throughput is {100 * tp['ratio']:.0f}% of unconstrained (target: at least 90%)."
        if data["accuracy"]:
            plot_bars("tool_calling", "correct calls (%)",
                      {f"{r['mode']}, {r['decoding']}": 100 * r["correct_rate"]
                       for r in data["accuracy"]}, title=f"Correct tool calls, {args.model}")
        write("tool_calling", f"Tool calling on {args.model}", table, data, interrupted)
        return data

    with keep_partial_results(report):
        llm = LLM(args.model, max_num_seqs=args.max_num_seqs)
        tools, tasks = load_tasks(args.limit)
        for mode in MODES:
            for decoding, _, _ in DECODINGS:
                data["accuracy"].append(accuracy(llm, tools, tasks, mode, decoding, args.max_tokens))
        if not args.skip_throughput:
            data["throughput"] = throughput(llm, load_workload("mixed_chat_128", args.throughput_limit), args.repeats)
    return report()


if __name__ == "__main__":
    main()
