"""Prometheus metrics: the worker's figures, exposed at GET /metrics across the host's workers.

The hot path never touches Prometheus: it bumps the plain ints of ``service.counters.Counters``, and
``Metrics.run`` copies them into Prometheus counters (by the delta) once a second, together with
the gauges. The one exception is the fan-out latency histogram, observed once per message per
worker (never per connection) through ``Hub.on_fanout``.

Under gunicorn the workers share a directory of prometheus-client multiprocess files
(PROMETHEUS_MULTIPROC_DIR, prepared by ``workers/metrics_dir.py`` in the gunicorn master), so any
worker answering /metrics serves the sum over all of them. Without that
variable (one process, e.g. plain uvicorn) the worker serves its own registry.
"""

from __future__ import annotations

import asyncio
import logging
import os
from time import perf_counter
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector

from service.config import MULTIPROC_ENV
from service.counters import Counters, series
from service.outbound import Message

if TYPE_CHECKING:
    from service.broker import Broker
    from service.memory import MemoryMonitor
    from service.tracker import Tracker

log = logging.getLogger("wsbroadcast.metrics")

CONTENT_TYPE = CONTENT_TYPE_LATEST
SYNC_INTERVAL = 1.0
# From a single connection on an idle worker (~10 us) to a 5000-connection fan-out on a busy one.
LATENCY_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                   0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

class Metrics:
    """One worker's Prometheus figures, kept in step with the plain counters by ``sync``."""

    def __init__(self, counters: Counters, tracker: Tracker, memory: MemoryMonitor, broker: Broker) -> None:
        self._counters_now = counters
        self._tracker = tracker
        self._memory = memory
        self._broker = broker
        self._series = series()
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        if self.multiprocess and prometheus_values.ValueClass is prometheus_values.MutexValue:
            # prometheus-client picks its value class once, at import: imported before the variable
            # was set, this worker would count in private memory and /metrics would miss it.
            raise RuntimeError(
                f"prometheus_client was imported before {MULTIPROC_ENV} was set; set it before any import"
            )
        # In multiprocess mode the values live in files keyed by name and pid, whatever the
        # registry; the private registry serves the single-process case and keeps several apps
        # in one process (tests) from colliding in the global one.
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        families = {family.name: family for _, family, _ in self._series}
        self._counters = {
            name: Counter(f"wsbroadcast_{name}", f.help, () if f.label is None else (f.label,), registry=r)
            for name, f in families.items()
        }
        self._children: dict[str, Counter] = {}
        for field, family, value in self._series:
            counter = self._counters[family.name]
            # Every known label value shows from the start (at 0), so rate() and alerts see a
            # series before its first event.
            self._children[field] = counter if value is None else counter.labels(value)
        self._last: dict[str, int] = {field: 0 for field, _, _ in self._series}
        self.fanout_latency = Histogram(
            "wsbroadcast_fanout_latency_seconds",
            "From a publication's arrival at a worker to its hand-off to the last local connection "
            "(the socket on the fast path, the connection's queue on the ASGI path); once per message per worker",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        def host(name: str, text: str) -> Gauge:
            # livesum: summed over the live workers; a dead worker's share drops out.
            return Gauge(f"wsbroadcast_{name}", text, registry=r, multiprocess_mode="livesum")

        def worker(name: str, text: str) -> Gauge:
            # liveall: one series per live worker (label pid); a dead worker's series disappear.
            return Gauge(f"wsbroadcast_worker_{name}", text, registry=r, multiprocess_mode="liveall")

        self.connections = host("connections", "Open WebSocket connections, all workers of the host")
        self.queued_frames = host("queued_frames", "Publication frames waiting for their clients, all workers")
        self.queued_bytes = host("queued_bytes", "Bytes waiting for their clients (outside the kernel), all workers")
        self.workers_under_pressure = host(
            "workers_under_memory_pressure", "Workers above their memory high watermark (refusing new connections)"
        )
        self.worker_connections = worker("connections", "Open WebSocket connections of this worker")
        self.worker_limit = worker(
            "connections_effective_limit",
            "Connections this worker admits: min(MAX_CONNECTIONS, what memory and file descriptors allow)",
        )
        self.worker_queue_frames = worker("queue_depth_max_frames", "Frames waiting for this worker's slowest client")
        self.worker_queue_bytes = worker("queue_depth_max_bytes", "Bytes waiting for this worker's slowest client")
        self.worker_rss = worker("resident_memory_bytes", "Resident set size of the worker process")
        self.worker_memory_limit = worker(
            "memory_limit_bytes", "Memory this worker may use (MEMORY_LIMIT, cgroup or RAM)"
        )
        self.worker_pressure = worker("memory_pressure", "1 when the worker is above its memory high watermark")
        self.worker_pool = worker(
            "redis_pool_connections_in_use", "Redis pool connections checked out (pub/sub included)"
        )
        self.worker_redis_up = worker("redis_connected", "1 when the worker's Redis pub/sub connection is up")

    def observe_fanout(self, message: Message) -> None:
        """Hub.on_fanout: one observation per message per worker."""
        self.fanout_latency.observe(perf_counter() - message.arrived)

    def sync(self) -> None:
        """Copy the plain counters (by their growth since the last sync) and set the gauges."""
        now = self._counters_now
        for field, child in self._children.items():
            value = getattr(now, field)
            delta = value - self._last[field]
            if delta > 0:
                child.inc(delta)
                self._last[field] = value
        tracker, memory, broker = self._tracker, self._memory, self._broker
        depth = tracker.queue_depths()
        current = tracker.current
        pressure = 1 if tracker.memory_pressure else 0
        self.connections.set(current)
        self.queued_frames.set(depth["frames_total"])
        self.queued_bytes.set(depth["bytes_total"])
        self.workers_under_pressure.set(pressure)
        self.worker_connections.set(current)
        self.worker_limit.set(tracker.effective_limit)
        self.worker_queue_frames.set(depth["frames_max"])
        self.worker_queue_bytes.set(depth["bytes_max"])
        self.worker_rss.set(memory.rss)
        self.worker_memory_limit.set(memory.limit)
        self.worker_pressure.set(pressure)
        self.worker_pool.set(broker.pool_usage()["in_use"])
        self.worker_redis_up.set(1 if broker.connected else 0)

    async def run(self, interval: float = SYNC_INTERVAL) -> None:
        try:
            while True:
                try:
                    self.sync()
                except Exception:
                    log.exception("metrics sync failed; will retry in %.0f s", interval)
                await asyncio.sleep(interval)
        finally:
            # A worker stopping keeps what it counted since the last tick (its counter files stay).
            self.sync()

    def render(self) -> bytes:
        """The Prometheus text: the host's workers summed in multiprocess mode, else this process.

        Reads every worker's file: call it off the event loop.
        """
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
