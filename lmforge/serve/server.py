"""uvicorn for `lmforge serve`, hardened against slow and numerous clients.

`make_server(app, host, port, limits)` builds a uvicorn server whose HTTP protocol (`protocol_class`, uvicorn's
h11 protocol with three additions) holds:

- **Header timeout.** A connection must deliver a complete request line and headers within
  ``header_timeout`` seconds of connecting, and of the end of its previous response; otherwise it is closed
  (with a 408 in OpenAI's shape when part of a request came). uvicorn alone waits for ever.
- **Connection cap.** At most ``max_connections`` connections are open at once. One more evicts the
  connection that has stalled longest (waiting for its headers, or for its body before any response began,
  for at least `ConnectionLimits.grace`); when there is none the newcomer gets 503 and is closed. So slow clients
  cannot fill the process's file descriptors (uvicorn then fails every ``accept`` with ``Too many open
  files``), and real clients still get in while slow ones hold connections.
- **Abandoned bodies.** A connection whose response went out before its request body was read (401, 413,
  408, a GET with a body) is closed rather than kept waiting for the rest.

The body timeout itself is an ASGI layer (`lmforge.serve.limits.Guard`), so it holds under any server.
`fit_to_fd_limit` checks the cap against ``RLIMIT_NOFILE`` at start-up (raising the soft limit when the hard
one allows, else lowering the cap, with one ``note:`` line). Malformed HTTP (or headers over
`MAX_HEADER_BYTES`) gets a 400 in the same JSON shape instead of uvicorn's text.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from lmforge.config import UserError
from lmforge.serve.protocol import APIError

FD_MARGIN = 32  # descriptors kept free beside the connections (static files, logs, the odd library)
MIN_CONNECTIONS = 8
MAX_HEADER_BYTES = 16 << 10  # request line + headers (h11's incomplete-event cap)
REASONS = {400: "Bad Request", 408: "Request Timeout", 503: "Service Unavailable"}


@dataclass
class ConnectionLimits:
    max_connections: int = 512  # open connections at once
    header_timeout: float = 10.0  # seconds to deliver a request's line and headers
    keep_alive: int = 5  # seconds an idle connection is kept between requests
    backlog: int = 2048  # the listen queue, and how many connections asyncio accepts in one go

    @property
    def grace(self) -> float:
        """A stalled connection younger than this is not evicted for a newcomer (it may just be starting)."""
        return min(1.0, self.header_timeout / 2)


def open_fds() -> int | None:
    """Descriptors this process has open (None where /proc and /dev/fd are missing)."""
    for d in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(d))
        except OSError:
            continue
    return None


def fit_to_fd_limit(limits: ConnectionLimits) -> tuple[ConnectionLimits, str | None]:
    """``limits`` made to fit ``RLIMIT_NOFILE``, and a note when they had to shrink.

    The descriptors needed: those open now (the model loaded), the connections, the accept queue (asyncio
    accepts up to ``backlog`` connections before any can be closed) and `FD_MARGIN`. The soft limit is raised
    towards the hard one when that is short; when the hard one is too, the backlog and then the connection cap
    are lowered to fit, with one line saying so."""
    try:
        import resource
    except ImportError:  # not a POSIX system: nothing to check
        return limits, None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = open_fds() or 64
    need = in_use + limits.max_connections + limits.backlog + FD_MARGIN
    if soft == resource.RLIM_INFINITY or soft >= need:
        return limits, None
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft >= need:
        return limits, None
    budget = soft - in_use - FD_MARGIN
    backlog = min(limits.backlog, max(16, budget - limits.max_connections))
    cap = min(limits.max_connections, budget - backlog)
    if cap < MIN_CONNECTIONS:
        raise UserError(f"the open-file limit (ulimit -n) is {soft} and {in_use} descriptors are already open: "
                        f"no room for connections; raise it (ulimit -n {need})")
    fitted = dataclasses.replace(limits, max_connections=cap, backlog=backlog)
    if cap == limits.max_connections:
        return fitted, None  # only the accept queue shrank
    return fitted, (f"note: the open-file limit (ulimit -n) is {soft} with {in_use} descriptors in use, room for "
                    f"{cap} connections, not --max-connections {limits.max_connections}; accepting at most {cap} "
                    f"at once (raise it with 'ulimit -n {need}')")


class _QuietOnBadClients(logging.LoggerAdapter):
    """uvicorn's logger, except that a malformed request (a client's fault, answered with a 400) is logged at
    debug level rather than as a warning: a client cannot fill the log."""

    @property
    def level(self) -> int:
        return self.logger.level

    def warning(self, msg, *args, **kwargs):
        level = logging.DEBUG if msg == "Invalid HTTP request received." else logging.WARNING
        self.log(level, msg, *args, **kwargs)


def raw_response(status: int, err: APIError) -> bytes:
    """A complete HTTP/1.1 response with ``err``'s JSON, written straight to a connection h11 cannot answer on."""
    body = err.json_bytes()
    head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def protocol_class(limits: ConnectionLimits) -> type[H11Protocol]:
    class GuardedH11(H11Protocol):
        """uvicorn's h11 protocol with a header timeout, a connection cap and JSON errors (module doc)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.logger = _QuietOnBadClients(self.logger, {})
            self._since = 0.0  # when the current wait (for headers, or for the body) began
            self._got_bytes = False  # bytes came since then
            self._header_timer = None

        # ---- states ----------------------------------------------------------------------------------
        def _waiting_for_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _stalled(self) -> bool:
            """Waiting on the client: for a request's headers, or for its body before any response began."""
            if self.transport is None or self.transport.is_closing():
                return False
            if self._waiting_for_headers():
                return True
            return self.conn.their_state is h11.SEND_BODY and not self.cycle.response_started

        def _start_waiting(self) -> None:
            self._since, self._got_bytes = self.loop.time(), False

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(limits.header_timeout, self._header_timeout)

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self._stalled() and self._waiting_for_headers():
                self._drop(408, f"the request headers did not arrive within {limits.header_timeout:g} s")

        def _drop(self, status: int, why: str) -> None:
            """Close this connection, telling the client why when it has begun a request and no response
            has started."""
            if self.transport.is_closing():
                return
            began = self._got_bytes or not self._waiting_for_headers()
            if began and (self._waiting_for_headers() or not self.cycle.response_started):
                code = "request_timeout" if status == 408 else "server_busy"
                self.transport.write(raw_response(status, APIError(status, why, code=code)))
            self.transport.close()

        # ---- uvicorn's hooks -------------------------------------------------------------------------
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._start_waiting()
            self._arm_header_timer()
            if len(self.connections) > limits.max_connections:
                now = self.loop.time()
                stalled = [c for c in self.connections if c is not self and isinstance(c, GuardedH11)
                           and c._stalled() and now - c._since >= limits.grace]
                if stalled:
                    oldest = min(stalled, key=lambda c: c._since)
                    oldest._drop(408, f"this connection stalled for {self.loop.time() - oldest._since:.1f} s "
                                 f"while the server is at its cap of {limits.max_connections} connections")
                else:
                    self._got_bytes = True  # say why: the client is about to send a request
                    self._drop(503, f"the server is at its cap of {limits.max_connections} connections, all "
                               "busy; retry shortly")

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._got_bytes = True
            super().data_received(data)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers came: now its body is awaited
                self._start_waiting()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.SEND_BODY and self._waiting_for_headers():
                self.transport.close()  # answered before its body came: the rest is not awaited
                return
            if self._waiting_for_headers():
                self._start_waiting()
                self._arm_header_timer()

        def send_400_response(self, msg: str) -> None:
            err = APIError(400, f"invalid HTTP request (malformed, or a request line and headers over "
                           f"{MAX_HEADER_BYTES // 1024} KiB)", code="invalid_http")
            self.transport.write(raw_response(400, err))
            self.transport.close()

    return GuardedH11


def make_server(app, host: str, port: int, limits: ConnectionLimits | None = None, *,
                log_level: str = "warning", server_class: type | None = None, **config):
    """A uvicorn server for ``app`` with `protocol_class`'s limits (``server_class``: a uvicorn.Server
    subclass)."""
    limits = limits or ConnectionLimits()
    cfg = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol_class(limits),
                         timeout_keep_alive=limits.keep_alive, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                         backlog=limits.backlog,
                         **config)
    return (server_class or uvicorn.Server)(cfg)
