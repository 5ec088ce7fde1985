"""A local OTLP/HTTP receiver (/v1/traces, /v1/metrics, /v1/logs, protobuf): what the span
benchmark and the export tests point a served process at. It also plays Google's OAuth
token endpoint (/token) and answers 404 to metadata-server lookups, so that the tests can
run google-auth and ADK's Cloud set-up against it without leaving the machine."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAKE_TOKEN = "fake-access-token-7f3a"


def _any_value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attributes(point) -> dict:
    return {a.key: _any_value(a.value) for a in point.attributes}


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.metrics: dict[str, list] = {}   # metric name -> its data points
        self.logs = 0
        self.auth_headers: list[str] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # metadata server lookups: not on GCP
                self.send_response(404)
                self.end_headers()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                path = urlsplit(self.path).path
                if path == "/token":
                    reply = json.dumps({"access_token": FAKE_TOKEN, "expires_in": 3600, "token_type": "Bearer"})
                    return self._reply(200, reply.encode(), "application/json")
                with receiver.lock:
                    receiver.auth_headers.append(self.headers.get("authorization", ""))
                if path.endswith("/v1/traces"):
                    receiver._add_spans(body)
                elif path.endswith("/v1/metrics"):
                    receiver._add_metrics(body)
                elif path.endswith("/v1/logs"):
                    receiver.logs += 1
                else:
                    return self._reply(404, b"", "text/plain")
                self._reply(200, b"", "application/x-protobuf")

            def _reply(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _add_spans(self, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
        request = ExportTraceServiceRequest.FromString(body)
        spans = [{"name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                  "parent_span_id": s.parent_span_id.hex(), "start": s.start_time_unix_nano,
                  "end": s.end_time_unix_nano, "attributes": {a.key: _any_value(a.value) for a in s.attributes}}
                 for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
        with self.lock:
            self.spans.extend(spans)

    def _add_metrics(self, body: bytes) -> None:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
        request = ExportMetricsServiceRequest.FromString(body)
        with self.lock:
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if m.HasField("histogram"):
                            points = [{"count": p.count, "sum": p.sum, "attributes": _attributes(p)}
                                      for p in m.histogram.data_points]
                        elif m.HasField("gauge"):
                            points = [{"value": p.as_double or p.as_int, "attributes": _attributes(p)}
                                      for p in m.gauge.data_points]
                        else:
                            points = []
                        self.metrics.setdefault(m.name, []).extend(points)

    def close(self) -> None:
        self.server.shutdown()
