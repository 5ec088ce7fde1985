"""Per-request sampling parameters, validated up front with errors that name the field."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field


_KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
# Stop strings are searched in every new token's text on the shared step thread: a few, short
# (OpenAI takes at most 4).
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 64
# Grammar sizes (characters of the schema, EBNF or regex as sent): xgrammar compiles an EBNF
# of 5,000 alternatives (170 KB) in about 10 s; these stay well under a second.
MAX_GRAMMAR_CHARS = {"json": 32_768, "json_object": 16, "regex": 4_096, "choice": 16_384, "grammar": 16_384,
                     "structural_tag": 65_536}
MAX_CHOICES = 256


@dataclass(frozen=True)
class StructuredOutputsParams:
    """vLLM's names; exactly one is set. `json` is a JSON schema (dict or JSON text),
    `grammar` is EBNF (GBNF), `structural_tag` is xgrammar's structural-tag format (free
    text with constrained tagged regions, used for tool calls)."""
    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    structural_tag: dict | str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice) or not self.choice:
                raise ValueError(f"structured_outputs.choice must be a non-empty list of strings, got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.json_object not in (True, False):
            raise ValueError(f"structured_outputs.json_object must be a boolean, got {self.json_object!r}")
        chosen = self._chosen()
        if len(chosen) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(_KINDS)}; got "
                             f"{', '.join(chosen) or 'none'}")
        for kind in ("json", "structural_tag"):
            value = getattr(self, kind)
            if value is not None and not isinstance(value, (dict, str)):
                raise ValueError(f"structured_outputs.{kind} must be a JSON object or JSON text, "
                                 f"got {type(value).__name__}")
        for kind in ("regex", "grammar"):
            value = getattr(self, kind)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{kind} must be a non-empty string, got {value!r}"[:300])
        # Compiling grows with a grammar's size and runs beside everyone's requests: bounded.
        size = len(self.key[1])
        limit = MAX_GRAMMAR_CHARS[self.kind]
        if size > limit:
            raise ValueError(f"structured_outputs.{self.kind} is {size} characters; at most {limit}")
        if self.choice is not None and len(self.choice) > MAX_CHOICES:
            raise ValueError(f"structured_outputs.choice has {len(self.choice)} options; at most {MAX_CHOICES}")

    @classmethod
    def from_any(cls, value) -> "StructuredOutputsParams":
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs must be a dict or StructuredOutputsParams, got {type(value).__name__}")
        unknown = sorted(set(value) - set(_KINDS))
        if unknown:
            raise ValueError(f"structured_outputs has unknown field(s) {unknown}; known: {list(_KINDS)}")
        return cls(**value)

    def _chosen(self) -> list[str]:
        return [k for k in _KINDS if getattr(self, k) not in (None, False)]

    @property
    def kind(self) -> str:
        return self._chosen()[0]

    @property
    def key(self) -> tuple[str, str]:
        """What the compiled grammar is cached by."""
        value = getattr(self, self.kind)
        if isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        elif isinstance(value, tuple):
            value = json.dumps(value)
        return self.kind, str(value)


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1              # -1 (or 0): no top-k
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # top-n logprobs per generated token
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output to a grammar
    n: int = 1                   # sequences sampled from one prompt (they share its KV blocks)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop) if self.stop is not None else []
        self.stop_token_ids = list(self.stop_token_ids) if self.stop_token_ids is not None else []
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_any(self.structured_outputs)
        self._validate()

    def _validate(self) -> None:
        _int("n", self.n)
        _check(1 <= self.n <= 64, "n", self.n, "in [1, 64]")
        _num("temperature", self.temperature)
        _check(self.temperature >= 0, "temperature", self.temperature, ">= 0")
        _num("top_p", self.top_p)
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _int("top_k", self.top_k)
        _check(self.top_k >= -1, "top_k", self.top_k, ">= -1 (-1 or 0 disables it)")
        _num("min_p", self.min_p)
        _check(0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        if self.seed is not None:
            _int("seed", self.seed)
            _check(0 <= self.seed < 2**63, "seed", self.seed, "in [0, 2**63)")
        if self.max_tokens is not None:
            _int("max_tokens", self.max_tokens)
            _check(self.max_tokens >= 1, "max_tokens", self.max_tokens, ">= 1")
        _int("min_tokens", self.min_tokens)
        _check(self.min_tokens >= 0, "min_tokens", self.min_tokens, ">= 0")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
                   f"<= max_tokens ({self.max_tokens})")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"SamplingParams.stop must be a list of non-empty strings, got {self.stop!r}"[:300])
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"<{len(self.stop)} strings>",
               f"at most {MAX_STOP_STRINGS} strings")
        longest = max((len(s) for s in self.stop), default=0)
        _check(longest <= MAX_STOP_LENGTH, "stop", f"<a string of {longest} characters>",
               f"strings of at most {MAX_STOP_LENGTH} characters")
        _check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids", f"<{len(self.stop_token_ids)} ids>",
               f"at most {MAX_STOP_TOKEN_IDS} ids")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise ValueError(f"SamplingParams.stop_token_ids must be non-negative ints, got {t!r}")
        _num("repetition_penalty", self.repetition_penalty)
        _check(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "> 0")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _num(name, value)
            _check(-2 <= value <= 2, name, value, "in [-2, 2]")
        if self.logprobs is not None:
            _int("logprobs", self.logprobs)
            _check(0 <= self.logprobs <= 20, "logprobs", self.logprobs, "in [0, 20]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _check(ok: bool, name: str, value, limit: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} must be {limit}, got {value!r}")


def _num(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"SamplingParams.{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"SamplingParams.{name} must be finite, got {value!r}")


def _int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"SamplingParams.{name} must be an integer, got {value!r}")
