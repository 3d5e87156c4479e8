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

from service import wire
from service.gate import CLAIMS_SCOPE_KEY, Claims, TokenError
from service.history import Position
from service.outbound import DIRECT_EXTENSION, Bounds, DirectOutbound, QueueOutbound, control_message
from service.ratelog import RateLimitedLog
from service.recovery import Recovered
from service.tracker import Connection

if TYPE_CHECKING:
    from service.node import Node

log = logging.getLogger("wsbroadcast.endpoint")
# Every client can subscribe while Redis is down: one line per interval, not one per subscribe.
_rated = RateLimitedLog(log)

MAX_ERRORS = 10
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
    service: Node = ws.app.state.node
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


def _already_closed(why: wire.Close) -> bool:
    return False


async def _deny(ws: WebSocket, status: int, detail: str, retry_after: int | None = None) -> None:
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        await ws.send_denial_response(PlainTextResponse(detail + "\n", status_code=status, headers=headers))
    else:
        await ws.close(wire.TRY_AGAIN if status == 503 else wire.POLICY, detail)


class _Session:
    """One admitted connection, from accept to unregister."""

    def __init__(self, service: Node, ws: WebSocket, receive: Receive) -> None:
        self.service = service
        self.ws = ws
        self.receive = receive
        extension = ws.scope.get("extensions", {}).get(DIRECT_EXTENSION, {})
        self.link: Any = extension.get("link")
        direct = bool(extension.get("direct", True))
        self.conn: Connection = service.tracker.admit(self.close)
        self.writer: asyncio.Task[None] | None = None
        self.closer: asyncio.Task[None] | None = None
        # Subscriptions under way: Redis's confirmation, the position or the recovery read.
        self.joining: dict[str, asyncio.Task[Recovered]] = {}
        self.errors = 0
        self.closing = False
        # With CONNECT_SECRET set: what the token grants, and the timer that closes the connection
        # when it expires (one handle per connection, nothing per message).
        self.claims: Claims | None = ws.scope.get(CLAIMS_SCOPE_KEY)
        self.expiry: asyncio.TimerHandle | None = None
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
            if self.claims is not None:
                self._expire_at(self.claims.exp)
            if not await self._initial_channels():
                return
            await self._read_loop()
        except _GONE as exc:
            # The client went away mid-send (uvicorn's ClientDisconnected, which starlette turns
            # into WebSocketDisconnect) or the connection was closed under us.
            log.debug("connection %s ended: %r", self.who(), exc)
        finally:
            # The protocol closes abusers (1008) and clients that never read its pongs (4008) on its own.
            verdict = getattr(self.link, "verdict", None)
            if verdict == "abuse":
                service.tracker.counters.abuse_closed += 1
            elif verdict == "slow":
                service.tracker.counters.slow_closed += 1
            for channel in list(self.conn.channels):
                self._leave(channel)
            service.tracker.remove(self.conn)
            if self.expiry is not None:
                self.expiry.cancel()
                self.expiry = None
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
            log.debug("writer of connection %s ended: %r", self.who(), exc)

    async def _initial_channels(self) -> bool:
        names = wire.channels_param(self.ws.query_params.get("channels"), self.service.settings.default_channel)
        limit = self.service.settings.max_channels_per_connection
        if len(names) > limit:
            await self._fail("too_many_channels", f"at most {limit} channels per connection")
            return False
        for name in names:
            if not wire.is_channel(name):
                await self._fail("invalid_channel", wire.CHANNEL_RULE)
                return False
            if not self._may_subscribe(name):
                await self._fail("forbidden_channel", f"the token does not allow channel {name!r}")
                return False
        # Joined together: with Redis down, every channel waits for it at once.
        for name in names:
            self._join(name, None)
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
                self.close(wire.TOO_BIG)
                return
            else:
                op = wire.parse_client_frame(text)
                if isinstance(op, wire.ClientError):
                    await self._error(op.code, op.detail)
                else:
                    await self._apply(op)
            if self.errors >= MAX_ERRORS:
                self.service.tracker.counters.abuse_closed += 1
                await self._fail("too_many_errors", f"closed after {MAX_ERRORS} invalid frames", count=False)
                return

    async def _apply(self, op: wire.ClientOp) -> None:
        if op.op == "ping":
            await self.ws.send_text(wire.PONG)
        elif op.op == "refresh":
            await self._refresh(op.token)
        elif op.op == "subscribe":
            if op.channel in self.conn.channels:
                # Already subscribed: the position now (its first ack, if still joining, follows),
                # through the outbound path, after the publications queued before it.
                position = None if op.channel in self.joining else self.service.hub.position(op.channel)
                if position is not None and self.conn.outbound is not None:
                    ack = wire.subscribed(op.channel, *position)
                    self.conn.outbound.offer(control_message(op.channel, ack, *position))
            elif len(self.conn.channels) >= self.service.settings.max_channels_per_connection:
                limit = self.service.settings.max_channels_per_connection
                await self._error("too_many_channels", f"at most {limit} channels per connection")
            elif not self._may_subscribe(op.channel):
                await self._error("forbidden_channel", f"the token does not allow channel {op.channel!r}")
            else:
                self._join(op.channel, op.since)
        elif op.channel in self.conn.channels:
            self._leave(op.channel)
            await self.ws.send_text(wire.unsubscribed(op.channel))
        else:
            await self._error("not_subscribed", f"not subscribed to {op.channel!r}")

    def _may_subscribe(self, channel: str) -> bool:
        return self.claims is None or self.claims.allows(channel)

    async def _refresh(self, token: str) -> None:
        """Replace the connection's token: verified like a connect token, and it must allow every
        channel the connection is subscribed to; otherwise an error frame, and the old one stays."""
        try:
            claims = self.service.gate.verify(token)
        except TokenError as exc:
            await self._error("invalid_token", f"{exc}; the current token stays")
            return
        refused = sorted(channel for channel in self.conn.channels if not claims.allows(channel))
        if refused:
            await self._error(
                "forbidden_channel", f"the new token does not allow channel {refused[0]!r}; the current token stays"
            )
            return
        self.claims = claims
        self._expire_at(claims.exp)
        await self.ws.send_text(wire.refreshed(claims.exp))

    def _expire_at(self, exp: int) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
        loop = asyncio.get_running_loop()
        # exp is wall-clock time, the loop's clock is monotonic: convert once, now.
        self.expiry = loop.call_at(loop.time() + max(0.0, exp - time.time()), self._expired)

    def _expired(self) -> None:
        self.expiry = None
        if self.close(wire.TOKEN_EXPIRED):
            self.service.tracker.counters.token_expired_closed += 1
            _rated.info("token_expired", "connection %s closed 3000: token expired, not refreshed", self.who())

    def who(self) -> str:
        """The connection as log lines name it: its id and, with a connect token, the token's ``sub``."""
        if self.claims is None:
            return str(self.conn.id)
        return f"{self.conn.id} (sub {self.claims.who()})"

    def _join(self, channel: str, since: tuple[int, str] | None) -> None:
        """Subscribe in the background: the read loop goes on (pings, other ops) while Redis
        confirms the subscription and the history is read, however long that takes."""
        self.conn.channels.add(channel)
        position = Position(*since) if since is not None else None
        join = self.service.recovery.join(channel, self.conn.outbound, position, self.service.confirmed)  # type: ignore[arg-type]
        task = asyncio.get_running_loop().create_task(join)
        self.joining[channel] = task
        task.add_done_callback(lambda done: self._joined(channel, done))

    def _joined(self, channel: str, task: asyncio.Task[Recovered]) -> None:
        if self.joining.get(channel) is task:
            del self.joining[channel]
        if not task.cancelled() and task.exception() is not None:
            failure = task.exception()
            _rated.warning("join", "connection %s: subscription to %r failed: %r", self.who(), channel, failure)

    def _leave(self, channel: str) -> None:
        task = self.joining.pop(channel, None)
        if task is not None:
            task.cancel()
        self.conn.channels.discard(channel)
        self.service.hub.discard(channel, self.conn.outbound)  # type: ignore[arg-type]

    async def _error(self, code: str, detail: str) -> None:
        self.errors += 1
        self.service.tracker.counters.bad_client_frames += 1
        await self.ws.send_text(wire.error(code, detail))

    async def _fail(self, code: str, detail: str, count: bool = True) -> None:
        if count:
            self.service.tracker.counters.bad_client_frames += 1
        await self.ws.send_text(wire.error(code, detail))
        self.close(wire.policy(detail))

    def _slow(self) -> None:
        if self.close(wire.SLOW):
            self.service.tracker.counters.slow_closed += 1

    def close(self, why: wire.Close) -> bool:
        """Close this client without awaiting it: safe to call from fan-out and the idle sweep.

        True when this call started the close; False when it was already closing.
        """
        if self.closing:
            return False
        self.closing = True
        if self.writer is not None:
            self.writer.cancel()
        if self.link is not None:
            self.link.close(why.code, why.reason)
        else:
            # Kept: a task nobody references may be collected before it runs.
            self.closer = asyncio.get_running_loop().create_task(self._close_asgi(why))
        return True

    async def _close_asgi(self, why: wire.Close) -> None:
        try:
            await asyncio.wait_for(self.ws.close(why.code, why.reason), timeout=5.0)
        except (TimeoutError, *_GONE) as exc:
            log.debug("close of connection %s failed: %r", self.who(), exc)
