"""`python tests/with_fake_google.py MODULE ARGS...`: runs `python -m MODULE ARGS...` (our
`adk_backend serve`, or ADK's own `google.adk.cli web`) with Google's telemetry endpoints
re-pointed at local fakes at the transport level (see fake_google_cloud). FAKE_GOOGLE_URL
names the OTLP/OAuth receiver, FAKE_CLOUD_TRACE the Cloud Trace gRPC fake."""
import os
import runpy
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]
from fake_google_cloud import install_transport_fakes  # noqa: E402

install_transport_fakes(os.environ["FAKE_GOOGLE_URL"], os.environ.get("FAKE_CLOUD_TRACE"))
module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
