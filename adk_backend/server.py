"""One FastAPI app: ADK's own (dev UI, /run_sse, sessions) plus the OpenAI-compatible API,
/health and /metrics, all on the one shared engine of this process.

Telemetry is ADK's set-up, not a second one racing it: `otel_to_cloud` (OTLP to the Cloud
Telemetry API), `trace_to_cloud` (Cloud Trace exporter) and the OTEL_EXPORTER_OTLP_*
variables all go to `get_fast_api_app`, which installs the global providers the engine's
spans and metrics use. Every HTTP request gets a server span (FastAPI instrumentation), so
an engine span always has a parent: ADK's generate_content span, or the /v1 request's."""
from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from adk_backend import sqlite_sessions
from adk_backend.engines import engine_for, model_name
from adk_backend.metrics import EngineMetrics
from adk_backend.openai_api import make_router
from adk_backend.openai_http import APIError, error_response
from adk_backend.session_turns import SessionTurns
from engine.config import DEFAULT_MODEL

log = logging.getLogger(__name__)
DEFAULT_MAX_BODY = 4 << 20  # bytes


class BodyLimit:
    """Refuses request bodies over `limit` bytes with 413, whether or not they say their length
    (a chunked body is cut where it passes the limit, and answered 413 if nothing was sent yet)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(413, f"request body over {self.limit} bytes")(scope, receive, send)
        seen, started = 0, False

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise APIError(413, f"request body over {self.limit} bytes")
            return message

        async def tracking(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking)
        except APIError as exc:  # raised from a route outside FastAPI's handlers (ADK's, the turn locks)
            if started:
                raise
            await exc.response()(scope, receive, send)


class ApiKeyGuard:
    """With an API key, every route but /health needs `Authorization: Bearer <key>`, websockets
    included (the header of their handshake). `open_paths(path)` says which routes are open on
    purpose (ADK's, with --open-adk-routes). A CORS preflight passes: it carries no credentials,
    and the CORS middleware inside answers it."""

    def __init__(self, app: ASGIApp, key: str, open_path) -> None:
        self.app, self.expected, self.open_path = app, f"Bearer {key}".encode(), open_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await receive()  # the connect message
            return await send({"type": "websocket.close", "code": 1008, "reason": "invalid or missing API key"})
        return await error_response(401, "invalid or missing API key (Authorization: Bearer <key>)",
                                    "authentication_error", code="invalid_api_key")(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        if path == "/health" or self.open_path(path):
            return True
        headers = dict(scope.get("headers") or [])
        if scope["type"] == "http" and scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            return True
        return hmac.compare_digest(headers.get(b"authorization", b""), self.expected)  # constant time


def _redacting(detail, root: str):
    """An error detail with the server's absolute agents path cut to the agent's own name."""
    if isinstance(detail, str):
        return detail.replace(root + os.sep, "").replace(root, "agents")
    return detail


def create_app(agents_dir: str = "agents", model: str = DEFAULT_MODEL, api_key: str | None = None,
               open_adk_routes: bool = False, trace_to_cloud: bool = False, otel_to_cloud: bool = False,
               host: str = "127.0.0.1",
               port: int = 8000, allow_origins: list[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
               max_tokens_limit: int = 4096, web: bool = True,
               max_concurrent_per_client: int | None = None, session_service_uri: str | None = None,
               max_waiting: int | None = 512, artifact_service_uri: str | None = None,
               memory_service_uri: str | None = None, eval_storage_uri: str | None = None,
               extra_plugins: list[str] | None = None, a2a: bool = False) -> FastAPI:
    """`session_service_uri`: ADK's forms (`memory://`, `sqlite:///path`, `postgresql://...`,
    `agentengine://...`; default `memory://`); replicas given one PostgreSQL URI share
    sessions, one turn per session at a time (session_turns). With `api_key` (or
    ENGINE_API_KEY) every route but /health needs it; `open_adk_routes` leaves ADK's own
    (dev UI, sessions, /run) open on purpose, /v1 and /metrics stay guarded.
    `artifact_service_uri` (`memory://`, `file:///path`, `gs://bucket`), `memory_service_uri`,
    `eval_storage_uri`, `extra_plugins` (qualified names) and `a2a` are `adk api_server`'s;
    replicas must share sessions and artifacts (a `gs://` bucket)."""
    from google.adk.cli.fast_api import get_fast_api_app

    # Not ADK's own default (a SQLite file in each agent's folder): its writers wait at most
    # 5 s for the file's lock, and under tens of concurrent sessions turns failed with
    # "database is locked"; it also wrote into the agents' folder (site-packages, installed).
    session_service_uri = session_service_uri or "memory://"
    sqlite_sessions.register()  # sqlite:// URIs: one writer at a time (see there)
    if session_service_uri.startswith(("postgresql://", "postgres://")):
        # SQLAlchemy would pick the synchronous psycopg2 for a bare postgresql:// URL.
        session_service_uri = "postgresql+asyncpg://" + session_service_uri.split("://", 1)[1]
    served = [model_name(model)]
    engine = engine_for(served[0])
    root = str(Path(agents_dir).resolve())
    # bind_host: ADK's guard against DNS rebinding (a loopback server refuses other Host names)
    app = get_fast_api_app(agents_dir=root, web=web, host=host, bind_host=host, port=port,
                           trace_to_cloud=trace_to_cloud, otel_to_cloud=otel_to_cloud, allow_origins=allow_origins,
                           session_service_uri=session_service_uri,
                           # RunConfig.service_tier reaches the engine's queue (priority, flex)
                           extra_plugins=["adk_backend.agent_runs.ServiceTierPlugin", *(extra_plugins or [])],
                           artifact_service_uri=artifact_service_uri, memory_service_uri=memory_service_uri,
                           eval_storage_uri=eval_storage_uri, a2a=a2a)
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    FastAPIInstrumentor.instrument_app(app, excluded_urls="/health,/metrics,/dev-ui")
    metrics = EngineMetrics()
    metrics.attach(served[0], engine)
    app.state.engine_metrics = metrics
    app.include_router(make_router(served, max_tokens_limit, max_concurrent_per_client, max_waiting))
    app.add_exception_handler(APIError, lambda request, exc: exc.response())

    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": _redacting(exc.detail, root)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))
    app.add_exception_handler(StarletteHTTPException, http_error)

    # ADK's app answers /health with 200 always; ours says whether the engine can serve.
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/health"]

    @app.get("/health")
    async def health():
        ok = all(engine_for(m).is_healthy() for m in served)
        return JSONResponse({"status": "ok" if ok else "unhealthy", "models": served}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(SessionTurns, session_service_uri=session_service_uri)  # inside the key check
    key = api_key or os.environ.get("ENGINE_API_KEY")
    if key:
        app.add_middleware(ApiKeyGuard, key=key,
                           open_path=lambda path: open_adk_routes and not path.startswith(("/v1/", "/metrics")))
    app.add_middleware(BodyLimit, limit=max_body_bytes)  # outermost: nothing reads an oversized body
    return app
