"""Spans and GenAI metrics leave a served process the ways Google Cloud and ADK take them:
OTLP/HTTP from the standard OTEL_EXPORTER_OTLP_* variables, `--otel-to-cloud` (OTLP to the
Cloud Telemetry API with google-auth credentials) and `--trace-to-cloud` (the Cloud Trace
exporter). The real exporters, google-auth and protobuf run; only the far ends are local
fakes (tests/fake_google_cloud.py). Values are checked, not only keys."""
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from fake_google_cloud import FAKE_TOKEN, FakeCloudTrace, OtlpReceiver, service_account_file
from benchmarks.systems import free_port, served

MODEL = "dummy-tiny"
AGENT = '''from google.adk.agents import LlmAgent
from google.genai import types

import adk_backend  # noqa: F401  (registers engine/ models)

root_agent = LlmAgent(name="traced", model="engine/dummy-tiny", instruction="Answer briefly.",
                      generate_content_config=types.GenerateContentConfig(max_output_tokens=8))
'''
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRIC_EXPORT_INTERVAL": "500"}


@pytest.fixture(scope="module")
def agents_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("agents")
    (root / "traced").mkdir()
    (root / "traced" / "__init__.py").write_text("from . import agent\n")
    (root / "traced" / "agent.py").write_text(AGENT)
    return root


def chat(url: str) -> dict:
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 12, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def adk_turn(url: str) -> None:
    sid = uuid.uuid4().hex
    assert httpx.post(f"{url}/apps/traced/users/u/sessions/{sid}", json={}, timeout=30).status_code == 200
    r = httpx.post(url + "/run_sse", timeout=60, json={
        "appName": "traced", "userId": "u", "sessionId": sid, "streaming": False,
        "newMessage": {"role": "user", "parts": [{"text": "hi"}]}})
    assert r.status_code == 200 and '"text"' in r.text, r.text[:500]


def wait_for(cond, timeout: float = 20.0):
    deadline = time.time() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.time() < deadline, "not exported in time"
        time.sleep(0.1)


def ancestors(span: dict, spans: list[dict]) -> list[str]:
    by_id = {s["span_id"]: s for s in spans}
    names, parent = [], by_id.get(span["parent_span_id"])
    while parent is not None:
        names.append(parent["name"])
        parent = by_id.get(parent["parent_span_id"])
    return names


def check_engine_span(span: dict) -> None:
    a = span["attributes"]
    assert a["gen_ai.provider.name"] == "adk_engine" and a["gen_ai.request.model"] == MODEL
    queue, ttft, e2e = a["gen_ai.latency.time_in_queue"], a["gen_ai.response.time_to_first_chunk"], a["gen_ai.latency.e2e"]
    assert 0 <= queue <= ttft <= e2e
    assert abs((span["end"] - span["start"]) / 1e9 - e2e) < 0.05  # the span covers the request
    assert a["gen_ai.usage.input_tokens"] == a["gen_ai.usage.prompt_tokens"] > 0  # vLLM's names kept beside
    assert a["gen_ai.usage.output_tokens"] == a["gen_ai.usage.completion_tokens"]


