"""The serving app against a live server: OpenAI API (openai client), /metrics, /health,
the dev UI route, API keys, body limits and OpenAI-shaped errors."""
import json
from pathlib import Path

import httpx
import openai
import pytest
from starlette.testclient import TestClient

from adk_backend.server import create_app

from conftest import SERVER_MODEL as MODEL
from server_helpers import LiveServer

ROOT_DIR = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(smollm2_server):
    return smollm2_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def test_chat_completion_with_the_openai_client(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2 + 2?"}],
                                       max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.chat.completions.create(model=f"engine/{MODEL}", messages=[{"role": "user",
                                                                               "content": "What is 2 + 2?"}],
                                           max_tokens=16, temperature=0)
    assert again.choices[0].message.content == r.choices[0].message.content  # greedy: same answer


def test_streaming_chat_completion_adds_up_to_the_plain_one(client):
    msgs = [{"role": "user", "content": "Name a color."}]
    # a warm-up first, so that both requests find the same cached prefix (a prompt attended
    # fresh and one over cached blocks differ in the last bits, and int8 activations can
    # turn that into a near-tie token flip)
    client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1)
    plain = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason


def test_tool_call_in_openai_shape(client):
    tools = [{"type": "function", "function": {"name": "get_capital", "description": "Capital of a country",
                                               "parameters": {"type": "object", "properties": {
                                                   "country": {"type": "string"}}, "required": ["country"]}}}]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Capital of Japan?"}],
                                       tools=tools, tool_choice="required", max_tokens=40)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.type == "function"
    assert call.function.name == "get_capital" and isinstance(json.loads(call.function.arguments), dict)
    follow = client.chat.completions.create(model=MODEL, max_tokens=20, tools=tools, messages=[
        {"role": "user", "content": "Capital of Japan?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"capital": "Tokyo"})}])
    assert follow.choices[0].message.content


def test_completions_and_models(client, server):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 5
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.parametrize("body, status, fragment", [
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    ({"model": "/etc/passwd", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    ({"model": MODEL, "messages": []}, 400, "non-empty list"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": "x"}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "'model' is required"),
])
def test_bad_requests_get_openai_shaped_4xx(server, body, status, fragment):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status
    assert fragment in r.json()["error"]["message"]


def test_invalid_json_and_oversized_bodies(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", content=b"x" * (5 << 20), timeout=30)
    assert r.status_code == 413


def test_metrics_health_and_dev_ui(server, client):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    text = httpx.get(server.url + "/metrics").text
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
                 "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "engine:kv_blocks_pinned",
                 "engine:kv_blocks_pinned_swapped", "engine:program_prompts_continued_total",
                 "engine:jump_forward_tokens_total"):
        assert f'{name}{{model_name="{MODEL}"}}' in text, name
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert httpx.get(server.url + "/dev-ui/").status_code == 200
    assert "assistant" in httpx.get(server.url + "/list-apps").json()


def test_api_key_guards_v1_routes(server):
    app = create_app(agents_dir="agents", model=MODEL, api_key="s3cret", web=False)
    with TestClient(app, base_url="http://localhost") as c:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert c.post("/v1/chat/completions", json=body).status_code == 401
        assert c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models").json()["error"]["code"] == "invalid_api_key"
        ok = c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200  # probes stay open


def test_sessions_default_to_memory_and_write_nothing_into_the_agents_folder(server, tmp_path):
    # README and `--session-service-uri` say the default store is in memory. ADK's own default
    # became a SQLite file per agent (<agent>/.adk/session.db), whose 5 s write lock made
    # turns fail with "database is locked" (HTTP 500) under 64 concurrent sessions.
    import shutil
    shutil.copytree(ROOT_DIR / "agents" / "assistant", tmp_path / "assistant", ignore=shutil.ignore_patterns(".adk"))
    app = create_app(agents_dir=str(tmp_path), model=MODEL, web=False)
    with TestClient(app, base_url="http://localhost") as c:
        r = c.post("/apps/assistant/users/u/sessions/s1", json={"k": 1})  # the body is the state
        assert r.status_code == 200, r.text
        assert c.get("/apps/assistant/users/u/sessions/s1").json()["state"] == {"k": 1}
    assert not list(tmp_path.rglob("session.db")), list(tmp_path.rglob("*"))


def test_an_idle_keep_alive_connection_outlives_the_clients_own_expiry():
    # httpx and many proxies drop an idle connection after 5 s, uvicorn's own default too: a
    # client reusing one at ~5 s raced the server's close and got a cut connection (ReadError)
    # under load. The server keeps idle connections longer than its clients do.
    import http.client
    import time

    from adk_backend.__main__ import parser, uvicorn_config
    from adk_backend.server import create_app
    from server_helpers import free_port

    args = parser().parse_args(["serve", "--port", str(free_port())])  # serve's own defaults
    app = create_app(agents_dir="agents", model="dummy-tiny", web=False)
    with LiveServer(config=uvicorn_config(app, args)) as s:
        conn = http.client.HTTPConnection(s.url.removeprefix("http://"), timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().read() and conn.sock is not None
        time.sleep(6)
        conn.request("GET", "/health")  # the same socket, idle past 5 s
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"

def test_serve_takes_adks_server_options_artifacts_in_a_file_store(tmp_path):
    """`adk api_server`'s options pass through (here: artifacts in a file:// store, which a
    new app on the same folder reads back)."""
    from adk_backend.__main__ import parser
    args = parser().parse_args(["serve", "--artifact-service-uri", f"file://{tmp_path}", "--memory-service-uri",
                                "memory://", "--extra-plugins", "adk_backend.adk_model.ServiceTierPlugin"])
    assert args.artifact_service_uri == f"file://{tmp_path}" and args.extra_plugins
    app = create_app(agents_dir="agents", model="dummy-tiny", web=False, artifact_service_uri=args.artifact_service_uri,
                     memory_service_uri=args.memory_service_uri)
    url = "/apps/assistant/users/u/sessions/s1/artifacts"
    with TestClient(app, base_url="http://localhost") as c:
        assert c.post("/apps/assistant/users/u/sessions/s1", json={}).status_code == 200
        r = c.post(url, json={"filename": "note.txt", "artifact": {"inlineData": {"mimeType": "text/plain",
                                                                                  "data": "aGVsbG8="}}})
        assert r.status_code == 200, r.text
    assert any(tmp_path.rglob("*")), "the artifact went to the file store"
