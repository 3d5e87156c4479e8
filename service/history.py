"""A channel's history in Redis: the publish function that assigns offsets, positions, range reads.

Publishing is one call of the Redis function ``wsb_publish`` (library ``wsbroadcast``), so any
language's Redis client can publish recoverably without our code::

    FCALL wsb_publish 2 <meta key> <stream key> <pub/sub channel> <channel> <data JSON> \
        <history size> <history ttl ms> <meta ttl ms>
    FCALL wsb_publish 3 <meta key> <stream key> <idempotency key> ... <window ms> <fingerprint>

Atomically it checks the channel name and that the data is JSON, reads or creates the channel's
epoch, increments its top offset, appends the frame to the channel's stream (entry id
``<offset>-0``, trimmed to the history size, expiring after the history TTL), refreshes the
metadata's much longer TTL (a quiet channel keeps its epoch), builds the frame
``{"channel":..,"offset":..,"epoch":..,"data":<data>}`` around the publisher's bytes without
re-encoding them, and publishes it. It answers ``[replayed (0/1), offset, epoch, receivers,
fingerprint]``; with an idempotency key, a second call within the window answers the first one's
result and publishes nothing.

The metadata hash (``epoch``, ``top``), the stream and the pub/sub channel share one hash slot
(see ``Keys``), so the same calls work on a Redis Cluster. A Redis that restarted without
persistence has lost the library: every call here loads it again on "Function not found" and
retries once, so no publish fails for that.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from service.keys import Keys
from service.topology import Nodes, One
from service.wire import CHANNEL_RULE

LIBRARY = "wsbroadcast"

# Bump VERSION with any change to the code: workers load the library with REPLACE, and the
# version in the source makes a mixed deployment's library visible (FUNCTION LIST).
VERSION = 3

_SOURCE = """#!lua name=wsbroadcast
-- wsbroadcast v__VERSION__: channel offsets, epochs and history
-- Cluster only: true when the channel's metadata was last written by another node that failed or
-- is now a replica: this node took over by failover, and replication being asynchronous, it may
-- lack the last publications the old master made (and workers delivered). A node that is still a
-- healthy master handed the slot over by migration, with the history whole.
local function taken_over(meta)
  local me = redis.call('CLUSTER', 'MYID')
  local owner = redis.call('HGET', meta, 'owner')
  if owner == me then return false end
  redis.call('HSET', meta, 'owner', me)
  if not owner then return false end
  local line = string.match('\\n' .. redis.call('CLUSTER', 'NODES'), '\\n' .. owner .. ' [^\\n]*')
  local flags = line and string.match(line, '^\\n?%S+ %S+ (%S+)')
  return not flags or string.find(flags, 'fail', 1, true) ~= nil or string.find(flags, 'slave', 1, true) ~= nil
end

local function position(meta, stream, meta_ttl, sharded)
  local epoch = redis.call('HGET', meta, 'epoch')
  if sharded and taken_over(meta) then
    -- Offsets the old master gave out may be missing here: a new lifetime, so that none is
    -- given out twice (workers announce the change as a gap).
    epoch = false
  end
  if not epoch then
    -- A new lifetime of the channel's history, named by the time (no earlier lifetime of this
    -- key had that name); a stream left from an earlier lifetime (metadata evicted) is dropped.
    local now = redis.call('TIME')
    epoch = string.format('%x%05x', tonumber(now[1]), tonumber(now[2]))
    redis.call('HSET', meta, 'epoch', epoch, 'top', 0)
    redis.call('DEL', stream)
  end
  redis.call('PEXPIRE', meta, meta_ttl)
  return epoch, tonumber(redis.call('HGET', meta, 'top'))
end

