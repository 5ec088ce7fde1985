"""Grammar-constrained decoding, backed by xgrammar.

A request whose `SamplingParams.structured_outputs` is set carries a grammar matcher.
Grammars compile off the step thread (AsyncLLM awaits `compile_async`; the offline LLM
compiles while it adds requests), are cached by their key, and a grammar that fails or
takes longer than `compile_timeout` seconds is a `ValueError` naming the problem. A compile
runs in a child process (grammar_worker), killed at its deadline: xgrammar cannot stop a
compile, and one left running would hold a core and a worker long after its client left.

Each step, `GrammarBitmask.apply` fills one token bitmask for every constrained row of the
batch and applies it to the logits in one vectorized op before sampling; free rows share
the batch untouched.

Jump-forward (`EngineConfig.jump_forward`): where the grammar allows one continuation only
(a required call's `<tool_call>\n{"name": "lookup", "arguments": {"step": ` once its first
character is out, JSON keys, a tag's end), decoding it a token a step spends a forward pass
of the whole batch on each token, and a small model under a mask spells it in fragments
(SmolLM2 wrote a `lookup` call in 59 tokens, 55 of them forced). After each sampled token
the engine appends the forced text's tokens at once (xgrammar's
`find_jump_forward_tokens`: the longest vocabulary tokens that spell it, stop and special
tokens excluded, and without a last token that could merge with what the model writes
next); the next step computes them as one chunk with the request's last token and samples
after them, as SGLang's jump-forward. Where that leaves a token out but the mask allows
that one token only (a tag's closing `>`; the stop token once the grammar is complete), it
is appended too: the sampler could pick nothing else. A request that asks for logprobs
decodes every token.

Invariant: a request's matcher has accepted exactly its output tokens, in order. Tokens
are accepted only where they are appended (`LLMEngine._append_token`: sampled, or forced
by jump-forward), so preemption (swap or recompute), chunked prefill and prefix-cache hits,
which recompute or reuse KV but never resample a token, leave it right; an aborted request
drops its matcher with itself.
"""
from __future__ import annotations

import asyncio
import json
import tempfile
import threading
from collections import OrderedDict
from concurrent.futures import Future

import torch
import xgrammar as xgr

from engine import grammar_worker
from engine.sampling_params import StructuredOutputsParams


