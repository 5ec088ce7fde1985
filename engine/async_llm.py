"""AsyncLLM: one engine shared by any number of asyncio callers, on any event loops.

A dedicated thread owns the engine: it runs the step loop while there is work and sleeps
on a condition variable when there is none. Callers never wait for a step, nor block their
loop: `generate()` tokenizes and templates on one input thread (a fast tokenizer is not
safe to share between threads, so the step thread detokenizes with its own copy) and
compiles grammars on the grammar workers, drops the request into an inbox and awaits its
RequestStream; after every step the thread hands each request's delta to its stream.

Request ids: the engine runs each request under an internal id, unique for the life of
the process; the caller's id names its stream, so reusing an id right after `abort()` is
fine, and a duplicate of an id still in flight fails only that call. Leaving the
`async for` early (break, task cancelled, client gone) aborts the request; so does a reader
that stops reading for `EngineConfig.stalled_stream_timeout` seconds. `shutdown()` ends
every open stream with EngineDeadError.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable

from engine import tracing
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.output_stream import RequestStream
from engine.errors import EngineDeadError, RequestFailedError  # noqa: F401 (re-exported)
from engine.request import Request, RequestOutput, StepOutput, aborted_before_start
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
IDLE_STEP_WAIT_S = 0.01  # the longest a held-back request waits for time-driven changes (pins' expiry, aging)


class AsyncLLM:
    def __init__(self, config: EngineConfig | None = None, **engine_options) -> None:
        if config is None:
            config = EngineConfig(**engine_options)
        self.engine = LLMEngine(config)
        self.config = config
        self.engine.platform.release_openmp_pool()  # the step thread runs the kernels: see its docstring
        self.engine.detokenize_with_own_tokenizer()  # the step thread's, apart from the input thread's
        # Guards the inbox, aborts and the id maps only (short sections); the engine itself
        # is touched by the step thread alone.
        self._cond = threading.Condition()
        self._inbox: list[Request] = []
        self._aborts: list[str] = []                    # engine ids
        self._releases: list[tuple[str, float]] = []    # (program, finished by): release_program_kv
        self._streams: dict[str, RequestStream] = {}    # engine id -> its caller's stream
        self._engine_ids: dict[str, str] = {}           # caller's id -> engine id, while in flight
        self._seq = itertools.count()
        self._input_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-input")
        self._dead: BaseException | None = None
        self._stopping = False
        self._stats = self.engine.stats()
        # Called on the step thread with every step's StepOutput (metrics), and with an
        # aborted request's (no stats).
        self.step_listeners: list[Callable[[StepOutput], None]] = []
        tracing.observe_engine(self, config.model)
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self._thread.start()

    # -- public API ---------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def sampling_defaults(self) -> dict:
        """SamplingParams fields the checkpoint's generation_config.json sets; they apply
        where a request leaves the field unset."""
        return self.engine.sampling_defaults

    def default_sampling_params(self) -> SamplingParams:
        return self.engine.default_sampling_params()

    async def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                                  template_kwargs: dict | None = None) -> str:
        """The prompt text for a conversation, rendered on the engine's input thread."""
        self._check_alive()
        return await asyncio.get_running_loop().run_in_executor(
            self._input_pool, self.engine.apply_chat_template, messages, tools, template_kwargs)

    async def count_tokens(self, text: str) -> int:
        """Tokens `text` encodes to (no special tokens), on the input thread (the tokenizer's own)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._input_pool, lambda: len(self.engine.tokenizer.encode(text, add_special_tokens=False)))

    def is_healthy(self) -> bool:
        return self._dead is None and not self._stopping and self._thread.is_alive()

    async def generate(self, prompt: str | list[int] | list[dict], params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0,
                       program: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields a RequestOutput per step with the new text and token ids (deltas; several
        steps' deltas merged when the caller reads slower than the engine steps); the last
        one has `finished=True`, the finish reason and the request's metrics. With
        `params.n > 1` each output holds the sequences (by `index`) that changed. A list of
        {'role', 'content'} dicts is rendered with the model's chat template. `program`: the
        agent run this call belongs to (EngineConfig.program_scheduling)."""
        self._check_alive()
        client_id = request_id if request_id is not None else f"async-{next(self._seq)}"
        engine_id = f"{client_id}#{next(self._seq)}"
        with self._cond:
            if client_id in self._engine_ids:
                raise ValueError(f"request id {client_id!r} is already in use")
            self._engine_ids[client_id] = engine_id
        try:
            req = await self._make_request(prompt, params, engine_id, priority, program)
        except BaseException:
            self._release(client_id, engine_id)
            raise
        # The caller's OpenTelemetry context travels with the request to the step thread.
        stream = RequestStream(asyncio.get_running_loop(), client_id,
                               tracing.start_request_span(req, self.config.model), [req, *req.forks])
        with self._cond:
            refused = self._dead is not None or self._stopping
            if not refused and self._engine_ids.get(client_id) == engine_id:  # not aborted meanwhile
                self._streams[engine_id] = stream
                self._inbox.append(req)
                self._cond.notify()
                queued = True
            else:
                queued = False
        if not queued:
            stream.span.end()
            self._release(client_id, engine_id)
            self._check_alive()
            yield self._as_client(aborted_before_start(req), stream)
            return
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:  # the consumer left early: free its blocks
                self._abort_engine_id(client_id, engine_id)

    def abort(self, request_id: str) -> bool:
        """Stops a request; its blocks are freed and its stream ends with finish_reason
        'abort' at the next step. False if no such request is in flight."""
        with self._cond:
            engine_id = self._engine_ids.get(request_id)
        return engine_id is not None and self._abort_engine_id(request_id, engine_id)

    def release_program_kv(self, program: str, finished_by: float) -> None:
        """The call of `program` that finished at `finished_by` (its output's
        metrics.finished_time) ended in no tool call: the KV kept for the program's next call
        is let go (at the step thread's next turn), not held for its time to live."""
        with self._cond:
            self._releases.append((program, finished_by))
            self._cond.notify()

    def stats(self) -> dict:
        """Engine stats as of the last step, plus the requests not yet taken in."""
        with self._cond:
            inbox = len(self._inbox)
        stats = dict(self._stats)
        stats["num_waiting"] += inbox
        return stats | {"healthy": self.is_healthy()}

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stops the step thread; every open stream ends with EngineDeadError."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self._input_pool.shutdown(wait=False, cancel_futures=True)
        self.engine.shutdown()

    # -- caller side ----------------------------------------------------------------------
    async def _make_request(self, prompt, params, engine_id: str, priority: int, program: str | None) -> Request:
        """On the input thread: render, tokenize and check the prompt (cheap, refused first);
        then compile the grammar (its own workers); then the request."""
        loop = asyncio.get_running_loop()

        def check():
            text = prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
                text = self.engine.apply_chat_template(prompt)
            return self.engine.check_prompt(text, params)
        checked = await loop.run_in_executor(self._input_pool, check)
        grammar = None
        if checked.params.structured_outputs is not None:
            grammar = await self.engine.compile_grammar_async(checked.params.structured_outputs)
        return await loop.run_in_executor(
            self._input_pool, lambda: self.engine.make_request(checked, request_id=engine_id, priority=priority,
                                                               grammar=grammar, program=program))

    def _release(self, client_id: str, engine_id: str) -> None:
        with self._cond:
            if self._engine_ids.get(client_id) == engine_id:
                del self._engine_ids[client_id]

    def _abort_engine_id(self, client_id: str, engine_id: str) -> bool:
        with self._cond:
            if self._engine_ids.get(client_id) != engine_id:
                return False
            del self._engine_ids[client_id]
            self._aborts.append(engine_id)
            self._cond.notify()
        return True

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine is not running: {self._dead!r}")
        if self._stopping:
            raise EngineDeadError("engine is shut down")

    # -- step thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                self._take_in()
                if self._stopping:
                    break
                step = self.engine.step() if self.engine.has_unfinished() else None
                self._stats = self.engine.stats()
                if step is not None:
                    self._notify(step)
                    self._publish(step)
                self._abort_stalled()
                if step is not None and step.stats is None:
                    self._wait_idle()
            self._fail_all(EngineDeadError("engine is shut down"))
        except BaseException as exc:  # the loop itself broke: fail everyone now, refuse new work
            log.exception("engine step loop died")
            self._dead = exc
            self._fail_all(EngineDeadError(f"engine step loop died: {exc!r}"))

    def _wait_idle(self) -> None:
        """After a step with nothing to run though requests wait (held back by the cap of
        programs in progress, or memory that only a pin's time or a release will free):
        wait for new work, an abort or a release, or IDLE_STEP_WAIT_S for time-driven
        changes, instead of stepping emptily on a core the callers need."""
        with self._cond:
            if not (self._inbox or self._aborts or self._releases or self._stopping):
                self._cond.wait(IDLE_STEP_WAIT_S)

    def _take_in(self) -> None:
        """Moves new requests, aborts and KV releases into the engine."""
        with self._cond:
            while not (self._inbox or self._aborts or self._releases or self.engine.has_unfinished()
                       or self._stopping):
                self._cond.wait()
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
            releases, self._releases = self._releases, []
        for program, finished_by in releases:
            self.engine.release_program_kv(program, finished_by)
        for req in inbox:
            try:
                self.engine.enqueue(req, delta=True)
            except Exception as exc:  # one caller's request, not the engine
                self._finish(req.request_id, exc)
        for engine_id in aborts:
            self._abort_now(engine_id)

    def _publish(self, step: StepOutput) -> None:
        """Each updated request's output to its stream."""
        for seq in step.preempted:
            stream = self._streams.get(seq.group_id)
            if stream is not None:
                tracing.on_preempted(stream.span, seq, step.stats.time)
        for out in step.outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if not stream.first_token_seen and out.metrics.first_token_time is not None:
                stream.first_token_seen = True
                tracing.on_first_token(stream.span, out.metrics, self.config.model)
            if out.error is not None:
                self._abort_now(out.request_id, quiet=True)  # its other sequences, if any
                self._finish(out.request_id, RequestFailedError(f"request {stream.client_id} failed: {out.error}"))
            elif out.finished:
                self._finish(out.request_id, out)
            elif not stream.put(self._as_client(out, stream)):
                self._abort_engine_id(stream.client_id, out.request_id)  # its loop is gone

    def _notify(self, step: StepOutput) -> None:
        for listener in self.step_listeners:
            try:
                listener(step)
            except Exception:  # a broken metrics hook must not take the engine down
                log.exception("step listener failed")

    def _abort_now(self, engine_id: str, quiet: bool = False) -> None:
        """Step thread: stops the request in the engine and ends its stream. Listeners see
        its sequences finish with reason 'abort' (metrics count aborts as vLLM does)."""
        seqs = self.engine.sequences(engine_id)
        out = self.engine.abort(engine_id)
        if out is None or quiet:
            return
        self._stats = self.engine.stats()  # no step may follow: listeners read stats without the request
        self._notify(StepOutput([out], seqs, [], None))
        self._finish(engine_id, out)

    def _finish(self, engine_id: str, item: RequestOutput | BaseException) -> None:
        """The request's last item; its stream and ids are forgotten."""
        with self._cond:
            stream = self._streams.pop(engine_id, None)
            if stream is None:
                return
            self._release(stream.client_id, engine_id)
        tracing.end_request_span(stream.span, stream.seqs, self.config.model)
        stream.put(self._as_client(item, stream) if isinstance(item, RequestOutput) else item)

    @staticmethod
    def _as_client(out: RequestOutput, stream: RequestStream) -> RequestOutput:
        out.request_id = stream.client_id
        return out

    def _abort_stalled(self) -> None:
        timeout = self.config.stalled_stream_timeout
        now = time.monotonic()
        for engine_id, stream in list(self._streams.items()):
            if stream.stalled_for(now) > timeout:
                log.warning("request %s: its reader has not read for %.0f s; aborting it", stream.client_id, timeout)
                self._abort_now(engine_id)

    def _fail_all(self, error: EngineDeadError) -> None:
        with self._cond:
            streams, self._streams = list(self._streams.values()), {}
            self._inbox.clear()
            self._engine_ids.clear()
        for stream in streams:
            stream.span.end()
            stream.put(error)
