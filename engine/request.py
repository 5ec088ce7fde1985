"""A request's life: WAITING -> RUNNING -> (PREEMPTED | SWAPPED -> RUNNING)* -> FINISHED."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"   # blocks dropped; recomputed when it runs again
    SWAPPED = "swapped"       # blocks copied to CPU memory; copied back when it runs again
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.time()) and counters of one request."""
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    # tokens whose KV it had computed when it finished: its prompt and output less what was
    # appended after its last step (the last sampled token, a closing jump-forward stretch)
    num_computed_tokens: int | None = None
    batch_size_at_first_schedule: int | None = None

    @property
    def time_in_queue(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class Logprob:
    """One token's log probability under the model's raw next-token distribution (before
    penalties, temperature and grammar masks, as vLLM reports them)."""
    logprob: float
    rank: int | None = None            # 1 = the most likely token
    decoded_token: str | None = None   # filled when the output is built


@dataclass
class CompletionOutput:
    index: int                           # which of the request's n sequences
    text: str
    token_ids: list[int]
    finish_reason: str | None = None     # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    logprobs: list[dict[int, Logprob]] | None = None  # per token: the top-n and the sampled one
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None

    @property
    def num_cached_tokens(self) -> int:
        return self.metrics.num_cached_tokens


@dataclass(eq=False)
class Request:
    """One sequence. A request with `n > 1` is n of these: the first (index 0) carries the
    caller's id and, until its prompt is computed, its siblings in `forks`; they then share
    its prompt's KV blocks."""
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    max_total_tokens: int = 0            # prompt + output cap (max_model_len)
    priority: int = 0                    # lower runs first; ties by arrival
    program: str | None = None           # the agent program (run) this call belongs to, if known
    arrival_time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.status = RequestStatus.WAITING
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_forced_pending = 0          # jump-forward tokens at the end, not computed yet
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []   # chained hashes of this request's full blocks
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.error: str | None = None
        self.logprobs: list[dict[int, Logprob]] | None = [] if self.sampling_params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.generator: torch.Generator | None = None
        if self.sampling_params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.sampling_params.seed)
        self.grammar = None                  # its grammar matcher, when structured_outputs is set
        self.group_id = self.request_id      # the id of the request this sequence belongs to
        self.index = 0                       # its place among the request's n sequences
        self.forks: list[Request] = []       # index 0 only: siblings waiting for the prompt's KV

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def max_output_tokens(self) -> int:
        cap = self.max_total_tokens - self.num_prompt_tokens
        mt = self.sampling_params.max_tokens
        return cap if mt is None else min(mt, cap)


def aborted_before_start(req: Request) -> RequestOutput:
    """The final output of a request stopped before the engine took it in."""
    return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                         outputs=[CompletionOutput(index=i, text="", token_ids=[], finish_reason="abort")
                                  for i in range(req.sampling_params.n)],
                         finished=True, metrics=req.metrics)


@dataclass
class StepStats:
    """What one step did, for tests, metrics and plots."""
    step: int
    time: float
    batch_size: int                 # requests in the forward pass
    num_decodes: int
    num_prefill_tokens: int         # prompt tokens and recomputed ones (not jump-forward output)
    scheduled: dict[str, int]       # request id -> tokens computed
    finished: list[str]
    preempted: list[str]
    num_free_blocks: int            # after the step (finished requests' blocks returned)
    num_running: int
    num_waiting: int
    num_jump_forward_tokens: int = 0  # forced output tokens computed in chunks (jump-forward)


@dataclass
class StepOutput:
    """What one `step()` produced."""
    outputs: list[RequestOutput]   # one per request with new tokens or finished (finished ones are forgotten)
    updated: list[Request]         # the sequences that got a token or finished
    preempted: list[Request]
    stats: StepStats | None        # None when nothing was scheduled
