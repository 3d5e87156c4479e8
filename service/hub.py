"""The hub: which local connections listen to which channel, and fan-out to them.

Fan-out calls ``offer`` on each connection's outbound path: it never awaits, so one slow client
cannot delay another. The hub knows nothing of Redis; ``on_first`` and ``on_last`` tell whoever
wires it (the app, to the broker) when a channel gains its first or loses its last local listener.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from service.outbound import Message, Outbound

# A batch is flushed early at this many publications or bytes (or a quarter of a connection's
# queue bound, if smaller), so one burst never becomes one write near a connection's bound.
MAX_BATCH = 64
MAX_BATCH_BYTES = 64 * 1024


class _Batch:
    __slots__ = ("arrived", "payloads", "size", "texts")

    def __init__(self, arrived: float) -> None:
        self.arrived = arrived
        self.payloads: list[bytes] = []
        self.texts: list[str] = []
        self.size = 0


class Hub:
    def __init__(
        self,
        on_first: Callable[[str], None],
        on_last: Callable[[str], None],
        queue_frames: int = 4 * MAX_BATCH,
        queue_bytes: int = 4 * MAX_BATCH_BYTES,
    ) -> None:
        self._max_batch = max(1, min(MAX_BATCH, queue_frames // 4))
        self._max_batch_bytes = max(1, min(MAX_BATCH_BYTES, queue_bytes // 4))
        self._channels: dict[str, dict[Outbound, None]] = {}
        self._last_publish: dict[str, float] = {}
        self._pending: dict[str, _Batch] = {}
        self._flush_scheduled = False
        self._on_first = on_first
        self._on_last = on_last
        # Called once per message per worker with the message and the number of connections it
        # was offered to; the metrics module hooks fan-out latency here.
        self.on_fanout: Callable[[Message, int], None] | None = None

    def add(self, channel: str, outbound: Outbound) -> None:
        listeners = self._channels.get(channel)
        if listeners is None:
            listeners = self._channels[channel] = {}
            self._last_publish[channel] = time.monotonic()
            self._on_first(channel)
        listeners[outbound] = None

    def discard(self, channel: str, outbound: Outbound) -> None:
        listeners = self._channels.get(channel)
        if listeners is None:
            return
        listeners.pop(outbound, None)
        if not listeners:
            del self._channels[channel]
            self._last_publish.pop(channel, None)
            self._on_last(channel)

    def publish(self, channel: str, payload: bytes) -> int:
        """Queue one publication for the local listeners of ``channel``; returns how many there are.

        Publications that arrive together (the broker reads them from one socket read without
        yielding) are flushed together on the next loop iteration: each connection then gets them
        in one write, so under load the cost per delivery falls instead of the backlog growing.
        Alone, a publication waits for no timer: just until the broker's read loop yields.
        Raises UnicodeDecodeError for a payload that is not UTF-8 (the caller counts it).
        """
        listeners = self._channels.get(channel)
        if not listeners:
            return 0
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
        if len(batch.payloads) >= self._max_batch or batch.size >= self._max_batch_bytes:
            del self._pending[channel]
            self._fan_out(channel, batch)
        return len(listeners)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for channel, batch in pending.items():
            self._fan_out(channel, batch)

    def _fan_out(self, channel: str, batch: _Batch) -> None:
        listeners = self._channels.get(channel)
        if not listeners:
            return
        message = Message(channel, batch.payloads, batch.arrived, batch.texts)
        self._last_publish[channel] = time.monotonic()
        # No copy of the listeners: offer() never changes subscriptions synchronously (a slow
        # client's close only schedules its endpoint to unregister it).
        for outbound in listeners:
            outbound.offer(message)
        if self.on_fanout is not None:
            self.on_fanout(message, len(listeners))

    def last_publish(self, channel: str) -> float:
        return self._last_publish.get(channel, 0.0)

    def channels(self) -> dict[str, int]:
        """Local listeners per channel."""
        return {name: len(listeners) for name, listeners in self._channels.items()}
