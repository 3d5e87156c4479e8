"""The hub: which local connections listen to which channel, per-channel offsets, and fan-out.

Fan-out calls ``offer`` on each connection's outbound path: it never awaits, so one slow client
cannot delay another. The hub knows nothing of Redis; ``on_first`` and ``on_last`` tell whoever
wires it (to the broker) when a channel gains its first or loses its last local listener, and
``on_hole`` when publications of a channel are missing (to read them from the history).

Offsets. For each channel the hub knows its epoch and the last offset it accepted. A publication
that follows it is delivered; one already seen (a history read and the live stream overlap) is
dropped; one that skips ahead is held, with every one after it, until ``fill`` brings the missing
range; what the history could not supply, or a change of epoch (Redis lost the channel), reaches
the listeners as one ``gap`` frame in its place. Until a channel's position is known
(``set_position``, once Redis confirmed the subscription) its publications are held too, so the
position in a ``subscribed`` ack is exact. Frames without an offset (a raw PUBLISH) pass as they are.

A connection joins a channel in two steps: ``add`` (counts for the Redis subscription, receives
nothing yet) and ``activate`` (receives every publication after ``position``), so the endpoint can
first write what the connection recovers, then the ack, then let live publications follow, with no
hole and no duplicate in between.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from service import wire
from service.counters import Counters
from service.outbound import Message, Outbound

# A batch is flushed early at this many publications or bytes (or a quarter of a connection's
# queue bound, if smaller), so one burst never becomes one write near a connection's bound.
MAX_BATCH = 64
MAX_BATCH_BYTES = 64 * 1024
# Publications held per channel while a hole is filled; past it the hole is given up (a gap).
MAX_HELD = 10_000
_ALL = float("inf")  # a read's top meaning "nothing more can be read": every hole is a gap
# While clients recover a channel, the hub keeps its latest publications in memory, so that one
# history read serves a reconnect storm: at most this many bytes over all channels.
RECENT_BYTES_TOTAL = 16 * 1024 * 1024


class _Batch:
    __slots__ = ("arrived", "epoch", "offset", "payloads", "size", "texts")

    def __init__(self, arrived: float) -> None:
        self.arrived = arrived
        self.payloads: list[bytes] = []
        self.texts: list[str] = []
        self.size = 0
        self.offset: int | None = None
        self.epoch: str | None = None


class _Channel:
    __slots__ = (
        "epoch", "filling", "floor", "held", "last_publish", "listeners", "offset", "parked", "recent",
        "recent_bytes", "recent_until",
    )

    def __init__(self) -> None:
        self.listeners: dict[Outbound, None] = {}
        self.parked: dict[Outbound, None] = {}
        self.last_publish = time.monotonic()
        self.epoch: str | None = None  # None until the position is known
        self.offset = 0  # the last offset accepted (delivered, or waiting in the batch)
        self.held: dict[tuple[str, int], bytes] = {}  # (epoch, offset) -> payload, after a hole
        self.filling = False
        # The latest publications, contiguous up to ``offset``, while clients recover (else None).
        self.recent: deque[tuple[int, bytes]] | None = None
        self.recent_bytes = 0
        self.recent_until = 0.0
        # The first offset Redis's history of this epoch still held when last seen (0: unknown):
        # it only moves forward (trimming, expiry), so nothing before it can be recovered.
        self.floor = 0


class Hub:
    def __init__(
        self,
        on_first: Callable[[str], None],
        on_last: Callable[[str], None],
        queue_frames: int = 4 * MAX_BATCH,
        queue_bytes: int = 4 * MAX_BATCH_BYTES,
        on_hole: Callable[[str, int, str], None] | None = None,
        recent_size: int = 100,
        counters: Counters | None = None,
    ) -> None:
        self._max_batch = max(1, min(MAX_BATCH, queue_frames // 4))
        self._max_batch_bytes = max(1, min(MAX_BATCH_BYTES, queue_bytes // 4))
        self._channels: dict[str, _Channel] = {}
        self._pending: dict[str, _Batch] = {}
        self._flush_scheduled = False
        self._on_first = on_first
        self._on_last = on_last
        # Called with (channel, last offset accepted, epoch) when publications after that offset
        # are missing; the callee reads them and calls ``fill``.
        self._on_hole = on_hole
        # Called once per message per worker, after it was offered to every listener; the metrics
        # module hooks fan-out latency here.
        self.on_fanout: Callable[[Message], None] | None = None
        self._recent_size = recent_size
        self._recent_bytes_max = max(1, min(RECENT_BYTES_TOTAL, queue_bytes))
        self._recent_total = 0
        self.counters = Counters() if counters is None else counters

    # --- listeners -------------------------------------------------------------------------------

    def add(self, channel: str, outbound: Outbound) -> None:
        """Count ``outbound`` as a listener of ``channel`` (for the Redis subscription); it receives
        nothing until ``activate``."""
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel()
            self._on_first(channel)
        if outbound not in state.listeners:
            state.parked[outbound] = None

    def activate(self, channel: str, outbound: Outbound) -> None:
        """From now on ``outbound`` receives every publication of ``channel`` after ``position``."""
        state = self._channels.get(channel)
        if state is not None and state.parked.pop(outbound, 0) is None:
            state.listeners[outbound] = None

    def discard(self, channel: str, outbound: Outbound) -> None:
        state = self._channels.get(channel)
        if state is None:
            return
        state.listeners.pop(outbound, None)
        state.parked.pop(outbound, None)
        if not state.listeners and not state.parked:
            del self._channels[channel]
            self._pending.pop(channel, None)
            if state.recent is not None:
                self._drop_recent(state)
            self._on_last(channel)

    def position(self, channel: str) -> tuple[int, str] | None:
        """(offset, epoch): a connection activated now receives every publication after offset.

        None while the channel's position is not known yet (see ``set_position``).
        """
        state = self._channels.get(channel)
        if state is None or state.epoch is None:
            return None
        batch = self._pending.pop(channel, None)
        if batch is not None:
            # What waits for the next loop iteration goes to the current listeners now, so that
            # "after offset" is exact for the one activated next.
            self._fan_out(channel, batch)
        return state.offset, state.epoch

    def set_position(self, channel: str, offset: int, epoch: str) -> None:
        """The channel's top in Redis, read after the subscription was confirmed: publications
        held until now that are not after it are dropped, the rest delivered."""
        state = self._channels.get(channel)
        if state is None or state.epoch is not None:
            return
        state.epoch, state.offset = epoch, offset
        # Held publications of another epoch are older than the position just read.
        for key in [k for k in state.held if k[0] != epoch]:
            del state.held[key]
        self._release(channel, state, top=offset)

    def begin_check(self, channel: str) -> tuple[int, str] | None:
        """Hold the channel's publications for a history read after its last accepted offset
        (after a pub/sub reconnect); returns (offset, epoch), or None when nothing needs it."""
        state = self._channels.get(channel)
        if state is None or state.epoch is None or state.filling:
            return None
        state.filling = True
        return state.offset, state.epoch

    # --- publications ----------------------------------------------------------------------------

    def publish(self, channel: str, payload: bytes, offset: int | None = None, epoch: str | None = None) -> int:
        """Queue one publication for the local listeners of ``channel``; returns how many there are.

        Publications that arrive together (the broker reads them from one socket read without
        yielding) are flushed together on the next loop iteration: each connection then gets them
        in one write, so under load the cost per delivery falls instead of the backlog growing.
        Alone, a publication waits for no timer: just until the broker's read loop yields.
        Raises UnicodeDecodeError for a payload that is not UTF-8 (the caller counts it).
        """
        state = self._channels.get(channel)
        if state is None:
            return 0
        if offset is not None and epoch is not None:
            if state.epoch is None or state.filling or epoch != state.epoch or offset != state.offset + 1:
                self._sequence(channel, state, payload, offset, epoch)
                return len(state.listeners)
            state.offset = offset
            if state.recent is not None:
                self._remember(state, offset, payload)
        self._enqueue(channel, payload, offset, epoch)
        return len(state.listeners)

    def _sequence(self, channel: str, state: _Channel, payload: bytes, offset: int, epoch: str) -> None:
        """A publication that does not simply follow the last one accepted."""
        payload.decode()  # refuse a non-UTF-8 payload now, as for one delivered at once
        if epoch == state.epoch and offset <= state.offset:
            self.counters.duplicates += 1
            return
        state.held[(epoch, offset)] = payload
        if state.epoch is None or state.filling:
            if len(state.held) > MAX_HELD:
                # The read takes too long: give the hole up rather than hold without a bound.
                state.filling = False
                self._release(channel, state, top=_ALL)
            return
        if epoch != state.epoch:
            self._release(channel, state, top=_ALL)  # Redis lost the channel: a new lifetime starts
        else:
            self._start_fill(channel, state)

    def fill(self, channel: str, epoch: str, top: int, frames: list[tuple[int, bytes]]) -> None:
        """The end of a history read: ``frames`` (offset, frame) of ``epoch``, whose top was ``top``.

        What the read could not supply up to its top is lost (announced as a gap); a hole above
        it (publications lost while reading) makes another read; then the held publications follow.
        """
        state = self._channels.get(channel)
        if state is None or not state.filling:
            return
        state.filling = False
        if epoch != state.epoch:
            # The channel's epoch changed under the hole: the old lifetime has nothing more to give.
            if not epoch or top <= 0:
                self._release(channel, state, top=_ALL)
                return
            # Redis holds a new lifetime already published in, which no live publication may
            # follow to reveal: announce it now and read it from its start.
            for key in [k for k in state.held if k[0] != epoch]:
                del state.held[key]
            self._gap(channel, state, 0, epoch)
            self._start_fill(channel, state)
            return
        for offset, frame in frames:
            state.held.setdefault((epoch, offset), frame)
        self._release(channel, state, top=top)

    def _release(self, channel: str, state: _Channel, top: float) -> None:
        """Deliver the held publications in order, announcing a gap before any that does not follow.

        Offsets up to ``top`` that are missing are lost; a hole above it makes another read.
        """
        current = state.epoch
        items = sorted(state.held.items(), key=lambda item: (item[0][0] != current, item[0][1]))
        state.held.clear()
        for index, ((epoch, offset), payload) in enumerate(items):
            if epoch != state.epoch:
                # A new lifetime of the channel (Redis lost it): whatever of the old one was not
                # delivered is lost, and the new one is read from its start.
                self._gap(channel, state, 0, epoch)
                top = -1
            if offset <= state.offset:
                self.counters.duplicates += 1
                continue
            if offset != state.offset + 1 and state.offset < top:
                self._gap(channel, state, int(min(top, offset - 1)), epoch)
            if offset != state.offset + 1:
                state.held.update(items[index:])
                self._start_fill(channel, state)
                return
            state.offset = offset
            if state.recent is not None:
                self._remember(state, offset, payload)
            self._enqueue(channel, payload, offset, epoch)

    def _start_fill(self, channel: str, state: _Channel) -> None:
        assert state.epoch is not None
        self.counters.holes += 1
        state.filling = True
        if self._on_hole is not None:
            self._on_hole(channel, state.offset, state.epoch)
        else:
            state.filling = False
            self._release(channel, state, top=_ALL)

    def _gap(self, channel: str, state: _Channel, offset: int, epoch: str) -> None:
        state.floor = max(state.floor, offset + 1) if epoch == state.epoch else 0
        state.epoch, state.offset = epoch, offset
        if state.recent is not None:
            self._drop_recent(state)
            state.recent = deque()  # what precedes a gap is not recoverable from here
        self.counters.gaps_sent += len(state.listeners)
        frame = wire.gap(channel, offset, epoch)
        self._enqueue(channel, frame, offset, epoch)

    def _enqueue(self, channel: str, payload: bytes, offset: int | None = None, epoch: str | None = None) -> None:
        text = payload.decode()
        batch = self._pending.get(channel)
        if batch is None:
            batch = self._pending[channel] = _Batch(time.perf_counter())
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        batch.payloads.append(payload)
        batch.texts.append(text)
        batch.size += len(payload)
        if offset is not None:
            batch.offset, batch.epoch = offset, epoch
        if len(batch.payloads) >= self._max_batch or batch.size >= self._max_batch_bytes:
            del self._pending[channel]
            self._fan_out(channel, batch)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for channel, batch in pending.items():
            self._fan_out(channel, batch)

    def _fan_out(self, channel: str, batch: _Batch) -> None:
        state = self._channels.get(channel)
        if state is None:
            return
        state.last_publish = time.monotonic()
        listeners = state.listeners
        if not listeners:
            return
        message = Message(channel, batch.payloads, batch.arrived, batch.texts, batch.offset, batch.epoch)
        # No copy of the listeners: offer() never changes subscriptions synchronously (a slow
        # client's close only schedules its endpoint to unregister it).
        for outbound in listeners:
            outbound.offer(message)
        if self.on_fanout is not None:
            self.on_fanout(message)

    # --- what clients recovering a channel are served from ----------------------------------------

    def recent(self, channel: str, after: int, epoch: str) -> list[tuple[int, bytes]] | None:
        """The publications after ``after`` up to ``position``, when memory still holds them all.

        Call it right before ``activate``, with no await in between.
        """
        state = self._channels.get(channel)
        position = self.position(channel)
        if state is None or position is None or position[1] != epoch or after > position[0]:
            return None
        if after == position[0]:
            return []
        recent = state.recent
        if not recent or recent[0][0] > after + 1:
            return None
        return [item for item in recent if item[0] > after]

    def note_floor(self, channel: str, epoch: str, floor: int) -> None:
        """Redis's history of ``epoch`` held nothing before ``floor`` (a read found so)."""
        state = self._channels.get(channel)
        if state is not None and state.epoch == epoch:
            state.floor = max(state.floor, floor)

    def below_floor(self, channel: str, after: int, epoch: str) -> bool:
        """True when the publications after ``after`` are known to be gone from Redis's history."""
        state = self._channels.get(channel)
        return state is not None and state.epoch == epoch and after + 1 < state.floor

    def remember(self, channel: str, epoch: str, frames: list[tuple[int, bytes]], window: float) -> None:
        """Keep the channel's latest publications for ``window`` seconds: the live ones from now on,
        and before them those of ``frames`` (a history read) that reach up to them without a hole.

        Called before a read too (with no frames), so that publications accepted while the read is
        under way are kept: a read that Redis answered just before them still joins up with them.
        """
        state = self._channels.get(channel)
        if state is None or state.epoch != epoch:
            return
        state.recent_until = time.monotonic() + window
        if state.recent is None:
            state.recent = deque()
        recent = state.recent
        first = recent[0][0] if recent else state.offset + 1
        older = [item for item in frames if item[0] < first]
        # A read's frames are in order without repeats: contiguous when first to last spans them all.
        if not older or older[-1][0] != first - 1 or older[-1][0] - older[0][0] + 1 != len(older):
            return
        for offset, frame in reversed(older):
            recent.appendleft((offset, frame))
            state.recent_bytes += len(frame)
            self._recent_total += len(frame)
        self._trim(state)

    def _remember(self, state: _Channel, offset: int, frame: bytes) -> None:
        recent = state.recent
        assert recent is not None
        recent.append((offset, frame))
        state.recent_bytes += len(frame)
        self._recent_total += len(frame)
        self._trim(state)

    def _trim(self, state: _Channel) -> None:
        recent = state.recent
        assert recent is not None
        while recent and (
            len(recent) > self._recent_size
            or state.recent_bytes > self._recent_bytes_max
            or self._recent_total > RECENT_BYTES_TOTAL
        ):
            _, dropped = recent.popleft()
            state.recent_bytes -= len(dropped)
            self._recent_total -= len(dropped)

    def _drop_recent(self, state: _Channel) -> None:
        self._recent_total -= state.recent_bytes
        state.recent_bytes = 0
        state.recent = None

    def forget_recent(self, now: float | None = None) -> None:
        """Drop the kept publications of channels no client recovered for a while."""
        now = time.monotonic() if now is None else now
        for state in self._channels.values():
            if state.recent is not None and state.recent_until < now:
                self._drop_recent(state)

    # --- for the wiring and the stats ------------------------------------------------------------

    def last_publish(self, channel: str) -> float:
        state = self._channels.get(channel)
        return state.last_publish if state is not None else 0.0

    def positioned(self) -> list[str]:
        """The channels whose position is known (to check with ``begin_check`` after a reconnect)."""
        return [name for name, s in self._channels.items() if s.epoch is not None]

    def channels(self) -> dict[str, int]:
        """Local listeners per channel."""
        return {name: len(s.listeners) + len(s.parked) for name, s in self._channels.items()}
