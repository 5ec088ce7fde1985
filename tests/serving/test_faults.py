"""Faults against a live server: a failing step, a dead engine thread, a client that stops
reading, and SIGTERM. The server keeps serving where it can and never hangs a caller."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from adk_backend import configure_engine, engine_for
from adk_backend.server import create_app
from helpers import fail_next_forward
from server_helpers import LiveServer, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def chat(url, model, max_tokens=8, **extra):
    return httpx.post(url + "/v1/chat/completions", timeout=30, json={
        "model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens, **extra})


def wait_until(cond, timeout=5.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_exception_in_one_step_fails_that_request_and_the_server_keeps_serving():
    configure_engine("fault-step", model="dummy-tiny", dtype="float32", num_kv_blocks=256, max_model_len=512)
    engine = engine_for("fault-step")
    with LiveServer(create_app(model="fault-step", web=False)) as s:
        assert chat(s.url, "fault-step").status_code == 200
        fail_next_forward(engine.engine, RuntimeError("injected forward fault"))
        r = chat(s.url, "fault-step")
        assert r.status_code == 500 and "injected forward fault" in r.json()["error"]["message"]
        assert httpx.get(s.url + "/health").status_code == 200
        assert chat(s.url, "fault-step").status_code == 200
        stats = engine.stats()
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_dead_engine_thread_turns_health_503_and_fails_callers_fast():
    configure_engine("fault-dead", model="dummy-tiny", dtype="float32", num_kv_blocks=256, max_model_len=2048)
    engine = engine_for("fault-dead")
    with LiveServer(create_app(model="fault-dead", web=False)) as s:
        import threading
        result = {}

        def long_request():
            start = time.time()
            result["response"] = chat(s.url, "fault-dead", max_tokens=1500, ignore_eos=True)
            result["seconds"] = time.time() - start

        t = threading.Thread(target=long_request)
        t.start()
        wait_until(lambda: engine.stats()["num_running"] == 1)

        def broken_step():
            raise SystemError("engine thread crashed")

        engine.engine.step = broken_step
        killed_at = time.time()
        t.join(5)
        assert result["response"].status_code == 503
        assert time.time() - killed_at < 1.0 + 0.5  # the pending caller heard within a second
        assert httpx.get(s.url + "/health").status_code == 503
        start = time.time()
        assert chat(s.url, "fault-dead").status_code == 503  # refused, not queued forever
        assert time.time() - start < 1.0


def test_client_that_stops_reading_its_stream_is_aborted_and_its_blocks_come_back():
    configure_engine("fault-slow", model="dummy-tiny", dtype="float32", num_kv_blocks=256, max_model_len=4000)
    engine = engine_for("fault-slow")
    with LiveServer(create_app(model="fault-slow", web=False)) as s:
        body = json.dumps({"model": "fault-slow", "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": 3500, "ignore_eos": True, "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b"data:" not in received:
            chunk = sock.recv(4096)
            assert chunk, received  # the server answered and closed: no stream
            received += chunk
        wait_until(lambda: engine.stats()["num_running"] == 1)
        sock.close()  # the client goes away mid-stream
        wait_until(lambda: engine.stats()["num_running"] == 0)
        stats = engine.stats()
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
        assert stats["generation_tokens_total"] < 3500  # it was stopped, not run to the end


def test_sigterm_drains_in_flight_requests_and_exits_zero():
    """SIGTERM mid-stream: the stream still gets every one of its tokens and its real finish
    reason, while a new request is refused (the listener is closed) before the process
    exits 0."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "adk_backend", "serve", "--model", "dummy-tiny", "--port",
                             str(port), "--agents-dir", "agents", "--grace-period", "60"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    max_tokens = 600
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
                "model": "dummy-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)  # mid-stream
            refused = None
            deadline = time.time() + 10
            while refused is None and time.time() < deadline:
                try:
                    code = chat(url, "dummy-tiny").status_code
                    if code == 503:
                        refused = "503"
                except httpx.TransportError:  # connection refused: the listener is closed
                    refused = "connection refused"
                time.sleep(0.05)
            draining = proc.poll() is None  # still serving the stream when it refused
            rest = [line for line in lines if line]
        assert refused is not None, "a new request was accepted while draining"
        assert draining
        chunks = [json.loads(line[6:]) for line in [first, *rest] if line.startswith("data: {")]
        assert rest[-1] == "data: [DONE]"
        assert not any("error" in c for c in chunks), chunks[-2:]
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert finish == ["length"]  # ran to its end, not cut
        assert chunks[-1]["usage"]["completion_tokens"] == max_tokens
        text_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
        assert len(text_chunks) >= 10  # the text really arrived, not only the final usage
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_per_client_concurrency_limit_answers_429_when_configured():
    configure_engine("limit-tiny", model="dummy-tiny", dtype="float32", num_kv_blocks=256, max_model_len=4000)
    engine = engine_for("limit-tiny")
    with LiveServer(create_app(model="limit-tiny", web=False, max_concurrent_per_client=1)) as s:
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=30, json={
                "model": "limit-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000,
                "ignore_eos": True, "stream": True}) as held:
            lines = held.iter_lines()  # keep it: a dropped iterator closes the stream
            next(lines)
            r = chat(s.url, "limit-tiny")
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        wait_until(lambda: engine.stats()["num_running"] == 0)
        assert chat(s.url, "limit-tiny").status_code == 200
