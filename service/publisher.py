"""Publishing into Redis, for the service and for any Python app (sync and asyncio).

A publication is one call of the Redis function ``wsb_publish`` (service/history.py): it assigns
the channel's next offset, keeps the frame in the channel's history and publishes it, atomically;
with an idempotency key, a retry within the window answers the first call's result instead of
publishing again, so a publisher may retry a publication whose fate it does not know.

A failure says what is known, by where it happened: a connection that could not be made (or a
command Redis answered with an error) published nothing (``Refused``); a command sent without an
answer may have been carried out (``Unknown``): retry it with the same idempotency key.

    from redis import Redis
    from service.publisher import publish_sync
    publish_sync(Redis.from_url(url), "news", b'{"title":"..."}', idempotency_key="order-42")

On a Redis Cluster, pass redis-py's ``RedisCluster`` (sync or asyncio) instead: the call goes to the
master serving the channel's slot (``wsb_spublish``, sharded pub/sub). redis-py's client is used for
what it does well, finding that master and patching its slot map from a MOVED answer, but not for
sending the call: its ``execute_command`` re-sends a command after a timeout (a second publication
for a call whose fate was unknown) and follows redirections up to 16 times. Here a MOVED, ASK or
TRYAGAIN answer is retried once, as the service does, and every failure says what is known.

The history's size and lifetimes and the key prefix come from the same environment variables as
the service's (HISTORY_SIZE, HISTORY_TTL, HISTORY_META_TTL, REDIS_PREFIX, IDEMPOTENCY_WINDOW), or
from the ``settings`` given.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

from redis import Redis, RedisCluster
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio import RedisCluster as AsyncRedisCluster
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.connection import ConnectionPool
from redis.exceptions import AskError, MovedError, RedisClusterException, RedisError, ResponseError, TryAgainError

from service import history
from service.config import Settings
from service.keys import Keys
from service.publication import InvalidPublication, check_data
from service.topology import slot
from service.wire import CHANNEL_RULE, is_channel

IDEMPOTENCY_KEY_RE = re.compile(r"[\x20-\x7e]{1,200}")
IDEMPOTENCY_KEY_RULE = "Idempotency-Key must be 1-200 printable ASCII characters"
# What finding a cluster's node may raise (redis-py's cluster errors are not all RedisErrors).
_LOOKUP_ERRORS = (RedisError, RedisClusterException, OSError)
# Mid-migration, a channel's keys are split between two nodes for a moment (TRYAGAIN).
TRY_AGAIN_DELAY = 0.05


@dataclass(frozen=True, slots=True)
class Published:
    """The publication's offset and epoch, Redis's receiver count (workers subscribed to the
    channel), and whether this answer replays an earlier call with the same idempotency key."""

    workers: int
    offset: int
    epoch: str
    replay: bool = False


class PublishError(Exception):
    """Publishing failed; ``published`` is False (surely not made) or None (unknown)."""

    published: bool | None = None


class Refused(PublishError):
    """Nothing was published: Redis could not be reached, or it refused the command."""

    published = False


class Unknown(PublishError):
    """The command was sent but not answered: it may have been carried out."""

    published = None


class IdempotencyConflict(ValueError):
    """The idempotency key was used within the window for a different publication."""


@dataclass(frozen=True, slots=True)
class _Command:
    args: tuple[Any, ...]
    fingerprint: str

    @property
    def key(self) -> str:
        """The channel's metadata key: its hash slot is the one of every key and the shard channel."""
        return str(self.args[3])

    def result(self, reply: Any) -> Published:
        got = history.published(reply)
        if got.replayed and got.fingerprint != self.fingerprint:
            raise IdempotencyConflict("the Idempotency-Key was used for a different publication within the window")
        return Published(got.receivers, got.offset, got.epoch, replay=got.replayed)


def command(settings: Settings, channel: str, data: bytes, idempotency_key: str | None = None) -> _Command:
    """The call of ``wsb_publish`` that publishes the JSON ``data`` bytes on ``channel``
    (``wsb_spublish``, the same with sharded pub/sub, on a Redis Cluster)."""
    keys, args = history.publish_call(
        Keys(settings.redis_prefix), settings, channel, data, idempotency_key, settings.idempotency_window
    )
    fingerprint = history.fingerprint(channel, data) if idempotency_key is not None else ""
    function = "wsb_spublish" if settings.redis_cluster else "wsb_publish"
    return _Command(("FCALL", function, len(keys), *keys, *args), fingerprint)


def check_key(idempotency_key: str | None) -> None:
    if idempotency_key is not None and not IDEMPOTENCY_KEY_RE.fullmatch(idempotency_key):
        raise InvalidPublication(IDEMPOTENCY_KEY_RULE)


