"""What the server checks before a handler reads the body: the API key, then the body's size.

A pure ASGI middleware, so a client without the key gets 401 whatever it sent (FastAPI
parses the body before any dependency runs), and a body over the limit gets 413 from its
Content-Length, or as soon as the bytes received pass the limit when it sends none: no
handler ever holds more than the limit in memory, and nothing is parsed first.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROTECTED = "/v1/"  # /health and /metrics stay open, as before


def error_body(message: str, kind: str, code: str | None, param: str | None = None) -> bytes:
    """OpenAI's error shape, as bytes."""
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"the request body is larger than this server's limit of {limit} bytes (--max-body-bytes)")


class Guard:
    """Refuses /v1 requests without the key (401) and bodies over `max_body_bytes` (413) before the app sees them."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int,
                 on_refuse: Callable[[int], None] | None = None) -> None:
        self.app, self.api_key, self.max_body_bytes, self.on_refuse = app, api_key, max_body_bytes, on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.lower(): value for name, value in scope.get("headers", [])}
        if self.api_key is not None and scope["path"].startswith(PROTECTED):
            if not hmac.compare_digest(headers.get(b"authorization", b""), f"Bearer {self.api_key}".encode()):
                await self._refuse(send, 401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                   "authentication_error", "invalid_api_key")
                return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await self._refuse(send, 413, too_large(self.max_body_bytes).detail, "invalid_request_error", "body_too_large")
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise too_large(self.max_body_bytes)  # FastAPI passes HTTPException from a body read through
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, send: Send, status: int, message: str, kind: str, code: str) -> None:
        if self.on_refuse is not None:
            self.on_refuse(status)
        body = error_body(message, kind, code)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
