"""Replicas sharing ADK sessions in PostgreSQL (`serve --session-service-uri postgresql://...`),
on a real throwaway cluster: a conversation moves between replicas with its history,
concurrent turns on one session from both replicas are serialized (nothing is lost, no
500), and a replica restarted mid-conversation picks the conversation up."""
import asyncio
import uuid

import httpx
import pytest

from benchmarks.systems import served, served_together
from pg_cluster import PostgresCluster, server_binaries

MODEL = "dummy-tiny"
AGENT = '''from google.adk.agents import LlmAgent
from google.genai import types

import adk_backend  # noqa: F401  (registers engine/ models)

root_agent = LlmAgent(name="chat", model="engine/dummy-tiny", instruction="Answer briefly.",
                      generate_content_config=types.GenerateContentConfig(max_output_tokens=6))
'''

pytestmark = pytest.mark.skipif(server_binaries() is None, reason="PostgreSQL's server binaries are missing: "
                                "`make test` installs them (apt-get install postgresql)")


@pytest.fixture(scope="module")
def agents_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("agents")
    (root / "chat").mkdir()
    (root / "chat" / "__init__.py").write_text("from . import agent\n")
    (root / "chat" / "agent.py").write_text(AGENT)
    return str(root)


@pytest.fixture(scope="module")
def pg():
    with PostgresCluster() as cluster:
        yield cluster


# float32: greedy answers do not depend on which replica, or which batch, computed them
def _replica_args(agents_dir: str, pg: PostgresCluster) -> tuple[str, ...]:
    return ("--agents-dir", agents_dir, "--dtype", "float32", "--session-service-uri", pg.url)


def replica(agents_dir: str, pg: PostgresCluster):
    return served(MODEL, *_replica_args(agents_dir, pg))


@pytest.fixture(scope="module")
def replicas(agents_dir, pg):
    with served_together(2, MODEL, *_replica_args(agents_dir, pg)) as [(a, _), (b, _)]:
        yield a, b


def new_session(url: str) -> str:
    sid = uuid.uuid4().hex
    r = httpx.post(f"{url}/apps/chat/users/u/sessions/{sid}", json={}, timeout=30)
    assert r.status_code == 200, r.text
    return sid


def turn(url: str, sid: str, text: str) -> str:
    r = httpx.post(url + "/run", timeout=120, json={
        "appName": "chat", "userId": "u", "sessionId": sid, "streaming": False,
        "newMessage": {"role": "user", "parts": [{"text": text}]}})
    assert r.status_code == 200, (r.status_code, r.text[:300])
    return "".join(p.get("text", "") for e in r.json() for p in (e.get("content") or {}).get("parts", []))


def history(url: str, sid: str) -> list[tuple[str, str]]:
    r = httpx.get(f"{url}/apps/chat/users/u/sessions/{sid}", timeout=30)
    assert r.status_code == 200, r.text
    return [(e["author"], "".join(p.get("text", "") for p in e["content"]["parts"])) for e in r.json()["events"]]


def test_a_conversation_begun_on_one_replica_continues_on_the_other_with_its_history(replicas):
    a, b = replicas
    moved = new_session(a)
    first = turn(a, moved, "My name is Ada.")
    second = turn(b, moved, "What is my name?")
    expected = [("user", "My name is Ada."), ("chat", first), ("user", "What is my name?"), ("chat", second)]
    assert history(a, moved) == history(b, moved) == expected
    # B answered from the whole conversation: the same as A does with it, not as without it.
    stayed = new_session(a)
    turn(a, stayed, "My name is Ada.")
    assert turn(a, stayed, "What is my name?") == second
    assert turn(a, new_session(a), "What is my name?") != second


def test_concurrent_turns_on_one_session_from_both_replicas_lose_nothing(replicas):
    a, b = replicas
    sid = new_session(a)
    questions = [f"Question {i}." for i in range(6)]

    async def one(client, url, q, sse):  # /run and /run_sse alike
        return await client.post(url + ("/run_sse" if sse else "/run"), json={
            "appName": "chat", "userId": "u", "sessionId": sid, "streaming": sse,
            "newMessage": {"role": "user", "parts": [{"text": q}]}})

    async def main():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client, a if i % 2 else b, q, i % 3 == 0)
                                          for i, q in enumerate(questions)))
    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * len(questions), [r.text[:200] for r in responses]
    assert not any('"error' in r.text for r in responses)  # no stream ended in an error event
    events = history(a, sid)
    assert len(events) == 2 * len(questions)
    # One turn at a time: every question is followed by its own answer, none interleaved.
    assert [author for author, _ in events] == ["user", "chat"] * len(questions)
    assert sorted(text for author, text in events if author == "user") == questions


def test_a_replica_restarted_mid_conversation_picks_it_up(agents_dir, pg):
    with replica(agents_dir, pg) as (url, _):
        sid = new_session(url)
        first = turn(url, sid, "My name is Ada.")
    with replica(agents_dir, pg) as (url, _):  # a new process: nothing in memory
        assert history(url, sid) == [("user", "My name is Ada."), ("chat", first)]
        second = turn(url, sid, "What is my name?")
        assert history(url, sid)[-1] == ("chat", second)


def test_waiters_on_one_busy_session_never_hold_up_turns_on_other_sessions(pg):
    """(hostile input, item 8) A waiter holds no connection: 70 turns queued on one busy
    session (more than a replica's Cloud Run concurrency) leave every other session free."""
    from adk_backend.session_turns import turn_locks

    async def main():
        locks = turn_locks(pg.url)
        busy = await locks.acquire(1, 1.0)
        waiters = [asyncio.ensure_future(locks.acquire(1, 30.0)) for _ in range(70)]
        await asyncio.sleep(0.5)
        other = await asyncio.wait_for(locks.acquire(2, 5.0), 3.0)  # on main: stuck behind the waiters
        assert other is not None
        await locks.release(2, other)
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        await locks.release(1, busy)
        again = await locks.acquire(1, 1.0)
        assert again is not None  # nothing leaked: the session is free again
        await locks.release(1, again)
        await locks.pool.close()
    asyncio.run(main())


def test_a_replica_with_every_turn_slot_taken_answers_busy_in_time(pg):
    from adk_backend.session_turns import Busy, _PostgresLocks

    async def main():
        locks = _PostgresLocks(pg.url, max_turns=3)
        held = [await locks.acquire(key, 1.0) for key in (11, 12, 13)]
        start = asyncio.get_running_loop().time()
        with pytest.raises(Busy):
            await locks.acquire(14, 0.5)
        assert asyncio.get_running_loop().time() - start < 2
        for key, conn in zip((11, 12, 13), held):
            await locks.release(key, conn)
        conn = await locks.acquire(14, 0.5)
        assert conn is not None
        await locks.release(14, conn)
        await locks.pool.close()
    asyncio.run(main())