local function publisher(sharded)
  return function(keys, args)
    -- keys: meta, stream[, idempotency key]; args: pub/sub channel, channel, data, history size,
    -- history ttl ms, meta ttl ms[, idempotency window ms, fingerprint of the publication].
    -- Answers {replayed (0/1), offset, epoch, receivers, fingerprint}.
    local meta, stream, idem = keys[1], keys[2], keys[3]
    local pubsub, channel, data = args[1], args[2], args[3]
    local size, ttl, meta_ttl = tonumber(args[4]), tonumber(args[5]), tonumber(args[6])
    if idem then
      local first = redis.call('GET', idem)
      if first then
        local fp, offset, epoch, receivers = string.match(first, '^(%S*) (%d+) (%S+) (%d+)$')
        return {1, tonumber(offset), epoch, tonumber(receivers), fp}
      end
    end
    if #channel > 128 or not string.match(channel, '^[%w_.:-]+$') then
      return redis.error_reply('ERR wsbroadcast: __CHANNEL_RULE__')
    end
    if not pcall(cjson.decode, data) then
      return redis.error_reply('ERR wsbroadcast: data is not valid JSON')
    end
    local epoch = position(meta, stream, meta_ttl, sharded)
    local top = redis.call('HINCRBY', meta, 'top', 1)
    local frame = '{"channel":"' .. channel .. '","offset":' .. top .. ',"epoch":"' .. epoch .. '","data":'
      .. data .. '}'
    if size > 0 then
      redis.call('XADD', stream, 'MAXLEN', size, top .. '-0', 'f', frame)
      redis.call('PEXPIRE', stream, ttl)
    end
    local fingerprint = args[8] or ''
    if idem then
      -- Written before the PUBLISH: a write refused here fails the call with nothing published.
      redis.call('SET', idem, fingerprint .. ' ' .. top .. ' ' .. epoch .. ' 0', 'PX', args[7])
    end
    local receivers = redis.call(sharded and 'SPUBLISH' or 'PUBLISH', pubsub, frame)
    if idem then
      redis.call('SET', idem, fingerprint .. ' ' .. top .. ' ' .. epoch .. ' ' .. receivers, 'PX', args[7])
    end
    return {0, top, epoch, receivers, fingerprint}
  end
end

-- wsb_publish on one Redis (PUBLISH); wsb_spublish on a Redis Cluster (SPUBLISH: the shard channel
-- is in the slot of the keys, so the one node serving it runs the whole call).
redis.register_function('wsb_publish', publisher(false))
redis.register_function('wsb_spublish', publisher(true))

redis.register_function('wsb_position', function(keys, args)
  local epoch, top = position(keys[1], keys[2], tonumber(args[1]), false)
  return {top, epoch}
end)

redis.register_function('wsb_sposition', function(keys, args)
  local epoch, top = position(keys[1], keys[2], tonumber(args[1]), true)
  return {top, epoch}
end)

