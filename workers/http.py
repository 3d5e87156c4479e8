"""Our uvicorn HTTP protocol: uvicorn's httptools protocol with limits on the request head.

httptools accepts a request line and headers of any size and waits for them for ever; uvicorn
bounds them only for h11 (``h11_max_incomplete_event_size``). Here, per connection:

* the request line and headers may take MAX_HEADER_BYTES: over it the client gets 431 and the
  connection is closed, before httptools has buffered more;
* they must be complete within HANDSHAKE_TIMEOUT of the connection (or of the first byte of the
  next request on a kept-alive one): else 408 and close. A WebSocket handshake is this head;
  the app answers it at once;
* at most MAX_HANDSHAKES connections per worker may be in that state (sending a head): a further
  one is answered 503 at once, so half-open handshakes cannot hold the worker's file descriptors;
* a connection that would leave fewer than half of FD_RESERVE descriptors free (counted from the
  server's open connections) is answered 503 at once too: a storm of connections then meets
  refusals, not a worker out of descriptors whose accept loop can only reset them. The app's
  admission (``Tracker``) refuses WebSockets earlier, at the whole reserve.

Rejections are counted in the worker's ``tracker.Counters`` (``http_rejected_*``), which the
worker puts on uvicorn's config (``config.wsbroadcast_counters``).

This subclasses uvicorn's ``HttpToolsProtocol`` and relies on its internals (``parser``,
``cycle``, ``connections``, the ``on_*`` callbacks).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from asyncio import TimerHandle
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.ratelog import RateLimitedLog
from workers import lean
from workers.limits import DEFAULT_LIMITS, Limits

_END_OF_HEAD = b"\r\n\r\n"

log = logging.getLogger("wsbroadcast.http")
_ratelog = RateLimitedLog(log)


class _Pending:
    """Connections of this worker still sending a request head (one event loop per process)."""

    count = 0


class _Descriptors:
    """How many connections this process's descriptors allow, measured once: RLIMIT_NOFILE minus
    what is not a connection (listening socket, Redis, logs) minus half of FD_RESERVE."""

    limit: int | None = None
    measured = False

    @classmethod
    def connections_allowed(cls, open_connections: int, reserve: int) -> int | None:
        if not cls.measured:
            cls.measured = True
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft != resource.RLIM_INFINITY:
                try:
                    others = len(os.listdir("/proc/self/fd")) - open_connections
                except OSError:
                    others = reserve
                cls.limit = soft - others - reserve // 2
        return cls.limit


class BroadcastHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits: Limits = getattr(self.config, "wsbroadcast_limits", DEFAULT_LIMITS)
        self._in_head = True
        self._head_bytes = 0
        self._tail = b""  # the last bytes of the head so far: its end may straddle two reads
        self._head_timer: TimerHandle | None = None
        self._pending = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        allowed = _Descriptors.connections_allowed(len(self.connections), self.limits.fd_reserve)
        if allowed is not None and len(self.connections) > allowed:
            self._reject(503, "fds", "worker is short of file descriptors; retry later", retry_after=True)
            return
        if _Pending.count >= self.limits.max_handshakes:
            self._reject(503, "handshakes_full", "too many connections in handshake; retry later", retry_after=True)
            return
        _Pending.count += 1
        self._pending = True
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head and not self._head_fits(data):
            self._reject(431, "headers_too_big", f"request line and headers over MAX_HEADER_BYTES "
                         f"({self.limits.max_header_bytes})")
            return
        super().data_received(data)

    def _head_fits(self, data: bytes) -> bool:
        """Count the bytes of ``data`` that belong to the head; False when the head is over the limit."""
        tail = self._tail
        seam = (tail + data[:3]).find(_END_OF_HEAD) if tail else -1
        if seam >= 0:
            used, ended = seam + 4 - len(tail), True
        else:
            end = data.find(_END_OF_HEAD)
            used, ended = (end + 4, True) if end >= 0 else (len(data), False)
        total = self._head_bytes + used
        if total > self.limits.max_header_bytes:
            return False
        if not ended:
            self._head_bytes = total
            self._tail = (tail + data[-3:])[-3:]
        return True

    def handle_websocket_upgrade(self) -> None:
        # A clean upgrade of /ws takes the lean path (workers.lean): no ASGI task per connection.
        if not lean.upgrade(self):
            super().handle_websocket_upgrade()

    # --- parser callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None and self._in_head:
            self._arm()  # a kept-alive connection's next request

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._tail = b""
        self._head_done()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True

    # --- limits ---------------------------------------------------------------------------------

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.handshake_timeout, self._head_timeout)

    def _head_done(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._pending:
            self._pending = False
            _Pending.count -= 1

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._in_head:
            return
        self._reject(408, "head_timeout", f"request head not complete within HANDSHAKE_TIMEOUT "
                     f"({self.limits.handshake_timeout:g} s)")

    def _reject(self, status: int, reason: str, detail: str, retry_after: bool = False) -> None:
        """Answer ``status`` with ``detail`` and close, or just close mid-response (pipelining)."""
        self._head_done()
        self._in_head = False
        counters = getattr(self.config, "wsbroadcast_counters", None)
        if counters is not None:
            name = f"http_rejected_{reason}"
            setattr(counters, name, getattr(counters, name) + 1)
        _ratelog.warning(reason, "HTTP %d: %s", status, detail)
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()
            return
        lean.answer_plain(self, status, detail, 1 if retry_after else None)
