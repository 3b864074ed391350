"""Request-body size limit as a pure ASGI middleware (413 in OpenAI's error shape, before any parsing).

The body is read up to the limit and replayed to the app; later ``receive`` calls go to the server, so the
app still sees the client's disconnect.
"""

from __future__ import annotations

import json

from lmforge.serve.protocol import APIError


class BodyLimit:
    def __init__(self, app, max_bytes: int = 1 << 20):
        self.app, self.max_bytes = app, max_bytes

    async def _too_large(self, send, size: str) -> None:
        body = json.dumps(APIError(413, f"the request body is {size} bytes; this server accepts at most "
                                        f"{self.max_bytes:,} (--max-body-bytes)", code="request_too_large").body())
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body.encode()})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send, f"{int(declared):,}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(send, f"over {self.max_bytes:,}")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