class GrammarCompiler:
    """Compiles grammars for one tokenizer, off the caller's thread, with a cache and a timeout."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...],
                 compile_timeout: float = 10.0, cache_size: int = 256, cache_bytes: int = 256 << 20) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.compile_timeout = compile_timeout
        self.cache_size = cache_size    # grammars kept, and their bytes at most (least recently used go)
        self.cache_bytes = cache_bytes
        self._cached_bytes = 0
        self._cache: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._pending: dict[tuple[str, str], Future] = {}
        self._lock = threading.Lock()        # cache and pending compilations
        self._init_lock = threading.Lock()
        self._info: xgr.TokenizerInfo | None = None
        # compiles run in grammar_worker's child processes (shared by every engine), which read
        # the tokenizer from this file
        self._info_file = tempfile.NamedTemporaryFile("w", suffix=".json", prefix="tokenizer-info-")
        self.cache_hits = 0
        self.cache_misses = 0

    def _tokenizer_info(self) -> xgr.TokenizerInfo:
        with self._init_lock:  # reading the vocabulary takes ~0.2 s: once, on first use
            if self._info is None:
                if self.tokenizer is None:
                    raise ValueError("structured outputs need a tokenizer; this model has none")
                self._info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                                stop_token_ids=self.stop_token_ids)
                self._info_file.write(self._info.serialize_json())  # for the compiler processes
                self._info_file.flush()
            return self._info

    def submit(self, params: StructuredOutputsParams) -> Future:
        """A future of the compiled grammar; one compilation per key, however many ask."""
        key = params.key
        with self._lock:
            if key in self._cache:
                self.cache_hits += 1
                self._cache.move_to_end(key)
                done: Future = Future()
                done.set_result(self._cache[key])
                return done
            if key in self._pending:
                self.cache_hits += 1
                return self._pending[key]
            self.cache_misses += 1
            future = grammar_worker.POOL.submit(self._compile, params)
            self._pending[key] = future
        future.add_done_callback(lambda f: self._store(key, f))
        return future

    def _store(self, key: tuple[str, str], future: Future) -> None:
        with self._lock:
            self._pending.pop(key, None)
            if future.cancelled() or future.exception() is not None:
                return
            compiled = future.result()
            self._cache[key] = compiled
            self._cached_bytes += compiled.memory_size_bytes
            while len(self._cache) > 1 and (len(self._cache) > self.cache_size
                                            or self._cached_bytes > self.cache_bytes):
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.memory_size_bytes

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """Blocking form (offline LLM). Every compile ends: within `compile_timeout` seconds
        of starting, or its process is killed (a ValueError)."""
        return self.submit(params).result()

    async def compile_async(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """As `compile`. Each waiter has a future of its own: one that gives up (its client
        left) never cancels the compilation for the others waiting on the same grammar
        (asyncio.wrap_future would)."""
        shared = self.submit(params)
        loop = asyncio.get_running_loop()
        mine = loop.create_future()

        def settle(done: Future) -> None:
            if mine.done():
                return
            if done.cancelled():
                mine.cancel()
            elif done.exception() is not None:
                mine.set_exception(done.exception())
            else:
                mine.set_result(done.result())

        def settle_soon(done: Future) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(settle, done)
        shared.add_done_callback(settle_soon)
        return await mine

    def _timeout_message(self, params: StructuredOutputsParams) -> str:
        return (f"structured_outputs.{params.kind}: the grammar did not compile within "
                f"{self.compile_timeout:g} s; simplify it")

    def _compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        kind = params.kind
        try:
            if kind == "json":
                schema = json.loads(params.json) if isinstance(params.json, str) else params.json
                job = ("json_schema", json.dumps(strict_json_strings(schema)))
            elif kind == "json_object":
                job = ("json_schema", '{"type": "object"}')
            elif kind == "regex":
                job = ("regex", params.regex)
            elif kind == "choice":
                job = ("grammar", "root ::= " + " | ".join(json.dumps(c) for c in params.choice))
            elif kind == "grammar":
                job = ("grammar", params.grammar)
            else:
                tag = json.loads(params.structural_tag) if isinstance(params.structural_tag, str) \
                    else params.structural_tag
                job = ("structural_tag", json.dumps(_strict_tag_schemas(tag)))
            self._tokenizer_info()
            compiled = grammar_worker.compile(self._info_file.name, *job, self.compile_timeout)
            return xgr.CompiledGrammar.deserialize_json(compiled, self._info)
        except grammar_worker.CompileTimeout:
            raise ValueError(self._timeout_message(params)) from None
        except (ValueError, TypeError) as exc:
            raise ValueError(f"structured_outputs.{kind} is invalid: {_first_line(exc)}") from None

    def matcher(self, compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(compiled)

    def shutdown(self) -> None:
        self._info_file.close()  # removes it; the compiler processes are shared, and stay


# A JSON string character that needs no escape; xgrammar's rule for strings with a length
# bound allows raw control characters (U+0000-U+001F), which no JSON parser accepts.
_PLAIN_CHAR = r'[^"\\\x00-\x1f]'


def strict_json_strings(schema):
    """The schema with every length-bounded string (no pattern or format of its own) given
    an equivalent pattern that excludes raw control characters, so the output always parses."""
    if isinstance(schema, list):
        return [strict_json_strings(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_json_strings(v) if k not in ("enum", "const", "default", "examples") else v
           for k, v in schema.items()}
    types = out.get("type") if isinstance(out.get("type"), list) else [out.get("type")]
    bounded = "minLength" in out or "maxLength" in out
    if "string" in types and len(types) == 1 and bounded and not ({"pattern", "format", "enum", "const"} & out.keys()):
        lo, hi = out.pop("minLength", 0), out.pop("maxLength", None)
        out["pattern"] = f"^{_PLAIN_CHAR}{{{lo},{'' if hi is None else hi}}}$"
    return out


def _strict_tag_schemas(node):
    """strict_json_strings applied to every json_schema inside a structural tag."""
    if isinstance(node, list):
        return [_strict_tag_schemas(n) for n in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "json_schema" and "json_schema" in node:
        return {**node, "json_schema": strict_json_strings(node["json_schema"])}
    return {k: _strict_tag_schemas(v) for k, v in node.items()}


def _first_line(exc: BaseException) -> str:
    """xgrammar's messages start with a timestamp and a C++ source location."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
        if ": " in text and ".cc:" in text.split(": ", 1)[0]:
            text = text.split(": ", 1)[1]
    return text


class ForcedTokens:
    """The tokens a request's grammar forces next (jump-forward), for one vocabulary."""

    def __init__(self, vocab_size: int) -> None:
        self.mask = xgr.allocate_token_bitmask(1, vocab_size)

    def __call__(self, matcher: xgr.GrammarMatcher) -> list[int]:
        tokens = matcher.find_jump_forward_tokens()
        if tokens or matcher.is_terminated() or not (matcher.is_completed() or matcher.find_jump_forward_string()):
            return tokens
        only = self.only_allowed(matcher)
        return [] if only is None else [only]

    def only_allowed(self, matcher: xgr.GrammarMatcher) -> int | None:
        """The next token, where the grammar allows exactly one."""
        matcher.fill_next_token_bitmask(self.mask)
        words = self.mask[0].nonzero()
        if len(words) != 1:
            return None
        word = int(self.mask[0, words[0]]) & 0xFFFFFFFF  # 32 tokens a word, stored as int32
        return int(words[0]) * 32 + word.bit_length() - 1 if word & (word - 1) == 0 else None


class GrammarBitmask:
    """One reusable bitmask buffer for the constrained rows of a step; the platform applies it."""

    def __init__(self, vocab_size: int, platform) -> None:
        self.vocab_size = vocab_size
        self.buffer = xgr.allocate_token_bitmask(1, vocab_size)
        self.platform = platform

    def apply(self, logits: torch.Tensor, matchers: list) -> None:
        """logits: [N, V] fp32, row i belongs to matchers[i] (None: unconstrained)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        n = logits.shape[0]
        if self.buffer.shape[0] < n:
            self.buffer = xgr.allocate_token_bitmask(max(n, 2 * self.buffer.shape[0]), self.vocab_size)
        bitmask = self.buffer[:n]
        for i in rows:
            matchers[i].fill_next_token_bitmask(bitmask, i)
        self.platform.apply_token_bitmask(logits, bitmask, rows)
