"""Our uvicorn WebSocket protocol: uvicorn's sans-I/O protocol plus the fast-path scope extension.

With permessage-deflate off, a broadcast frame is byte-for-byte the same for every connection, so
the hub builds it once and writes it to each transport through the ``DirectLink`` this protocol is,
with no per-connection framing, task wake-up or await. Every write here, ours and uvicorn's, is one
synchronous ``transport.write`` of whole frames, so frames never interleave; the fast path writes
only while ``close_sent``, ``disconnected`` and ``transport.is_closing()`` are all false, and every
close path sets one of them.

Each accepted socket's kernel send buffer is capped at SEND_BUFFER_BYTES so a stalled client holds
at most QUEUE_BYTES + SEND_BUFFER_BYTES.

What one client can make the worker do is bounded here, below the app:

* every frame it sends (control and continuation frames included) is paid for from a
  ``FrameBudget`` before websockets parses it; an abuser is closed with 1008 "too many frames" and
  the rest of its input is discarded unparsed, so one read never handles more frames than the
  budget allows;
* what we write without the app (pongs) counts against QUEUE_BYTES: over it, the connection gets
  the slow-consumer close (4008) and we stop reading from it;
* a fragmented message is kept in one bytearray, so empty continuation frames cost nothing.

``verdict`` tells the endpoint (through the link) why the protocol closed a connection on its own.

This subclasses uvicorn's ``WebSocketsSansIOProtocol`` and relies on its internals (``conn``,
``frames``, ``handle_*``, ``close_sent``, ``read_paused``, ``close_timer``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from asyncio.transports import BaseTransport
from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame
from websockets.http11 import Request

from service import wire
from service.outbound import DIRECT_EXTENSION as EXTENSION
from workers.limits import DEFAULT_LIMITS, FrameBudget, Limits

log = logging.getLogger("wsbroadcast.protocol")


class _Inbox:
    """uvicorn's per-connection receive queue, without asyncio.Queue's three deques (2.4 KB each
    idle connection): events wait in a list, and the one reader (the ASGI app) in a future."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


