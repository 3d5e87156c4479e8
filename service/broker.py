"""The broker: the worker's Redis topology, its pub/sub listeners, and publishing.

On one Redis the broker has one listener (``service.listener``). On a Redis Cluster
(``REDIS_CLUSTER``) it has one listener per master, each subscribed with ``SSUBSCRIBE`` to the
wanted channels whose slots that master serves, each with its own canary (so a deaf shard is not
hidden by healthy ones), and each drawing its connection from that node's pool. When the slot map
changes (a replica promoted, a slot migrated, a ``sunsubscribe`` pushed by Redis) channels move to
the listener of their new master; the channels a listener may have missed publications of (it
reconnected, or they moved to it) are handed to ``on_reconnect``, which reads them from the history.

Publications are handed to ``on_message`` (the hub); the broker never imports the hub.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import AskError, MovedError, TryAgainError

from service import publisher
from service.config import Settings
from service.counters import Counters
from service.keys import Keys
from service.listener import Listener
from service.publisher import Published
from service.topology import Topology

log = logging.getLogger("wsbroadcast.broker")

# How often a cluster's slot map is read even when nothing suggested a change: it bounds how late
# a failover is noticed by a worker whose commands all went to healthy nodes.
REFRESH_INTERVAL = 1.0
# Canary channel names tried per master to find one in a slot that master serves.
CANARY_TRIES = 100_000

T = TypeVar("T")


class Broker:
    def __init__(
        self,
        settings: Settings,
        keys: Keys,
        worker_id: tuple[str, int],
        on_message: Callable[[str, bytes], None],
        on_reconnect: Callable[[list[str] | None], None] | None = None,
        counters: Counters | None = None,
    ) -> None:
        self._settings = settings
        self._keys = keys
        self._worker_id = worker_id
        self._on_message = on_message
        # Called when publications may have been missed: None for every channel (the one Redis's
        # listener is back after a loss), else the channels concerned (a cluster node's; none when
        # a new master's listener connects, whose function library may still need loading).
        self._on_reconnect = on_reconnect
        self.cluster = settings.redis_cluster
        self.topology = Topology(settings, f"wsbroadcast:{worker_id[0]}:{worker_id[1]}")
        self._wanted: set[str] = set()  # Redis channel names
        self._listeners: dict[str, Listener] = {}  # node address -> its listener
        self._route: dict[str, str] = {}  # Redis channel -> the node whose listener holds it
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._refresh_now = asyncio.Event()
        self._topology_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.counters = Counters() if counters is None else counters
        self._ever_connected = False
        if not self.cluster:
            self._add_listener(self.topology.masters[0])

    def masters(self) -> list[Redis]:
        """A client per master (SCANs that must see every key)."""
        return [self.topology.redis(address) for address in self.topology.masters]

    async def run(self, key: str, command: Callable[[Redis], Awaitable[T]]) -> T:
        """``command`` on the node serving ``key`` (retried once after MOVED)."""
        return await self.topology.run(key, command)

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self.cluster:
            self._topology_task = asyncio.create_task(self._watch_topology(), name="broker-topology")
        for listener in self._listeners.values():
            listener.start()

    async def stop(self) -> None:
        self._stopping = True
        if self._topology_task is not None:
            self._topology_task.cancel()
            await asyncio.gather(self._topology_task, return_exceptions=True)
        for listener in list(self._listeners.values()):
            await listener.stop()
        self._listeners.clear()
        await self.topology.close()

    # --- subscriptions ---------------------------------------------------------------------------

    def want(self, channel: str) -> None:
        """Subscribe to the public ``channel`` in Redis (called on its first local listener)."""
        redis_channel = self._keys.channel(channel)
        self._wanted.add(redis_channel)
        self._place(redis_channel)

    def unwant(self, channel: str) -> None:
        """Unsubscribe from ``channel`` in Redis (called after its last local listener left)."""
        redis_channel = self._keys.channel(channel)
        self._wanted.discard(redis_channel)
        node = self._route.pop(redis_channel, None)
        if node is not None and node in self._listeners:
            self._listeners[node].unwant(redis_channel)

    async def confirmed(self, channel: str, timeout: float) -> bool:
        """Wait until Redis has confirmed the subscription to ``channel``; False on timeout."""
        redis_channel = self._keys.channel(channel)
        if self._is_confirmed(redis_channel):
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

    def _is_confirmed(self, redis_channel: str) -> bool:
        node = self._route.get(redis_channel)
        listener = self._listeners.get(node) if node is not None else None
        return listener is not None and redis_channel in listener.confirmed_channels

    def _place(self, redis_channel: str) -> None:
        """Hand the channel to the listener of the node serving it (moving it if it was elsewhere)."""
        address = self.topology.address_of(redis_channel)
        old = self._route.get(redis_channel)
        if old == address and address in self._listeners:
            return
        if old is not None and old in self._listeners:
            self._listeners[old].unwant(redis_channel)
        if not address or address not in self._listeners:
            self._route.pop(redis_channel, None)  # served by none yet: placed once the map says
            return
        self._route[redis_channel] = address
        self._listeners[address].want(redis_channel)

    # --- publishing ---------------------------------------------------------------------------

    async def publish(self, channel: str, data: bytes, idempotency_key: str | None = None) -> Published:
        """Publish the JSON ``data`` bytes on ``channel`` through the Redis function (once per
        ``idempotency_key`` within IDEMPOTENCY_WINDOW), on the node serving the channel.

        Raises publisher.Refused when nothing was published (no connection could be made, or Redis
        refused the command), publisher.Unknown when the command went out unanswered within
        REDIS_COMMAND_TIMEOUT, publisher.IdempotencyConflict for a key reused for another publication.
        A cluster's MOVED (a failover, a migrated slot) is retried once on the new owner.
        """
        cmd = publisher.command(self._settings, channel, data, idempotency_key)
        key = self._keys.meta(channel)
        try:
            return await publisher.execute(self.topology.pool(self._address(key)), cmd)
        except publisher.Refused as exc:
            cause = exc.__cause__
            if not self.cluster:
                raise
            if isinstance(cause, TryAgainError):
                # Mid-migration, the channel's keys are split between the two nodes for a moment.
                await asyncio.sleep(publisher.TRY_AGAIN_DELAY)
                return await publisher.execute(self.topology.pool(self._address(key)), cmd)
            if isinstance(cause, AskError) and not isinstance(cause, MovedError):  # MovedError is an AskError
                # The slot is migrating and its keys already left: the importing node runs it.
                return await publisher.execute(self.topology.pool(f"{cause.host}:{cause.port}"), cmd, asking=True)
            if not isinstance(cause, MovedError):
                self.topology.refresh_soon()
                raise
        await self.topology.refresh()
        return await publisher.execute(self.topology.pool(self._address(key)), cmd)

    def _address(self, key: str) -> str:
        address = self.topology.address_of(key)
        if not address:
            raise publisher.Refused(f"no Redis Cluster master serves the slot of {key!r} (a failover under way?)")
        return address

    def pool_usage(self) -> dict[str, int]:
        """In use and idle connections, summed over the nodes; ``max`` is per node."""
        usage = self.topology.pool_usage()
        return {
            "in_use": sum(u["in_use"] for u in usage.values()),
            "idle": sum(u["idle"] for u in usage.values()),
            "max": self._settings.redis_pool_size,
        }

    # --- the status the health report reads ----------------------------------------------------

    def _live(self) -> list[Listener]:
        return list(self._listeners.values())

    @property
    def connected(self) -> bool:
        listeners = self._live()
        return bool(listeners) and all(listener.connected for listener in listeners) and not self._unplaced()

    @property
    def ever_connected(self) -> bool:
        return self._ever_connected

    @property
    def canary_ok(self) -> bool:
        return all(listener.canary_ok for listener in self._live())

    @property
    def canary_error(self) -> str:
        return "; ".join(self._name(lis) + lis.canary_error for lis in self._live() if not lis.canary_ok)

    @property
    def last_error(self) -> str:
        errors = [self._name(lis) + lis.last_error for lis in self._live() if not lis.connected]
        if self._unplaced():
            errors.append(f"{self._unplaced()} subscribed channels in slots no master serves")
        return "; ".join(errors) or ("no Redis Cluster master known yet" if not self._live() else "")

    @property
    def down_since(self) -> float | None:
        times = [listener.down_since for listener in self._live() if listener.down_since is not None]
        return min(times) if times else None

    def _unplaced(self) -> int:
        return len(self._wanted) - len(self._route)

    def _name(self, listener: Listener) -> str:
        return f"{listener.node}: " if self.cluster else ""

    def nodes(self) -> list[dict[str, Any]]:
        """Per node: its listener's state and channel count (the health detail)."""
        return [
            {"node": lis.node, "connected": lis.connected, "canary_ok": lis.canary_ok,
             "channels": len(lis.wanted()), "reconnects": lis.reconnects}
            for lis in self._live()
        ]

    # --- listeners and the slot map ---------------------------------------------------------------

    def _sync_listeners(self) -> None:
        """One listener per master, every wanted channel on the listener of its slot's master."""
        masters = [address for address in self.topology.masters if self.topology.slots_of(address) or not self.cluster]
        moved: dict[str, list[str]] = {}
        for address in list(self._listeners):
            if address not in masters:
                listener = self._listeners.pop(address)
                task = asyncio.get_running_loop().create_task(listener.stop())
                task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
        for address in masters:
            existing = self._listeners.get(address)
            if existing is None:
                self._add_listener(address).start()
            else:
                existing.set_canary(self._canary(address))
        for redis_channel in sorted(self._wanted):
            before = self._route.get(redis_channel)
            self._place(redis_channel)
            after = self._route.get(redis_channel)
            if after is not None and after != before and before is not None:
                moved.setdefault(after, []).append(redis_channel)
        for channels in moved.values():
            self._missed(channels)

    def _add_listener(self, address: str) -> Listener:
        listener = self._listeners[address] = Listener(
            address, self.topology.pool(address), self.topology.redis(address), self._canary(address),
            self._settings.canary_interval, self.counters, sharded=self.cluster, on_message=self._message,
            on_confirmed=self._confirmed, on_up=self._up, on_dropped=self._dropped, on_error=self._error,
        )
        return listener

    def _canary(self, address: str) -> str:
        """A canary channel of this worker in a slot that ``address`` serves."""
        base = self._keys.canary(*self._worker_id)
        if not self.cluster:
            return base
        for tag in range(CANARY_TRIES):
            name = f"{base}:{tag}"
            if self.topology.owns(address, name):
                return name
        raise RuntimeError(f"no canary channel found for {address}")  # a master serves at least one slot

    async def _watch_topology(self) -> None:
        while True:
            try:
                await self.topology.refresh()
            except Exception:
                log.exception("reading the Redis Cluster slot map failed")
            self._sync_listeners()
            self._refresh_now.clear()
            try:
                await asyncio.wait_for(self._refresh_now.wait(), REFRESH_INTERVAL)
            except TimeoutError:
                pass

    # --- what the listeners tell ------------------------------------------------------------------

    def _message(self, channel_bytes: bytes, payload: bytes) -> None:
        name = self._keys.channel_name(channel_bytes)
        if name is not None:
            self._on_message(name, payload)

    def _confirmed(self, listener: Listener, redis_channel: str) -> None:
        if self._route.get(redis_channel) != listener.node:
            return
        for future in self._waiters.pop(redis_channel, []):
            if not future.done():
                future.set_result(None)

    def _up(self, listener: Listener, again: bool) -> None:
        self._ever_connected = True
        if self._on_reconnect is None:
            return
        if not again:
            if self.cluster:
                self._on_reconnect([])  # a new master: nothing missed, but its library may be missing
            return
        if not self.cluster:
            self._on_reconnect(None)
            return
        channels = sorted(listener.wanted())
        if channels:
            self._missed(channels)

    def _missed(self, redis_channels: list[str]) -> None:
        if self._on_reconnect is None or self._stopping:
            return
        names = [name for c in redis_channels if (name := self._keys.channel_name(c.encode())) is not None]
        if names:
            self._on_reconnect(names)

    def _dropped(self, listener: Listener, redis_channel: str) -> None:
        """Redis dropped a subscription (its slot migrated): read the map, move the channel."""
        log.info("Redis %s dropped the subscription to %s; reading the slot map", listener.node, redis_channel)
        if self._route.get(redis_channel) == listener.node:
            del self._route[redis_channel]
            listener.unwant(redis_channel)
            if redis_channel in self._wanted:
                self._missed([redis_channel])
        self._refresh_now.set()

    def _error(self, listener: Listener) -> None:
        if self.cluster:
            self._refresh_now.set()
