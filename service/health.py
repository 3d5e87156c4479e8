"""The heartbeat to Redis, and the cluster aggregation.

The aggregation (``read_cluster`` + ``summarize``) is the one implementation behind both
``GET /health/cluster`` and the coordinator script ``scripts/health``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from service import codec
from service.config import Settings
from service.keys import Keys
from service.topology import Nodes, One

log = logging.getLogger("wsbroadcast.health")

OK, DEGRADED, FAILING = "ok", "degraded", "failing"
EXIT_CODES = {OK: 0, DEGRADED: 1, FAILING: 2}
UTILISATION_DEGRADED = 0.9
STATUS_POLL = 0.2  # seconds between checks for a status change between heartbeats
REMOVE_TIMEOUT = 2.0  # at shutdown, for deleting the heartbeat key
CLUSTER_TIMEOUT = 2.0  # GET /health/cluster: a Redis that does not answer within this is unreachable
INVALID_LISTED = 20  # invalid heartbeat keys named in a report; all of them are counted


def worker_identity() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()


class Heartbeat:
    """Writes the worker's stats to its key (``Keys.worker``) with a TTL of three intervals, early
    when the worker's status changes, and logs the stats line every STATS_LOG_INTERVAL."""

    def __init__(
        self,
        redis: Redis | Nodes,
        key: str,
        settings: Settings,
        doc: Callable[[], dict[str, Any]],
        status: Callable[[], tuple[str, list[str]]],
        line: Callable[[], str],
    ) -> None:
        self._nodes: Nodes = One(redis) if isinstance(redis, Redis) else redis
        self._key = key
        self._interval = settings.heartbeat_interval
        self._stats_interval = settings.stats_log_interval
        self._doc = doc
        self._status = status
        self._line = line

    async def beat(self) -> None:
        payload = codec.dumps(self._doc())
        ttl_ms = int(self._interval * 3 * 1000)
        # Bounded by the interval: against a stalled Redis the loop must go on watching the
        # status (and try again) instead of waiting for the pool's socket timeout.
        async with asyncio.timeout(self._interval):
            await self._nodes.run(self._key, lambda redis: redis.set(self._key, payload, px=ttl_ms))

    async def run(self) -> None:
        last_log = time.monotonic()
        while True:
            status = self._status()[0]
            try:
                await self.beat()
            except (RedisError, OSError) as exc:
                log.debug("heartbeat not written: %r", exc)
            now = time.monotonic()
            if now - last_log >= self._stats_interval:
                last_log = now
                log.info("%s", self._line())
            # Beat early when the status changes (Redis connects or is lost, a canary is missed,
            # memory pressure): the cluster must not read "failing" for a whole interval after a
            # worker has connected.
            steps = max(1, round(self._interval / STATUS_POLL))
            for _ in range(steps):
                await asyncio.sleep(self._interval / steps)
                if self._status()[0] != status:
                    break

    async def remove(self) -> None:
        try:
            async with asyncio.timeout(min(self._interval, REMOVE_TIMEOUT)):
                await self._nodes.run(self._key, lambda redis: redis.delete(self._key))
        except (RedisError, OSError) as exc:
            log.warning("heartbeat key %s not deleted: %r (it expires by TTL)", self._key, exc)


# --- the cluster ---------------------------------------------------------------------------------


_INT: tuple[type, ...] = (int,)
_NUMBER: tuple[type, ...] = (int, float)
# Every heartbeat field the aggregation and the coordinator's table read, with its JSON types.
# Fields a heartbeat may lack (an older worker during a rolling deploy) are checked when present.
_REQUIRED: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("worker.id", (str,)),
    ("worker.host", (str,)),
    ("worker.pid", _INT),
    ("ts", _NUMBER),
    ("heartbeat_interval", _NUMBER),
    ("status", (str,)),
    ("connections.current", _INT),
    ("connections.peak", _INT),
    ("connections.limit", _INT),
    ("memory.rss_bytes", _INT),
    ("subscriptions", (dict,)),
)
_OPTIONAL: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("connections.effective_limit", _INT),
    ("reasons", (list,)),
    ("memory.pressure", (bool,)),
    ("memory.limit_bytes", _INT),
    ("memory.usage", _NUMBER),
)
_MISSING = object()
_TYPE_NAMES = {
    int: "an integer", float: "a number", str: "a string", bool: "a boolean", dict: "an object", list: "an array"
}


