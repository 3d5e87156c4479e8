"""Recovery: history reads that fill the hub's holes and serve clients subscribing with ``since``.

One worker reads for all its connections. Reads are coalesced per channel (a read under way from
an offset serves every request from that offset on) and bounded in concurrency; after a read the
hub keeps the channel's latest publications in memory for a while (``Hub.remember``), so the
thousands of clients of a restarted worker that reconnect with ``since`` cost a handful of reads,
not one each.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.exceptions import RedisError

from service import wire
from service.history import History, Position, Range
from service.hub import Hub
from service.outbound import Message, Outbound, control_message
from service.ratelog import RateLimitedLog

log = logging.getLogger("wsbroadcast.recovery")

CONCURRENT_READS = 4
# How long the hub keeps a channel's latest publications after a client recovered it.
RECENT_WINDOW = 10.0
FILL_ATTEMPTS = 8
FILL_BACKOFF_CAP = 1.0
RECOVER_ATTEMPTS = 3
# A reconnect's check of a channel waits this long for its subscription (then the next publication
# on it shows any hole anyway).
CHECK_CONFIRM_TIMEOUT = 30.0
# Recovered publications go out in writes of this many: each write is checked against the
# connection's bound like any other, so a client that cannot take its backlog is a slow consumer.
RECOVERY_BATCH = 16


@dataclass(frozen=True, slots=True)
class Recovered:
    """What a client subscribing with ``since`` gets before its ack, and the ack's position."""

    frames: list[tuple[int, bytes]]
    recovered: bool
    offset: int
    epoch: str


