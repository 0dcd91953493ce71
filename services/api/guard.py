"""What stands in front of every route: the bearer token, checked before a byte of the body
is read, a bound on the body's size, and a JSON encoder no input can break.

Checking the token in a dependency is too late: FastAPI reads and parses a request's body
before it resolves the route's dependencies, so an anonymous client could make the API
parse (and hold) a body of any size. This ASGI middleware answers 401 or 413 first.
"""

from __future__ import annotations

import hmac
import json
import math
from typing import Any

from fastapi.responses import JSONResponse

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""Routes without the token: the probes and the Prometheus scrape."""


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


class SafeJSONResponse(JSONResponse):
    """JSON that always encodes: non-finite floats become null, and every non-ASCII
    character is escaped, so a lone surrogate echoed from a rejected input is still valid
    JSON instead of an encoding error (a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            finite(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")
        ).encode("ascii")


class GuardMiddleware:
    """401 without the token and 413 over ``max_body`` bytes, before the app reads the body."""

    def __init__(self, app, token: str | None, max_body: int) -> None:
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.token is not None and scope["path"] not in OPEN_PATHS:
            if not self._authorized(headers.get("authorization", b"")):
                await _reply(send, 401, "missing or wrong bearer token", www_auth=True)
                return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _reply(send, 413, self._too_large())
            return
        await self.app(scope, *self._bounded(receive, send))

    def _bounded(self, receive, send):
        """(receive, send) for the app: past ``max_body`` bytes of a streamed body the client
        gets the 413 at once and the app sees a disconnect; what it answers then is dropped."""
        seen, replied, started = 0, False, False

        async def counting_receive():
            nonlocal seen, replied
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    if not started and not replied:
                        replied = True
                        await _reply(send, 413, self._too_large())
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if replied:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        return counting_receive, guarded_send

    def _authorized(self, header: bytes) -> bool:
        scheme, _, given = header.decode("latin-1").partition(" ")
        expected = self.token.encode()
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected)

    def _too_large(self) -> str:
        return f"request body over {self.max_body // 1024} KiB (DAPO_MAX_BODY_BYTES)"


async def _reply(send, status: int, detail: str, www_auth: bool = False) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if www_auth:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