def _prepare(channel: str, data: bytes | str, settings: Settings | None, prefix: str | None,
             key: str | None, cluster: bool = False) -> _Command:
    if not is_channel(channel):
        raise InvalidPublication(CHANNEL_RULE)
    check_key(key)
    raw = check_data(data.encode() if isinstance(data, str) else data)
    settings = Settings.from_env() if settings is None else settings
    if prefix is not None:
        settings = replace(settings, redis_prefix=prefix)
    if cluster:  # a cluster client means a cluster, whatever REDIS_CLUSTER says
        settings = replace(settings, redis_cluster=True)
    return command(settings, channel, raw, key)


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class Connections(Protocol):
    """Where ``execute`` takes a connection from: an asyncio pool, or one cluster node's connections."""

    async def get_connection(self) -> Any: ...

    async def release(self, connection: Any) -> None: ...


async def execute(pool: Connections, cmd: _Command, asking: bool = False) -> Published:
    """Run ``cmd`` on a connection connected before anything is sent, so failures say what is known.

    The wait for the answer is the pool's ``socket_timeout`` (a timeout passed to read_response
    would return None and leave the answer to be read by the connection's next user). ``asking``:
    the node imports the slot from another that answered ASK (a migration under way).
    """
    try:
        conn = await pool.get_connection()
    except (RedisError, OSError) as exc:
        raise Refused(_text(exc)) from exc
    try:
        try:
            await conn.connect()  # already connected by the pool; a no-op then, a connect otherwise
        except (RedisError, OSError) as exc:
            raise Refused(_text(exc)) from exc
        try:
            try:
                reply = await _call(conn, cmd.args, asking)
            except ResponseError as exc:
                if not history.missing_library(exc):
                    raise
                # Not run (a Redis that restarted without persistence): load the library, again.
                await _call(conn, ("FUNCTION", "LOAD", "REPLACE", history.LUA), asking=False)
                reply = await _call(conn, cmd.args, asking)
        except ResponseError as exc:
            raise Refused(f"Redis refused the command: {exc}") from exc
        except (RedisError, OSError) as exc:
            await conn.disconnect(nowait=True)
            raise Unknown(_text(exc)) from exc
        except BaseException:
            # Cancelled with a reply outstanding: the connection must not serve anyone else.
            await conn.disconnect(nowait=True)
            raise
        return cmd.result(reply)
    finally:
        await pool.release(conn)


async def _call(conn: Any, args: tuple[Any, ...], asking: bool) -> Any:
    if asking:
        await conn.send_command("ASKING")
        await conn.read_response()
    await conn.send_command(*args)
    return await conn.read_response()


def execute_sync(pool: ConnectionPool, cmd: _Command, asking: bool = False) -> Published:
    """``execute`` for redis-py's synchronous client (its socket_timeout bounds the wait)."""
    try:
        conn: Any = pool.get_connection()  # redis-py's sync connections are untyped
    except (RedisError, OSError) as exc:
        raise Refused(_text(exc)) from exc
    try:
        try:
            conn.connect()
        except (RedisError, OSError) as exc:
            raise Refused(_text(exc)) from exc
        try:
            try:
                reply = _call_sync(conn, cmd.args, asking)
            except ResponseError as exc:
                if not history.missing_library(exc):
                    raise
                _call_sync(conn, ("FUNCTION", "LOAD", "REPLACE", history.LUA), asking=False)
                reply = _call_sync(conn, cmd.args, asking)
        except ResponseError as exc:
            raise Refused(f"Redis refused the command: {exc}") from exc
        except (RedisError, OSError) as exc:
            conn.disconnect()
            raise Unknown(_text(exc)) from exc
        except BaseException:
            conn.disconnect()
            raise
        return cmd.result(reply)
    finally:
        pool.release(conn)


def _call_sync(conn: Any, args: tuple[Any, ...], asking: bool) -> Any:
    if asking:
        conn.send_command("ASKING")
        conn.read_response()
    conn.send_command(*args)
    return conn.read_response()


class _NodeConnections:
    """One node of redis-py's asyncio cluster client as ``Connections`` (its own connections, its
    ``max_connections`` bound: past it the call is refused, not queued)."""

    def __init__(self, node: AsyncClusterNode) -> None:
        self._node = node

    async def get_connection(self) -> Any:
        connection = self._node.acquire_connection()
        # One marked when the slot map changed (its state may be stale) is connected afresh.
        try:
            await self._node.disconnect_if_needed(connection)
        except BaseException:
            self._node.release(connection)
            raise
        return connection

    async def release(self, connection: Any) -> None:
        self._node.release(connection)


def _redirection(exc: Refused) -> MovedError | AskError | TryAgainError | None:
    """The cluster's answer that says where (or when) to run the call again, if it was one."""
    cause = exc.__cause__
    return cause if isinstance(cause, MovedError | AskError | TryAgainError) else None


def _lost_node(exc: PublishError) -> bool:
    """The node could not be reached or did not answer (it may have failed: read the map again)."""
    return isinstance(exc, Unknown) or not isinstance(exc.__cause__, ResponseError)