def _field(doc: dict[str, Any], path: str) -> Any:
    value: Any = doc
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _type_error(path: str, value: Any, types: tuple[type, ...]) -> str | None:
    # bool is an int to Python, not to JSON.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        expected = "a number" if float in types else " or ".join(_TYPE_NAMES[t] for t in types)
        return f"{path} is {_json_type(value)}, expected {expected}"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        return f"{path} is negative"
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def check_heartbeat(key: str, raw: bytes | str, keys: Keys) -> dict[str, Any] | str:
    """The heartbeat stored under ``key``, or why it is not one this version can read."""
    try:
        doc = codec.loads(raw)
    except codec.JSONDecodeError:
        return "not JSON"
    if not isinstance(doc, dict):
        return f"{_json_type(doc)}, not a heartbeat object"
    for path, types in _REQUIRED:
        value = _field(doc, path)
        if value is _MISSING:
            return f"missing {path}"
        if (error := _type_error(path, value, types)) is not None:
            return error
    for path, types in _OPTIONAL:
        value = _field(doc, path)
        if value is not _MISSING and (error := _type_error(path, value, types)) is not None:
            return error
    if doc["status"] not in EXIT_CODES:
        return f"status {doc['status'][:32]!r} is not one of {', '.join(EXIT_CODES)}"
    if not doc["heartbeat_interval"] > 0:
        return "heartbeat_interval is not positive"
    if not all(isinstance(r, str) for r in doc.get("reasons", [])):
        return "reasons holds a non-string"
    for count in doc["subscriptions"].values():
        if (error := _type_error("a subscription count", count, _INT)) is not None:
            return error
    # A copy of another worker's heartbeat under a second key would count that worker twice.
    if key != keys.worker(doc["worker"]["host"], doc["worker"]["pid"]):
        return "worker.host and worker.pid do not match the key"
    return doc


