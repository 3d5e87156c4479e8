"""Worker stats, the heartbeat to Redis, and the cluster aggregation.

The aggregation (``read_cluster`` + ``summarize``) is the one implementation behind both
``GET /health/cluster`` and the coordinator script ``scripts/health``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import psutil
from redis.asyncio import Redis
from redis.exceptions import RedisError

from service import codec
from service.keys import Keys

if TYPE_CHECKING:
    from service.app import Service

log = logging.getLogger("wsbroadcast.health")

OK, DEGRADED, FAILING = "ok", "degraded", "failing"
EXIT_CODES = {OK: 0, DEGRADED: 1, FAILING: 2}
UTILISATION_DEGRADED = 0.9
STATUS_POLL = 0.2  # seconds between checks for a status change between heartbeats


def worker_identity() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()


def rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def worker_status(service: Service) -> tuple[str, list[str]]:
    """This worker's status and the reasons for anything but ok."""
    broker = service.broker
    reasons = []
    if not broker.ever_connected:
        return FAILING, [f"Redis unreachable: {broker.last_error}"]
    if not broker.connected:
        reasons.append(f"Redis pub/sub disconnected: {broker.last_error}")
    elif not broker.canary_ok:
        reasons.append("pub/sub listener missed its canary")
    if service.tracker.memory_pressure:
        reasons.append("memory above the high watermark")
    return (DEGRADED if reasons else OK), reasons


def worker_stats(service: Service) -> dict[str, Any]:
    """The document served by GET /health and written as the heartbeat."""
    tracker, settings, broker = service.tracker, service.settings, service.broker
    status, reasons = worker_status(service)
    host, pid = service.worker_id
    doc: dict[str, Any] = {
        "status": status,
        "reasons": reasons,
        "worker": {"host": host, "pid": pid, "id": service.worker_name, "started_at": service.started_at},
        "ts": time.time(),
        "heartbeat_interval": settings.heartbeat_interval,
        "connections": {
            "current": tracker.current,
            "peak": tracker.peak,
            "limit": settings.max_connections,
            "effective_limit": tracker.effective_limit,
            "paths": tracker.paths(),
        },
        "subscriptions": service.hub.channels(),
        "queues": {
            "size": settings.queue_size,
            "bytes": settings.queue_bytes,
            "send_buffer_bytes": settings.send_buffer_bytes,
            "policy": settings.slow_consumer_policy,
            "depth": tracker.queue_depths(),
        },
        "counters": tracker.counters.as_dict(),
        "redis": {
            "connected": broker.connected,
            "canary_ok": broker.canary_ok,
            "canary_misses": broker.canary_misses,
            "reconnects": broker.reconnects,
            "last_error": broker.last_error if not broker.connected else None,
            "pool": broker.pool_usage(),
        },
        "memory": service.memory.stats(),
        "settings": settings.public(),
    }
    return doc


def heartbeat_doc(service: Service) -> dict[str, Any]:
    """The heartbeat: the worker's stats without the bulky per-connection settings."""
    doc = worker_stats(service)
    doc.pop("settings")
    return doc


class Heartbeat:
    """Writes the worker's stats to ``<prefix>worker:<host>:<pid>`` with a TTL of three intervals."""

    def __init__(self, service: Service) -> None:
        self._service = service
        self._key = service.keys.worker(*service.worker_id)
        self._interval = service.settings.heartbeat_interval
        self._stats_interval = service.settings.stats_log_interval

    async def beat(self) -> None:
        payload = codec.dumps(heartbeat_doc(self._service))
        ttl_ms = int(self._interval * 3 * 1000)
        await self._service.broker.redis.set(self._key, payload, px=ttl_ms)

    async def run(self) -> None:
        last_log = time.monotonic()
        while True:
            status = worker_status(self._service)[0]
            try:
                await self.beat()
            except (RedisError, OSError) as exc:
                log.debug("heartbeat not written: %s", exc)
            now = time.monotonic()
            if now - last_log >= self._stats_interval:
                last_log = now
                log.info("%s", stats_line(self._service))
            # Beat early when the status changes (Redis connects or is lost, a canary is missed,
            # memory pressure): the cluster must not read "failing" for a whole interval after a
            # worker has connected.
            steps = max(1, round(self._interval / STATUS_POLL))
            for _ in range(steps):
                await asyncio.sleep(self._interval / steps)
                if worker_status(self._service)[0] != status:
                    break

    async def remove(self) -> None:
        try:
            await self._service.broker.redis.delete(self._key)
        except (RedisError, OSError) as exc:
            log.warning("heartbeat key %s not deleted: %s (it expires by TTL)", self._key, exc)


