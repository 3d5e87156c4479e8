"""A connection's outbound path: the bounded queue between the hub and one client.

Two implementations, which the hub cannot tell apart:

* ``QueueOutbound``, the plain ASGI path: a bounded deque drained by one writer task per connection.
* ``DirectOutbound``, the fast path: the WebSocket frame is built once per message per worker and
  written straight to the connection's transport, whose write buffer is the bounded queue. It needs
  the ``wsbroadcast.direct`` scope extension that ``workers.protocol`` offers.

``offer`` never awaits and never blocks: over the bound it applies the slow-consumer policy to this
connection alone and returns.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

from service import wire
from service.counters import Counters

# The scope extension through which our WebSocket protocol (workers.protocol) offers a DirectLink.
DIRECT_EXTENSION = "wsbroadcast.direct"


def ws_text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented server-to-client WebSocket text frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return header + payload


class Message:
    """Publications on one channel as they reach a worker, decoded and framed once, shared by every
    connection. Usually one; several when they arrived together (see ``Hub``), so that each
    connection gets them in one write. ``offset`` and ``epoch`` are those of the last publication
    in it (None for frames published without an offset); ``control`` marks a frame built for one
    connection (an ack, a gap), outside its queue's bounds; ``gap`` marks a gap frame."""

    __slots__ = ("arrived", "channel", "control", "count", "epoch", "frame", "gap", "offset", "size", "texts")

    def __init__(self, channel: str, payloads: bytes | list[bytes], arrived: float | None = None,
                 texts: list[str] | None = None, offset: int | None = None, epoch: str | None = None) -> None:
        if isinstance(payloads, bytes):
            payloads = [payloads]
        self.channel = channel
        # Raises UnicodeDecodeError on a non-UTF-8 payload: the service counts and drops those.
        self.texts = texts if texts is not None else [p.decode() for p in payloads]
        self.frame = b"".join([ws_text_frame(p) for p in payloads])
        self.size = sum(len(p) for p in payloads)
        self.count = len(payloads)
        self.arrived = time.perf_counter() if arrived is None else arrived
        self.offset = offset
        self.epoch = epoch
        self.control = False
        self.gap = False


def control_message(channel: str, frame: bytes, offset: int, epoch: str) -> Message:
    """A control frame for one connection (an ack, a gap), in order with its publications but
    outside its queue's bounds and not counted as a delivered publication."""
    message = Message(channel, frame, offset=offset, epoch=epoch)
    message.control = True
    message.count = 0
    return message


def gap_message(channel: str, offset: int, epoch: str) -> Message:
    """The gap frame that tells one connection it lost the publications of ``channel`` up to ``offset``."""
    message = control_message(channel, wire.gap(channel, offset, epoch), offset, epoch)
    message.gap = True
    return message


@dataclass(frozen=True, slots=True)
class Bounds:
    frames: int
    bytes: int
    drop_oldest: bool


class Outbound(Protocol):
    """What the hub holds for each subscribed connection."""

    direct: ClassVar[bool]  # True for the fast path

    def offer(self, message: Message) -> None: ...

    def depth(self) -> tuple[int, int]:
        """(frames, bytes) waiting for this client, as far as the path can tell."""
        ...


class QueueOutbound:
    """The plain ASGI path: a deque bounded in frames and bytes, drained by ``run``."""

    direct: ClassVar[bool] = False

    __slots__ = ("_bounds", "_bytes", "_counters", "_frames", "_on_slow", "_queue", "_wake", "closed", "dropped")

    def __init__(self, bounds: Bounds, counters: Counters, on_slow: Callable[[], None]) -> None:
        self._queue: deque[Message] = deque()
        self._frames = 0
        self._bytes = 0
        self._wake = asyncio.Event()
        self._bounds = bounds
        self._counters = counters
        self._on_slow = on_slow
        self.closed = False
        self.dropped = 0

    def offer(self, message: Message) -> None:
        if self.closed:
            return
        queue, bounds = self._queue, self._bounds
        if message.control:
            queue.append(message)
            self._wake.set()
            return
        if self._frames + message.count > bounds.frames or self._bytes + message.size > bounds.bytes:
            if not bounds.drop_oldest:
                self.closed = True
                self._on_slow()
                return
            gaps: list[Message] = []
            while queue and queue[0].control:
                gaps.append(queue.popleft())
            while queue and (
                self._frames + message.count > bounds.frames or self._bytes + message.size > bounds.bytes
            ):
                oldest = queue.popleft()
                self._frames -= oldest.count
                self._bytes -= oldest.size
                self._drop(oldest, gaps)
            too_big = message.count > bounds.frames or message.size > bounds.bytes
            if too_big:
                self._drop(message, gaps)
            # The gaps go first: each announces, before any later publication of its channel, what
            # this connection lost of it.
            queue.extendleft(reversed(gaps))
            if too_big:
                self._wake.set()
                return
        queue.append(message)
        self._frames += message.count
        self._bytes += message.size
        self._wake.set()

    def _drop(self, message: Message, gaps: list[Message]) -> None:
        if message.control:
            gaps.append(message)
            return
        self.dropped += message.count
        self._counters.dropped += message.count
        if message.offset is not None and message.epoch is not None:
            # The channel's latest control frame, if a gap, grows to cover this drop too; any other
            # (its ack) must stay, and stay before the gap: the ack's position precedes this drop.
            for index in range(len(gaps) - 1, -1, -1):
                if gaps[index].channel == message.channel:
                    if gaps[index].gap:
                        gaps[index] = gap_message(message.channel, message.offset, message.epoch)
                        return
                    break
            gaps.append(gap_message(message.channel, message.offset, message.epoch))
            self._counters.gaps_sent += 1

    def depth(self) -> tuple[int, int]:
        return self._frames, self._bytes

    async def run(self, send_text: Callable[[str], Awaitable[None]]) -> None:
        """The connection's one writer: send queued frames in order until cancelled."""
        queue = self._queue
        while not self.closed:
            if not queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            message = queue.popleft()
            if message.control:
                for text in message.texts:
                    await send_text(text)
                continue
            self._frames -= message.count
            self._bytes -= message.size
            for text in message.texts:
                await send_text(text)
            self._counters.delivered += message.count


