"""The front door, as a pure ASGI middleware that runs before any routing or parsing (`Guard`):

1. ``Host``: without an API key only loopback names are answered (``localhost``, ``127.0.0.1`` and the rest of
   127/8, ``[::1]``, plus the names given in ``allowed_hosts``): a web page that rebinds its own domain to
   127.0.0.1 (DNS rebinding) gets 403 instead of the API. A request without ``Host`` (HTTP/1.0 tools; browsers
   always send one) passes.
2. The API key, for ``/v1`` paths, from the headers alone: a request without it gets 401 before its body is
   read (and the connection is closed, so an unread body cannot hold it).
3. The body: a declared ``Content-Length`` over ``max_body_bytes`` is a 413 at once; otherwise the body is read
   up to the limit within ``body_timeout`` seconds (a client that sends part of it and stalls gets 408 and is
   disconnected) and replayed to the app. Later ``receive`` calls go to the server, so the app still sees
   the client's disconnect.

Every refusal is OpenAI's error shape, as JSON, with ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress

from lmforge.serve.protocol import APIError

LOOPBACK_NAMES = frozenset({"localhost"})


def host_name(value: str) -> str:
    """The name in a ``Host`` header: no port, no IPv6 brackets, no trailing dot, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value[1:]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def is_loopback_name(name: str) -> bool:
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


async def send_error(send, err: APIError, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = err.json_bytes()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, *, api_key: str | None = None, allowed_hosts=(), max_bytes: int = 1 << 20,
                 body_timeout: float = 30.0):
        self.app, self.api_key, self.max_bytes, self.body_timeout = app, api_key, max_bytes, body_timeout
        self.allowed_hosts = frozenset(host_name(h) for h in allowed_hosts)

    def _host_error(self, headers: dict) -> APIError | None:
        if self.api_key is not None:
            return None  # the key protects the API; any Host may carry it
        raw = headers.get(b"host")
        if raw is None:
            return None
        name = host_name(raw.decode("latin-1"))
        if is_loopback_name(name) or name in self.allowed_hosts:
            return None
        return APIError(403, f"Host '{name[:100]}' is not a loopback name: without --api-key this server answers "
                        "only localhost, 127.0.0.1 and [::1] (DNS-rebinding protection); pass --api-key KEY, or "
                        "--allow-host NAME for a name you trust", code="host_not_allowed")

    def _key_error(self, scope, headers: dict) -> APIError | None:
        if self.api_key is None:
            return None
        path = scope.get("path", "")
        if path != "/v1" and not path.startswith("/v1/"):
            return None  # the page, its files and /health stay open
        auth = headers.get(b"authorization", b"").decode("latin-1")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if hmac.compare_digest(given.encode("utf-8", "replace"), self.api_key.encode()):
            return None
        return APIError(401, "invalid or missing API key; send 'Authorization: Bearer KEY'", code="invalid_api_key")

    def _too_large(self, size: str) -> APIError:
        return APIError(413, f"the request body is {size} bytes; this server accepts at most {self.max_bytes:,} "
                        "(--max-body-bytes)", code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        err = self._host_error(headers) or self._key_error(scope, headers)
        if err is not None:
            return await send_error(send, err, [(b"www-authenticate", b"Bearer")] if err.status == 401 else [])
        declared = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        if scope["method"] in ("GET", "HEAD", "OPTIONS") or (not chunked and declared in (None, b"0")):
            return await self.app(scope, receive, send)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await send_error(send, self._too_large(f"{int(declared):,}"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
            except asyncio.TimeoutError:
                return await send_error(send, APIError(
                    408, f"the request body did not arrive within {self.body_timeout:g} s ({size:,} bytes came); "
                    "send the whole body at once (--body-timeout)", code="request_timeout"))
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await send_error(send, self._too_large(f"over {self.max_bytes:,}"))
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