async def _on_cluster(redis: AsyncRedisCluster, cmd: _Command) -> Published:
    try:
        await redis.initialize()  # reads the slot map on first use; a no-op afterwards
    except _LOOKUP_ERRORS as exc:
        raise Refused(_text(exc)) from exc
    try:
        return await execute(_master(redis, cmd), cmd)
    except PublishError as exc:
        redirect = _redirection(exc) if isinstance(exc, Refused) else None
        if redirect is None:
            if _lost_node(exc):
                with contextlib.suppress(*_LOOKUP_ERRORS):
                    await redis.nodes_manager.initialize()
            raise
    if isinstance(redirect, TryAgainError):
        await asyncio.sleep(TRY_AGAIN_DELAY)
    elif isinstance(redirect, MovedError):  # first: a MovedError is an AskError too
        await redis.nodes_manager.move_slot(redirect)  # a migrated slot, a promoted replica
    else:
        # The slot is migrating and the keys already left: the importing node runs it.
        target = redis.get_node(host=redirect.host, port=redirect.port)
        if target is None:
            raise Refused(f"ASK to {redirect.host}:{redirect.port}, a node the cluster client does not know")
        return await execute(_NodeConnections(target), cmd, asking=True)
    return await execute(_master(redis, cmd), cmd)


def _master(redis: AsyncRedisCluster, cmd: _Command) -> _NodeConnections:
    """The connections of the master serving the channel, by the cluster client's slot map."""
    try:
        return _NodeConnections(redis.nodes_manager.get_node_from_slot(slot(cmd.key)))
    except _LOOKUP_ERRORS as exc:
        raise Refused(_text(exc)) from exc


def _on_cluster_sync(redis: RedisCluster, cmd: _Command) -> Published:
    try:
        return execute_sync(_master_sync(redis, cmd), cmd)
    except PublishError as exc:
        redirect = _redirection(exc) if isinstance(exc, Refused) else None
        if redirect is None:
            if _lost_node(exc):
                with contextlib.suppress(*_LOOKUP_ERRORS):
                    redis.nodes_manager.initialize()
            raise
    if isinstance(redirect, TryAgainError):
        time.sleep(TRY_AGAIN_DELAY)
    elif isinstance(redirect, MovedError):
        redis.nodes_manager.move_slot(redirect)
    else:
        target = redis.nodes_manager.get_node(redirect.host, redirect.port)
        if target is None:
            raise Refused(f"ASK to {redirect.host}:{redirect.port}, a node the cluster client does not know")
        return execute_sync(redis.get_redis_connection(target).connection_pool, cmd, asking=True)
    return execute_sync(_master_sync(redis, cmd), cmd)


def _master_sync(redis: RedisCluster, cmd: _Command) -> ConnectionPool:
    """The pool of the master serving the channel, by the cluster client's slot map."""
    try:
        node = redis.nodes_manager.get_node_from_slot(slot(cmd.key))
        return redis.get_redis_connection(node).connection_pool
    except _LOOKUP_ERRORS as exc:
        raise Refused(_text(exc)) from exc


async def publish(
    redis: AsyncRedis | AsyncRedisCluster,
    channel: str,
    data: bytes | str,
    *,
    idempotency_key: str | None = None,
    settings: Settings | None = None,
    prefix: str | None = None,
) -> Published:
    """Publish the JSON text ``data`` (forwarded byte for byte) to ``channel``'s subscribers.

    ``settings`` default to the environment's (as the service reads them); ``prefix`` overrides
    their REDIS_PREFIX. Raises InvalidPublication (bad channel, key or JSON), Refused, Unknown (no
    answer within the client's ``socket_timeout``) or IdempotencyConflict. With a ``RedisCluster``
    it runs on the master serving the channel (see the module's docstring).
    """
    if isinstance(redis, AsyncRedisCluster):
        return await _on_cluster(redis, _prepare(channel, data, settings, prefix, idempotency_key, cluster=True))
    return await execute(redis.connection_pool, _prepare(channel, data, settings, prefix, idempotency_key))


def publish_sync(
    redis: Redis | RedisCluster,
    channel: str,
    data: bytes | str,
    *,
    idempotency_key: str | None = None,
    settings: Settings | None = None,
    prefix: str | None = None,
) -> Published:
    """``publish`` for redis-py's synchronous client (a Django view, a Celery task)."""
    if isinstance(redis, RedisCluster):
        return _on_cluster_sync(redis, _prepare(channel, data, settings, prefix, idempotency_key, cluster=True))
    return execute_sync(redis.connection_pool, _prepare(channel, data, settings, prefix, idempotency_key))


__all__ = [
    "IdempotencyConflict",
    "InvalidPublication",
    "PublishError",
    "Published",
    "Refused",
    "Unknown",
    "publish",
    "publish_sync",
]