async def read_cluster(
    redis: Redis | Sequence[Redis], keys: Keys
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Every live worker's heartbeat (SCAN, never KEYS; on a Redis Cluster, on every master), and
    the keys there that hold none.

    The second list names each invalid key and why (key names are Redis's, shown as UTF-8 with
    replacements). Raises RedisError/OSError if Redis is unreachable.
    """
    workers: list[dict[str, Any]] = []
    invalid: list[dict[str, str]] = []
    for node in [redis] if isinstance(redis, Redis) else redis:
        await _read_node(node, keys, workers, invalid)
    workers.sort(key=lambda w: (w["worker"]["host"], w["worker"]["pid"]))
    invalid.sort(key=lambda entry: entry["key"])
    return workers, invalid


async def _read_node(redis: Redis, keys: Keys, workers: list[dict[str, Any]], invalid: list[dict[str, str]]) -> None:
    found: list[bytes] = []
    async for key in redis.scan_iter(match=keys.worker_pattern(), count=500):
        found.append(key)
    absent: list[bytes] = []
    for start in range(0, len(found), 500):
        batch = found[start : start + 500]
        # GETs in a pipeline, not MGET: a cluster node refuses an MGET of keys in several slots.
        async with redis.pipeline(transaction=False) as pipe:
            for key in batch:
                pipe.get(key)
            values = await pipe.execute(raise_on_error=False)
        for key_bytes, raw in zip(batch, values, strict=True):
            key = key_bytes.decode("utf-8", "replace")
            if raw is None or isinstance(raw, Exception):
                absent.append(key_bytes)  # expired between SCAN and GET, or not a string
                continue
            checked = check_heartbeat(key, raw, keys)
            if isinstance(checked, str):
                invalid.append({"key": key, "why": checked})
            else:
                workers.append(checked)
    # GET answers nil for an expired key and an error for a key of another type: tell them apart.
    for start in range(0, len(absent), 500):
        batch_keys = absent[start : start + 500]
        async with redis.pipeline(transaction=False) as pipe:
            for key in batch_keys:
                pipe.type(key)
            types = await pipe.execute()
        for key_bytes, kind in zip(batch_keys, types, strict=True):
            name = kind.decode() if isinstance(kind, bytes) else str(kind)
            if name != "none":
                invalid.append({"key": key_bytes.decode("utf-8", "replace"), "why": f"a Redis {name}, not a string"})


def stale_after(interval: float) -> float:
    """Age at which a heartbeat counts as late: one interval plus slack.

    A fresh heartbeat is up to one interval old by design; the slack (half an interval, at least
    1 s) absorbs the write's own latency, an event loop busy for a moment, and clock skew between
    hosts (``ts`` is the worker's wall clock, compared with the reader's). A worker that stops
    beating altogether leaves the report when its key expires, at three intervals.
    """
    return interval + max(interval / 2, 1.0)


def summarize(
    workers: list[dict[str, Any]], now: float | None = None, invalid: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    """Totals over live workers and the cluster's status: failing, degraded or ok, with reasons.

    ``workers`` are heartbeats that passed ``check_heartbeat``; ``invalid`` are the keys that did not
    (counted, the first INVALID_LISTED named). An invalid key makes the cluster degraded: something
    else writes into the workers' key space, or a worker of an incompatible version runs, and
    either way the totals may be missing someone.
    """
    now = time.time() if now is None else now
    invalid = invalid or []
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
    if invalid:
        plural = "s" if len(invalid) != 1 else ""
        reasons.append(f"{len(invalid)} invalid heartbeat key{plural} (not a heartbeat this version can read)")
    if not workers:
        status, reasons = FAILING, ["no live workers", *reasons]
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
            "invalid_heartbeats": len(invalid),
        },
        "workers": workers,
        "invalid": invalid[:INVALID_LISTED],
    }


async def cluster_report(redis: Redis | Sequence[Redis], keys: Keys, timeout: float | None = None) -> dict[str, Any]:
    """read_cluster + summarize; Redis unreachable (or silent for ``timeout`` s) makes the cluster
    failing, never raises for it."""
    try:
        async with asyncio.timeout(timeout):
            workers, invalid = await read_cluster(redis, keys)
    except TimeoutError:
        return _unreachable(f"Redis unreachable: no answer within {timeout:g} s")
    except (RedisError, OSError) as exc:
        return _unreachable(f"Redis unreachable: {exc or type(exc).__name__}")
    return summarize(workers, invalid=invalid)


def _unreachable(reason: str) -> dict[str, Any]:
    return {"status": FAILING, "reasons": [reason], "totals": None, "workers": [], "invalid": []}


# --- what anyone may read -------------------------------------------------------------------------


def public_worker(doc: dict[str, Any]) -> dict[str, Any]:
    """The part of GET /health an orchestrator needs: status and capacity, no channels, no settings."""
    conns, redis, memory = doc["connections"], doc["redis"], doc["memory"]
    return {
        "status": doc["status"],
        "reasons": doc["reasons"],
        "worker": {key: doc["worker"][key] for key in ("id", "host", "pid")},
        "ts": doc["ts"],
        "connections": {key: conns[key] for key in ("current", "limit", "effective_limit")},
        "redis": {key: redis[key] for key in ("connected", "canary_ok", "canary_misses")},
        "memory": {key: memory[key] for key in ("pressure", "usage")},
    }


def public_cluster(report: dict[str, Any]) -> dict[str, Any]:
    """GET /health/cluster for anyone: status, reasons and totals, without channels or workers."""
    totals = report["totals"]
    if totals is not None:
        totals = {key: value for key, value in totals.items() if key != "channels"}
    return {"status": report["status"], "reasons": report["reasons"], "totals": totals}
