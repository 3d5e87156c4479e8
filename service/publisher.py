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

The history's size and lifetimes and the key prefix come from the same environment variables as
the service's (HISTORY_SIZE, HISTORY_TTL, HISTORY_META_TTL, REDIS_PREFIX, IDEMPOTENCY_WINDOW), or
from the ``settings`` given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from redis import Redis
from redis.asyncio import ConnectionPool as AsyncPool
from redis.asyncio import Redis as AsyncRedis
from redis.connection import ConnectionPool
from redis.exceptions import RedisError, ResponseError

from service import history
from service.config import Settings
from service.keys import Keys
from service.publication import InvalidPublication, check_data
from service.wire import CHANNEL_RULE, is_channel

IDEMPOTENCY_KEY_RE = re.compile(r"[\x20-\x7e]{1,200}")
IDEMPOTENCY_KEY_RULE = "Idempotency-Key must be 1-200 printable ASCII characters"


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
             key: str | None) -> _Command:
    if not is_channel(channel):
        raise InvalidPublication(CHANNEL_RULE)
    check_key(key)
    raw = check_data(data.encode() if isinstance(data, str) else data)
    settings = Settings.from_env() if settings is None else settings
    if prefix is not None:
        settings = replace(settings, redis_prefix=prefix)
    return command(settings, channel, raw, key)


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def execute(pool: AsyncPool, cmd: _Command, asking: bool = False) -> Published:
    """Run ``cmd`` on a connection connected before anything is sent, so failures say what is known.

    The wait for the answer is the pool's ``socket_timeout`` (a timeout passed to read_response
    would return None and leave the answer to be read by the connection's next user). ``asking``:
    the node imports the slot from another that answered ASK (a migration under way).
    """
    try:
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
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


def execute_sync(pool: ConnectionPool, cmd: _Command) -> Published:
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
            conn.send_command(*cmd.args)
            try:
                reply = conn.read_response()
            except ResponseError as exc:
                if not history.missing_library(exc):
                    raise
                conn.send_command("FUNCTION", "LOAD", "REPLACE", history.LUA)
                conn.read_response()
                conn.send_command(*cmd.args)
                reply = conn.read_response()
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


async def publish(
    redis: AsyncRedis,
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
    answer within the client's ``socket_timeout``) or IdempotencyConflict.
    """
    cmd = _prepare(channel, data, settings, prefix, idempotency_key)
    return await execute(redis.connection_pool, cmd)


def publish_sync(
    redis: Redis,
    channel: str,
    data: bytes | str,
    *,
    idempotency_key: str | None = None,
    settings: Settings | None = None,
    prefix: str | None = None,
) -> Published:
    """``publish`` for redis-py's synchronous client (a Django view, a Celery task)."""
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

