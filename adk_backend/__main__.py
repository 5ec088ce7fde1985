"""`python -m adk_backend serve ...` (also the `adk-engine` console script)."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time

import uvicorn
from engine.config import DEFAULT_MODEL
from engine.engine_args import add_engine_args, engine_options


def _warm_up(engine) -> None:
    from engine import SamplingParams

    async def once():
        async for _ in engine.generate("Hello", SamplingParams(temperature=0, max_tokens=4)):
            pass
    asyncio.run(once())


def serve(args: argparse.Namespace) -> None:
    from adk_backend import configure_engine, engine_for
    from adk_backend.server import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("adk_backend")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: reachable from other machines%s", args.host,
                    "" if args.api_key or os.environ.get("ENGINE_API_KEY") else " with NO API key")
    options = engine_options(args)  # the EngineConfig fields given as flags
    if args.tool_call_parser is not None:
        options["tool_call_parser"] = args.tool_call_parser
    if args.reasoning_parser is not None:
        options["reasoning_parser"] = None if args.reasoning_parser == "none" else args.reasoning_parser
    if options:
        configure_engine(args.model, **options)
    start = time.time()
    log.info("loading %s ...", args.model)
    engine = engine_for(args.model)
    log.info("loaded %s in %.1f s; warming up", args.model, time.time() - start)
    _warm_up(engine)
    app = create_app(agents_dir=args.agents_dir, model=args.model, api_key=args.api_key,
                     open_adk_routes=args.open_adk_routes, trace_to_cloud=args.trace_to_cloud,
                     otel_to_cloud=args.otel_to_cloud, session_service_uri=args.session_service_uri, host=args.host,
                     port=args.port, allow_origins=args.allow_origins,
                     max_concurrent_per_client=args.max_concurrent_per_client, web=not args.no_web,
                     max_waiting=args.max_waiting, artifact_service_uri=args.artifact_service_uri,
                     memory_service_uri=args.memory_service_uri, eval_storage_uri=args.eval_storage_uri,
                     extra_plugins=args.extra_plugins, a2a=args.a2a)
    server = DrainingServer(uvicorn_config(app, args))
    server.ready_message = (f"serving {args.model} on http://{args.host}:{args.port} "
                            "(dev UI at /dev-ui/, OpenAI API at /v1, metrics at /metrics)")
    server.run()
    from adk_backend import shutdown_all
    shutdown_all()  # in-flight requests were drained (or cut at the grace period) by uvicorn
    log.info("shut down cleanly")


def uvicorn_config(app, args: argparse.Namespace) -> uvicorn.Config:
    """How `serve` runs the app: its address, drain period and keep-alive."""
    return uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                          timeout_graceful_shutdown=args.grace_period, timeout_keep_alive=args.timeout_keep_alive)


class DrainingServer(uvicorn.Server):
    """SIGTERM/SIGINT stop admitting and drain in-flight requests for the grace period, and
    the process exits 0 (plain uvicorn re-raises the signal after shutdown)."""

    ready_message = ""

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.ready_message:  # only now can it answer
            logging.getLogger("adk_backend").info(self.ready_message)

    @contextlib.contextmanager
    def capture_signals(self):
        def stop(signum, frame):
            if self.should_exit:  # a second signal: stop now
                self.force_exit = True
            self.should_exit = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="adk-engine", description="ADK agents on the in-process engine")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="ADK dev UI + OpenAI-compatible API + Prometheus metrics")
    s.add_argument("--agents-dir", default="agents")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--host", default="127.0.0.1", help="loopback by default; 0.0.0.0 in containers")
    s.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8000)))
    s.add_argument("--otel-to-cloud", action="store_true",
                   help="export spans, metrics and logs to Google Cloud over OTLP (the Telemetry API), as "
                        "adk web --otel_to_cloud; OTEL_EXPORTER_OTLP_* variables add any OTLP collector")
    s.add_argument("--trace-to-cloud", action="store_true",
                   help="export spans with the Cloud Trace exporter (older path; needs GOOGLE_CLOUD_PROJECT)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health, "
                   "websockets included (or ENGINE_API_KEY)")
    s.add_argument("--open-adk-routes", action="store_true",
                   help="with an API key, leave ADK's own routes (dev UI, sessions, /run) open; /v1 and /metrics "
                        "stay guarded")
    s.add_argument("--no-web", action="store_true",
                   help="no dev UI (ADK's API routes, /v1 and /metrics stay): the container's default")
    s.add_argument("--max-waiting", type=int, default=512,
                   help="generation requests waiting for the batch before new ones get 503 with Retry-After")
    s.add_argument("--allow-origins", nargs="*", default=None, help="CORS origins (closed by default)")
    s.add_argument("--session-service-uri", default=os.environ.get("SESSION_SERVICE_URI"),
                   help="ADK session store: memory://, sqlite:///path, postgresql://user:pass@host/db, "
                        "agentengine://... (default: in memory; or SESSION_SERVICE_URI)")
    s.add_argument("--artifact-service-uri", default=os.environ.get("ARTIFACT_SERVICE_URI"),
                   help="ADK artifact store: memory://, file:///path, gs://bucket (replicas share one: gs://)")
    s.add_argument("--memory-service-uri", default=None, help="ADK memory service (as adk api_server)")
    s.add_argument("--eval-storage-uri", default=None, help="ADK eval sets and results in gs:// (as adk api_server)")
    s.add_argument("--extra-plugins", nargs="*", default=None, help="qualified names of ADK plugins to load")
    s.add_argument("--a2a", action="store_true", help="serve the agents over A2A too (needs ADK's a2a extra)")
    s.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
                   help="how the model writes tool calls (default: read from its chat template)")
    s.add_argument("--reasoning-parser", default=None, choices=["qwen3", "deepseek_r1", "none"],
                   help="how the model marks its thinking (default: read from its chat template)")
    s.add_argument("--max-concurrent-per-client", type=int, default=None,
                   help="requests in flight on /v1 per client address (429 beyond)")
    add_engine_args(s)  # one flag per EngineConfig field: --max-num-seqs, --dtype, --program-scheduling, ...
    s.add_argument("--timeout-keep-alive", type=int, default=75,
                   help="seconds an idle keep-alive connection stays open (longer than clients' and "
                        "proxies' own, so that a request never meets a connection being closed)")
    s.add_argument("--grace-period", type=int, default=10, help="seconds to drain in-flight requests on SIGTERM")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    if args.command == "serve":
        serve(args)
    else:  # pragma: no cover
        ap.print_help()
        sys.exit(2)


if __name__ == "__main__":
    main()
