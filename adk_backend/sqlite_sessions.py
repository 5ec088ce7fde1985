"""ADK's SQLite session store with one writer at a time per process.

ADK's `SqliteSessionService` opens a connection per call and holds SQLite's write lock across
awaits (the reads, the INSERT, the commit); with tens of sessions writing at once on a busy
event loop, a writer waited past SQLite's 5 s busy timeout and the turn failed with
"database is locked" (HTTP 500). Here the process's writes (create, append, delete) queue on
one asyncio lock, in order, so SQLite sees one writer from this process and never times one
out; reads run as before. `register()` makes it the store for `sqlite://` URIs.
"""
from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlparse

from google.adk.cli.service_registry import get_service_registry
from google.adk.events import Event
from google.adk.sessions import InMemorySessionService, Session
from google.adk.sessions.sqlite_session_service import SqliteSessionService


class SerialWriteSqliteSessionService(SqliteSessionService):
    def __init__(self, db_path: str) -> None:
        super().__init__(db_path=db_path)
        self._write_lock = asyncio.Lock()

    async def create_session(self, **kwargs: Any) -> Session:
        async with self._write_lock:
            return await super().create_session(**kwargs)

    async def append_event(self, session: Session, event: Event) -> Event:
        async with self._write_lock:
            return await super().append_event(session, event)

    async def delete_session(self, **kwargs: Any) -> None:
        async with self._write_lock:
            await super().delete_session(**kwargs)


def _factory(uri: str, **_: Any):
    """ADK's reading of a sqlite URI: `sqlite:///rel.db` relative, `sqlite:////abs.db`
    absolute, `sqlite://` in memory."""
    path = urlparse(uri).path
    if not path:
        return InMemorySessionService()
    return SerialWriteSqliteSessionService(path[1:] if path.startswith("/") else path)


def register() -> None:
    get_service_registry().register_session_service("sqlite", _factory)
