"""AsyncLLM: one engine shared by any number of asyncio callers, on any event loops.

A dedicated thread owns the engine: it runs the step loop while there is work and sleeps
on a condition variable when there is none. Callers never wait for a step: `generate()`
validates and tokenizes on the caller's thread (a grammar compiles on a worker thread while
the caller's loop waits for it), drops the request into an inbox and
returns to its event loop; after every step the thread hands each request's delta to the
caller's own loop with `call_soon_threadsafe`. Leaving the `async for` early (break, task
cancelled, client gone) aborts the request; its blocks are freed at the next step.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from engine import tracing
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import Request, RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The step thread has died; the engine accepts no more requests."""


class RequestFailedError(RuntimeError):
    """The step running this request raised; the engine itself keeps serving."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    span: object  # the request's OpenTelemetry span, parented in the caller's context


class AsyncLLM:
    def __init__(self, config: EngineConfig | None = None, **engine_options) -> None:
        if config is None:
            config = EngineConfig(**engine_options)
        self.engine = LLMEngine(config)
        self.config = config
        # Guards the inbox, aborts and streams only (short sections); the engine itself is
        # touched by the step thread alone.
        self._cond = threading.Condition()
        self._inbox: list[Request] = []
        self._aborts: list[tuple[str, _Stream | None]] = []
        self._streams: dict[str, _Stream] = {}
        self._dead: BaseException | None = None
        self._stopping = False
        self._ids = 0
        self._stats = self.engine.stats()
        # Called on the step thread after every step with the requests it updated (metrics).
        self.step_listeners: list[Callable[[list[Request]], None]] = []
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self._thread.start()

    # -- public API ---------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    async def generate(self, prompt: str | list[int] | list[dict], params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yields a RequestOutput per step with the new text and token ids (deltas); the last
        one has `finished=True`, the finish reason and the request's metrics. A list of
        {'role', 'content'} dicts is rendered with the model's chat template."""
        self._check_alive()
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            prompt = self.engine.apply_chat_template(prompt)
        with self._cond:
            if request_id is None:
                self._ids += 1
                request_id = f"async-{self._ids}"
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
        grammar = None
        if params is not None and getattr(params, "structured_outputs", None) is not None:
            grammar = await self.engine.grammars.compile_async(params.structured_outputs)  # may raise
        req = self.engine.make_request(prompt, params, request_id=request_id, priority=priority,
                                       grammar=grammar)  # may raise
        # The caller's OpenTelemetry context travels with the request to the step thread.
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), tracing.start_request_span(req, self.config.model))
        with self._cond:
            self._check_alive()
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._inbox.append(req)
            self._cond.notify()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:  # the consumer left early: free its blocks
                self.abort(request_id)

    def abort(self, request_id: str) -> bool:
        """Stops a request; its blocks are freed and its stream ends with finish_reason
        'abort' at the next step. False if no such request is in flight."""
        with self._cond:
            stream = self._streams.pop(request_id, None)
            if stream is None:
                return False
            self._aborts.append((request_id, stream))
            self._cond.notify()
        return True

    def stats(self) -> dict:
        """Engine stats as of the last step, plus the requests not yet taken in."""
        with self._cond:
            inbox = len(self._inbox)
        stats = dict(self._stats)
        stats["num_waiting"] += inbox
        return stats | {"healthy": self.is_healthy()}

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self.engine.grammars.shutdown()

    # -- step thread ----------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine is not running: {self._dead!r}")
        if self._stopping:
            raise EngineDeadError("engine is shut down")

    def _deliver(self, stream: _Stream, item) -> bool:
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
            return True
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            return False

    def _take_in(self) -> list[tuple[_Stream, RequestOutput]]:
        """Moves new requests and aborts into the engine (step thread only)."""
        with self._cond:
            while not (self._inbox or self._aborts or self.engine.has_unfinished() or self._stopping):
                self._cond.wait()
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for req in inbox:
            self.engine.enqueue(req)
        finals = []
        for request_id, stream in aborts:
            req = self.engine.abort(request_id)
            if req is not None and stream is not None:
                tracing.end_request_span(stream.span, req)
                finals.append((stream, self.engine.make_output(req, delta=True)))
        return finals

    def _trace(self, stream: _Stream, req: Request) -> None:
        if req.num_output_tokens == 1 and req.metrics.first_token_time is not None:
            tracing.on_first_token(stream.span, req)
        if req.is_finished:
            tracing.end_request_span(stream.span, req)

    def _run(self) -> None:
        try:
            while True:
                deliveries = self._take_in()
                if self._stopping:
                    break
                updated = self.engine.step() if self.engine.has_unfinished() else []
                self._stats = self.engine.stats()
                for listener in self.step_listeners:
                    try:
                        listener(updated)
                    except Exception:  # a broken metrics hook must not take the engine down
                        log.exception("step listener failed")
                with self._cond:
                    last = self.engine.step_history[-1] if updated else None
                    for rid in last.preempted if last else ():
                        if rid in self._streams and rid in self.engine.requests:
                            tracing.on_preempted(self._streams[rid].span, self.engine.requests[rid], last.time)
                    for req in updated:
                        stream = self._streams.get(req.request_id)
                        if stream is None:
                            continue
                        self._trace(stream, req)
                        if req.error is not None:
                            item = RequestFailedError(f"request {req.request_id} failed: {req.error}")
                        else:
                            item = self.engine.make_output(req, delta=True)
                        if req.is_finished:
                            del self._streams[req.request_id]
                        deliveries.append((stream, item))
                for stream, item in deliveries:
                    if not self._deliver(stream, item) and isinstance(item, RequestOutput) and not item.finished:
                        self.abort(item.request_id)
        except BaseException as exc:  # the loop itself broke: fail everyone now, refuse new work
            log.exception("engine step loop died")
            with self._cond:
                self._dead = exc
                streams, self._streams = list(self._streams.values()), {}
                self._inbox.clear()
            for stream in streams:
                stream.span.end()
                self._deliver(stream, EngineDeadError(f"engine step loop died: {exc!r}"))