redis.register_function{function_name='wsb_range', flags={'no-writes'}, callback=function(keys, args)
  -- Publications after args[1], at most args[2] of them, with the epoch and top they belong to.
  local meta, stream = keys[1], keys[2]
  local after, count = tonumber(args[1]), tonumber(args[2])
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then return {0, false} end
  local top = tonumber(redis.call('HGET', meta, 'top'))
  local out = {top, epoch}
  if count > 0 and after < top then
    for _, entry in ipairs(redis.call('XRANGE', stream, (after + 1) .. '-0', '+', 'COUNT', count)) do
      out[#out + 1] = entry[1]
      out[#out + 1] = entry[2][2]
    end
  end
  return out
end}
"""
LUA = _SOURCE.replace("__VERSION__", str(VERSION)).replace("__CHANNEL_RULE__", CHANNEL_RULE)


@dataclass(frozen=True, slots=True)
class Position:
    """Where a channel is: its top offset (0 when never published) in its current epoch."""

    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class PublishReply:
    """A publication's offset and epoch, and how many workers' listeners Redis handed it to.

    ``replayed``: an earlier call with the same idempotency key made it; this is its result.
    """

    offset: int
    epoch: str
    receivers: int
    replayed: bool = False
    fingerprint: str = ""


@dataclass(frozen=True, slots=True)
class Range:
    """What the history holds after an offset: ``frames`` as (offset, frame), in order.

    ``complete`` is True when they are exactly every publication after the offset asked for, up to
    the top ``position`` (or there were none): the history reached back far enough and the epoch
    is the one asked for. An incomplete range still carries what the history holds of the epoch
    asked for (a worker filling a hole delivers that much and announces a gap for the rest).
    """

    position: Position
    frames: list[tuple[int, bytes]]
    complete: bool


class History:
    """Positions and reads of the ``wsbroadcast`` function library on one Redis or a cluster's
    masters (publishing is ``service.publisher``'s, which says what is known when it fails)."""

    def __init__(self, redis: Redis | Nodes, keys: Keys, settings: HistorySettings) -> None:
        self._nodes: Nodes = One(redis) if isinstance(redis, Redis) else redis
        self._keys = keys
        self.size = settings.history_size
        self._meta_ttl_ms = str(int(settings.history_meta_ttl * 1000))
        self._position = "wsb_sposition" if self._nodes.cluster else "wsb_position"

    async def load(self) -> None:
        """Load (or replace) the function library, on every master of a cluster."""
        for redis in self._nodes.masters():
            await redis.function_load(LUA, replace=True)

    async def _call(self, function: str, channel: str, *args: str) -> Any:
        keys = (self._keys.meta(channel), self._keys.history(channel))

        async def call(redis: Redis) -> Any:
            try:
                return await redis.fcall(function, 2, *keys, *args)
            except ResponseError as exc:
                if not missing_library(exc):
                    raise
            await redis.function_load(LUA, replace=True)
            return await redis.fcall(function, 2, *keys, *args)

        return await self._nodes.run(keys[0], call)

    async def position(self, channel: str) -> Position:
        """The channel's top offset and epoch, creating the epoch on first use."""
        reply = await self._call(self._position, channel, self._meta_ttl_ms)
        return Position(int(reply[0]), _text(reply[1]))

    async def read(self, channel: str, since: Position) -> Range:
        """Publications after ``since``, up to the channel's top, as far as the history holds them."""
        reply = await self._call("wsb_range", channel, str(since.offset), str(self.size))
        if reply[1] is None:  # no metadata at all: the channel never existed or Redis lost it
            return Range(Position(0, ""), [], False)
        position = Position(int(reply[0]), _text(reply[1]))
        if position.epoch != since.epoch or since.offset > position.offset:
            return Range(position, [], False)
        ids, found = reply[2::2], reply[3::2]
        frames = [(int(entry_id.split(b"-")[0]), frame) for entry_id, frame in zip(ids, found, strict=True)]
        missed = position.offset - since.offset
        complete = len(frames) == missed and (missed == 0 or frames[0][0] == since.offset + 1)
        return Range(position, frames, complete)


class HistorySettings(Protocol):
    """What of the settings the history uses (``config.Settings`` has them)."""

    @property
    def history_size(self) -> int: ...

    @property
    def history_ttl(self) -> float: ...

    @property
    def history_meta_ttl(self) -> float: ...


def publish_call(
    keys: Keys,
    settings: HistorySettings,
    channel: str,
    data: bytes,
    idempotency_key: str | None = None,
    window: float = 300.0,
) -> tuple[tuple[str, ...], tuple[str | bytes, ...]]:
    """The keys and arguments of one ``wsb_publish`` call (see the module's docstring)."""
    call_keys: tuple[str, ...] = (keys.meta(channel), keys.history(channel))
    args: tuple[str | bytes, ...] = (
        keys.channel(channel),
        channel,
        data,
        str(settings.history_size),
        str(int(settings.history_ttl * 1000)),
        str(int(settings.history_meta_ttl * 1000)),
    )
    if idempotency_key is not None:
        call_keys += (keys.idempotency(channel, idempotency_key),)
        args += (str(max(1, round(window * 1000))), fingerprint(channel, data))
    return call_keys, args


def missing_library(exc: ResponseError) -> bool:
    """True for the error of a Redis that does not have the function library (yet, or any more)."""
    return "function not found" in str(exc).lower()


def fingerprint(channel: str, data: bytes) -> str:
    """What an idempotency key is bound to: a key reused for another publication is refused."""
    return hashlib.blake2b(channel.encode() + b"\0" + data, digest_size=16).hexdigest()


def published(reply: Any) -> PublishReply:
    """The answer of ``wsb_publish``."""
    return PublishReply(int(reply[1]), _text(reply[2]), int(reply[3]), bool(int(reply[0])), _text(reply[4]))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

