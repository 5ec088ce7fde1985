"""Bad input over HTTP: each case gets a 4xx whose message names the problem, the server
keeps serving, and no KV block leaks. (The Python API's cases: test_bad_input.py.)"""
import json

import httpx
import pytest

from adk_backend import configure_engine, engine_for
from adk_backend.server import create_app
from server_helpers import LiveServer

MODEL = "bad-input-tiny"
MSG = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def server():
    configure_engine(MODEL, model="dummy-tiny", dtype="float32", num_kv_blocks=256, max_model_len=512)
    with LiveServer(create_app(agents_dir="agents", model=MODEL)) as s:
        yield s


def chat_body(**kw):
    return {"model": MODEL, "messages": MSG, "max_tokens": 4} | kw


CHAT_CASES = [
    ("unknown model", chat_body(model="gpt-9"), 404, "does not exist"),
    ("model is a path", chat_body(model="../../etc/passwd"), 404, "does not exist"),
    ("missing model", {"messages": MSG}, 400, "'model' is required"),
    ("model wrong type", chat_body(model=7), 400, "'model' is required"),
    ("missing messages", {"model": MODEL}, 400, "messages must be a non-empty list"),
    ("empty messages", chat_body(messages=[]), 400, "messages must be a non-empty list"),
    ("messages not a list", chat_body(messages="hi"), 400, "messages must be a non-empty list"),
    ("unknown role", chat_body(messages=[{"role": "wizard", "content": "x"}]), 400, "role"),
    ("content wrong type", chat_body(messages=[{"role": "user", "content": 5}]), 400, "content"),
    ("max_tokens 0", chat_body(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", chat_body(max_tokens=-5), 400, "max_tokens"),
    ("max_tokens huge", chat_body(max_tokens=10**9), 400, "max_tokens must be <="),
    ("max_tokens string", chat_body(max_tokens="10"), 400, "max_tokens"),
    ("temperature negative", chat_body(temperature=-1), 400, "temperature"),
    ("frequency_penalty huge", chat_body(frequency_penalty=1e9), 400, "frequency_penalty"),
    ("top_p zero", chat_body(top_p=0), 400, "top_p"),
    ("top_p above one", chat_body(top_p=1.5), 400, "top_p"),
    ("presence_penalty out of range", chat_body(presence_penalty=9), 400, "presence_penalty"),
    ("seed negative", chat_body(seed=-3), 400, "seed"),
    ("n zero", chat_body(n=0), 400, "SamplingParams.n must be in [1, 64]"),
    ("n not a number", chat_body(n="2"), 400, "'n' must be a number"),
    ("stop list of numbers", chat_body(stop=[1, 2]), 400, "stop"),
    ("stop empty string", chat_body(stop=[""]), 400, "stop"),
    ("stream not bool", chat_body(stream="yes"), 400, "stream"),
    ("tools not a list", chat_body(tools={"a": 1}), 400, "tools must be a list"),
    ("tool without name", chat_body(tools=[{"type": "function", "function": {}}]), 400, "each tool must be"),
    ("tool parameters not a schema", chat_body(tools=[{"type": "function", "function": {"name": "f",
                                                                                        "parameters": 3}}]),
     400, "not a JSON schema"),
    ("tool_choice names unknown tool", chat_body(tools=[TOOL], tool_choice={"type": "function",
                                                                           "function": {"name": "g"}}),
     400, "not among the tools"),
    ("tool call id mismatch", chat_body(messages=[
        {"role": "assistant", "content": None, "tool_calls": [{"id": "a", "type": "function",
                                                               "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "b", "content": "1"}]), 400, "tool_call_id 'b'"),
    ("tool call arguments not JSON", chat_body(messages=[
        {"role": "assistant", "content": None, "tool_calls": [{"id": "a", "type": "function",
                                                               "function": {"name": "f", "arguments": "{oops"}}]},
        {"role": "user", "content": "x"}]), 400, "not JSON"),
    ("image part to a text-only model", chat_body(messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]), 400,
     "'image_url' parts are not supported"),
    ("prompt over max_model_len", chat_body(messages=[{"role": "user", "content": "word " * 2000}]), 400,
     "max_model_len is 512"),
]


@pytest.mark.parametrize("name, body, status, fragment", CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_chat_completions_bad_input(server, name, body, status, fragment):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"]


@pytest.mark.parametrize("name, raw, status, fragment", [
    ("invalid JSON", b'{"model": ', 400, "not valid JSON"),
    ("JSON array body", b"[1, 2]", 400, "must be a JSON object"),
    ("NaN", b'{"model": "%s", "messages": [], "temperature": NaN}' % MODEL.encode(), 400, "NaN"),
    ("Infinity", b'{"model": "%s", "messages": [], "top_p": Infinity}' % MODEL.encode(), 400, "Infinity"),
    ("invalid UTF-8", b'{"model": "\xff\xfe"}', 400, "not valid UTF-8"),
    ("10 MB body", b'{"model": "' + b"x" * (10 << 20) + b'"}', 413, "over"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_raw_bodies(server, name, raw, status, fragment):
    r = httpx.post(server.url + "/v1/chat/completions", content=raw, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == status
    assert fragment in r.json()["error"]["message"]


@pytest.mark.parametrize("body, fragment", [
    ({"model": MODEL}, "'prompt' must be a string or a list of token ids"),
    ({"model": MODEL, "prompt": [1, "a"]}, "'prompt' must be"),
    ({"model": MODEL, "prompt": ""}, "prompt is empty"),
    ({"model": MODEL, "prompt": [10**9]}, "prompt token ids must be in"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
])
def test_completions_bad_input(server, body, fragment):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and fragment in r.json()["error"]["message"]


@pytest.mark.parametrize("body, status", [
    ({"appName": "assistant"}, 422),                                    # missing fields
    ({"appName": "assistant", "userId": "u", "sessionId": "nope",
      "newMessage": {"role": "user", "parts": [{"text": "hi"}]}}, 404),  # unknown session
    ({"appName": 5, "userId": [], "sessionId": {}, "newMessage": "x"}, 422),  # wrong types
])
def test_adk_run_sse_bad_input(server, body, status):
    r = httpx.post(server.url + "/run_sse", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["detail"]


def test_after_all_that_the_server_serves_and_no_block_leaked(server):
    r = httpx.post(server.url + "/v1/chat/completions", json=chat_body(), timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    assert httpx.get(server.url + "/health").status_code == 200
    stats = engine_for(MODEL).stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_running"] == 0
    assert json.loads(httpx.get(server.url + "/v1/models").text)["data"][0]["id"] == MODEL
