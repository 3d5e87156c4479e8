"""Publishing into Redis, for the service and for any Python app (sync and asyncio).

A publication is one ``PUBLISH`` of its frame; with an idempotency key it is one Lua script that,
atomically, returns the stored first result of that key or publishes and stores the result for the
window, so a publisher may retry a publication whose fate it does not know without duplicating it.

A failure says what is known, by where it happened: a connection that could not be made (or a
command Redis answered with an error) published nothing (``Refused``); a command sent without an
answer may have been carried out (``Unknown``): retry it with the same idempotency key.

    from redis import Redis
    from service.publisher import publish_sync
    publish_sync(Redis.from_url(url), "news", b'{"title":"..."}', idempotency_key="order-42")
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.asyncio import ConnectionPool as AsyncPool
from redis.asyncio import Redis as AsyncRedis
from redis.connection import ConnectionPool
from redis.exceptions import NoScriptError, RedisError, ResponseError

from service import codec
from service.config import CHANNEL_RE
from service.keys import Keys
from service.publication import CHANNEL_RULE, InvalidPublication, check_data

DEFAULT_WINDOW = 300.0
IDEMPOTENCY_KEY_RE = re.compile(r"[\x20-\x7e]{1,200}")
IDEMPOTENCY_KEY_RULE = "Idempotency-Key must be 1-200 printable ASCII characters"

# KEYS[1] the idempotency key; ARGV: pub/sub channel, frame, window (ms), fingerprint of the frame.
# Returns {1, "<fingerprint> <receivers>"} when it published, {0, <the stored first result>} when not.
# The key is written before the PUBLISH: a write Redis refuses (out of memory) then fails the script
# with nothing published, so an error reply always means "not published".
SCRIPT = """
local first = redis.call('GET', KEYS[1])
if first then return {0, first} end
redis.call('SET', KEYS[1], ARGV[4] .. ' 0', 'PX', ARGV[3])
local result = ARGV[4] .. ' ' .. redis.call('PUBLISH', ARGV[1], ARGV[2])
redis.call('SET', KEYS[1], result, 'PX', ARGV[3])
return {1, result}
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Published:
    """Redis's receiver count (workers subscribed to the channel) and whether this was a replay."""

    workers: int
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
    fingerprint: str | None

    def eval_args(self) -> tuple[Any, ...]:
        return ("EVAL", SCRIPT, *self.args[2:])

    def result(self, reply: Any) -> Published:
        if self.fingerprint is None:
            return Published(int(reply))
        flag, stored = reply
        fingerprint, _, workers = (stored.decode() if isinstance(stored, bytes) else stored).partition(" ")
        if fingerprint != self.fingerprint:
            raise IdempotencyConflict("the Idempotency-Key was used for a different publication within the window")
        return Published(int(workers), replay=int(flag) == 0)


def command(keys: Keys, channel: str, frame: bytes, idempotency_key: str | None, window: float) -> _Command:
    """The Redis command that publishes ``frame`` on ``channel`` (a script when a key is given)."""
    redis_channel = keys.channel(channel)
    if idempotency_key is None:
        return _Command(("PUBLISH", redis_channel, frame), None)
    fingerprint = hashlib.blake2b(frame, digest_size=16).hexdigest()
    window_ms = max(1, round(window * 1000))
    args = ("EVALSHA", SCRIPT_SHA, 1, keys.idempotency(idempotency_key), redis_channel, frame, window_ms, fingerprint)
    return _Command(args, fingerprint)


def check_key(idempotency_key: str | None) -> None:
    if idempotency_key is not None and not IDEMPOTENCY_KEY_RE.fullmatch(idempotency_key):
        raise InvalidPublication(IDEMPOTENCY_KEY_RULE)


def _prepare(channel: str, data: bytes | str, prefix: str, key: str | None, window: float) -> _Command:
    if not CHANNEL_RE.fullmatch(channel):
        raise InvalidPublication(CHANNEL_RULE)
    check_key(key)
    raw = check_data(data.encode() if isinstance(data, str) else data)
    return command(Keys(prefix), channel, codec.publication_frame(channel, raw), key, window)


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def execute(pool: AsyncPool, cmd: _Command) -> Published:
    """Run ``cmd`` on a connection connected before anything is sent, so failures say what is known.

    The wait for the answer is the pool's ``socket_timeout`` (a timeout passed to read_response
    would return None and leave the answer to be read by the connection's next user).
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
            await conn.send_command(*cmd.args)
            try:
                reply = await conn.read_response()
            except NoScriptError:  # not run: load it with EVAL (Redis caches it for EVALSHA)
                await conn.send_command(*cmd.eval_args())
                reply = await conn.read_response()
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
            except NoScriptError:
                conn.send_command(*cmd.eval_args())
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
    prefix: str = "broadcast:",
    idempotency_key: str | None = None,
    window: float = DEFAULT_WINDOW,
) -> Published:
    """Publish the JSON text ``data`` (forwarded byte for byte) to ``channel``'s subscribers.

    Raises InvalidPublication (bad channel, key or JSON), Refused, Unknown (no answer within the
    client's ``socket_timeout``) or IdempotencyConflict.
    """
    cmd = _prepare(channel, data, prefix, idempotency_key, window)
    return await execute(redis.connection_pool, cmd)


def publish_sync(
    redis: Redis,
    channel: str,
    data: bytes | str,
    *,
    prefix: str = "broadcast:",
    idempotency_key: str | None = None,
    window: float = DEFAULT_WINDOW,
) -> Published:
    """``publish`` for redis-py's synchronous client (a Django view, a Celery task)."""
    return execute_sync(redis.connection_pool, _prepare(channel, data, prefix, idempotency_key, window))


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

