"""Prometheus metrics: the worker's figures, exposed at GET /metrics across the host's workers.

The hot path never touches Prometheus: it bumps the plain ints of ``tracker.Counters``, and
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

from service.outbound import Message

if TYPE_CHECKING:
    from service.app import Service

log = logging.getLogger("wsbroadcast.metrics")

CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SYNC_INTERVAL = 1.0
# From a single connection on an idle worker (~10 us) to a 5000-connection fan-out on a busy one.
LATENCY_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                   0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# tracker.Counters field -> (Prometheus counter name, label values or ()).
_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "accepted": ("connections_accepted", ()),
    "refused_full": ("connections_refused", ("full",)),
    "refused_memory": ("connections_refused", ("memory",)),
    "idle_closed": ("connections_closed", ("idle",)),
    "slow_closed": ("connections_closed", ("slow_consumer",)),
    "abuse_closed": ("connections_closed", ("abuse",)),
    "token_expired_closed": ("connections_closed", ("token_expired",)),
    "delivered": ("frames_delivered", ()),
    "dropped": ("frames_dropped", ()),
    "published_http": ("publishes_received", ("http",)),
    "received_redis": ("publishes_received", ("redis",)),
    "invalid_payloads": ("invalid_publications", ()),
    "bad_client_frames": ("client_frames_rejected", ()),
    "reconnects": ("redis_reconnects", ()),
    "canary_misses": ("redis_canary_misses", ()),
    "memory_alerts": ("memory_pressure_alerts", ()),
    "publish_refused": ("publish_failures", ("false",)),
    "publish_unknown": ("publish_failures", ("unknown",)),
    "publish_replays": ("publish_replays", ()),
    "recovered": ("recoveries", ("true",)),
    "not_recovered": ("recoveries", ("false",)),
    "gaps_sent": ("gaps_sent", ()),
    "holes": ("holes", ()),
    "holes_filled": ("holes_filled", ()),
    "history_reads": ("history_reads", ()),
    "duplicates": ("duplicate_publications", ()),
    "http_rejected_headers_too_big": ("http_rejected", ("headers_too_big",)),
    "http_rejected_head_timeout": ("http_rejected", ("head_timeout",)),
    "http_rejected_body_timeout": ("http_rejected", ("body_timeout",)),
    "http_rejected_handshakes_full": ("http_rejected", ("handshakes_full",)),
    "http_rejected_fds": ("http_rejected", ("fds",)),
}

_COUNTER_HELP: dict[str, tuple[str, tuple[str, ...]]] = {
    "recoveries": ("Subscriptions with since, by outcome: true (recovered), false (told to reload)", ("recovered",)),
    "gaps_sent": ("Gap frames sent: publications lost to a connection, announced (drop-oldest, history too short, "
                  "Redis lost the channel)", ()),
    "holes": ("Publications missing between Redis and a worker (an offset skipped ahead, a reconnect)", ()),
    "holes_filled": ("History reads that filled a worker's hole", ()),
    "history_reads": ("Reads of a channel's history in Redis (holes and recoveries, coalesced per channel)", ()),
    "duplicate_publications": ("Publications a worker dropped as already delivered (history and live overlap)", ()),
    "connections_accepted": ("WebSocket connections accepted", ()),
    "connections_refused": ("WebSocket handshakes refused with 503, by reason (full, memory)", ("reason",)),
    "connections_closed": (
        "Connections closed by the server, by reason (idle, slow_consumer, abuse, token_expired)",
        ("reason",),
    ),
    "frames_delivered": ("Publication frames handed to a client's socket", ()),
    "frames_dropped": ("Publication frames dropped by the drop-oldest slow-consumer policy", ()),
    "publishes_received": (
        "Publications received, by source: http (POST /publish answered here), redis (arrived from pub/sub)",
        ("source",),
    ),
    "invalid_publications": (
        "Publications from Redis dropped: too big, not UTF-8 JSON, or not an object naming their channel",
        (),
    ),
    "client_frames_rejected": ("Client frames answered with an error frame", ()),
    "redis_reconnects": ("Times the Redis pub/sub connection was restored", ()),
    "redis_canary_misses": ("Listener canaries Redis did not accept in time or that did not come back", ()),
    "memory_pressure_alerts": ("Times a worker crossed its memory high watermark", ()),
    "publish_failures": (
        "POST /publish answered 503, by whether it was published: false (surely not), unknown (sent, unanswered)",
        ("published",),
    ),
    "publish_replays": ("POST /publish answered with the first result of its Idempotency-Key", ()),
    "http_rejected": (
        "HTTP requests and handshakes refused by the protocol limits, by reason "
        "(headers_too_big 431, head_timeout 408, body_timeout 408, handshakes_full 503, fds 503)",
        ("reason",),
    ),
}


class Metrics:
    """One worker's Prometheus figures, kept in step with the plain counters by ``sync``."""

    def __init__(self, service: Service) -> None:
        self._service = service
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
        self._counters = {
            name: Counter(f"wsbroadcast_{name}", text, labels, registry=r)
            for name, (text, labels) in _COUNTER_HELP.items()
        }
        for name, labels in _COUNTERS.values():
            if labels:
                # Every known label value shows from the start (at 0), so rate() and alerts see
                # a series before its first event.
                self._counters[name].labels(*labels)
        self._last: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
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

    def _current(self) -> dict[str, int]:
        service = self._service
        c = service.tracker.counters
        return {
            "accepted": c.accepted,
            "refused_full": c.refused - c.refused_memory,
            "refused_memory": c.refused_memory,
            "idle_closed": c.idle_closed,
            "slow_closed": c.slow_closed,
            "abuse_closed": c.abuse_closed,
            "token_expired_closed": c.token_expired_closed,
            "delivered": c.delivered,
            "dropped": c.dropped,
            "published_http": c.published_http,
            "received_redis": c.received_redis,
            "invalid_payloads": c.invalid_payloads,
            "bad_client_frames": c.bad_client_frames,
            "reconnects": service.broker.reconnects,
            "canary_misses": service.broker.canary_misses,
            "memory_alerts": service.memory.alerts,
            "publish_refused": c.publish_refused,
            "publish_unknown": c.publish_unknown,
            "publish_replays": c.publish_replays,
            **service.recovery.counts(c),
            "http_rejected_headers_too_big": c.http_rejected_headers_too_big,
            "http_rejected_head_timeout": c.http_rejected_head_timeout,
            "http_rejected_body_timeout": c.http_rejected_body_timeout,
            "http_rejected_handshakes_full": c.http_rejected_handshakes_full,
            "http_rejected_fds": c.http_rejected_fds,
        }

    def sync(self) -> None:
        """Copy the plain counters (by their growth since the last sync) and set the gauges."""
        for field, value in self._current().items():
            delta = value - self._last[field]
            if delta > 0:
                name, labels = _COUNTERS[field]
                counter = self._counters[name]
                (counter.labels(*labels) if labels else counter).inc(delta)
                self._last[field] = value
        service = self._service
        tracker, memory = service.tracker, service.memory
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
        self.worker_pool.set(service.broker.pool_usage()["in_use"])
        self.worker_redis_up.set(1 if service.broker.connected else 0)

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