class Transport(Protocol):
    """What the fast path uses of an asyncio transport."""

    def write(self, data: bytes) -> None: ...

    def get_write_buffer_size(self) -> int: ...

    def is_closing(self) -> bool: ...


class DirectLink(Protocol):
    """The ``wsbroadcast.direct`` scope extension: synchronous access to one connection's transport.

    Frames may be written to ``transport`` while neither ``close_sent`` nor ``disconnected`` is set
    and the transport is not closing: every close path of the protocol sets one of the three, so
    nothing is ever written after a close frame. Each write is one whole frame (or several).
    """

    @property
    def transport(self) -> Transport: ...

    @property
    def close_sent(self) -> bool: ...

    @property
    def disconnected(self) -> bool: ...

    def close(self, code: int, reason: str) -> None:
        """Send a close frame now, ahead of nothing: it queues behind the bytes already buffered."""
        ...


class DirectOutbound:
    """The fast path: the transport's write buffer is the queue, bounded by QUEUE_BYTES and QUEUE_SIZE.

    The transport only tells how many bytes it holds, so frames are counted from byte offsets: each
    write that stays (partly) buffered is remembered by the offset where it ends in the stream of
    bytes written; once the transport holds fewer bytes than were written after that offset, the
    write has left for the kernel. A client that keeps up never has anything remembered.
    """

    direct: ClassVar[bool] = True

    __slots__ = (
        "_bounds",
        "_buffered",
        "_closing",
        "_counters",
        "_link",
        "_on_slow",
        "_queued",
        "_waiting",
        "_write",
        "_written",
        "closed",
    )

    def __init__(self, link: DirectLink, bounds: Bounds, counters: Counters, on_slow: Callable[[], None]) -> None:
        self._link = link
        # The transport's own (C) methods, bound once: per delivery there is no Python call
        # between the hub and the socket.
        self._write = link.transport.write
        self._buffered = link.transport.get_write_buffer_size
        self._closing = link.transport.is_closing
        self._bounds = bounds
        self._counters = counters
        self._on_slow = on_slow
        self._written = 0  # bytes written to the transport, ever
        # (end offset, frames) of buffered writes; made on first need: a deque costs ~600 bytes
        # and most connections never need one.
        self._waiting: deque[tuple[int, int]] | None = None
        self._queued = 0  # frames in _waiting
        self.closed = False

    def _settle(self, buffered: int) -> None:
        """Forget the writes the transport has handed to the kernel."""
        waiting = self._waiting
        if waiting is None:
            return
        flushed = self._written - buffered
        while waiting and waiting[0][0] <= flushed:
            self._queued -= waiting.popleft()[1]

    def offer(self, message: Message) -> None:
        if self.closed:
            return
        link = self._link
        if link.close_sent or link.disconnected or self._closing():
            self.closed = True
            return
        frame = message.frame
        buffered = self._buffered()
        if buffered:
            self._settle(buffered)
            if buffered + len(frame) > self._bounds.bytes or self._queued + message.count > self._bounds.frames:
                self.closed = True
                self._on_slow()
                return
        elif self._waiting:
            self._waiting.clear()
            self._queued = 0
        self._write(frame)
        self._written += len(frame)
        self._counters.delivered += message.count
        if buffered or self._buffered():
            if self._waiting is None:
                self._waiting = deque()
            self._waiting.append((self._written, message.count))
            self._queued += message.count

    def depth(self) -> tuple[int, int]:
        buffered = self._buffered()
        if not buffered:
            return 0, 0
        self._settle(buffered)
        return self._queued, buffered
