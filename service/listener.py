"""One pub/sub connection to one Redis node: subscriptions reconciled, reconnects, a canary.

The listener owns one connection taken from its node's pool (so ``REDIS_POOL_SIZE`` bounds
everything), reconnects with capped exponential backoff and resubscribes every wanted channel.
Subscriptions are reconciled, not replayed: ``want``/``unwant`` change the wanted set and wake one
sender that brings Redis in line with it, so a reconnect and a burst of changes take the same path.
On a Redis Cluster it speaks sharded pub/sub (``SSUBSCRIBE``, one command per hash slot, all of a
batch in one write) to the master serving the channels' slots.

A liveness canary guards against a connection that is connected but deaf: every CANARY_INTERVAL
the listener publishes on its private channel (in a slot of its own node) and expects it back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import Connection
from redis.exceptions import RedisError

from service.counters import Counters
from service.topology import slot

log = logging.getLogger("wsbroadcast.broker")

BACKOFF_START = 0.05
# The cap bounds how late deliveries resume once Redis is back; a refused connect every cap per
# worker while Redis is down costs next to nothing.
BACKOFF_CAP = 0.1
CONNECT_TIMEOUT = 2.0


class Listener:
    def __init__(
        self,
        node: str,
        pool: BlockingConnectionPool,
        redis: Redis,
        canary_channel: str,
        canary_interval: float,
        counters: Counters,
        *,
        sharded: bool,
        on_message: Callable[[bytes, bytes], None],
        on_confirmed: Callable[[Listener, str], None],
        on_up: Callable[[Listener, bool], None],
        on_dropped: Callable[[Listener, str], None],
        on_error: Callable[[Listener], None],
    ) -> None:
        self.node = node
        # Log lines name the node on a cluster; on one Redis they read as they always did.
        self._where = f" (node {node})" if sharded else ""
        self._pool = pool
        self._redis = redis
        self._sharded = sharded
        self._subscribe, self._unsubscribe = ("SSUBSCRIBE", "SUNSUBSCRIBE") if sharded else ("SUBSCRIBE", "UNSUBSCRIBE")
        self._message_kind = b"smessage" if sharded else b"message"
        self._subscribed_kind = b"ssubscribe" if sharded else b"subscribe"
        self._unsubscribed_kind = b"sunsubscribe" if sharded else b"unsubscribe"
        self._interval = canary_interval
        self._on_message = on_message
        # Told when Redis confirmed a subscription; when the connection is up (again: True after
        # a loss, whose publications never reached it); when Redis dropped a subscription that
        # this listener still wants (a slot migrated away); when a command met an error reply.
        self._on_confirmed = on_confirmed
        self._on_up = on_up
        self._on_dropped = on_dropped
        self._on_error = on_error
        self.canary_channel = canary_channel
        self._canary_bytes = canary_channel.encode()
        self._wanted: set[str] = {canary_channel}
        self._sent: set[str] = set()
        self.confirmed_channels: set[str] = set()
        # Commands sent per channel and not answered yet: only the reply to the last one counts.
        self._unacked: dict[str, int] = {}
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._canary_task: asyncio.Task[None] | None = None
        self._restart = asyncio.Event()
        self._restart_reason = ""
        # Time allowed for the connect and handshake: a canary round (what the canary allows a
        # confirmation), and at least the TCP connect timeout.
        self._connect_budget = max(2 * canary_interval, CONNECT_TIMEOUT)
        # When the current connection was opened (None between attempts): a connection whose
        # SUBSCRIBE is never confirmed is as deaf as one that stops delivering.
        self._attempt_started: float | None = None
        self.connected = False
        self.down_since: float | None = time.monotonic()
        self.counters = counters  # the worker's, shared by its listeners
        self.reconnects = 0
        self.canary_ok = True
        self.canary_error = ""  # why the last canary was missed, while canary_ok is False
        self.last_error = "not connected yet"
        self.ever_connected = False
        self._down_logged = False
        self._ups = 0
        self._canary_pending: bytes | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name=f"broker-listener-{self.node}")
        self._canary_task = asyncio.create_task(self._canary_forever(), name=f"broker-canary-{self.node}")

    async def stop(self) -> None:
        for task in (self._canary_task, self._task):
            if task is not None:
                task.cancel()
        for task in (self._canary_task, self._task):
            if task is not None:
                try:
                    await task
                except asyncio.CancelledError:
                    pass

    # --- subscriptions ---------------------------------------------------------------------------

    def want(self, redis_channel: str) -> None:
        self._wanted.add(redis_channel)
        self._dirty.set()

    def unwant(self, redis_channel: str) -> None:
        self._wanted.discard(redis_channel)
        self.confirmed_channels.discard(redis_channel)
        self._dirty.set()

    def wanted(self) -> set[str]:
        return self._wanted - {self.canary_channel}

    def set_canary(self, channel: str) -> None:
        """Move the canary to ``channel`` (its old slot migrated to another node)."""
        if channel == self.canary_channel:
            return
        self._wanted.discard(self.canary_channel)
        self.canary_channel, self._canary_bytes = channel, channel.encode()
        self._canary_pending = None
        self._wanted.add(channel)
        self._dirty.set()

    # --- the connection ---------------------------------------------------------------------------

    async def _listen_forever(self) -> None:
        backoff = BACKOFF_START
        while True:
            ups_before = self._ups
            conn: Connection | None = None
            sender: asyncio.Task[None] | None = None
            try:
                # Bounded: a stalled Redis accepts the TCP connection and never answers the
                # handshake; the next attempt must not wait for the socket timeout.
                async with asyncio.timeout(self._connect_budget):
                    conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
                self._sent.clear()
                self.confirmed_channels.clear()
                self._unacked.clear()
                self._dirty.set()
                self._restart.clear()
                sender = asyncio.create_task(self._send_forever(conn), name="broker-subscriber")
                self._attempt_started = time.monotonic()
                await self._read_forever(conn, sender)
            except asyncio.CancelledError:
                raise
            except TimeoutError as exc:
                # Ours from the bounded connect (no connection yet), else a socket's own.
                self._mark_down(f"no connection within {self._connect_budget:g} s" if conn is None else repr(exc))
            except (RedisError, OSError, RuntimeError) as exc:
                self._mark_down(str(exc) or type(exc).__name__)
                self._on_error(self)
            except Exception as exc:
                # Anything else would end the listener for good: log it and reconnect.
                log.exception("pub/sub listener failed")
                self._mark_down(f"listener error: {exc!r}")
            finally:
                self._attempt_started = None
                if sender is not None:
                    sender.cancel()
                    # Awaited, so it is gone before its connection goes back to the pool; a
                    # cancellation of the listener itself still propagates after the cleanup.
                    await asyncio.gather(sender, return_exceptions=True)
                if conn is not None:
                    # nowait: a connection that stopped reading must not stall (or, by raising
                    # from here, end) the listener.
                    try:
                        await conn.disconnect(nowait=True)
                    except Exception as exc:
                        log.debug("pub/sub connection disconnect failed: %r", exc)
                    await self._pool.release(conn)
            if self._ups != ups_before:
                backoff = BACKOFF_START
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_CAP)

    async def _read_forever(self, conn: Connection, sender: asyncio.Task[None]) -> None:
        """Read until the connection fails, the sender fails or the canary asks for a restart."""
        reader = asyncio.create_task(self._read_loop(conn), name="broker-reader")
        restart = asyncio.create_task(self._restart.wait(), name="broker-restart")
        try:
            done, _ = await asyncio.wait({reader, sender, restart}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, restart):
                task.cancel()
            await asyncio.gather(reader, restart, return_exceptions=True)
        for task in (reader, sender):
            if task in done:
                task.result()  # re-raise the connection error
        self._mark_down(f"listener restarted: {self._restart_reason}")

    async def _read_loop(self, conn: Connection) -> None:
        handle = self._handle
        while True:
            handle(await conn.read_response(timeout=math.inf, push_request=True))

    async def _send_forever(self, conn: Connection) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            subscribe = sorted(self._wanted - self._sent)
            unsubscribe = sorted(self._sent - self._wanted)
            for channel in subscribe + unsubscribe:
                self._unacked[channel] = self._unacked.get(channel, 0) + 1
            commands: list[tuple[str, ...]] = []
            if subscribe:
                self._sent.update(subscribe)
                commands += self._commands(self._subscribe, subscribe)
            if unsubscribe:
                self._sent.difference_update(unsubscribe)
                # Not confirmed from now on: a listener arriving before the reply must wait for
                # the SUBSCRIBE that will follow, not trust the subscription being torn down.
                self.confirmed_channels.difference_update(unsubscribe)
                commands += self._commands(self._unsubscribe, unsubscribe)
            if commands:
                await conn.send_packed_command(conn.pack_commands(commands))

    def _commands(self, verb: str, channels: list[str]) -> list[tuple[str, ...]]:
        """One command for all ``channels``; sharded pub/sub takes one hash slot per command."""
        if not self._sharded:
            return [(verb, *channels)]
        by_slot: dict[int, list[str]] = {}
        for channel in channels:
            by_slot.setdefault(slot(channel), []).append(channel)
        return [(verb, *group) for group in by_slot.values()]

    def _handle(self, response: Any) -> None:
        if not isinstance(response, list) or len(response) < 3:
            return
        kind = response[0]
        if kind == self._message_kind:
            channel_bytes, payload = response[1], response[2]
            if channel_bytes == self._canary_bytes:
                self._canary_received(payload)
                return
            self._on_message(channel_bytes, payload)
        elif kind == self._subscribed_kind:
            channel = response[1].decode()
            if self._superseded(channel):
                return
            self.confirmed_channels.add(channel)
            if channel == self.canary_channel:
                self._mark_up()
            self._on_confirmed(self, channel)
        elif kind == self._unsubscribed_kind:
            channel = response[1].decode()
            pushed = channel not in self._unacked
            if self._superseded(channel):
                return
            self.confirmed_channels.discard(channel)
            if pushed and channel in self._sent:
                # Not an answer to ours: Redis dropped the subscription (its slot moved away).
                self._sent.discard(channel)
                self._on_dropped(self, channel)

    def _superseded(self, channel: str) -> bool:
        """True for a reply that a later SUBSCRIBE/UNSUBSCRIBE of the same channel supersedes."""
        left = self._unacked.get(channel, 1) - 1
        if left > 0:
            self._unacked[channel] = left
            return True
        self._unacked.pop(channel, None)
        return False

    def _mark_up(self) -> None:
        if not self.connected:
            again = self.ever_connected
            if again:
                self.reconnects += 1
                self.counters.reconnects += 1
                down = time.monotonic() - (self.down_since or time.monotonic())
                log.warning(
                    "Redis pub/sub connection restored after %.2f s; resubscribed %d channels%s",
                    down, len(self._wanted), self._where,
                )
            else:
                log.info("Redis pub/sub connected to %s", self.node)
            self.ever_connected = True
            self._ups += 1
            self.connected = True
            self._down_logged = False
            self.down_since = None
            self._on_up(self, again)

    def _mark_down(self, reason: str) -> None:
        if not self._down_logged:
            what = "lost" if self.ever_connected else "unavailable at start-up"
            log.warning("Redis pub/sub connection %s: %s; reconnecting with backoff%s", what, reason, self._where)
            self._down_logged = True
        if self.connected or self.down_since is None:
            self.down_since = time.monotonic()
        self.connected = False
        self.last_error = reason
        # A canary in flight went out with the old connection: waiting for it after a quick
        # reconnect would count a miss that is not one, and restart a healthy listener.
        self._canary_pending = None

    # --- the canary -----------------------------------------------------------------------------

    async def _canary_forever(self) -> None:
        """Publish a numbered canary each interval; one not back within two intervals is a miss.

        A canary Redis does not accept within one interval is a miss as well: a stalled server
        accepts connections and answers nothing, and the verdict must not wait for the pool's
        socket timeout (nor forget the canary when that timeout finally fires).
        """
        number = 0
        sent_at = 0.0
        interval = self._interval
        while True:
            await asyncio.sleep(interval)
            if not self.connected:
                self._canary_pending = None
                started = self._attempt_started
                if started is not None and time.monotonic() - started >= 2 * interval:
                    self._restart_reason = "subscription not confirmed by Redis"
                    self._restart.set()
                continue
            if self._canary_pending is not None:
                if time.monotonic() - sent_at < 2 * interval:
                    # Late is not lost: a worker busy for one interval must not restart a healthy
                    # listener (the restart itself would drop the publications of the gap).
                    continue
                self.counters.canary_misses += 1
                if self.canary_ok:
                    log.warning("canary missed: the pub/sub listener is not delivering; restarting it%s", self._where)
                self.canary_ok = False
                self.canary_error = f"canary not back within {2 * interval:g} s"
                self._canary_pending = None
                self._restart_reason = "canary missed"
                self._restart.set()
                continue
            number += 1
            token = str(number).encode()
            self._canary_pending = token
            try:
                async with asyncio.timeout(interval):
                    if self._sharded:
                        await self._redis.spublish(self.canary_channel, token)
                    else:
                        await self._redis.publish(self.canary_channel, token)
            except TimeoutError:
                self._canary_not_sent(f"canary publish not answered within {interval:g} s")
                continue
            except (RedisError, OSError) as exc:
                self._canary_not_sent(f"canary publish failed: {exc or type(exc).__name__}")
                if self._sharded:
                    self._on_error(self)
                continue
            sent_at = time.monotonic()

    def _canary_not_sent(self, reason: str) -> None:
        """Count a canary Redis did not take as a miss, without restarting the listener.

        The listener's own connection is judged by canaries Redis accepted: a stalled Redis goes on
        delivering on the same subscription once it answers again, and a restart would only add a
        reconnect to wait for.
        """
        self._canary_pending = None
        if not self.connected:
            return  # the listener saw the loss first; its reason says more than this one
        self.counters.canary_misses += 1
        if self.canary_ok:
            log.warning("canary not accepted by Redis: %s; reporting degraded until one is back%s", reason, self._where)
        self.canary_ok = False
        self.canary_error = reason

    def _canary_received(self, token: bytes) -> None:
        if token != self._canary_pending:
            return
        self._canary_pending = None
        if not self.canary_ok:
            log.warning("canary received again: the pub/sub listener is delivering%s", self._where)
            self.canary_ok = True
            self.canary_error = ""
