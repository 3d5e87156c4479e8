"""The per-worker connection tracker: the limit, the idle sweep."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from service import wire
from service.counters import Counters

if TYPE_CHECKING:
    from service.outbound import Outbound

log = logging.getLogger("wsbroadcast.tracker")


class Connection:
    """One admitted client: its channels, outbound path and last activity."""

    __slots__ = ("channels", "close", "id", "last_received", "outbound")

    def __init__(self, conn_id: int, close: Callable[[wire.Close], bool]) -> None:
        self.id = conn_id
        self.channels: set[str] = set()
        self.outbound: Outbound | None = None
        self.last_received = time.monotonic()
        # Closes the client without awaiting it (set by the endpoint);
        # returns False when the connection was already closing.
        self.close = close


class Tracker:
    """Counts connections, enforces MAX_CONNECTIONS and closes idle ones.

    A connection is idle when it has neither sent a frame nor had a publication on any of its
    channels for IDLE_TIMEOUT: listeners of a busy channel are not idle, and nothing per message
    per connection is touched to know it.
    """

    def __init__(
        self,
        max_connections: int,
        idle_timeout: float,
        last_publish: Callable[[str], float],
        counters: Counters | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self._last_publish = last_publish
        self.connections: dict[int, Connection] = {}
        self.peak = 0
        self.counters = Counters() if counters is None else counters
        self._next_id = 0
        # Set by the memory monitor: the connection limit the memory allows, and whether new
        # connections are refused for memory pressure.
        self.memory_limit_connections: int | None = None
        self.memory_pressure = False
        # Set by the memory monitor too: the connections the file descriptors left allow
        # (RLIMIT_NOFILE minus FD_RESERVE minus those in use), so that refusing still works.
        self.fd_limit_connections: int | None = None

    @property
    def current(self) -> int:
        return len(self.connections)

    @property
    def effective_limit(self) -> int:
        limit = self.max_connections
        if self.memory_limit_connections is not None:
            limit = min(limit, self.memory_limit_connections)
        if self.fd_limit_connections is not None:
            limit = min(limit, self.fd_limit_connections)
        return limit

    def refusal(self) -> str | None:
        """Why a new connection would be refused now, or None when it can be admitted."""
        if self.memory_pressure:
            return "memory"
        if len(self.connections) >= self.effective_limit:
            return "full"
        return None

    def admit(self, close: Callable[[wire.Close], bool]) -> Connection:
        self._next_id += 1
        conn = Connection(self._next_id, close)
        self.connections[conn.id] = conn
        self.counters.accepted += 1
        if len(self.connections) > self.peak:
            self.peak = len(self.connections)
        return conn

    def refuse(self, reason: str) -> None:
        if reason == "memory":
            self.counters.refused_memory += 1
        else:
            self.counters.refused_full += 1

    def remove(self, conn: Connection) -> None:
        self.connections.pop(conn.id, None)

    def idle_connections(self, now: float | None = None) -> list[Connection]:
        now = time.monotonic() if now is None else now
        cutoff = now - self.idle_timeout
        idle = []
        for conn in self.connections.values():
            last = conn.last_received
            for channel in conn.channels:
                last = max(last, self._last_publish(channel))
            if last < cutoff:
                idle.append(conn)
        return idle

    def sweep(self) -> int:
        idle = self.idle_connections()
        # Only closes this sweep started count: one already closing stays listed until it is gone.
        closed = sum(1 for conn in idle if conn.close(wire.IDLE))
        self.counters.idle_closed += closed
        if closed:
            log.info("closed %d idle connections", closed)
        return closed

    async def run_sweeps(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep()
            except Exception:
                log.exception("idle sweep failed; will retry in %.0f s", interval)

    def paths(self) -> dict[str, int]:
        """Connections per outbound path: ``direct`` (frame-once fast path) or ``queue`` (ASGI)."""
        direct = sum(1 for c in self.connections.values() if c.outbound is not None and c.outbound.direct)
        return {"direct": direct, "queue": len(self.connections) - direct}

    def queue_depths(self) -> dict[str, int]:
        frames_max = bytes_max = frames_total = bytes_total = 0
        for conn in self.connections.values():
            if conn.outbound is None:
                continue
            frames, nbytes = conn.outbound.depth()
            frames_total += frames
            bytes_total += nbytes
            frames_max = max(frames_max, frames)
            bytes_max = max(bytes_max, nbytes)
        return {
            "frames_max": frames_max,
            "bytes_max": bytes_max,
            "frames_total": frames_total,
            "bytes_total": bytes_total,
        }
