"""The node: one worker's parts, built and wired, started and stopped.

Built in order: counters, gate, hub, tracker, broker (pool + listener), history and recovery,
memory monitor, metrics, heartbeat; the app's lifespan calls ``start`` and ``stop``. The parts never
see the node: each gets the callbacks and parts it uses (the hub its first/last/hole callbacks, the
broker its message handler, metrics and the heartbeat what they read), so none imports this module.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.exceptions import RedisError

from service import health, wire
from service.broker import Broker
from service.config import Settings
from service.counters import HISTORY_FIELDS, Counters
from service.gate import Gate
from service.history import History
from service.hub import Hub
from service.keys import Keys
from service.memory import MemoryMonitor
from service.metrics import Metrics
from service.ratelog import RateLimitedLog
from service.recovery import Recovery
from service.tracker import Tracker

log = logging.getLogger("wsbroadcast.node")
ratelog = RateLimitedLog(log)

# A subscription Redis has not confirmed within this long is logged (rate-limited), then waited for.
SUBSCRIBE_CONFIRM_WAIT = 5.0


class Node:
    """Everything one worker holds."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self.worker_id = health.worker_identity()
        self.worker_name = f"{self.worker_id[0]}:{self.worker_id[1]}"
        self.started_at = time.time()
        self.counters = counters = Counters()
        self.gate = Gate(settings)
        self.hub = Hub(
            self._on_first,
            self._on_last,
            settings.queue_size,
            settings.queue_bytes,
            on_hole=self._on_hole,
            recent_size=settings.history_size,
            counters=counters,
        )
        self.tracker = Tracker(settings.max_connections, settings.idle_timeout, self.hub.last_publish, counters)
        self.broker = Broker(settings, self.keys, self.worker_id, self._on_message, self._on_reconnect, counters)
        self.history = History(self.broker, self.keys, settings)
        self.recovery = Recovery(self.history, self.hub)
        self.memory = MemoryMonitor(settings, self.tracker)
        self.metrics = Metrics(counters, self.tracker, self.memory, self.broker)
        self.hub.on_fanout = self.metrics.observe_fanout
        self.heartbeat = health.Heartbeat(
            self.broker, self.keys.worker(*self.worker_id), settings, self.heartbeat_doc, self.status,
            self.stats_line,
        )
        self._tasks: list[asyncio.Task[None]] = []

    # --- life ------------------------------------------------------------------------------------

    async def start(self) -> None:
        self.broker.start()
        self.memory.check()
        self.memory.check_fds()
        for name, job in (
            ("idle-sweep", self.tracker.run_sweeps(self.settings.cleanup_interval)),
            ("memory", self.memory.run()),
            ("metrics", self.metrics.run()),
            ("heartbeat", self.heartbeat.run()),
            ("library", self.load_library()),
        ):
            self._tasks.append(asyncio.create_task(job, name=name))
        log.info("worker %s started: %s", self.worker_name, self.settings.public())

    async def stop(self) -> None:
        for task in reversed(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.heartbeat.remove()
        await self.recovery.stop()
        await self.broker.stop()
        log.info("worker %s stopped", self.worker_name)

    # --- wiring ----------------------------------------------------------------------------------

    def _on_first(self, channel: str) -> None:
        self.broker.want(channel)

    def _on_last(self, channel: str) -> None:
        self.broker.unwant(channel)

    def _on_hole(self, channel: str, offset: int, epoch: str) -> None:
        self.recovery.on_hole(channel, offset, epoch)

    def _on_reconnect(self, channels: list[str] | None) -> None:
        # A Redis that restarted without persistence has lost the function library too (and a
        # replica promoted to master may have missed its last load).
        self._tasks = [task for task in self._tasks if not task.done()]
        self._tasks.append(asyncio.get_running_loop().create_task(self.load_library(), name="library"))
        self.recovery.check_all(self.confirmed, channels)

    async def load_library(self) -> None:
        """Load the publish function into Redis (every publish path also loads it when missing,
        but a publisher using redis-cli relies on a worker having done it)."""
        delay = 0.1
        while True:
            try:
                await self.history.load()
                return
            except (RedisError, OSError) as exc:
                ratelog.warning("library", "publish function not loaded into Redis yet: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def confirmed(self, channel: str) -> None:
        """Wait until Redis has confirmed the subscription to ``channel``, however long it takes."""
        while not await self.broker.confirmed(channel, SUBSCRIBE_CONFIRM_WAIT):
            ratelog.warning("unconfirmed", "subscription to %r not confirmed by Redis yet; still waiting", channel)

    def _on_message(self, channel: str, payload: bytes) -> None:
        self.counters.received_redis += 1
        # Once per message per worker, before any subscriber sees it.
        checked = wire.check_publication(channel, payload, self.settings.max_message_bytes)
        if isinstance(checked, wire.Invalid):
            self._invalid(channel, checked.why)
            return
        try:
            self.hub.publish(channel, payload, *checked)
        except UnicodeDecodeError:
            self._invalid(channel, "not UTF-8")

    def _invalid(self, channel: str, why: str) -> None:
        self.counters.invalid_payloads += 1
        ratelog.warning("invalid_payload", "dropped a publication from Redis on %r: %s", channel, why)

    # --- what the worker says about itself -------------------------------------------------------

    def status(self) -> tuple[str, list[str]]:
        """This worker's status and the reasons for anything but ok."""
        broker = self.broker
        reasons = []
        if not broker.ever_connected:
            return health.FAILING, [f"Redis unreachable: {broker.last_error}"]
        if not broker.connected:
            reasons.append(f"Redis pub/sub disconnected: {broker.last_error}")
        elif not broker.canary_ok:
            reasons.append(f"pub/sub listener missed its canary: {broker.canary_error}")
        if self.tracker.memory_pressure:
            reasons.append("memory above the high watermark")
        return (health.DEGRADED if reasons else health.OK), reasons

    def stats(self) -> dict[str, Any]:
        """The worker's health document (GET /health with ADMIN_TOKEN)."""
        tracker, settings, broker, counters = self.tracker, self.settings, self.broker, self.counters
        status, reasons = self.status()
        host, pid = self.worker_id
        return {
            "status": status,
            "reasons": reasons,
            "worker": {"host": host, "pid": pid, "id": self.worker_name, "started_at": self.started_at},
            "ts": time.time(),
            "heartbeat_interval": settings.heartbeat_interval,
            "connections": {
                "current": tracker.current,
                "peak": tracker.peak,
                "limit": settings.max_connections,
                "effective_limit": tracker.effective_limit,
                "paths": tracker.paths(),
            },
            "subscriptions": self.hub.channels(),
            "queues": {
                "size": settings.queue_size,
                "bytes": settings.queue_bytes,
                "send_buffer_bytes": settings.send_buffer_bytes,
                "policy": settings.slow_consumer_policy,
                "depth": tracker.queue_depths(),
            },
            "counters": counters.as_dict(),
            "history": {
                "size": settings.history_size,
                "ttl": settings.history_ttl,
                **{name: getattr(counters, name) for name in HISTORY_FIELDS},
            },
            "redis": {
                "connected": broker.connected,
                "canary_ok": broker.canary_ok,
                "canary_misses": counters.canary_misses,
                "reconnects": counters.reconnects,
                "last_error": broker.last_error if not broker.connected else None,
                "pool": broker.pool_usage(),
                **({"nodes": broker.nodes()} if broker.cluster else {}),
            },
            "memory": self.memory.stats(),
            "settings": settings.public(),
        }

    def heartbeat_doc(self) -> dict[str, Any]:
        """The heartbeat: the worker's stats without the bulky per-connection settings."""
        doc = self.stats()
        doc.pop("settings")
        return doc

    def stats_line(self) -> str:
        tracker, c = self.tracker, self.counters
        depth = tracker.queue_depths()
        return (
            f"stats worker={self.worker_name} connections={tracker.current} peak={tracker.peak} "
            f"limit={tracker.effective_limit} rss_mb={self.memory.rss / 1048576:.1f} "
            f"queue_frames_max={depth['frames_max']} queue_bytes_total={depth['bytes_total']} "
            f"delivered={c.delivered} dropped={c.dropped} slow_closed={c.slow_closed} "
            f"idle_closed={c.idle_closed} refused={c.refused}"
        )
