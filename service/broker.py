"""The broker: the worker's Redis pool, its one pub/sub listener, and publishing.

The listener owns one connection taken from the pool (so ``REDIS_POOL_SIZE`` bounds everything),
reconnects with capped exponential backoff and resubscribes every wanted channel. Subscriptions are
reconciled, not replayed: ``want``/``unwant`` change the wanted set and wake one sender that brings
Redis in line with it, so a reconnect and a burst of changes take the same path.

A liveness canary guards against a listener that is connected but deaf: every CANARY_INTERVAL the
worker publishes on its private channel and expects it back through its own subscription.
Publications are handed to ``on_message`` (the hub); the broker never imports the hub.
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
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service import publisher
from service.config import Settings, redact_url
from service.counters import Counters
from service.keys import Keys
from service.publisher import Published

log = logging.getLogger("wsbroadcast.broker")

BACKOFF_START = 0.05
# The cap bounds how late deliveries resume once Redis is back; a refused connect every cap per
# worker while Redis is down costs next to nothing.
BACKOFF_CAP = 0.1
CONNECT_TIMEOUT = 2.0


class Broker:
    def __init__(
        self,
        settings: Settings,
        keys: Keys,
        worker_id: tuple[str, int],
        on_message: Callable[[str, bytes], None],
        on_reconnect: Callable[[], None] | None = None,
        counters: Counters | None = None,
    ) -> None:
        self._settings = settings
        self._keys = keys
        self._on_message = on_message
        # Called when the listener is back after a loss: what was published meanwhile never
        # reached it, so whoever wires the broker reads it from the history.
        self._on_reconnect = on_reconnect
        # No client-side retries: a publish while Redis is down fails at once (503) instead of
        # hanging for the retry schedule.
        self.pool = BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=settings.redis_pool_size,
            timeout=settings.redis_pool_timeout,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=settings.redis_command_timeout,
            retry=Retry(NoBackoff(), 0),
            # RESP2: pub/sub messages arrive as plain replies, without RESP3's push-handler detour.
            protocol=2,
            client_name=f"wsbroadcast:{worker_id[0]}:{worker_id[1]}",
        )
        self.redis = Redis(connection_pool=self.pool, retry=Retry(NoBackoff(), 0))
        self._canary_channel = keys.canary(*worker_id)
        self._wanted: set[str] = {self._canary_channel}
        self._sent: set[str] = set()
        self._confirmed: set[str] = set()
        # Commands sent per channel and not answered yet: only the reply to the last one counts.
        self._unacked: dict[str, int] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._canary_task: asyncio.Task[None] | None = None
        self._restart = asyncio.Event()
        self._restart_reason = ""
        # Time allowed for the listener's connect and handshake: a canary round (what the canary
        # allows a confirmation), and at least the TCP connect timeout.
        self._connect_budget = max(2 * settings.canary_interval, CONNECT_TIMEOUT)
        # When the current listener connection was opened (None between attempts): a connection
        # whose SUBSCRIBE is never confirmed is as deaf as one that stops delivering.
        self._attempt_started: float | None = None
        self.connected = False
        self.down_since: float | None = time.monotonic()
        self.counters = Counters() if counters is None else counters
        self.canary_ok = True
        self.canary_error = ""  # why the last canary was missed, while canary_ok is False
        self.last_error = "not connected yet"
        self.ever_connected = False
        self._down_logged = False
        self._ups = 0
        self._canary_pending: bytes | None = None
        self._canary_bytes = self._canary_channel.encode()

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="broker-listener")
        self._canary_task = asyncio.create_task(self._canary_forever(), name="broker-canary")

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
        await self.redis.aclose()
        await self.pool.disconnect()

    # --- subscriptions ---------------------------------------------------------------------------

    def want(self, channel: str) -> None:
        """Subscribe to the public ``channel`` in Redis (called on its first local listener)."""
        self._wanted.add(self._keys.channel(channel))
        self._dirty.set()

    def unwant(self, channel: str) -> None:
        """Unsubscribe from ``channel`` in Redis (called after its last local listener left)."""
        self._wanted.discard(self._keys.channel(channel))
        self._dirty.set()

    async def confirmed(self, channel: str, timeout: float) -> bool:
        """Wait until Redis has confirmed the subscription to ``channel``; False on timeout."""
        redis_channel = self._keys.channel(channel)
        if redis_channel in self._confirmed:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(redis_channel, []).append(future)
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            waiters = self._waiters.get(redis_channel)
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._waiters[redis_channel]

    # --- publishing ---------------------------------------------------------------------------

    async def publish(self, channel: str, data: bytes, idempotency_key: str | None = None) -> Published:
        """Publish the JSON ``data`` bytes on ``channel`` through the Redis function (once per
        ``idempotency_key`` within IDEMPOTENCY_WINDOW).

        Raises publisher.Refused when nothing was published (no connection could be made, or Redis
        refused the command), publisher.Unknown when the command went out unanswered within
        REDIS_COMMAND_TIMEOUT, publisher.IdempotencyConflict for a key reused for another publication.
        """
        return await publisher.execute(self.pool, publisher.command(self._settings, channel, data, idempotency_key))

    def pool_usage(self) -> dict[str, int]:
        pool: Any = self.pool
        return {
            "in_use": len(pool._in_use_connections),
            "idle": len(pool._available_connections),
            "max": self._settings.redis_pool_size,
        }

    # --- the listener -------------------------------------------------------------------------

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
                    conn = await self.pool.get_connection()  # type: ignore[no-untyped-call]
                self._sent.clear()
                self._confirmed.clear()
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
                    await self.pool.release(conn)
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
            if subscribe:
                self._sent.update(subscribe)
                await conn.send_command("SUBSCRIBE", *subscribe)
            if unsubscribe:
                self._sent.difference_update(unsubscribe)
                # Not confirmed from now on: a listener arriving before the reply must wait for
                # the SUBSCRIBE that will follow, not trust the subscription being torn down.
                self._confirmed.difference_update(unsubscribe)
                await conn.send_command("UNSUBSCRIBE", *unsubscribe)

    def _handle(self, response: Any) -> None:
        if not isinstance(response, list) or len(response) < 3:
            return
        kind = response[0]
        if kind == b"message":
            channel_bytes, payload = response[1], response[2]
            if channel_bytes == self._canary_bytes:
                self._canary_received(payload)
                return
            name = self._keys.channel_name(channel_bytes)
            if name is not None:
                self._on_message(name, payload)
        elif kind in (b"subscribe", b"unsubscribe") and self._superseded(response[1].decode()):
            return
        elif kind == b"subscribe":
            channel = response[1].decode()
            self._confirmed.add(channel)
            if channel == self._canary_channel:
                self._mark_up()
            for future in self._waiters.pop(channel, []):
                if not future.done():
                    future.set_result(None)
        elif kind == b"unsubscribe":
            self._confirmed.discard(response[1].decode())

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
            if self.ever_connected:
                self.counters.reconnects += 1
                down = time.monotonic() - (self.down_since or time.monotonic())
                log.warning(
                    "Redis pub/sub connection restored after %.2f s; resubscribed %d channels",
                    down,
                    len(self._wanted),
                )
                if self._on_reconnect is not None:
                    self._on_reconnect()
            else:
                log.info("Redis pub/sub connected to %s", redact_url(self._settings.redis_url))
            self.ever_connected = True
            self._ups += 1
        self.connected = True
        self._down_logged = False
        self.down_since = None

    def _mark_down(self, reason: str) -> None:
        if not self._down_logged:
            what = "lost" if self.ever_connected else "unavailable at start-up"
            log.warning("Redis pub/sub connection %s: %s; reconnecting with backoff", what, reason)
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
        interval = self._settings.canary_interval
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
                    log.warning("canary missed: the pub/sub listener is not delivering; restarting it")
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
                    await self.redis.publish(self._canary_channel, token)
            except TimeoutError:
                self._canary_not_sent(f"canary publish not answered within {interval:g} s")
                continue
            except (RedisError, OSError) as exc:
                self._canary_not_sent(f"canary publish failed: {exc or type(exc).__name__}")
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
            log.warning("canary not accepted by Redis: %s; reporting degraded until one is back", reason)
        self.canary_ok = False
        self.canary_error = reason

    def _canary_received(self, token: bytes) -> None:
        if token != self._canary_pending:
            return
        self._canary_pending = None
        if not self.canary_ok:
            log.warning("canary received again: the pub/sub listener is delivering")
            self.canary_ok = True
            self.canary_error = ""

