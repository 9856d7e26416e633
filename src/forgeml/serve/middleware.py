"""ASGI middleware that looks at requests before FastAPI does.

- `BodyLimit`: a request-body size limit enforced on the bytes received, not on what the client
  declares. A Content-Length above the limit is refused before the body is read; a chunked upload (no
  Content-Length) is counted as it arrives and refused as soon as it passes the limit, so no request
  makes the server buffer more than `max_bytes`.
- `JsonBodies`: every API body is read as JSON whatever its Content-Type says. `curl -d '{...}'` sends
  `application/x-www-form-urlencoded`, which FastAPI would not parse; the API takes nothing but JSON, except
  the file-upload routes (`.../upload`), which keep their multipart/form-data.
- `RequestMetrics`: counts and times every request by route and status, and the API requests in flight.

All are plain ASGI callables rather than Starlette's `BaseHTTPMiddleware`, which runs every request
through a task group and memory streams: under load that cost the event loop a third of its time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

Scope = dict[str, Any]
UPLOAD_SUFFIX = "/upload"  # routes that take multipart/form-data file uploads rather than JSON


class BodyLimit:
    """ASGI middleware: 413 with a JSON body for HTTP requests whose body exceeds `max_bytes`."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for the client to disconnect

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any) -> None:
        payload = json.dumps({"detail": f"request body larger than {self.max_bytes:,} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


class JsonBodies:
    """ASGI middleware: requests to paths under `prefix` get `Content-Type: application/json`."""

    def __init__(self, app: Any, prefix: str = "/v1/"):
        self.app, self.prefix = app, prefix

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith(self.prefix) and not path.endswith(UPLOAD_SUFFIX):
            kept = [(name, value) for name, value in scope["headers"] if name != b"content-type"]
            # in place: the outer middleware reads what the router records in this same scope (the route)
            scope["headers"] = [*kept, (b"content-type", b"application/json")]
        await self.app(scope, receive, send)


class RequestMetrics:
    """ASGI middleware: `observe(route, status, seconds)` for every HTTP request, and `in_flight(+1 / -1)`
    around the API requests (paths under `prefix`). The route is the one the router matched (recorded in
    the request's scope), or "unmatched"."""

    def __init__(
        self,
        app: Any,
        observe: Callable[[str, int, float], None],
        in_flight: Callable[[int], None],
        prefix: str = "/v1/",
    ):
        self.app, self.observe, self.in_flight, self.prefix = app, observe, in_flight, prefix

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500  # 500 unless a response starts: the app raised
        api = scope["path"].startswith(self.prefix)

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if api:
            self.in_flight(1)
        try:
            await self.app(scope, receive, sending)
        finally:
            if api:
                self.in_flight(-1)
            route = getattr(scope.get("route"), "path", "unmatched")
            self.observe(route, status, time.perf_counter() - started)