def test_only_the_otlp_traces_endpoint_exports_engine_spans_under_their_http_and_adk_parents(agents_dir):
    receiver = OtlpReceiver()
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url + "/v1/traces", **FAST_EXPORT}
    try:
        with served(MODEL, "--agents-dir", str(agents_dir), env=env) as (url, _):
            usage = chat(url)["usage"]
            adk_turn(url)
            engine_spans = lambda: [s for s in receiver.spans if s["name"] == "llm_request"]  # noqa: E731
            # the HTTP server spans end last (a batch after the engine's on a loaded machine)
            wait_for(lambda: len(engine_spans()) >= 2 and {"POST /run_sse", "POST /v1/chat/completions"}
                     <= {s["name"] for s in receiver.spans})
            spans = list(receiver.spans)
    finally:
        receiver.close()
    v1 = [s for s in engine_spans() if s["attributes"]["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
          and "POST /v1/chat/completions" in ancestors(s, spans)]
    assert len(v1) == 1, [ancestors(s, spans) for s in engine_spans()]
    check_engine_span(v1[0])
    assert v1[0]["attributes"]["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert v1[0]["attributes"]["gen_ai.usage.output_tokens"] == 12
    adk = [s for s in engine_spans() if any(n.startswith("generate_content") for n in ancestors(s, spans))]
    assert len(adk) == 1
    check_engine_span(adk[0])
    chain = ancestors(adk[0], spans)
    assert chain[0].startswith("generate_content") and "invoke_agent traced" in chain and chain[-1] == "POST /run_sse"


def test_otel_to_cloud_exports_spans_and_genai_metrics_to_the_telemetry_api_with_google_auth(agents_dir, tmp_path):
    receiver = OtlpReceiver()
    env = {"FAKE_GOOGLE_URL": receiver.url, "GOOGLE_CLOUD_PROJECT": "test-project", "NO_GCE_CHECK": "True",
           "GOOGLE_APPLICATION_CREDENTIALS": str(service_account_file(tmp_path / "sa.json", receiver.url + "/token")),
           **FAST_EXPORT}
    try:
        with served(MODEL, "--agents-dir", str(agents_dir), "--otel-to-cloud", env=env,
                    launcher=["tests/with_fake_google.py", "adk_backend"]) as (url, _):
            for _ in range(3):
                chat(url)
            wait_for(lambda: sum(1 for s in receiver.spans if s["name"] == "llm_request") >= 3)
            # ADK's Cloud metrics reader exports every 5 s.
            duration = wait_for(lambda: receiver.metrics.get("gen_ai.server.request.duration"), timeout=30)
            ttft = receiver.metrics.get("gen_ai.server.time_to_first_token")
            tpot = receiver.metrics.get("gen_ai.server.time_per_output_token")
            exported = set(receiver.metrics)
    finally:
        receiver.close()
    assert all(h == f"Bearer {FAKE_TOKEN}" for h in receiver.auth_headers)  # google-auth's token on every export
    engine = [s for s in receiver.spans if s["name"] == "llm_request"]
    for span in engine:
        check_engine_span(span)
    assert max(p["count"] for p in duration) >= 3 and ttft and tpot
    assert duration[0]["attributes"] == {"gen_ai.operation.name": "text_completion",
                                         "gen_ai.provider.name": "adk_engine", "gen_ai.request.model": MODEL}
    # The time per output token of 12-token requests is (e2e - ttft) / 11: below the e2e.
    assert max(p["sum"] / p["count"] for p in tpot) < max(p["sum"] / p["count"] for p in duration)
    # Every metric the Cloud Monitoring dashboard charts is one the server exports.
    dashboard = (Path(__file__).resolve().parents[2] / "docs" / "cloud_monitoring_dashboard.json").read_text()
    charted = set(re.findall(r'prometheus\.googleapis\.com/([\w.]+)/(?:histogram|gauge)', dashboard))
    assert len(charted) == 7 and charted <= exported, charted - exported
    assert max(p["value"] for p in receiver.metrics["engine.batch_size"]) >= 1


def test_trace_to_cloud_exports_engine_spans_through_the_cloud_trace_exporter(agents_dir, tmp_path):
    receiver, cloud_trace = OtlpReceiver(), FakeCloudTrace()
    env = {"FAKE_GOOGLE_URL": receiver.url, "FAKE_CLOUD_TRACE": f"127.0.0.1:{cloud_trace.port}",
           "GOOGLE_CLOUD_PROJECT": "test-project", "NO_GCE_CHECK": "True",
           "GOOGLE_APPLICATION_CREDENTIALS": str(service_account_file(tmp_path / "sa.json", receiver.url + "/token")),
           **FAST_EXPORT}
    try:
        with served(MODEL, "--agents-dir", str(agents_dir), "--trace-to-cloud", env=env,
                    launcher=["tests/with_fake_google.py", "adk_backend"]) as (url, _):
            usage = chat(url)["usage"]
            spans = wait_for(lambda: [s for s in list(cloud_trace.spans) if s.display_name.value == "llm_request"
                                      and s.attributes.attribute_map["gen_ai.usage.output_tokens"].int_value
                                      == usage["completion_tokens"]])
    finally:
        receiver.close()
        cloud_trace.close()
    attrs = spans[0].attributes.attribute_map
    assert attrs["gen_ai.usage.input_tokens"].int_value == usage["prompt_tokens"]
    assert spans[0].name.startswith("projects/test-project/traces/")
    assert spans[0].parent_span_id  # under the /v1 request's HTTP span


def test_adk_web_with_otel_to_cloud_exports_our_agents_engine_spans(agents_dir, tmp_path):
    """ADK's own server (`adk web --otel_to_cloud`) with an agent on engine/ models: the
    engine's spans go out through ADK's telemetry set-up, under ADK's spans."""
    receiver = OtlpReceiver()
    port = free_port()
    env = {**os.environ, "FAKE_GOOGLE_URL": receiver.url, "GOOGLE_CLOUD_PROJECT": "test-project",
           "NO_GCE_CHECK": "True", "PYTHONUNBUFFERED": "1", **FAST_EXPORT,
           "GOOGLE_APPLICATION_CREDENTIALS": str(service_account_file(tmp_path / "sa.json", receiver.url + "/token"))}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "tests/with_fake_google.py", "google.adk.cli", "web", "--port", str(port),
                             "--otel_to_cloud", "--no-reload", str(agents_dir)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                return httpx.get(url + "/list-apps", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(up, timeout=180)
        adk_turn(url)
        engine = wait_for(lambda: [s for s in list(receiver.spans) if s["name"] == "llm_request"], timeout=30)
        # ADK's parent spans end (and are exported) after the engine's: wait for the whole chain
        wait_for(lambda: "invoke_agent traced" in ancestors(engine[0], list(receiver.spans)), timeout=30)
        spans = list(receiver.spans)
    finally:
        proc.terminate()
        proc.wait(30)
        receiver.close()
    check_engine_span(engine[0])
    chain = ancestors(engine[0], spans)
    assert chain[0].startswith("generate_content") and "invoke_agent traced" in chain
    assert all(h == f"Bearer {FAKE_TOKEN}" for h in receiver.auth_headers)
