"""The hub: which local connections listen to which channel, and fan-out to them.

Fan-out calls ``offer`` on each connection's outbound path: it never awaits, so one slow client
cannot delay another. The hub knows nothing of Redis; ``on_first`` and ``on_last`` tell whoever
wires it (the app, to the broker) when a channel gains its first or loses its last local listener.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from service.outbound import Message, Outbound

log = logging.getLogger("wsbroadcast.hub")


class Hub:
    def __init__(self, on_first: Callable[[str], None], on_last: Callable[[str], None]) -> None:
        self._channels: dict[str, dict[Outbound, None]] = {}
        self._last_publish: dict[str, float] = {}
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
        """Offer one publication to every local listener of ``channel``; returns how many.

        Raises UnicodeDecodeError for a payload that is not UTF-8 (the caller counts it).
        """
        listeners = self._channels.get(channel)
        if not listeners:
            return 0
        message = Message(channel, payload)
        self._last_publish[channel] = time.monotonic()
        # No copy of the listeners: offer() never changes subscriptions synchronously (a slow
        # client's close only schedules its endpoint to unregister it).
        for outbound in listeners:
            outbound.offer(message)
        if self.on_fanout is not None:
            self.on_fanout(message, len(listeners))
        return len(listeners)

    def last_publish(self, channel: str) -> float:
        return self._last_publish.get(channel, 0.0)

    def channels(self) -> dict[str, int]:
        """Local listeners per channel."""
        return {name: len(listeners) for name, listeners in self._channels.items()}
