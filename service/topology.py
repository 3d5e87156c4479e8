"""Where Redis is: one server, or a Redis Cluster's masters and which hash slots each serves.

Every node gets one bounded, blocking pool (``REDIS_POOL_SIZE``, its pub/sub listener included), so a
worker holds at most that many connections per node; replicas get none. The slot map is read with
``CLUSTER SLOTS`` from any node that answers (the seed first), again whenever a command meets MOVED
or a dead node, and periodically, so a failover or a slot migration is seen within a second or two.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import AskError, MovedError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.config import Settings, redact_url

log = logging.getLogger("wsbroadcast.topology")

CONNECT_TIMEOUT = 2.0
# How long a slot-map read may take per node tried.
REFRESH_TIMEOUT = 2.0

T = TypeVar("T")


def slot(key: str) -> int:
    """The hash slot of a key or shard channel (its ``{hash tag}``, if it has one)."""
    return int(key_slot(key.encode()))


class Nodes(Protocol):
    """Where the history's keys live: one Redis, or a cluster's masters (``Broker`` is one)."""

    cluster: bool

    async def run(self, key: str, command: Callable[[Redis], Awaitable[T]]) -> T: ...

    def masters(self) -> list[Redis]: ...


class One:
    """A single Redis as ``Nodes``."""

    cluster = False

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def run(self, key: str, command: Callable[[Redis], Awaitable[T]]) -> T:
        return await command(self._redis)

    def masters(self) -> list[Redis]:
        return [self._redis]


class Topology:
    """The nodes a worker talks to, with one pool each, and (for a cluster) the slot map."""

    def __init__(self, settings: Settings, client_name: str) -> None:
        self.cluster = settings.redis_cluster
        self._settings = settings
        self._client_name = client_name
        parts = urlsplit(settings.redis_url)
        # The one Redis is named by its URL (without a password: the name is logged).
        self._seed = f"{parts.hostname}:{parts.port or 6379}" if self.cluster else redact_url(settings.redis_url)
        self._pools: dict[str, BlockingConnectionPool] = {}
        self._clients: dict[str, Redis] = {}
        # slot -> address of the master serving it ("" while none does)
        self._slots: list[str] = [self._seed] * REDIS_CLUSTER_HASH_SLOTS
        self.masters: list[str] = [self._seed]
        self.version = 0  # bumped on every change of the map
        self._lock = asyncio.Lock()
        self._pool(self._seed)

    # --- pools -----------------------------------------------------------------------------------

    def _pool(self, address: str) -> BlockingConnectionPool:
        pool = self._pools.get(address)
        if pool is None:
            url = _node_url(self._settings.redis_url, address) if self.cluster else self._settings.redis_url
            # No client-side retries: a publish while Redis is down fails at once (503) instead
            # of hanging for the retry schedule. RESP2: pub/sub messages arrive as plain replies.
            pool = BlockingConnectionPool.from_url(
                url,
                max_connections=self._settings.redis_pool_size,
                timeout=self._settings.redis_pool_timeout,
                socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=self._settings.redis_command_timeout,
                retry=Retry(NoBackoff(), 0),
                protocol=2,
                client_name=self._client_name,
            )
            self._pools[address] = pool
            self._clients[address] = Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
        return pool

    def pool(self, address: str) -> BlockingConnectionPool:
        return self._pool(address)

    def redis(self, address: str) -> Redis:
        self._pool(address)
        return self._clients[address]

    def address_of(self, key: str) -> str:
        """The node serving ``key`` (or shard channel); "" while its slot is served by none."""
        return self._slots[slot(key)] if self.cluster else self._seed

    def slots_of(self, address: str) -> int:
        return sum(1 for owner in self._slots if owner == address)

    def owns(self, address: str, key: str) -> bool:
        return self.address_of(key) == address

    def pool_usage(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for address in self.masters:
            pool: Any = self._pool(address)
            out[address] = {
                "in_use": len(pool._in_use_connections),
                "idle": len(pool._available_connections),
                "max": self._settings.redis_pool_size,
            }
        return out

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        for pool in self._pools.values():
            await pool.disconnect()

    # --- commands --------------------------------------------------------------------------------

    async def run(self, key: str, command: Callable[[Redis], Awaitable[T]]) -> T:
        """Run ``command`` on the node serving ``key``; after MOVED (a migrated slot, a replica
        promoted) the map is read again and the command retried once on the new owner. A node
        that cannot be reached makes the map be read again for the next command."""
        address = self.address_of(key)
        if not address:
            await self.refresh()
            address = self.address_of(key) or self._seed
        try:
            return await command(self.redis(address))
        except (MovedError, AskError):
            await self.refresh()
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError):
            if self.cluster:
                self.refresh_soon()
            raise
        return await command(self.redis(self.address_of(key) or self._seed))

    # --- the slot map ----------------------------------------------------------------------------

    def refresh_soon(self) -> None:
        if self.cluster and not self._lock.locked():
            task = asyncio.get_running_loop().create_task(self.refresh())
            task.add_done_callback(_ignore)

    async def refresh(self) -> bool:
        """Read the slot map; True if it changed. Failures are logged: the old map stays."""
        if not self.cluster:
            return False
        async with self._lock:
            for address in dict.fromkeys([*self.masters, self._seed, *self._pools]):
                try:
                    async with asyncio.timeout(REFRESH_TIMEOUT):
                        reply = await self._slots_reply(address)
                except (RedisError, OSError, TimeoutError) as exc:
                    log.debug("CLUSTER SLOTS from %s failed: %r", address, exc)
                    continue
                return self._apply(address, reply)
            log.warning("no Redis Cluster node answered CLUSTER SLOTS; keeping the last slot map")
            return False

    async def _slots_reply(self, address: str) -> Any:
        pool = self._pool(address)
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_command("CLUSTER", "SLOTS")
            return await conn.read_response()
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    def _apply(self, asked: str, reply: Any) -> bool:
        slots = [""] * REDIS_CLUSTER_HASH_SLOTS
        masters: dict[str, None] = {}
        asked_host = asked.rpartition(":")[0]
        for entry in reply:
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            address = f"{host or asked_host}:{int(master[1])}"
            masters[address] = None
            slots[start : end + 1] = [address] * (end - start + 1)
        new_masters = sorted(masters)
        if slots == self._slots and new_masters == self.masters:
            return False
        self._slots = slots
        self.masters = new_masters
        self.version += 1
        for address in new_masters:
            self._pool(address)
        uncovered = slots.count("")
        log.info("Redis Cluster slot map: %d masters%s", len(new_masters),
                 f", {uncovered} slots served by none" if uncovered else "")
        return True


def _node_url(url: str, address: str) -> str:
    """``url`` (its scheme, credentials and options) pointed at the node ``address``."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@{address}" if credentials else address
    return parts._replace(netloc=netloc, path="").geturl()


def _ignore(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
