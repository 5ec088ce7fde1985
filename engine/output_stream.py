"""One request's outputs, handed from the step thread to the caller's event loop.

Invariant: at most one item is pending. A delta put while the previous one is unread is
merged into it (text and tokens appended, the newer finish state kept), so a caller that
reads slowly costs no memory and still receives every token; an error replaces whatever
is pending. `stalled_for()` tells how long the oldest unread output has waited, which is
how the step thread finds readers that stay connected but stopped reading.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

from engine.request import Request, RequestOutput


def merge(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """Two consecutive deltas of one request as one (sequence by sequence, by index)."""
    merged = {c.index: c for c in older.outputs}
    for b in newer.outputs:
        a = merged.get(b.index)
        if a is None:
            merged[b.index] = b
            continue
        logprobs = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
        merged[b.index] = replace(b, text=a.text + b.text, token_ids=a.token_ids + b.token_ids, logprobs=logprobs,
                                  finish_reason=b.finish_reason or a.finish_reason,
                                  stop_reason=b.stop_reason if b.finish_reason else a.stop_reason)
    return replace(newer, outputs=[merged[i] for i in sorted(merged)])


class RequestStream:
    def __init__(self, loop: asyncio.AbstractEventLoop, client_id: str, span, seqs: list[Request]) -> None:
        self.loop = loop
        self.client_id = client_id      # the caller's request id (engine ids are internal)
        self.span = span                # the request's OpenTelemetry span
        self.seqs = seqs                # its sequences (step thread only: for the span's totals)
        self.first_token_seen = False
        self._lock = threading.Lock()
        self._pending: RequestOutput | BaseException | None = None
        self._since: float | None = None
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> bool:
        """Step thread. False when the caller's loop is closed (nobody is listening)."""
        with self._lock:
            if isinstance(self._pending, RequestOutput) and isinstance(item, RequestOutput):
                item = merge(self._pending, item)
            if not isinstance(self._pending, BaseException) or isinstance(item, BaseException):
                self._pending = item
            if self._since is None:
                self._since = time.monotonic()
        try:
            self.loop.call_soon_threadsafe(self._ready.set)
            return True
        except RuntimeError:
            return False

    async def get(self) -> RequestOutput | BaseException:
        """Caller's loop: the next (possibly merged) output, or the error that ended it."""
        while True:
            self._ready.clear()  # set() only runs on this loop, between awaits: no lost wake-up
            with self._lock:
                item, self._pending, self._since = self._pending, None, None
            if item is not None:
                return item
            await self._ready.wait()

    def stalled_for(self, now: float) -> float:
        with self._lock:
            return 0.0 if self._since is None else now - self._since
