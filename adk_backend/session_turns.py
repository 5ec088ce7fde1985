"""One turn at a time per ADK session, across every replica sharing its session store.

Two turns on one session that run at once would both load the session, and the second to
append an event would lose ADK's stale-session check: a 500, or a stream cut short. So a
turn (`POST /run`, `POST /run_sse`) holds the session's lock from before ADK loads the
session until its response has been sent, and a concurrent turn waits for it (then sees
the first turn's events). With a PostgreSQL session store the lock is a PostgreSQL
advisory lock, so replicas serialize too; otherwise an in-process lock. A turn that still
loses the check (another writer, or a wait past `wait_timeout`) is a 409 that says to retry;
one that finds no turn slot on its replica in time, a 503 (both with Retry-After).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import time

from google.adk.errors import StaleSessionError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TURN_PATHS = ("/run", "/run_sse")


def _lock_id(app: str, user: str, session: str) -> int:
    """A signed 64-bit key for pg_advisory_lock, the same in every replica."""
    digest = hashlib.blake2b(f"{app}\0{user}\0{session}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class _LocalLocks:
    """One replica: an asyncio lock per session."""

    def __init__(self) -> None:
        self.locks: dict[int, asyncio.Lock] = {}

    async def acquire(self, key: int, timeout: float):
        lock = self.locks.setdefault(key, asyncio.Lock())
        try:
            await asyncio.wait_for(lock.acquire(), timeout)
        except TimeoutError:
            return None
        return lock

    async def release(self, key: int, lock: asyncio.Lock) -> None:
        lock.release()
        if not lock.locked() and not getattr(lock, "_waiters", None):
            self.locks.pop(key, None)


class _PostgresLocks:
    """Every replica on one PostgreSQL: a session-level advisory lock, held on a pooled
    connection for the turn. A waiter holds no connection: it borrows one for each try
    (pg_try_advisory_lock, polled), so waiters on one busy session never starve the pool
    of turns on other sessions; `max_turns` turns hold connections at once per replica (its
    Cloud Run concurrency), and a turn finding none within the wait is refused with 503."""

    def __init__(self, dsn: str, max_turns: int = 64) -> None:
        self.dsn = dsn.replace("postgresql+asyncpg://", "postgresql://", 1)
        self.max_turns = max_turns
        self.pool = None
        self._pool_lock = asyncio.Lock()  # the first turns arrive together: one pool, not one each

    async def acquire(self, key: int, timeout: float):
        import asyncpg
        async with self._pool_lock:
            if self.pool is None:
                self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.max_turns)
        deadline, pause = time.monotonic() + timeout, 0.01
        while True:
            left = deadline - time.monotonic()
            try:
                conn = await self.pool.acquire(timeout=max(left, 0.01))
            except asyncio.TimeoutError:
                raise Busy("every turn slot of this replica is in use") from None
            try:
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
                    return conn
            except BaseException:
                await self.pool.release(conn)
                raise
            await self.pool.release(conn)
            if time.monotonic() + pause > deadline:
                return None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)

    async def release(self, key: int, conn) -> None:
        try:
            await conn.execute("SELECT pg_advisory_unlock($1)", key)
        finally:
            await self.pool.release(conn)


class Busy(Exception):
    """No turn slot free in time: the client should retry shortly (503)."""


def turn_locks(session_service_uri: str | None):
    uri = session_service_uri or ""
    return _PostgresLocks(uri) if uri.startswith(("postgresql://", "postgresql+asyncpg://", "postgres://")) \
        else _LocalLocks()


class SessionTurns:
    """ASGI middleware: serializes turns per session (see the module docstring)."""

    def __init__(self, app: ASGIApp, session_service_uri: str | None = None, wait_timeout: float = 60.0) -> None:
        self.app, self.locks, self.wait_timeout = app, turn_locks(session_service_uri), wait_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in TURN_PATHS:
            return await self.app(scope, receive, send)
        parts, more = [], True
        while more:  # the whole body, to read the session and hand it on unchanged
            message = await receive()
            parts.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(parts)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        key = _session_key(body)
        if key is None:  # not a turn ADK will accept: let it answer
            return await self.app(scope, replay, send)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            held = await self.locks.acquire(key, self.wait_timeout)
        except Busy as exc:
            return await _refuse(send, 503, f"{exc}; retry")
        if held is None:
            return await _refuse(send, 409, "another turn on this session is still running; retry")
        try:
            await self.app(scope, replay, tracking_send)
        except StaleSessionError:
            if started:
                raise
            await _refuse(send, 409, "the session changed while this turn ran; reload it and retry")
        finally:
            await self.locks.release(key, held)


def _session_key(body: bytes) -> int | None:
    try:
        req = json.loads(body)
        app, user, session = req.get("appName") or req.get("app_name"), req.get("userId") or req.get(
            "user_id"), req.get("sessionId") or req.get("session_id")
    except (ValueError, AttributeError):
        return None
    if not all(isinstance(v, str) and v for v in (app, user, session)):
        return None
    return _lock_id(app, user, session)


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": body})
