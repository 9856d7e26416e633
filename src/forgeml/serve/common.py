"""What every forgeml service has, whatever it serves: access control by API key and scope with a per-key
rate limit, the body-size and JSON middleware, request metrics, validation errors as 422 naming the
field, and the health, readiness and metrics routes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from forgeml.config import ServeConfig
from forgeml.serve.keys import KeyStore
from forgeml.serve.middleware import BodyLimit, JsonBodies, RequestMetrics
from forgeml.serve.ratelimit import SharedRateLimiter


def scope_checker(keys: KeyStore | None, limits: ServeConfig) -> Callable[[str], Any]:
    """`require(scope)`: a FastAPI dependency that lets a request through when its bearer key has `scope`
    (and is under the key's request rate), returning the key's id; 401/403/429 otherwise. Keys, their
    revocation and their rate limits live in the store, so servers sharing it behave as one service."""
    # In the key store's database: several server processes on one store spend one bucket per key.
    limiter = (
        SharedRateLimiter(keys.engine, limits.rate_limit, limits.rate_burst) if keys and limits.rate_limit else None
    )

    def require(scope: str):
        # async: without keys nothing is looked up, and a sync dependency would cost every request a trip
        # through the thread pool; with keys, the database lookup goes there.
        async def check(authorization: str | None = Header(default=None)) -> str | None:
            if keys is None:
                return None
            token = authorization[7:].strip() if authorization and authorization.lower().startswith("bearer ") else None
            verdict = await run_in_threadpool(keys.check, token, scope)
            if verdict.status != 200:
                headers = {"WWW-Authenticate": "Bearer"} if verdict.status == 401 else None
                raise HTTPException(verdict.status, verdict.reason, headers=headers)
            wait = await run_in_threadpool(limiter.acquire, verdict.key_id) if limiter and verdict.key_id else 0.0
            if wait:
                raise HTTPException(
                    429,
                    f"rate limit: at most {limits.rate_limit:g} requests a minute for this key; retry in {wait:.1f} s",
                    headers={"Retry-After": str(math.ceil(wait))},
                )
            return verdict.key_id

        return check

    return require


def install_basics(
    app: FastAPI,
    limits: ServeConfig,
    registry: CollectorRegistry,
    invalid: Callable[[list[dict[str, str]]], dict[str, Any]] | None = None,
) -> None:
    """Middleware (JSON bodies, body-size limit, request metrics), 422s for invalid requests, and the
    /healthz, /readyz (503 until `app.state.ready`) and /metrics routes. `invalid(problems)` shapes the
    422 body (default: {"detail", "problems"})."""
    requests = Counter("forgeml_requests", "Requests by route and status", ["route", "status"], registry=registry)
    latency = Histogram("forgeml_request_seconds", "Request latency", ["route"], registry=registry)
    in_progress = Gauge("forgeml_requests_in_progress", "API requests (/v1/...) being answered", registry=registry)

    def observe(route: str, status: int, seconds: float) -> None:
        requests.labels(route, str(status)).inc()
        latency.labels(route).observe(seconds)

    app.add_middleware(JsonBodies)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    # added last, so outermost: it also counts what BodyLimit refuses
    app.add_middleware(RequestMetrics, observe=observe, in_flight=in_progress.inc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": ".".join(str(part) for part in e["loc"] if part != "body"), "problem": e["msg"]}
            for e in error.errors()
        ]
        body = invalid(problems) if invalid else {"detail": "invalid request", "problems": problems}
        return JSONResponse(body, status_code=422)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ready = bool(app.state.ready)
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def run_server(app: FastAPI, host: str, port: int, graceful_s: float = 30.0) -> None:
    """Run `app` under uvicorn until SIGINT/SIGTERM. When the shutdown begins, `app.state.begin_drain()`
    (if the app has one) is called first, so long work in flight (generations) is told to wrap up while
    uvicorn stops accepting and waits up to `graceful_s` for the open requests to end."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            begin_drain = getattr(app.state, "begin_drain", None)
            if begin_drain is not None:
                begin_drain()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=graceful_s)
    DrainingServer(config).run()
