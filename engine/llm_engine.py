"""The engine core: requests in, one scheduled forward pass per `step()`, outputs out."""
from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass

import torch

from engine.block_manager import KVCacheManager
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.loader import load_model, max_positions
from engine.model_runner import ModelRunner
from engine.request import CompletionOutput, Request, RequestOutput, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.structured_output import GrammarCompiler

log = logging.getLogger(__name__)

PromptType = str | list[int]


@dataclass
class StepStats:
    """What one step did, for tests, metrics and plots."""
    step: int
    time: float
    batch_size: int                 # requests in the forward pass
    num_decodes: int
    num_prefill_tokens: int
    scheduled: dict[str, int]       # request id -> tokens computed
    finished: list[str]
    preempted: list[str]
    num_free_blocks: int            # after the step (finished requests' blocks returned)
    num_running: int
    num_waiting: int


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
        loaded = load_model(config)
        self.model_config = loaded.model_config
        self.tokenizer = loaded.tokenizer
        self.detokenizer_tokenizer = loaded.tokenizer  # AsyncLLM gives the step thread its own copy
        self.max_model_len = max_positions(config, self.model_config)
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"EngineConfig.max_num_batched_tokens ({config.max_num_batched_tokens}) must be >= "
                             f"max_model_len ({self.max_model_len}) when chunked prefill is off")
        self.device = torch.device(config.device)
        num_blocks = self._num_kv_blocks()
        dtype = config.torch_dtype
        shape = (num_blocks, config.block_size, self.model_config.num_kv_heads, self.model_config.head_dim)
        # One buffer for every layer's K and V (block copies then take one launch). Zeroed:
        # padded decode rows read stale slots under a mask, and 0 * NaN would leak NaN.
        self.kv_buffer = torch.zeros((2 * self.model_config.num_layers, *shape), dtype=dtype, device=self.device)
        self.kv_caches = [(self.kv_buffer[2 * i], self.kv_buffer[2 * i + 1])
                          for i in range(self.model_config.num_layers)]
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        swapper = None
        if config.preemption_mode == "swap":
            from engine.swap import Swapper
            swapper = Swapper(self.kv, self.kv_caches, config.swap_space)
        self.scheduler = Scheduler(config, self.kv, swapper)
        self.runner = ModelRunner(loaded.model, self.kv_caches, config.block_size, self.device,
                                  config.attention_backend, config.seed)
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size,
                                        self.model_config.eos_token_ids, config.grammar_compile_timeout)
        self.requests: dict[str, Request] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()
        self.step_count = 0
        self.step_history: deque[StepStats] = deque(maxlen=4096)
        self.peak_batch_size = 0
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        log.info("engine ready: %s, %s on %s, %d KV blocks of %d tokens, max_model_len %d",
                 config.model, config.dtype, config.device, num_blocks, config.block_size, self.max_model_len)

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        per_block = self.model_config.kv_bytes_per_token(cfg.torch_dtype) * cfg.block_size
        if cfg.num_kv_blocks is not None:
            num_blocks = cfg.num_kv_blocks
        else:
            budget = cfg.kv_cache_memory
            if budget is None:
                if self.device.type == "cuda":
                    free, _ = torch.cuda.mem_get_info(self.device)
                    budget = int(free * 0.85)
                else:
                    budget = 4 << 30
            # No more than every sequence at full length could use.
            enough = cfg.max_num_seqs * -(-self.max_model_len // cfg.block_size)
            num_blocks = min(budget // per_block, enough)
        if num_blocks * cfg.block_size < self.max_model_len:
            raise ValueError(
                f"KV capacity of {num_blocks} blocks x {cfg.block_size} tokens = {num_blocks * cfg.block_size} tokens "
                f"cannot hold one request of max_model_len={self.max_model_len}; raise num_kv_blocks "
                f"(or kv_cache_memory) to at least {-(-self.max_model_len // cfg.block_size)} blocks or lower max_model_len")
        return num_blocks

    # -- requests ------------------------------------------------------------------------
    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model {self.config.model!r} has no tokenizer; pass token ids")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=False)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model {self.config.model!r} has no chat template")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content", ""), str):
                raise ValueError(f"each message needs a string 'role' and string 'content', got {m!r}")
        # transformers renders templates in a sandboxed Jinja environment.
        return self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)

    def make_request(self, prompt: PromptType, params: SamplingParams | None = None,
                     request_id: str | None = None, priority: int = 0,
                     arrival_time: float | None = None, grammar=None) -> Request:
        """Validates and tokenizes a request without touching engine state (any thread).
        `grammar`: its structured_outputs already compiled (AsyncLLM compiles them off the
        event loop); else they are compiled here."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        text, ids = self.tokenize(prompt)
        if not ids:
            raise ValueError("prompt is empty: it must have at least one token")
        if any(t < 0 or t >= self.model_config.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {self.model_config.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, "
                             "which leaves no room to generate")
        if params.structured_outputs is not None and grammar is None:
            grammar = self.grammars.compile(params.structured_outputs)
        req = Request(request_id=request_id if request_id is not None else f"req-{next(self._ids)}",
                      prompt_token_ids=ids, sampling_params=params, prompt=text,
                      eos_token_ids=self.model_config.eos_token_ids, max_total_tokens=self.max_model_len,
                      priority=priority, arrival_time=arrival_time or time.time())
        if grammar is not None:
            req.grammar = self.grammars.matcher(grammar)
        return req

    def enqueue(self, req: Request) -> Request:
        """Queues a request made by make_request (the thread that steps the engine only)."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        if self.tokenizer is not None:
            self.detokenizers[req.request_id] = IncrementalDetokenizer(self.detokenizer_tokenizer, req)
        self.scheduler.add(req)
        self.num_prompt_tokens += req.num_prompt_tokens
        return req

    def add_request(self, prompt: PromptType, params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0,
                    arrival_time: float | None = None) -> Request:
        if request_id is not None and request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        return self.enqueue(self.make_request(prompt, params, request_id, priority, arrival_time))

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return None
        self.scheduler.finish(req, "abort")
        self._forget(req)
        return req

    def _forget(self, req: Request) -> None:
        self.requests.pop(req.request_id, None)
        self.detokenizers.pop(req.request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one step ------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Schedule, run one forward pass, sample. Returns the requests that got a token or
        finished in this step (finished ones have already given their blocks back)."""
        sched = self.scheduler.schedule()
        self.step_count += 1
        if sched.is_empty:
            return []
        try:
            result = self.runner.execute(sched)
        except Exception as exc:  # fail this step's requests; the engine keeps serving
            log.exception("step %d failed", self.step_count)
            failed = [r for r, _ in sched.scheduled]
            for r in failed:
                r.error = f"{type(exc).__name__}: {exc}"
                self.scheduler.finish(r, "error")
                self._forget(r)
            self._record(sched, failed)
            return failed
        now = time.time()
        for req, n in sched.scheduled:
            if req.static_done:  # a pad token: the row's context grows within its reservation
                req.static_pad_pos = min(req.static_pad_pos + 1, len(req.block_ids) * self.kv.block_size - 1)
            else:
                req.num_computed_tokens += n
                self.kv.cache_full_blocks(req)
        updated: list[Request] = []
        finished: list[Request] = []
        for req, token, lp in zip(result.sampled, result.token_ids, result.logprobs):
            self._append_token(req, token, lp, now)
            updated.append(req)
            if req.finish_reason is not None:
                if self.config.scheduling_policy == "static":
                    req.static_done = True
                    req.static_pad_pos = req.num_tokens - 1  # its last token is not computed yet
                else:
                    finished.append(req)
        if self.config.scheduling_policy == "static" and self.scheduler.static_batch_done():
            finished.extend(self.scheduler.running)
            updated.extend(r for r in self.scheduler.running if r not in updated)
        for req in finished:
            self.scheduler.finish(req, req.finish_reason)
            self._forget(req)
        self._record(sched, finished)
        return updated

    def _append_token(self, req: Request, token: int, logprobs: dict[int, float] | None, now: float) -> None:
        p = req.sampling_params
        req.all_token_ids.append(token)
        self.num_generated_tokens += 1
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        if logprobs is not None:
            req.logprobs.append(logprobs)
            req.cumulative_logprob += logprobs[token]
        if req.grammar is not None and not req.grammar.accept_token(token):
            # Cannot happen while the sampler masks; if it does, only this request fails.
            req.error = f"sampled token {token} is not allowed by the request's grammar"
            req.finish_reason = "error"
            return
        n_out = req.num_output_tokens
        detok = self.detokenizers.get(req.request_id)
        # As vLLM: stop strings count only from min_tokens on (the text is never cut before).
        stop_str = detok.add_token(token, check_stop=n_out >= p.min_tokens) if detok is not None else None
        if detok is not None:
            req.output_text = detok.text
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

    def _record(self, sched, finished: list[Request]) -> None:
        decodes = sum(1 for _, n in sched.scheduled if n == 1)
        stats = StepStats(step=self.step_count, time=time.time(), batch_size=len(sched.scheduled),
                          num_decodes=decodes, num_prefill_tokens=sched.num_tokens - decodes,
                          scheduled={r.request_id: n for r, n in sched.scheduled},
                          finished=[r.request_id for r in finished],
                          preempted=[r.request_id for r in sched.preempted],
                          num_free_blocks=self.kv.num_free_blocks,
                          num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting))
        self.step_history.append(stats)
        self.peak_batch_size = max(self.peak_batch_size, stats.batch_size)

    # -- outputs and stats ---------------------------------------------------------------
    def make_output(self, req: Request, delta: bool = False) -> RequestOutput:
        """The request's output so far; with `delta`, only what was not returned before."""
        finished = req.is_finished
        detok = self.detokenizers.get(req.request_id)
        text = detok.releasable(finished) if detok is not None else req.output_text
        if finished:
            text = req.output_text
        token_ids = req.output_token_ids
        logprobs = req.logprobs
        if delta:
            new_text, new_ids = text[req.sent_text_len:], token_ids[req.sent_token_len:]
            new_lp = logprobs[req.sent_token_len:] if logprobs is not None else None
            req.sent_text_len, req.sent_token_len = len(text), len(token_ids)
            text, token_ids, logprobs = new_text, new_ids, new_lp
        completion = CompletionOutput(index=0, text=text, token_ids=list(token_ids),
                                      finish_reason=req.finish_reason if finished else None,
                                      stop_reason=req.stop_reason, logprobs=logprobs,
                                      cumulative_logprob=req.cumulative_logprob if req.logprobs is not None else None)
        return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                             outputs=[completion], finished=finished, metrics=req.metrics, error=req.error)

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
            "peak_batch_size": self.peak_batch_size,
            "batch_size_history": history,
            "num_steps": self.step_count,
            "prompt_tokens_total": self.num_prompt_tokens,
            "generation_tokens_total": self.num_generated_tokens,
            "grammar_cache_hits": self.grammars.cache_hits,
            "grammar_cache_misses": self.grammars.cache_misses,
        }
