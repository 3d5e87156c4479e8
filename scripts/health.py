"""The coordinator: every live worker's heartbeat across all hosts, summed.

``scripts/health [--json] [--watch N] [--redis-url URL]`` reads ``<REDIS_PREFIX>worker:*`` through
``service.health`` (the same code as ``GET /health/cluster``), prints the Redis it read (password
redacted; whether ``REDIS_URL`` was unset and the default used), a per-worker table and the
totals, and exits 0 healthy, 1 degraded, 2 failing (no live workers, Redis unreachable, invalid
settings), so it serves as-is as a health-check command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import replace
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service import codec, health
from service.config import Settings, SettingsError
from service.keys import Keys
from service.topology import Topology

# A health check must answer quickly: a Redis that does not accept within this is unreachable.
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 5.0


def _positive(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {raw!r}")
    return value


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1048576:.1f}"


def _memory_state(memory: dict[str, Any]) -> str:
    state = "PRESSURE" if memory.get("pressure") else "ok"
    limit = memory.get("limit_bytes")
    if not limit:
        return state
    return f"{state} {memory.get('usage', 0.0) * 100:.0f}% of {_mb(limit)} MB"


def redis_source(client: Redis, given: str | None) -> dict[str, str]:
    """Which Redis this run reads, as the client will connect to it (password redacted), and why that one."""
    kwargs = client.connection_pool.connection_kwargs
    user = kwargs.get("username") or ""
    secret = f"{user}:***@" if kwargs.get("password") else f"{user}@" if user else ""
    if kwargs.get("path"):
        url = f"unix://{secret}{kwargs['path']}?db={kwargs.get('db', 0)}"
    else:
        scheme = "rediss" if "SSL" in client.connection_pool.connection_class.__name__ else "redis"
        url = f"{scheme}://{secret}{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
    source = "--redis-url" if given else "REDIS_URL" if os.environ.get("REDIS_URL") else "default"
    return {"url": url, "source": source}


def _redis_line(redis: dict[str, str]) -> str:
    source = {"default": "REDIS_URL is unset: the default", "--redis-url": "from --redis-url"}.get(
        redis["source"], "from REDIS_URL"
    )
    prefix = f" · prefix {redis['prefix']}" if redis.get("prefix") else ""
    return f"redis: {redis['url']} ({source}){prefix}"


def format_report(report: dict[str, Any]) -> str:
    """The human view: one row per worker, then totals, channels and the status with its reasons."""
    totals = report["totals"]
    redis = report.get("redis")
    if totals is None:
        where = f" ({_redis_line(redis)})" if redis else ""
        return f"{report['status']}: {'; '.join(report['reasons'])}{where}"
    header = ("WORKER", "STATUS", "AGE", "CONNS", "PEAK", "LIMIT", "MAX", "UTIL", "RSS MB", "MEMORY", "CHANNELS")
    rows = [header]
    for w in report["workers"]:
        conns, memory = w["connections"], w["memory"]
        limit = conns.get("effective_limit", conns["limit"])
        rows.append((
            w["worker"]["id"],
            w["status"],
            f"{w.get('age', 0.0):.1f}s",
            str(conns["current"]),
            str(conns["peak"]),
            str(limit),
            str(conns["limit"]),
            f"{conns['current'] / limit * 100:.1f}%" if limit else "-",
            _mb(memory["rss_bytes"]),
            _memory_state(memory),
            str(len(w["subscriptions"])),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    hosts = totals["hosts"]
    lines.append("")
    lines.append(
        f"workers {totals['workers']} on {hosts} host{'s' if hosts != 1 else ''} · connections "
        f"{totals['connections']} of {totals['limit']} ({totals['utilisation'] * 100:.1f}%) · "
        f"RSS {_mb(totals['rss_bytes'])} MB"
    )
    channels = totals["channels"]
    lines.append("channels: " + (" · ".join(f"{name} {n}" for name, n in channels.items()) or "none"))
    listed = report.get("invalid", [])
    for entry in listed:
        lines.append(f"invalid heartbeat: {entry['key']!r}: {entry['why']}")
    unlisted = totals.get("invalid_heartbeats", 0) - len(listed)
    if unlisted > 0:
        lines.append(f"invalid heartbeat: {unlisted} more not listed")
    status = report["status"]
    lines.append(f"status: {status}" + (": " + "; ".join(report["reasons"]) if report["reasons"] else ""))
    return "\n".join(lines)


def _emit(report: dict[str, Any], as_json: bool, clear: bool) -> None:
    if as_json:
        print(codec.dumps(report).decode(), flush=True)
        return
    if report["totals"] is None:
        # Redis unreachable: the one-line reason, on stderr like any failure to get an answer.
        print(f"health: {format_report(report)}", file=sys.stderr, flush=True)
        return
    if clear:
        print("\x1b[H\x1b[2J", end="")
    # The first line says when and what was read: which Redis, under which prefix.
    redis = report.get("redis")
    print(time.strftime("%Y-%m-%d %H:%M:%S") + (f" · {_redis_line(redis)}" if redis else ""), flush=False)
    print(format_report(report), flush=True)
    if report["status"] == health.FAILING:
        # As for an unreachable Redis: a failing check says why in one line on stderr too.
        print(f"health: failing: {'; '.join(report['reasons'])}", file=sys.stderr, flush=True)


async def _run(redis: Redis, settings: Settings, args: argparse.Namespace, last: list[int]) -> None:
    keys = Keys(settings.redis_prefix)
    clear = args.watch is not None and not args.json and sys.stdout.isatty()
    source = {**redis_source(redis, args.redis_url), "prefix": keys.prefix}
    # A Redis Cluster: the heartbeats are spread over its masters, each SCANned.
    topology = Topology(replace(settings, redis_command_timeout=READ_TIMEOUT), "wsbroadcast-health")
    try:
        while True:
            nodes: Redis | list[Redis] = redis
            if settings.redis_cluster:
                await topology.refresh()
                nodes = [topology.redis(address) for address in topology.masters]
            report = {"redis": source, **await health.cluster_report(nodes, keys)}
            last[0] = health.EXIT_CODES[report["status"]]
            _emit(report, args.json, clear)
            if args.watch is None:
                return
            await asyncio.sleep(args.watch)
    finally:
        await topology.close()
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/health", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON document (one per refresh with --watch)")
    parser.add_argument("--watch", type=_positive, metavar="N", help="refresh every N seconds until interrupted")
    parser.add_argument("--redis-url", help="default: $REDIS_URL")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    if args.redis_url:
        env["REDIS_URL"] = args.redis_url
    try:
        settings = Settings.from_env(env)
    except SettingsError as exc:
        print(f"health: invalid setting: {exc}", file=sys.stderr)
        return health.EXIT_CODES[health.FAILING]
    try:
        # No retries: redis-py would otherwise back off and retry, and a health check must not hang.
        redis = Redis.from_url(settings.redis_url, socket_connect_timeout=CONNECT_TIMEOUT,
                               socket_timeout=READ_TIMEOUT, retry=Retry(NoBackoff(), 0))
    except ValueError as exc:
        # The URL itself may hold a password: name the problem, not the value.
        print(f"health: invalid setting: REDIS_URL is not a usable Redis URL: {exc}", file=sys.stderr)
        return health.EXIT_CODES[health.FAILING]
    last = [health.EXIT_CODES[health.FAILING]]
    try:
        asyncio.run(_run(redis, settings, args, last))
    except KeyboardInterrupt:
        pass  # --watch ends here; the exit code is the last report's
    except Exception as exc:
        # A health check answers with a status and one line, whatever it met; never a traceback.
        print(f"health: failing: {exc!r}", file=sys.stderr, flush=True)
        return health.EXIT_CODES[health.FAILING]
    return last[0]


if __name__ == "__main__":
    sys.exit(main())
