"""The WebSocket transport at /ws: admit, read client ops, write through the outbound path.

Admission happens before ``accept`` and before any per-connection state: a full worker answers
HTTP 503 with Retry-After (or close 1013 where the server has no denial responses). After accept,
the reader is this task; the writer is either the fast path (no task at all) or one QueueOutbound
task. Whatever happens, ``finally`` unregisters the connection from the hub and the tracker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from starlette.responses import PlainTextResponse
from starlette.types import Receive
from starlette.websockets import WebSocket, WebSocketDisconnect

from service import codec
from service.config import CHANNEL_RE
from service.outbound import Bounds, DirectOutbound, QueueOutbound
from service.tracker import CLOSE_SLOW, Connection

if TYPE_CHECKING:
    from service.app import Service

log = logging.getLogger("wsbroadcast.endpoint")

DIRECT_EXTENSION = "wsbroadcast.direct"
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013
MAX_ERRORS = 10
SUBSCRIBE_CONFIRM_TIMEOUT = 5.0
# How a send or receive fails once the client is gone or the connection is closed under us.
_GONE = (OSError, RuntimeError, WebSocketDisconnect)


class _RateLimit:
    """A token bucket: ``rate`` frames per second with bursts of ``burst``."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


async def websocket_endpoint(ws: WebSocket, receive: Receive) -> None:
    """Serve one WebSocket; ``receive`` is the server's own (Starlette's wrapper would keep one more
    suspended coroutine alive per idle connection)."""
    service: Service = ws.app.state.service
    refusal = await service.gate.check(ws)
    if refusal is not None:
        await _deny(ws, *refusal)
        return
    reason = service.tracker.refusal()
    if reason is not None:
        service.tracker.refuse(reason)
        detail = "worker is under memory pressure" if reason == "memory" else "worker is at its connection limit"
        await _deny(ws, 503, detail, retry_after=1 if reason == "full" else 5)
        return
    await _Session(service, ws, receive).run()


def _already_closed(code: int, reason: str) -> bool:
    return False


async def _deny(ws: WebSocket, status: int, detail: str, retry_after: int | None = None) -> None:
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        await ws.send_denial_response(PlainTextResponse(detail + "\n", status_code=status, headers=headers))
    else:
        await ws.close(CLOSE_TRY_AGAIN if status == 503 else CLOSE_POLICY, detail)


