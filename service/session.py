"""One admitted WebSocket connection's logic, driven by callbacks and never awaiting.

A transport feeds it the client's messages (``on_text``, ``on_binary``) and tells it when the
connection is gone (``ended``); it answers through the connection's outbound path, so that its
control frames (pong, errors, acks) go out in order with the publications, and it closes through
``close``, the one close path, which tells the transport to send the close frame (``Link``). Two
transports drive it: the lean protocol (``workers.lean``), which holds nothing else per idle
connection, and the ASGI endpoint (``service.endpoint``), for other servers, compression and
drop-oldest.

Admission (``admit``) runs before any of this exists, synchronously: the gate's checks and the
connection limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from service import wire
from service.config import Settings
from service.gate import Claims, Gate, TokenError
from service.history import Position
from service.hub import Hub
from service.outbound import Message, Outbound, control_message, reply_message
from service.ratelog import RateLimitedLog
from service.recovery import Recovered, Recovery
from service.tracker import Connection, Tracker

log = logging.getLogger("wsbroadcast.endpoint")
# Every client can subscribe while Redis is down: one line per interval, not one per subscribe.
_rated = RateLimitedLog(log)

MAX_ERRORS = 10

# The connection's one state.
OPEN = 0  # frames flow both ways
CLOSING = 1  # the close frame is sent (or the client's received): nothing more is read or written
ENDED = 2  # the transport is gone


class Link(Protocol):
    """What a session needs of its transport: ending the connection with a close frame."""

    def send_close(self, why: wire.Close) -> None:
        """Write the close frame now, after what is already written, and end the connection
        without awaiting the client (abort if it does not answer in time)."""
        ...


class Parts(Protocol):
    """What the transports and their sessions use of the worker (``service.node.Node`` has it)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def worker_name(self) -> str: ...

    @property
    def gate(self) -> Gate: ...

    @property
    def tracker(self) -> Tracker: ...

    @property
    def hub(self) -> Hub: ...

    @property
    def recovery(self) -> Recovery: ...

    async def confirmed(self, channel: str) -> None:
        """Wait until Redis has confirmed the subscription to ``channel``."""
        ...


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused handshake: the HTTP status, its text and Retry-After (seconds, or None)."""

    status: int
    detail: str
    retry_after: int | None = None


def admit(service: Parts, headers: Mapping[str, str], query: Mapping[str, str]) -> Refusal | Claims | None:
    """Whether a /ws handshake may be accepted: a Refusal, or the token's Claims (None without tokens).

    ``headers`` is keyed by lower-case name. Nothing per connection exists before this says yes.
    """
    checked = service.gate.check(headers, query)
    if isinstance(checked, tuple):
        return Refusal(*checked)
    reason = service.tracker.refusal()
    if reason is not None:
        service.tracker.refuse(reason)
        if reason == "memory":
            return Refusal(503, "worker is under memory pressure", 5)
        return Refusal(503, "worker is at its connection limit", 1)
    return checked


class Session:
    """One admitted connection, from accept to unregister."""

    __slots__ = ("claims", "conn", "errors", "expiry", "joining", "link", "outbound", "service", "stamp", "state",
                 "tokens")

    def __init__(self, service: Parts, claims: Claims | None, link: Link, outbound: Outbound) -> None:
        self.service = service
        self.link = link
        self.outbound = outbound
        self.conn: Connection = service.tracker.admit(self.close)
        self.conn.outbound = outbound
        outbound.owner = self
        self.state = OPEN
        # Subscriptions under way (Redis's confirmation, the position or the recovery read); made
        # on first need: most connections are idle.
        self.joining: dict[str, asyncio.Task[Recovered]] | None = None
        self.errors = 0
        # With CONNECT_SECRET set: what the token grants, and the timer that closes the connection
        # when it expires (one handle per connection, nothing per message).
        self.claims = claims
        self.expiry: asyncio.TimerHandle | None = None
        # The client's text frames, a token bucket: CLIENT_RATE_LIMIT per second, bursts of CLIENT_RATE_BURST.
        self.tokens = float(service.settings.client_rate_burst)
        self.stamp = time.monotonic()

    def start(self, channels: str | None) -> None:
        """Once the handshake is answered: the token's expiry, and the channels asked for at connect
        (``?channels=``, raw)."""
        if self.claims is not None:
            self._expire_at(self.claims.exp)
        settings = self.service.settings
        names = wire.channels_param(channels, settings.default_channel)
        limit = settings.max_channels_per_connection
        if len(names) > limit:
            self._fail("too_many_channels", f"at most {limit} channels per connection")
            return
        for name in names:
            if not wire.is_channel(name):
                self._fail("invalid_channel", wire.CHANNEL_RULE)
                return
            if not self._may_subscribe(name):
                self._fail("forbidden_channel", f"the token does not allow channel {name!r}")
                return
        # Joined together: with Redis down, every channel waits for it at once.
        for name in names:
            self._join(name, None)

    # --- what the client sends ---------------------------------------------------------------------

    def on_text(self, text: str) -> None:
        if self.state != OPEN:
            return
        if not self._received():
            return
        if len(text) > self.service.settings.max_message_bytes:
            # Reached only where the server did not enforce the limit itself.
            self.close(wire.TOO_BIG)
            return
        op = wire.parse_client_frame(text)
        if isinstance(op, wire.ClientError):
            self._error(op.code, op.detail)
        else:
            self._apply(op)
        self._check_errors()

    def on_binary(self) -> None:
        if self.state != OPEN or not self._received():
            return
        self._error("binary_not_supported", "send text JSON frames")
        self._check_errors()

    def _received(self) -> bool:
        """Note the client's activity and charge its rate limit; False when it closed the connection."""
        now = time.monotonic()
        self.conn.last_received = now
        settings = self.service.settings
        tokens = min(float(settings.client_rate_burst), self.tokens + (now - self.stamp) * settings.client_rate_limit)
        self.stamp = now
        if tokens < 1.0:
            self.tokens = tokens
            self.service.tracker.counters.abuse_closed += 1
            self._fail("rate_limited", "too many frames; slow down", count=False)
            return False
        self.tokens = tokens - 1.0
        return True

    def _check_errors(self) -> None:
        if self.state == OPEN and self.errors >= MAX_ERRORS:
            self.service.tracker.counters.abuse_closed += 1
            self._fail("too_many_errors", f"closed after {MAX_ERRORS} invalid frames", count=False)

    def _apply(self, op: wire.ClientOp) -> None:
        conn = self.conn
        if op.op == "ping":
            self._send(wire.PONG)
        elif op.op == "refresh":
            self._refresh(op.token)
        elif op.op == "subscribe":
            limit = self.service.settings.max_channels_per_connection
            if op.channel in conn.channels:
                # Already subscribed: the position now (its first ack, if still joining, follows),
                # through the outbound path, after the publications queued before it.
                joining = self.joining is not None and op.channel in self.joining
                position = None if joining else self.service.hub.position(op.channel)
                if position is not None:
                    ack = wire.subscribed(op.channel, *position)
                    self._offer(control_message(op.channel, ack, *position))
            elif len(conn.channels) >= limit:
                self._error("too_many_channels", f"at most {limit} channels per connection")
            elif not self._may_subscribe(op.channel):
                self._error("forbidden_channel", f"the token does not allow channel {op.channel!r}")
            else:
                self._join(op.channel, op.since)
        elif op.channel in conn.channels:
            self._leave(op.channel)
            self._send(wire.unsubscribed(op.channel))
        else:
            self._error("not_subscribed", f"not subscribed to {op.channel!r}")

    def _may_subscribe(self, channel: str) -> bool:
        return self.claims is None or self.claims.allows(channel)

    def _refresh(self, token: str) -> None:
        """Replace the connection's token: verified like a connect token, and it must allow every
        channel the connection is subscribed to; otherwise an error frame, and the old one stays."""
        try:
            claims = self.service.gate.verify(token)
        except TokenError as exc:
            self._error("invalid_token", f"{exc}; the current token stays")
            return
        refused = sorted(channel for channel in self.conn.channels if not claims.allows(channel))
        if refused:
            self._error(
                "forbidden_channel", f"the new token does not allow channel {refused[0]!r}; the current token stays"
            )
            return
        self.claims = claims
        self._expire_at(claims.exp)
        self._send(wire.refreshed(claims.exp))

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

    # --- subscriptions -----------------------------------------------------------------------------

    def _join(self, channel: str, since: tuple[int, str] | None) -> None:
        """Subscribe in the background: the client's other ops go on while Redis confirms the
        subscription and the history is read, however long that takes."""
        self.conn.channels.add(channel)
        position = Position(*since) if since is not None else None
        join = self.service.recovery.join(channel, self.outbound, position, self.service.confirmed)
        task = asyncio.get_running_loop().create_task(join)
        if self.joining is None:
            self.joining = {}
        self.joining[channel] = task
        task.add_done_callback(lambda done: self._joined(channel, done))

    def _joined(self, channel: str, task: asyncio.Task[Recovered]) -> None:
        joining = self.joining
        if joining is not None and joining.get(channel) is task:
            del joining[channel]
            if not joining:
                self.joining = None
        if not task.cancelled() and task.exception() is not None:
            failure = task.exception()
            _rated.warning("join", "connection %s: subscription to %r failed: %r", self.who(), channel, failure)

    def _leave(self, channel: str) -> None:
        task = self.joining.pop(channel, None) if self.joining is not None else None
        if task is not None:
            task.cancel()
        self.conn.channels.discard(channel)
        self.service.hub.discard(channel, self.outbound)

    # --- what the server sends -----------------------------------------------------------------------

    def _send(self, text: str) -> None:
        self._offer(reply_message(text.encode()))

    def _offer(self, message: Message) -> None:
        verdict = self.outbound.offer(message)
        if verdict is not None:
            self.close(verdict)

    def _error(self, code: str, detail: str) -> None:
        self.errors += 1
        self.service.tracker.counters.bad_client_frames += 1
        self._send(wire.error(code, detail))

    def _fail(self, code: str, detail: str, count: bool = True) -> None:
        if count:
            self.service.tracker.counters.bad_client_frames += 1
        self._send(wire.error(code, detail))
        self.close(wire.policy(detail))

    def close(self, why: wire.Close) -> bool:
        """Close this client without awaiting it: safe to call from anywhere, fan-out included.

        True when this call started the close; False when it was already closing. The connection
        is released at once (its channels, its slot in the tracker): nothing more is offered to it,
        and a client that never reads again does not keep its slot while the transport waits.
        """
        if self.state != OPEN:
            return False
        self.state = CLOSING
        if why is wire.SLOW:
            self.service.tracker.counters.slow_closed += 1
        self._release()
        self.link.send_close(why)
        return True

    def ended(self) -> None:
        """The transport is gone: release the connection if not yet done, and cut the cycles between
        session, connection and outbound so the memory is freed now, not whenever the cyclic GC runs."""
        if self.state == ENDED:
            return
        if self.state == OPEN:
            self._release()
        self.state = ENDED
        self.conn.close = _already_closed
        self.conn.outbound = None
        self.outbound.owner = None

    def _release(self) -> None:
        for channel in list(self.conn.channels):
            self._leave(channel)
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        self.service.tracker.remove(self.conn)


def _already_closed(why: wire.Close) -> bool:
    return False
