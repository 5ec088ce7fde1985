"""Local stand-ins for what a served process talks to when it exports telemetry, so that the
real exporters, google-auth and the real protobuf run end to end on 127.0.0.1:

- `OtlpReceiver` (benchmarks/otlp_receiver.py): an OTLP/HTTP receiver, which also plays
  Google's OAuth token endpoint and answers 404 to metadata-server lookups.
- `FakeCloudTrace`: Cloud Trace v2's BatchWriteSpans over gRPC.
- `service_account_file`: real service-account credentials (a fresh RSA key) whose token_uri
  is the receiver.
- `install_transport_fakes`: run inside the served process (tests/with_fake_google.py), it
  re-points HTTP requests to Google hosts at the receiver and Cloud Trace's gRPC channel at
  the fake, at the transport: everything above the socket is the real code.
"""
from __future__ import annotations

import json
import threading
from concurrent import futures
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from benchmarks.otlp_receiver import FAKE_TOKEN, OtlpReceiver  # noqa: F401 (re-exported)

GOOGLE_HOSTS = ("telemetry.googleapis.com", "oauth2.googleapis.com", "metadata.google.internal", "169.254.169.254")


class FakeCloudTrace:
    """Cloud Trace v2 BatchWriteSpans on an insecure local gRPC port."""

    def __init__(self) -> None:
        import grpc
        from google.cloud.trace_v2.types import BatchWriteSpansRequest
        from google.protobuf import empty_pb2
        self.spans = []
        self.lock = threading.Lock()

        def batch_write(request, context):
            with self.lock:
                self.spans.extend(request.spans)
            return empty_pb2.Empty()
        handler = grpc.method_handlers_generic_handler("google.devtools.cloudtrace.v2.TraceService", {
            "BatchWriteSpans": grpc.unary_unary_rpc_method_handler(
                batch_write, request_deserializer=BatchWriteSpansRequest.deserialize,
                response_serializer=empty_pb2.Empty.SerializeToString)})
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def close(self) -> None:
        self.server.stop(None)


def service_account_file(path: Path, token_uri: str, project: str = "test-project") -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path.write_text(json.dumps({
        "type": "service_account", "project_id": project, "private_key_id": "k1", "private_key": pem,
        "client_email": f"tester@{project}.iam.gserviceaccount.com", "client_id": "1", "token_uri": token_uri}))
    return path


def install_transport_fakes(receiver_url: str, cloud_trace_target: str | None = None) -> None:
    """In this process: HTTP(S) requests to Google's hosts go to `receiver_url`, and a gRPC
    channel to Cloud Trace goes to `cloud_trace_target` (insecure)."""
    import grpc
    import requests.adapters

    fake = urlsplit(receiver_url)
    send = requests.adapters.HTTPAdapter.send

    def redirected_send(self, request, *args, **kwargs):
        url = urlsplit(request.url)
        if url.hostname in GOOGLE_HOSTS:
            request.url = urlunsplit(("http", fake.netloc, url.path, url.query, ""))
        return send(self, request, *args, **kwargs)
    requests.adapters.HTTPAdapter.send = redirected_send

    if cloud_trace_target:
        secure_channel = grpc.secure_channel

        def channel(target, credentials, *args, **kwargs):
            if target.startswith("cloudtrace.googleapis.com"):
                return grpc.insecure_channel(cloud_trace_target)
            return secure_channel(target, credentials, *args, **kwargs)
        grpc.secure_channel = channel
