"""ASGI middleware that guards every route before FastAPI parses anything: the API key and the body size.

Both answer with the OpenAI-style error body. They are plain ASGI (no BaseHTTPMiddleware), so a streamed
response passes through untouched.
"""

from __future__ import annotations

import secrets

from vattn.server.errors import error_response

OPEN_PATHS = ("/health", "/metrics")  # as in vLLM: probes and scrapers need no key
_DRAIN_FACTOR = 8  # read (and drop) at most this many times the limit of an oversized body before answering


class APIKeyMiddleware:
    """Every route but /health and /metrics needs `Authorization: Bearer <key>` (401 otherwise)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self._key):
            return await self.app(scope, receive, send)
        message = ("Incorrect API key provided." if auth else
                   "You didn't provide an API key: send it as `Authorization: Bearer <key>`.")
        response = error_response(message, 401, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class BodyLimitMiddleware:
    """A request body over `max_bytes` gets 413 before any of it is parsed or kept.

    A declared Content-Length over the limit is refused at once; a chunked body is counted as it arrives.
    Either way what the client is still sending is read and dropped (up to a bound) before the reply, so the
    client sees the 413 instead of a connection reset mid-upload.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, receive, send, int(length), 0)

        body, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send, None, size if more else -1)
            body.append(chunk)
        replay = [{"type": "http.request", "body": b"".join(body), "more_body": False}]

        async def replayed_receive():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed_receive, send)

    async def _refuse(self, scope, receive, send, declared: int | None, read: int) -> None:
        size = f"{declared} bytes" if declared is not None else f"more than {self.max_bytes} bytes"
        while read >= 0 and read <= self.max_bytes * _DRAIN_FACTOR:
            message = await receive()
            if message["type"] != "http.request":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        response = error_response(f"the request body is {size}, more than the {self.max_bytes} bytes this server "
                                  "accepts (see --max-request-body-bytes)", 413)
        await response(scope, receive, send)
