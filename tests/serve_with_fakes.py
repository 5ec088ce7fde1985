"""`python tests/serve_with_fakes.py serve ...`: the real `adk_backend serve`, with Google's
telemetry endpoints re-pointed at local fakes at the transport level (see fake_google_cloud).
FAKE_GOOGLE_URL names the OTLP/OAuth receiver, FAKE_CLOUD_TRACE the Cloud Trace gRPC fake."""
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]
from fake_google_cloud import install_transport_fakes  # noqa: E402

install_transport_fakes(os.environ["FAKE_GOOGLE_URL"], os.environ.get("FAKE_CLOUD_TRACE"))

from adk_backend.__main__ import main  # noqa: E402

main(sys.argv[1:])