class _Session:
    """One admitted connection, from accept to unregister."""

    def __init__(self, service: Service, ws: WebSocket, receive: Receive) -> None:
        self.service = service
        self.ws = ws
        self.receive = receive
        extension = ws.scope.get("extensions", {}).get(DIRECT_EXTENSION, {})
        self.link: Any = extension.get("link")
        direct = bool(extension.get("direct", True))
        self.conn: Connection = service.tracker.admit(self.close)
        self.writer: asyncio.Task[None] | None = None
        self.errors = 0
        self.closing = False
        self.allowed: frozenset[str] | None = ws.scope.get("wsbroadcast.allowed_channels")
        settings = service.settings
        self.limit = _RateLimit(settings.client_rate_limit, settings.client_rate_burst)
        bounds = Bounds(settings.queue_size, settings.queue_bytes, settings.slow_consumer_policy == "drop-oldest")
        # drop-oldest needs a queue it can drop from; bytes already framed into a transport
        # buffer cannot be taken back, so that policy always takes the ASGI path.
        if self.link is not None and direct and settings.fast_path and not bounds.drop_oldest:
            self.conn.outbound = DirectOutbound(self.link, bounds, service.tracker.counters, self._slow)
        else:
            self.conn.outbound = QueueOutbound(bounds, service.tracker.counters, self._slow)

    async def run(self) -> None:
        service = self.service
        try:
            await self.ws.accept(headers=[(b"x-wsbroadcast-worker", service.worker_name.encode())])
            if isinstance(self.conn.outbound, QueueOutbound):
                self.writer = asyncio.create_task(self._write(self.conn.outbound))
            if not await self._initial_channels():
                return
            await self._read_loop()
        except _GONE as exc:
            # The client went away mid-send (uvicorn's ClientDisconnected, which starlette turns
            # into WebSocketDisconnect) or the connection was closed under us.
            log.debug("connection %d ended: %r", self.conn.id, exc)
        finally:
            # The protocol closes abusers (1008) and clients that never read its pongs (4008) on its own.
            verdict = getattr(self.link, "verdict", None)
            if verdict == "abuse":
                service.tracker.counters.abuse_closed += 1
            elif verdict == "slow":
                service.tracker.counters.slow_closed += 1
            for channel in self.conn.channels:
                service.hub.discard(channel, self.conn.outbound)  # type: ignore[arg-type]
            self.conn.channels.clear()
            service.tracker.remove(self.conn)
            if self.writer is not None:
                self.writer.cancel()
            # Session, connection and outbound refer to each other: cut the cycles so the
            # connection's memory is freed now, not whenever the cyclic GC runs.
            self.conn.outbound = None
            self.conn.close = _already_closed

    async def _write(self, queue: QueueOutbound) -> None:
        try:
            await queue.run(self.ws.send_text)
        except _GONE as exc:
            log.debug("writer of connection %d ended: %r", self.conn.id, exc)

    async def _initial_channels(self) -> bool:
        raw = self.ws.query_params.get("channels")
        if raw is None:
            names = [self.service.settings.default_channel]
        else:
            names = list(dict.fromkeys(n for n in raw.split(",") if n))
        limit = self.service.settings.max_channels_per_connection
        if len(names) > limit:
            await self._fail("too_many_channels", f"at most {limit} channels per connection")
            return False
        for name in names:
            if not CHANNEL_RE.fullmatch(name):
                await self._fail("invalid_channel", "channel names match [A-Za-z0-9_.:-]{1,128}")
                return False
            if not self._may_subscribe(name):
                await self._fail("forbidden_channel", f"the token does not allow channel {name!r}")
                return False
        # Registered at once and confirmed together: with Redis down, N channels wait one
        # timeout, not N.
        for name in names:
            self._register(name)
        confirmed = await asyncio.gather(*(self._confirm(name) for name in names))
        for name, _ in zip(names, confirmed, strict=True):
            await self.ws.send_text(codec.control("subscribed", channel=name))
        return True

    async def _read_loop(self) -> None:
        receive = self.receive
        max_bytes = self.service.settings.max_message_bytes
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            self.conn.last_received = time.monotonic()
            if not self.limit.allow():
                self.service.tracker.counters.abuse_closed += 1
                await self._fail("rate_limited", "too many frames; slow down", count=False)
                return
            text = message.get("text")
            if text is None:
                await self._error("binary_not_supported", "send text JSON frames")
            elif len(text) > max_bytes:
                # Reached only where the server did not enforce ws_max_size itself.
                self.close(1009, "frame too big")
                return
            else:
                op = codec.parse_client_frame(text)
                if isinstance(op, codec.ClientError):
                    await self._error(op.code, op.detail)
                else:
                    await self._apply(op)
            if self.errors >= MAX_ERRORS:
                self.service.tracker.counters.abuse_closed += 1
                await self._fail("too_many_errors", f"closed after {MAX_ERRORS} invalid frames", count=False)
                return

    async def _apply(self, op: codec.ClientOp) -> None:
        if op.op == "ping":
            await self.ws.send_text(codec.PONG)
        elif op.op == "subscribe":
            if op.channel in self.conn.channels:
                await self.ws.send_text(codec.control("subscribed", channel=op.channel))
            elif len(self.conn.channels) >= self.service.settings.max_channels_per_connection:
                limit = self.service.settings.max_channels_per_connection
                await self._error("too_many_channels", f"at most {limit} channels per connection")
            elif not self._may_subscribe(op.channel):
                await self._error("forbidden_channel", f"the token does not allow channel {op.channel!r}")
            else:
                await self._subscribe(op.channel)
        elif op.channel in self.conn.channels:
            self.conn.channels.discard(op.channel)
            self.service.hub.discard(op.channel, self.conn.outbound)  # type: ignore[arg-type]
            await self.ws.send_text(codec.control("unsubscribed", channel=op.channel))
        else:
            await self._error("not_subscribed", f"not subscribed to {op.channel!r}")

    def _may_subscribe(self, channel: str) -> bool:
        return self.allowed is None or channel in self.allowed or "*" in self.allowed

    async def _subscribe(self, channel: str) -> None:
        self._register(channel)
        await self._confirm(channel)
        await self.ws.send_text(codec.control("subscribed", channel=channel))

    def _register(self, channel: str) -> None:
        self.conn.channels.add(channel)
        self.service.hub.add(channel, self.conn.outbound)  # type: ignore[arg-type]

    async def _confirm(self, channel: str) -> bool:
        # The ack means "publications from now on reach you": wait for Redis to confirm. While
        # Redis is down the subscription stays registered and is restored on reconnect.
        if await self.service.broker.confirmed(channel, SUBSCRIBE_CONFIRM_TIMEOUT):
            return True
        log.warning("subscription to %r not confirmed by Redis within %.0f s", channel, SUBSCRIBE_CONFIRM_TIMEOUT)
        return False

    async def _error(self, code: str, detail: str) -> None:
        self.errors += 1
        self.service.tracker.counters.bad_client_frames += 1
        await self.ws.send_text(codec.error(code, detail))

    async def _fail(self, code: str, detail: str, count: bool = True) -> None:
        if count:
            self.service.tracker.counters.bad_client_frames += 1
        await self.ws.send_text(codec.error(code, detail))
        self.close(CLOSE_POLICY, detail[:120])

    def _slow(self) -> None:
        if self.close(CLOSE_SLOW, "slow consumer"):
            self.service.tracker.counters.slow_closed += 1

    def close(self, code: int, reason: str) -> bool:
        """Close this client without awaiting it: safe to call from fan-out and the idle sweep.

        True when this call started the close; False when it was already closing.
        """
        if self.closing:
            return False
        self.closing = True
        if self.writer is not None:
            self.writer.cancel()
        if self.link is not None:
            self.link.close(code, reason)
        else:
            asyncio.get_running_loop().create_task(self._close_asgi(code, reason))
        return True

    async def _close_asgi(self, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(self.ws.close(code, reason), timeout=5.0)
        except (TimeoutError, *_GONE) as exc:
            log.debug("close of connection %d failed: %r", self.conn.id, exc)