class Recovery:
    def __init__(self, history: History, hub: Hub) -> None:
        self._history = history
        self._hub = hub
        self._counters = hub.counters
        self._limit = asyncio.Semaphore(CONCURRENT_READS)
        self._reads: dict[str, list[tuple[Position, asyncio.Task[Range]]]] = {}
        self._positions: dict[str, asyncio.Task[Position]] = {}
        self._fills: set[asyncio.Task[None]] = set()
        self._log = RateLimitedLog(log)

    # --- positions -------------------------------------------------------------------------------

    async def position(self, channel: str) -> tuple[int, str]:
        """The channel's position in the hub, read from Redis (once per channel) if not known yet.

        Call it once Redis has confirmed the subscription: from then on no publication is missed.
        Raises RedisError/OSError when Redis cannot be read.
        """
        known = self._hub.position(channel)
        if known is not None:
            return known
        task = self._positions.get(channel)
        if task is None:
            task = self._positions[channel] = asyncio.create_task(self._history.position(channel))
            task.add_done_callback(lambda _: self._positions.pop(channel, None))
        read = await asyncio.shield(task)
        self._hub.set_position(channel, read.offset, read.epoch)
        known = self._hub.position(channel)
        return known if known is not None else (read.offset, read.epoch)

    # --- clients ---------------------------------------------------------------------------------

    async def recover(self, channel: str, since: Position) -> Recovered:
        """What a client that last saw ``since`` missed, up to the hub's position, or recovered=False.

        Activate the client in the hub right after this returns, with no await in between: the
        frames run exactly up to the returned offset, and live publications follow from there.
        Raises RedisError/OSError when Redis cannot be read.
        """
        for _ in range(RECOVER_ATTEMPTS):
            offset, epoch = await self.position(channel)
            frames = self._hub.recent(channel, since.offset, since.epoch)
            if frames is not None:
                return self._answer(frames, True, offset, epoch)
            if since.epoch != epoch or since.offset > offset or self._hub.below_floor(channel, since.offset, epoch):
                # Known unrecoverable without a read: a reconnect storm of clients too far behind
                # costs one read per channel, not one each.
                return self._answer([], False, offset, epoch)
            # Keep what arrives while the read is under way: it joins up with what the read returns.
            self._hub.remember(channel, epoch, [], RECENT_WINDOW)
            got = await self._read(channel, since)
            frames, complete = _after(got, since)
            if not complete and got.position.epoch == since.epoch:
                # The stream is trimmed from its oldest end: what it lacks after since, it lacks before.
                floor = got.frames[0][0] if got.frames else got.position.offset + 1
                self._hub.note_floor(channel, got.position.epoch, floor)
            if not complete:
                # What the history still held serves the clients that come next from there on.
                self._hub.remember(channel, got.position.epoch, got.frames, RECENT_WINDOW)
                offset, epoch = self._hub.position(channel) or (got.position.offset, got.position.epoch)
                return self._answer([], False, offset, epoch)
            self._hub.remember(channel, got.position.epoch, got.frames, RECENT_WINDOW)
            now = self._hub.position(channel)
            if now is not None and now[1] == got.position.epoch and got.position.offset >= now[0]:
                return self._answer([f for f in frames if f[0] <= now[0]], True, *now)
            # The worker got publications the read did not see yet: the kept ones cover them now.
        offset, epoch = await self.position(channel)
        frames = self._hub.recent(channel, since.offset, since.epoch)
        return self._answer(frames or [], frames is not None, offset, epoch)

    def _answer(self, frames: list[tuple[int, bytes]], recovered: bool, offset: int, epoch: str) -> Recovered:
        if recovered:
            self._counters.recovered += 1
        else:
            self._counters.not_recovered += 1
        return Recovered(frames, recovered, offset, epoch)

    async def join(
        self,
        channel: str,
        outbound: Outbound,
        since: Position | None,
        confirmed: Callable[[str], Awaitable[None]],
    ) -> Recovered:
        """Subscribe one connection to ``channel``: what it recovers, then its ack, then live ones.

        The connection counts for the Redis subscription at once (``Hub.add``); ``confirmed`` waits
        until Redis has confirmed it, however long Redis is away, so the ack is never given
        falsely. A history read that fails is retried with backoff: the subscription waits, it is
        never lost. The frames and the ack are offered through the connection's own outbound path,
        in order with the live publications that follow them.
        """
        self._hub.add(channel, outbound)
        delay = 0.05
        while True:
            await confirmed(channel)
            try:
                if since is None:
                    offset, epoch = await self.position(channel)
                    got = Recovered([], True, offset, epoch)
                else:
                    got = await self.recover(channel, since)
                break
            except (RedisError, OSError) as exc:
                self._log.warning("join", "subscription to %r waits for Redis: %s", channel, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, FILL_BACKOFF_CAP)
        ack = wire.subscribed(channel, got.offset, got.epoch, got.recovered if since is not None else None)
        frames = got.frames
        for start in range(0, len(frames), RECOVERY_BATCH):
            batch = frames[start : start + RECOVERY_BATCH]
            outbound.offer(Message(channel, [f for _, f in batch], offset=batch[-1][0], epoch=got.epoch))
        outbound.offer(control_message(channel, ack, got.offset, got.epoch))
        self._hub.activate(channel, outbound)
        return got

    # --- holes -----------------------------------------------------------------------------------

    def on_hole(self, channel: str, offset: int, epoch: str) -> None:
        """Hub.on_hole: read what is missing after ``offset`` and hand it to the hub."""
        task = asyncio.get_running_loop().create_task(self._fill(channel, Position(offset, epoch)))
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)

    def check_all(self, confirmed: Callable[[str], Awaitable[None]], channels: list[str] | None = None) -> None:
        """After a pub/sub reconnect: once each positioned channel's subscription is confirmed
        again, read its publications since its last accepted offset, so whatever was published
        while the listener was away is delivered. ``channels``: only those (a cluster node's)."""
        positioned = self._hub.positioned()
        if channels is not None:
            wanted = set(channels)
            positioned = [channel for channel in positioned if channel in wanted]
        for channel in positioned:
            task = asyncio.get_running_loop().create_task(self._check(channel, confirmed))
            self._fills.add(task)
            task.add_done_callback(self._fills.discard)

    async def _check(self, channel: str, confirmed: Callable[[str], Awaitable[None]]) -> None:
        try:
            await asyncio.wait_for(confirmed(channel), CHECK_CONFIRM_TIMEOUT)
        except TimeoutError:
            self._log.warning("check", "no history check for %r: its subscription was not confirmed", channel)
            return
        begun = self._hub.begin_check(channel)
        if begun is not None:
            await self._fill(channel, Position(*begun), check=True)

    async def _fill(self, channel: str, since: Position, check: bool = False) -> None:
        delay = 0.05
        for _ in range(FILL_ATTEMPTS):
            try:
                got = await self._read(channel, since)
            except (RedisError, OSError) as exc:
                self._log.warning("fill", "history read for %r failed: %s; retrying", channel, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, FILL_BACKOFF_CAP)
                continue
            if check:
                # A reconnect's check found a hole only if Redis is past what the worker accepted.
                missed = got.position != since
                self._counters.holes += missed
                self._counters.holes_filled += missed
            else:
                self._counters.holes_filled += 1
            self._hub.fill(channel, got.position.epoch, got.position.offset, got.frames)
            return
        # Redis could not be read for a long while: what is missing is announced as lost.
        self._hub.fill(channel, since.epoch, sys.maxsize, [])

    async def stop(self) -> None:
        tasks = [*self._fills, *self._positions.values(), *(t for reads in self._reads.values() for _, t in reads)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- reads -----------------------------------------------------------------------------------

    async def _read(self, channel: str, since: Position) -> Range:
        """A history read after ``since``; a read under way from ``since`` or before serves it."""
        for after, task in self._reads.get(channel, ()):
            if after.epoch == since.epoch and after.offset <= since.offset:
                return await asyncio.shield(task)
        task = asyncio.get_running_loop().create_task(self._read_now(channel, since))
        entry = (since, task)
        self._reads.setdefault(channel, []).append(entry)

        def done(_: asyncio.Task[Range]) -> None:
            reads = self._reads.get(channel)
            if reads is not None:
                reads.remove(entry)
                if not reads:
                    del self._reads[channel]

        task.add_done_callback(done)
        # Shielded: a client that leaves must not cancel a read that others wait for.
        return await asyncio.shield(task)

    async def _read_now(self, channel: str, since: Position) -> Range:
        async with self._limit:
            self._counters.history_reads += 1
            return await self._history.read(channel, since)


def _after(got: Range, since: Position) -> tuple[list[tuple[int, bytes]], bool]:
    """The part of a (possibly shared) read after ``since``, and whether it is complete from there."""
    top = got.position.offset
    if got.position.epoch != since.epoch or since.offset > top:
        return [], False
    frames = [f for f in got.frames if f[0] > since.offset]
    missed = top - since.offset
    complete = missed == 0 or (len(frames) == missed and frames[0][0] == since.offset + 1)
    return frames, complete
