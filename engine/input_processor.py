"""Prompts in, validated Requests out: tokenizing, chat templates (engine/chat_template.py),
limits, grammars.

Touches no engine state, so it may run on any one thread (AsyncLLM runs it on its input
thread; a fast tokenizer must not be used by two threads at once). A request with `n > 1`
comes out as its first sequence carrying the other n - 1 in `forks`.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from typing import NamedTuple

from engine import chat_template
from engine.config import ModelConfig
from engine.program_tokens import ProgramTokens
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.structured_output import GrammarCompiler

PromptType = str | list[int]


class CheckedPrompt(NamedTuple):
    """A prompt past the cheap checks: its text (None for token ids), ids, sampling params."""
    text: str | None
    ids: list[int]
    params: SamplingParams


class InputProcessor:
    def __init__(self, tokenizer, model_config: ModelConfig, max_model_len: int,
                 grammars: GrammarCompiler, model_name: str, sampling_defaults: dict | None = None,
                 continue_programs: bool = True) -> None:
        self.tokenizer = tokenizer
        # an agent program's next call in the tokens its last call ended with (engine/program_tokens.py)
        self.program_tokens = ProgramTokens(
            lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
            chat_template.control_token_ids(tokenizer)) if tokenizer is not None and continue_programs else None
        self.sampling_defaults = dict(sampling_defaults or {})  # from generation_config.json
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.grammars = grammars
        self.model_name = model_name
        self._ids = itertools.count()

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text, ids). A string is refused when longer than any `max_model_len` tokens can
        spell, before it is tokenized. A raw string gets the tokenizer's special tokens
        (BOS, as vLLM; not twice); a rendered chat has what its template wrote; text marked
        protected (engine.chat_template) never becomes a control token."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model {self.model_name!r} has no tokenizer; pass token ids")
            limit = self.max_model_len * chat_template.max_token_chars(self.tokenizer)
            if len(prompt) > limit:
                raise ValueError(f"prompt has {len(prompt)} characters: more than {self.max_model_len} tokens "
                                 f"(max_model_len) can spell ({limit})")
            bos = self.tokenizer.bos_token
            add_special = not isinstance(prompt, chat_template.RenderedChat) and not (bos and prompt.startswith(bos))
            return str(prompt), chat_template.encode(self.tokenizer, prompt, add_special)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            template_kwargs: dict | None = None) -> str:
        """The prompt for a conversation. Messages are transformers' chat messages: 'role' and
        'content' (a string; None on an assistant turn that only calls tools), and where the
        template renders them, an assistant's 'tool_calls' and a tool result's 'name' and
        'tool_call_id'. `template_kwargs` reach the template where it reads them (e.g.
        Qwen3's enable_thinking). Control tokens spelled in the messages stay plain text."""
        template = getattr(self.tokenizer, "chat_template", None) if self.tokenizer is not None else None
        if not isinstance(template, str) or not template:
            raise ValueError(f"model {self.model_name!r} has no chat template")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        for m in messages:
            content = m.get("content", "") if isinstance(m, dict) else None
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                    isinstance(content, str) or (content is None and m.get("tool_calls"))):
                raise ValueError(f"each message needs a string 'role' and string 'content', got {m!r}"[:300])
        kwargs = chat_template.check_template_kwargs(template, template_kwargs)
        # transformers renders templates in a sandboxed Jinja environment.
        return chat_template.render(self.tokenizer, messages, tools, kwargs)

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config defaults (as vLLM)."""
        return SamplingParams(**self.sampling_defaults)

    def check(self, prompt: PromptType, params: SamplingParams | None = None) -> CheckedPrompt:
        """The cheap checks, before any grammar is compiled: the prompt tokenized and within
        max_model_len, the sampling values within this model's vocabulary."""
        params = params or self.default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        text, ids = self.tokenize(prompt)
        vocab = self.model_config.vocab_size
        if not ids:
            raise ValueError("prompt is empty: it must have at least one token")
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if params.top_k > vocab:
            raise ValueError(f"SamplingParams.top_k must be <= the vocabulary size ({vocab}), got {params.top_k}")
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"SamplingParams.stop_token_ids must be < the vocabulary size ({vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, "
                             "which leaves no room to generate")
        return CheckedPrompt(text, ids, params)

    def make_request(self, prompt: PromptType | CheckedPrompt, params: SamplingParams | None = None,
                     request_id: str | None = None, priority: int = 0,
                     arrival_time: float | None = None, grammar=None, program: str | None = None) -> Request:
        """`prompt` checked here, or already (`check`); `grammar`: its structured_outputs
        already compiled (AsyncLLM compiles them off the event loop), else compiled here."""
        checked = prompt if isinstance(prompt, CheckedPrompt) else self.check(prompt, params)
        text, ids, params = checked
        if program is not None and text is not None and self.program_tokens is not None:
            continued = self.program_tokens.continued(program, ids)
            ids = continued if len(continued) < self.max_model_len else ids
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
                          priority=priority, program=program, arrival_time=arrival_time)
            seq.group_id, seq.index = request_id, index
            if grammar is not None:
                seq.grammar = self.grammars.matcher(grammar)
            return seq

        first = sequence(0)
        first.forks = [sequence(i) for i in range(1, params.n)]
        return first