class _Flag:
    """uvicorn's ``writable`` event, without asyncio.Event's deque until someone actually waits."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        while not self._set:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            await waiter


class BroadcastWebSocketProtocol(WebSocketsSansIOProtocol):
    # Seconds a closing connection may take to read our close frame before it is aborted: a stalled
    # client must not keep its (bounded) buffers alive for ever, but one that resumes reading in time
    # learns why it was closed (4008).
    close_timeout = 10.0
    # An abuser has had its close frame (and FIN) at once: it is aborted sooner, as it is not read.
    abuse_linger = 2.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _Inbox()  # type: ignore[assignment]
        self.writable = _Flag()  # type: ignore[assignment]
        self.limits: Limits = getattr(self.config, "wsbroadcast_limits", DEFAULT_LIMITS)
        self.budget: FrameBudget | None = None
        self.discarding = False
        # Why the protocol closed this connection on its own ("abuse", "slow"), for the endpoint's counters.
        self.verdict: str | None = None

    # --- what a client may send and make us write ----------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return
        if self.handshake_initiated:
            budget = self.budget
            if budget is None:
                budget = self.budget = FrameBudget(self.limits, self.loop.time())
            if not budget.charge(data, self.loop.time()):
                self._abuse(wire.TOO_MANY_FRAMES)
                return
        super().data_received(data)

    def _abuse(self, why: wire.Close) -> None:
        """Close 1008 and read nothing more: the client's further input is dropped unparsed."""
        if not self.handshake_complete:
            self.transport.abort()
            return
        if self.verdict is None and not self.close_sent:
            self.verdict = "abuse"
        self.close(why.code, why.reason)
        self._stop_reading()
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.abuse_linger, self.transport.abort)

    def _stop_reading(self) -> None:
        """Read nothing more from this client: our close frame goes out, then FIN, then the abort timer."""
        self.discarding = True
        self.frames = []
        if not self.transport.is_closing():
            if self.transport.can_write_eof():
                self.transport.write_eof()
            if not self.read_paused:
                self.read_paused = True
                self.transport.pause_reading()

    async def receive(self) -> Any:
        # As uvicorn's, but reading stays paused once we stopped reading from this client.
        message = await self.queue.get()
        if self.read_paused and self.queue.empty() and not self.discarding:
            self.read_paused = False
            self.transport.resume_reading()
        return message

    def handle_ping(self) -> None:
        if self.discarding:
            return  # a ping parsed in the same read as the one that stopped us: nothing more is written
        super().handle_ping()
        if self.transport.get_write_buffer_size() > self.limits.queue_bytes:
            # A client that pings and never reads would make us buffer its pongs for ever.
            if self.verdict is None and not self.close_sent:
                self.verdict = "slow"
            self.close(wire.SLOW.code, wire.SLOW.reason)
            self._stop_reading()

    def handle_text(self, event: Frame) -> None:
        self.curr_msg_data_type = "text"
        self._start_message(event)

    def handle_bytes(self, event: Frame) -> None:
        self.curr_msg_data_type = "bytes"
        self._start_message(event)

    def _start_message(self, event: Frame) -> None:
        # One bytearray per fragmented message (websockets bounds its size by MAX_MESSAGE_BYTES):
        # a list of fragments would grow by a slot per empty continuation frame.
        self.frames = [event.data if event.fin else bytearray(event.data)]  # type: ignore[list-item]
        if event.fin:
            self.send_receive_event_to_app()

    def handle_cont(self, event: Frame) -> None:
        if self.frames:
            self.frames[0] += event.data  # type: ignore[operator]
        if event.fin:
            self.send_receive_event_to_app()

    def start_keepalive(self) -> None:
        # Called once the handshake response is written: the handshake's request and response
        # (headers and all, ~3 KB) are not needed any more.
        self.request = None  # type: ignore[assignment]
        self.response = None  # type: ignore[assignment]
        super().start_keepalive()

    def connection_made(self, transport: BaseTransport) -> None:
        super().connection_made(transport)
        send_buffer = getattr(self.config, "wsbroadcast_send_buffer_bytes", 0)
        sock = transport.get_extra_info("socket")
        if send_buffer and sock is not None:
            try:
                # Linux doubles the value it is given (bookkeeping overhead): halve it, so that the
                # kernel holds at most SEND_BUFFER_BYTES for a stalled client.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(send_buffer // 2, 2048))
            except OSError as exc:  # an exotic transport; the user-space bound still holds
                log.warning("could not set SO_SNDBUF=%d: %s", send_buffer, exc)

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The link is offered on every accepted upgrade, so that any connection can be closed
        # without awaiting its client (the abort timer bounds a stalled one); writing frames
        # through it ("direct") only without compression: a compressed frame differs per
        # connection, so the ASGI path must build it.
        if self.response.status_code == 101:
            self.scope["extensions"][EXTENSION] = {  # type: ignore[index]
                "link": self,
                "direct": not self.conn.extensions,
            }

    async def run_asgi(self) -> None:
        # As uvicorn's, except that a handshake refused with a denial response (401, 403, 503) counts
        # as completed: uvicorn logged "ASGI callable returned without completing handshake" at ERROR
        # for every refusal, so any client could fill the log.
        try:
            result = await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            self.logger.exception("Exception in ASGI application\n")
            self.send_500_response()
        else:
            if not self.handshake_complete and self.initial_response is None:
                self.logger.error("ASGI callable returned without completing handshake.")
                self.send_500_response()
            elif result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.", result)
        if self.close_timer is None:
            self.transport.close()

    # --- DirectLink --------------------------------------------------------------------------

    def keepalive_timeout(self) -> None:
        # uvicorn sends 1011 and then transport.close(), which waits for the write buffer to drain:
        # a peer that stopped reading never drains it, so its buffers would live for ever. Give
        # it close_timeout to read the close frame, then abort.
        super().keepalive_timeout()
        if self.close_timer is None and not self.disconnected:
            self.close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # The scope (kept by the app for the connection's life) refers back to us through the
        # link: break the cycle so a closed connection is freed at once, not by the cyclic GC.
        extensions = getattr(self, "scope", {}).get("extensions") or {}
        extensions.pop(EXTENSION, None)

    def close(self, code: int, reason: str) -> None:
        """Send a close frame without awaiting the client and abort if it does not answer in time."""
        if self.close_sent or self.disconnected or self.transport.is_closing():
            return
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)