def stats_line(service: Service) -> str:
    tracker = service.tracker
    c = tracker.counters
    depth = tracker.queue_depths()
    return (
        f"stats worker={service.worker_name} connections={tracker.current} peak={tracker.peak} "
        f"limit={tracker.effective_limit} rss_mb={rss_bytes() / 1048576:.1f} "
        f"queue_frames_max={depth['frames_max']} queue_bytes_total={depth['bytes_total']} "
        f"delivered={c.delivered} dropped={c.dropped} slow_closed={c.slow_closed} "
        f"idle_closed={c.idle_closed} refused={c.refused}"
    )


# --- the cluster ---------------------------------------------------------------------------------


async def read_cluster(redis: Redis, keys: Keys) -> list[dict[str, Any]]:
    """Every live worker's heartbeat (SCAN, never KEYS). Raises RedisError/OSError if unreachable."""
    found: list[bytes] = []
    async for key in redis.scan_iter(match=keys.worker_pattern(), count=500):
        found.append(key)
    workers: list[dict[str, Any]] = []
    for start in range(0, len(found), 500):
        for raw in await redis.mget(found[start : start + 500]):
            if raw is None:
                continue  # expired between SCAN and MGET
            try:
                workers.append(codec.loads(raw))
            except codec.JSONDecodeError:
                log.warning("ignoring a heartbeat that is not JSON")
    workers.sort(key=lambda w: (w["worker"]["host"], w["worker"]["pid"]))
    return workers


def stale_after(interval: float) -> float:
    """Age at which a heartbeat counts as late: one interval plus slack.

    A fresh heartbeat is up to one interval old by design; the slack (half an interval, at least
    1 s) absorbs the write's own latency, an event loop busy for a moment, and clock skew between
    hosts (``ts`` is the worker's wall clock, compared with the reader's). A worker that stops
    beating altogether leaves the report when its key expires, at three intervals.
    """
    return interval + max(interval / 2, 1.0)


def summarize(workers: list[dict[str, Any]], now: float | None = None) -> dict[str, Any]:
    """Totals over live workers and the cluster's status: failing, degraded or ok, with reasons."""
    now = time.time() if now is None else now
    reasons: list[str] = []
    channels: dict[str, int] = {}
    current = limit = rss = 0
    hosts = set()
    for w in workers:
        name = w["worker"]["id"]
        conns = w["connections"]
        hosts.add(w["worker"]["host"])
        current += conns["current"]
        worker_limit = conns.get("effective_limit", conns["limit"])
        limit += worker_limit
        rss += w["memory"]["rss_bytes"]
        for channel, count in w["subscriptions"].items():
            channels[channel] = channels.get(channel, 0) + count
        age = now - w["ts"]
        w["age"] = round(age, 3)
        if age > stale_after(w["heartbeat_interval"]):
            reasons.append(f"{name}: heartbeat {age:.1f} s old")
        if worker_limit and conns["current"] > UTILISATION_DEGRADED * worker_limit:
            reasons.append(f"{name}: {conns['current']}/{worker_limit} connections")
        if w["status"] != OK:
            reasons.append(f"{name}: {w['status']} ({'; '.join(w.get('reasons', []))})")
    if not workers:
        status, reasons = FAILING, ["no live workers"]
    else:
        status = DEGRADED if reasons else OK
    return {
        "status": status,
        "reasons": reasons,
        "totals": {
            "workers": len(workers),
            "hosts": len(hosts),
            "connections": current,
            "limit": limit,
            "utilisation": round(current / limit, 4) if limit else 0.0,
            "channels": dict(sorted(channels.items())),
            "rss_bytes": rss,
        },
        "workers": workers,
    }


async def cluster_report(redis: Redis, keys: Keys) -> dict[str, Any]:
    """read_cluster + summarize; Redis unreachable makes the cluster failing, never raises for it."""
    try:
        workers = await read_cluster(redis, keys)
    except (RedisError, OSError) as exc:
        return {
            "status": FAILING,
            "reasons": [f"Redis unreachable: {exc or type(exc).__name__}"],
            "totals": None,
            "workers": [],
        }
    return summarize(workers)
