"""The engine core: requests in, one scheduled forward pass per `step()`, outputs out.

`step()` schedules, runs the model, appends each sampled token (the one place a token is
added: grammar matchers, stop conditions and parallel-sampling forks follow it), lets
finished requests go (their blocks return to the pool in the same step) and returns one
StepOutput. Prompts become Requests in the InputProcessor; tokens become RequestOutputs in
the OutputProcessor.
"""
from __future__ import annotations

import copy
import itertools
import logging
import os
import time
from collections import deque

import torch

from engine.attention_backends import make_backend
from engine.kv_cache_manager import KVCacheManager
from engine.config import EngineConfig, num_kv_blocks
from engine.input_processor import InputProcessor, PromptType
from engine.loader import load_model, max_positions
from engine.model_runner import ModelRunner
from engine.platform import current_platform
from engine.output_processor import OutputProcessor
from engine.request import Logprob, Request, RequestOutput, RequestStatus, StepOutput, StepStats
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.static_scheduler import StaticScheduler
from engine.structured_output import ForcedTokens, GrammarCompiler
from engine.swap import CpuKVPool, SwapSpace, cpu_blocks_for
from engine_kernels import kv_quant

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
        loaded = load_model(config)
        self.model_config = loaded.model_config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = max_positions(config, self.model_config)
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"EngineConfig.max_num_batched_tokens ({config.max_num_batched_tokens}) must be >= "
                             f"max_model_len ({self.max_model_len}) when chunked prefill is off")
        self.device = torch.device(config.device)
        num_blocks = num_kv_blocks(config, self.model_config, self.max_model_len, self.device)
        head_dim, kv_heads = self.model_config.head_dim, self.model_config.num_kv_heads
        int8_kv = config.kv_cache_dtype == "int8"
        if int8_kv and head_dim % 16:
            raise ValueError(f"kv_cache_dtype 'int8' needs a head_dim that is a multiple of 16; {config.model} has "
                             f"{head_dim}")
        shape = (kv_quant.cache_shape(num_blocks, config.block_size, kv_heads, head_dim) if int8_kv
                 else (num_blocks, config.block_size, kv_heads, head_dim))
        # One buffer for every layer's K and V (block copies then take one launch). Zeroed:
        # padded decode rows read stale slots under a mask, and 0 * NaN would leak NaN (a
        # zeroed int8 row has scale 0: zeros too).
        kv_buffer = torch.zeros((2 * self.model_config.num_layers, *shape),
                                dtype=torch.uint8 if int8_kv else config.torch_dtype, device=self.device)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.platform = current_platform(self.device)
        backend = make_backend(config.attention_backend, config.block_size, self.device, config.torch_dtype,
                               self.platform, config.kv_cache_dtype, head_dim)
        self.platform.prepare_model(loaded.model, config.torch_dtype, backend)
        self.runner = ModelRunner(loaded.model, kv_buffer, config.block_size, backend, self.platform, config.seed)
        if self.platform.uses_cuda_graphs(backend.name, config.enforce_eager):
            self.runner.use_graphs(config.max_num_seqs, self.max_model_len, capture=True)
        # fixed once the runner is built (stats() runs every step: described once)
        self.weights = self.runner.describe_weights(config)
        self.platform_info = self.runner.describe_platform(self.platform, config, self.model_config)
        swap_space = None
        if config.preemption_mode == "swap":
            num_cpu_blocks = cpu_blocks_for(config.swap_space, self.runner.kv_caches)
            self.runner.cpu_pool = CpuKVPool(self.runner.kv_caches, num_cpu_blocks)
            swap_space = SwapSpace(self.kv, num_cpu_blocks)
        scheduler_cls = StaticScheduler if config.scheduling_policy == "static" else Scheduler
        self.scheduler = scheduler_cls(config, self.kv, swap_space)
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size,
                                        self.model_config.eos_token_ids, config.grammar_compile_timeout)
        self.forced_tokens = ForcedTokens(self.model_config.vocab_size)  # jump-forward
        self.inputs = InputProcessor(self.tokenizer, self.model_config, self.max_model_len, self.grammars, config.model,
                                     loaded.sampling_defaults, continue_programs=config.enable_prefix_caching)
        self.outputs = OutputProcessor(self.tokenizer)  # AsyncLLM gives it the step thread's own tokenizer
        self.requests: dict[str, list[Request]] = {}   # request id -> its sequences, until its output is final
        self.step_count = 0
        self.step_history: deque[StepStats] = deque(maxlen=4096)
        self.peak_batch_size = 0
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        self.num_prefill_tokens_computed = 0  # prompt tokens run through the model: cache misses and recomputes
        self.num_jump_forward_tokens = 0      # output tokens a grammar forced, appended without a step each
        log.info("engine ready: %s, %s on %s (%s attention), %d KV blocks of %d tokens (%s), max_model_len %d",
                 config.model, config.dtype, self.platform, backend.name, num_blocks, config.block_size,
                 "int8" if int8_kv else config.dtype, self.max_model_len)

    # -- requests ------------------------------------------------------------------------
    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        return self.inputs.tokenize(prompt)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            template_kwargs: dict | None = None) -> str:
        return self.inputs.apply_chat_template(messages, tools, template_kwargs)

    def default_sampling_params(self) -> SamplingParams:
        return self.inputs.default_sampling_params()

    @property
    def sampling_defaults(self) -> dict:
        """SamplingParams fields the checkpoint's generation_config.json sets."""
        return dict(self.inputs.sampling_defaults)

    def detokenize_with_own_tokenizer(self) -> None:
        """Outputs are detokenized with a tokenizer of their own: for a front end that steps
        on one thread and tokenizes on another (a fast tokenizer is not safe to share)."""
        if self.tokenizer is not None:
            self.outputs.tokenizer = copy.deepcopy(self.tokenizer)

    async def compile_grammar_async(self, spec):
        """A structured-output spec compiled by the grammar workers (any thread, any loop)."""
        return await self.grammars.compile_async(spec)

    def sequences(self, request_id: str) -> list[Request]:
        """A request's sequences while it is in flight (n > 1: it and its forks)."""
        return list(self.requests.get(request_id, ()))

    def shutdown(self) -> None:
        """Stops the grammar workers (the engine steps no more)."""
        self.grammars.shutdown()

    def check_prompt(self, prompt: PromptType, params: SamplingParams | None = None):
        """Tokenizes and checks a prompt without touching engine state (any one thread)."""
        return self.inputs.check(prompt, params)

    def make_request(self, prompt, params: SamplingParams | None = None,
                     request_id: str | None = None, priority: int = 0,
                     arrival_time: float | None = None, grammar=None, program: str | None = None) -> Request:
        """Validates and tokenizes a request without touching engine state (any one thread)."""
        return self.inputs.make_request(prompt, params, request_id, priority, arrival_time, grammar, program)

    def enqueue(self, req: Request, delta: bool = False) -> Request:
        """Queues a request made by make_request (the thread that steps the engine only).
        `delta`: its outputs carry only what is new since the last one."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        if req.forks and self.config.scheduling_policy == "static":
            raise ValueError("SamplingParams.n > 1 is not supported by the static scheduling baseline")
        self.requests[req.request_id] = [req, *req.forks]
        self.outputs.add(req, delta)
        self.scheduler.add(req)
        self.num_prompt_tokens += req.num_prompt_tokens
        return req

    def add_request(self, prompt: PromptType, params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0,
                    arrival_time: float | None = None, program: str | None = None) -> Request:
        if request_id is not None and request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        return self.enqueue(self.make_request(prompt, params, request_id, priority, arrival_time, program=program))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops every sequence of a request; returns its final output (None if unknown)."""
        seqs = self.requests.pop(request_id, None)
        if seqs is None:
            return None
        for seq in seqs:
            self.scheduler.finish(seq, "abort")
        return self.outputs.make_output(request_id)

    def release_program_kv(self, program: str, finished_by: float) -> None:
        """The call of `program` that finished at `finished_by` (its metrics' finished_time)
        ended in no tool call: the KV kept for the program's next call is let go now
        (program_kv_retention; the front end that parses replies tells)."""
        self.scheduler.release_program_kv(program, finished_by)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one step ------------------------------------------------------------------------
    def step(self) -> StepOutput:
        """Schedule, run one forward pass, sample, let finished requests go."""
        sched = self.scheduler.schedule()
        self.step_count += 1
        self.runner.move_kv(sched)  # swaps planned this step, before any forward pass writes
        if sched.is_empty:
            return StepOutput([], [], [], None)
        try:
            result = self.runner.execute(sched)
        except Exception as exc:  # fail this step's requests; the engine keeps serving
            log.exception("step %d failed", self.step_count)
            failed = [seq for r, _ in sched.scheduled for seq in (r, *r.forks)]
            for seq in failed:
                seq.error = f"{type(exc).__name__}: {exc}"
                self.scheduler.finish(seq, "error")
            return self._step_output(sched, failed, failed)
        now = time.time()
        jumped = generated = 0  # forced tokens computed; output tokens among multi-token rows (not prefill)
        for req, n in sched.scheduled:
            if req not in sched.pads:
                last_sampled = req.num_tokens - req.num_forced_pending - 1
                forced = max(0, req.num_computed_tokens + n - (last_sampled + 1))
                req.num_forced_pending -= forced
                jumped += forced
                if n > 1 and forced:  # a row from the last sampled token on carries it too
                    generated += forced + (req.num_computed_tokens == last_sampled)
                req.num_computed_tokens += n
                self.kv.cache_full_blocks(req)
        done: list[Request] = []
        for i, (req, token, lp) in enumerate(zip(result.sampled, result.token_ids, result.logprobs)):
            if token is None:  # this row alone could not be sampled: it alone fails
                req.error, req.finish_reason = result.errors[i], "error"
            else:
                self._append_token(req, token, lp, now)
                if req.finish_reason is None and self._jumps_forward(req):
                    self._append_forced(req, now)
            if req.finish_reason is not None:
                done.append(req)
        for req in result.sampled:
            if req.forks:  # n > 1: the siblings join, each with its copy of the last block
                copies = self.scheduler.fork(req)
                self.runner.copy_blocks([src for src, _ in copies], [dst for _, dst in copies])
        leaving = self.scheduler.leaving(sched, [r for r in done if not r.is_finished])
        for req in leaving:
            self.scheduler.finish(req, req.finish_reason)
            if req.program is not None and req.index == 0 and req.finish_reason in ("stop", "length") \
                    and self.inputs.program_tokens is not None:
                self.inputs.program_tokens.record(req.program, req.all_token_ids)
        return self._step_output(sched, list(dict.fromkeys([*result.sampled, *leaving])), leaving, jumped, generated)

    def _jumps_forward(self, req: Request) -> bool:
        """Whether the text `req`'s grammar forces next is appended at once (jump_forward):
        not where each token must carry logprobs, nor before parallel samples fork."""
        return (self.config.jump_forward and req.grammar is not None and req.sampling_params.logprobs is None
                and not req.forks and req.status == RequestStatus.RUNNING
                and self.config.scheduling_policy != "static")

    def _append_forced(self, req: Request, now: float) -> None:
        """Appends the tokens of the text `req`'s grammar forces after its last token; the
        next step computes them in one chunk (engine/structured_output.py)."""
        while tokens := self.forced_tokens(req.grammar):
            for token in tokens:
                self._append_token(req, token, None, now)
                req.num_forced_pending += 1
                self.num_jump_forward_tokens += 1
                if req.finish_reason is not None:  # the grammar's end, a stop string, max_tokens
                    return

    def _append_token(self, req: Request, token: int, logprobs: dict[int, Logprob] | None, now: float) -> None:
        p = req.sampling_params
        req.all_token_ids.append(token)
        self.num_generated_tokens += 1
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        if logprobs is not None:
            req.logprobs.append(logprobs)
            req.cumulative_logprob += logprobs[token].logprob
        if req.grammar is not None and not req.grammar.accept_token(token):
            # Cannot happen while the sampler masks; if it does, only this request fails.
            req.error = f"sampled token {token} is not allowed by the request's grammar"
            req.finish_reason = "error"
            return
        n_out = req.num_output_tokens
        # As vLLM: stop strings count only from min_tokens on (the text is never cut before).
        stop_str = self.outputs.on_token(req, token, check_stop=n_out >= p.min_tokens)
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in req.eos_token_ids:
                req.finish_reason = "stop"
                return
            if token in p.stop_token_ids:
                req.finish_reason, req.stop_reason = "stop", token
                return
            if stop_str is not None:
                req.finish_reason, req.stop_reason = "stop", stop_str
                return
        if req.grammar is not None and req.grammar.is_terminated():  # accepted its stop token
            req.finish_reason = "stop"
            return
        if n_out >= req.max_output_tokens:
            req.finish_reason = "length"

    def _step_output(self, sched, updated: list[Request], finished: list[Request], jumped: int = 0,
                     generated: int = 0) -> StepOutput:
        decodes = sched.num_decodes
        stats = StepStats(step=self.step_count, time=time.time(), batch_size=len(sched.scheduled),
                          num_decodes=decodes, num_prefill_tokens=sched.num_tokens - decodes - generated,
                          scheduled={r.request_id: n for r, n in sched.scheduled},
                          finished=[r.request_id for r in finished],
                          preempted=[r.request_id for r in sched.preempted],
                          num_free_blocks=self.kv.num_free_blocks,
                          num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                          num_jump_forward_tokens=jumped)
        self.step_history.append(stats)
        self.num_prefill_tokens_computed += stats.num_prefill_tokens
        self.peak_batch_size = max(self.peak_batch_size, stats.batch_size)
        groups = list(dict.fromkeys(r.group_id for r in updated))
        return StepOutput([self.make_output(g) for g in groups], updated, list(sched.preempted), stats)

    def make_output(self, request_id: str) -> RequestOutput:
        """The request's output (a delta if it was enqueued with `delta`). Once it is
        finished, the request is forgotten."""
        out = self.outputs.make_output(request_id)
        if out.finished:
            self.requests.pop(request_id, None)
        return out

    # -- stats ----------------------------------------------------------------------------
    def stats(self) -> dict:
        sched = self.scheduler
        history = [s.batch_size for s in itertools.islice(reversed(self.step_history), 256)][::-1]
        return {
            "num_running": len(sched.running),
            "num_waiting": sum(1 for r in sched.waiting if r.status != RequestStatus.SWAPPED),
            "num_swapped": sum(1 for r in sched.waiting if r.status == RequestStatus.SWAPPED),
            "kv_blocks_total": self.kv.num_blocks,
            "kv_blocks_free": self.kv.num_free_blocks,
            "kv_cache_usage": 1.0 - self.kv.num_free_blocks / self.kv.num_blocks,
            "num_preemptions": sched.num_preemptions,
            "prefix_cache_queries": self.kv.prefix_cache_queries,
            "prefix_cache_hits": self.kv.prefix_cache_hits,
            "kv_blocks_pinned": self.kv.num_pinned_blocks,   # kept for agent programs' next calls
            "kv_pins": dict(self.kv.pin_counts),              # made; taken by the next call, expired, yielded, swaps
            "kv_blocks_pinned_swapped": sched.swap_space.num_pinned_blocks if sched.swap_space else 0,  # in CPU
            # programs' next calls that took their last call's own tokens (engine/program_tokens.py)
            "program_prompts_continued": self.inputs.program_tokens.num_continued if self.inputs.program_tokens else 0,
            "program_cap": sched.program_cap(),  # programs that may be in progress (None: any)
            "peak_batch_size": self.peak_batch_size,
            "batch_size_history": history,
            "num_steps": self.step_count,
            "prompt_tokens_total": self.num_prompt_tokens,
            "prefill_tokens_computed_total": self.num_prefill_tokens_computed,
            "generation_tokens_total": self.num_generated_tokens,
            "jump_forward_tokens_total": self.num_jump_forward_tokens,
            "grammar_cache_hits": self.grammars.cache_hits,
            "grammar_cache_misses": self.grammars.cache_misses,
            "weights": self.weights,
            "platform": self.platform_info,
        }
