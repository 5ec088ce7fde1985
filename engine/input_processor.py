"""Prompts in, validated Requests out: tokenizing, chat templates, limits, grammars.

Touches no engine state, so it may run on any one thread (AsyncLLM runs it on its input
thread; a fast tokenizer must not be used by two threads at once). A request with `n > 1`
comes out as its first sequence carrying the other n - 1 in `forks`.
"""
from __future__ import annotations

import dataclasses
import itertools
import time

from engine.config import ModelConfig
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.structured_output import GrammarCompiler

PromptType = str | list[int]

class InputProcessor:
    def __init__(self, tokenizer, model_config: ModelConfig, max_model_len: int,
                 grammars: GrammarCompiler, model_name: str, sampling_defaults: dict | None = None) -> None:
        self.tokenizer = tokenizer
        self.sampling_defaults = dict(sampling_defaults or {})  # from generation_config.json
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.grammars = grammars
        self.model_name = model_name
        self._ids = itertools.count()

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model {self.model_name!r} has no tokenizer; pass token ids")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=False)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            template_kwargs: dict | None = None) -> str:
        """The prompt for a conversation. Messages are transformers' chat messages: 'role' and
        'content' (a string; None on an assistant turn that only calls tools), and where the
        template renders them, an assistant's 'tool_calls' and a tool result's 'name' and
        'tool_call_id'. `template_kwargs` reach the template (e.g. Qwen3's enable_thinking)."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model {self.model_name!r} has no chat template")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        for m in messages:
            content = m.get("content", "") if isinstance(m, dict) else None
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                    isinstance(content, str) or (content is None and m.get("tool_calls"))):
                raise ValueError(f"each message needs a string 'role' and string 'content', got {m!r}"[:300])
        kwargs = dict(template_kwargs or {})
        for reserved in ("messages", "conversation", "tools", "tokenize", "add_generation_prompt"):
            if reserved in kwargs:
                raise ValueError(f"chat template argument {reserved!r} cannot be overridden")
        # transformers renders templates in a sandboxed Jinja environment.
        return self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False,
                                                 **kwargs)

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config defaults (as vLLM)."""
        return SamplingParams(**self.sampling_defaults)

    def make_request(self, prompt: PromptType, params: SamplingParams | None = None,
                     request_id: str | None = None, priority: int = 0,
                     arrival_time: float | None = None, grammar=None) -> Request:
        """`grammar`: its structured_outputs already compiled (AsyncLLM compiles them off the
        event loop); else they are compiled here."""
        params = params or self.default_sampling_params()
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
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        arrival_time = arrival_time or time.time()

        def sequence(index: int) -> Request:
            # As vLLM: sibling i of a seeded request draws from seed + i, so they differ.
            p = params if index == 0 or params.seed is None else dataclasses.replace(params, seed=params.seed + index)
            seq = Request(request_id=request_id if index == 0 else f"{request_id}/{index}",
                          prompt_token_ids=ids, sampling_params=p, prompt=text,
                          eos_token_ids=self.model_config.eos_token_ids, max_total_tokens=self.max_model_len,
                          priority=priority, arrival_time=arrival_time)
            seq.group_id, seq.index = request_id, index
            if grammar is not None:
                seq.grammar = self.grammars.matcher(grammar)
            return seq

        first = sequence(0)
        first.forks = [sequence(i) for i in range(1, params.n)]
        return first
