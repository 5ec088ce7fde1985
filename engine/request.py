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
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None     # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None


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
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    max_total_tokens: int = 0            # prompt + output cap (max_model_len)
    priority: int = 0                    # lower runs first; ties by arrival
    arrival_time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.status = RequestStatus.WAITING
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []   # chained hashes of this request's full blocks
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.error: str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if self.sampling_params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.generator: torch.Generator | None = None
        if self.sampling_params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.sampling_params.seed)
        self.grammar = None                  # its grammar matcher, when structured_outputs is set
        self.static_done = False             # static batching: finished, but its row stays until the batch ends
        self.static_pad_pos = 0              # position of its next pad token
        self.output_text = ""                # filled by the detokenizer
        self.sent_text_len = 0               # how much of output_text has been streamed
        self.sent_token_len = 0

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
