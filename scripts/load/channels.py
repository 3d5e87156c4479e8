"""The ``channels`` scenario: many channels, each with a few subscribers, on one Redis and on a
Redis Cluster (``REDIS_CLUSTER=1``, sharded pub/sub), side by side.

For each broker it starts a private Redis (or a cluster of ``--cluster-masters`` masters with
``--cluster-replicas`` replicas each) and the service (``--workers``), connects
``--subscribers-per-channel`` raw clients to each of ``--channels`` channels (one channel per
connection), then publishes ``--channel-rate`` msg/s on every channel through the publish function
(``wsb_publish`` / ``wsb_spublish``, on the node serving the channel, as the service does) for
``--duration`` s. It reports deliveries/s, latency, and each redis-server's CPU (user + system from
``/proc/<pid>/stat``) over the step and idle before it (a cluster's bus costs CPU of its own), with
the workers' and the client processes' for context.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import psutil

from scripts.load.rawclient import Clients, split
from scripts.load.scenarios import _percentile, log
from scripts.redis_cluster import PrivateCluster
from scripts.redis_server import PrivateRedis, free_port
from scripts.service_process import ServiceProcess, web_env
from service import publisher
from service.config import Settings
from service.keys import Keys
from service.topology import Topology

PUBLISHERS = 16  # publications in flight at once
IDLE_SECONDS = 5.0


@dataclass
class BrokerResult:
    broker: str
    channels: int
    subscribers: int
    rate: float  # msg/s per channel
    seconds: float = 0.0
    published: int = 0
    failed: int = 0
    publisher_behind_s: float = 0.0
    expected: int = 0
    delivered: int = 0
    deliveries_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    redis_cpu: dict[str, float] = field(default_factory=dict)  # node -> cores
    redis_cpu_total: float = 0.0
    redis_idle_cpu: dict[str, float] = field(default_factory=dict)  # node -> cores, before publishing
    redis_us_per_publication: float = 0.0
    workers_cpu: float = 0.0
    clients_cpu: float = 0.0
    other_processes_cores: float = 0.0


def add_arguments(add: Any) -> None:
    add("--channels", type=int, default=300, help="channels: channels")
    add("--subscribers-per-channel", type=int, default=10, help="channels: subscribers of each channel")
    add("--channel-rate", type=float, default=2.0, help="channels: msg/s on each channel")
    add("--cluster-masters", type=int, default=3, help="channels: masters of the cluster")
    add("--cluster-replicas", type=int, default=0, help="channels: replicas per master")
    add("--brokers", default="redis,cluster", help="channels: which brokers, in order (redis, cluster)")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` from /proc/<pid>/stat, in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    times = psutil.cpu_times()
    return float(times.user + times.system + getattr(times, "irq", 0) + getattr(times, "softirq", 0))


async def run(args: argparse.Namespace) -> list[BrokerResult]:
    results = []
    for broker in [b.strip() for b in args.brokers.split(",") if b.strip()]:
        if broker not in ("redis", "cluster"):
            raise RuntimeError(f"--brokers: unknown broker {broker!r}; expected redis or cluster")
        results.append(await _one(args, broker))
    return results


async def _one(args: argparse.Namespace, broker: str) -> BrokerResult:
    cluster = broker == "cluster"
    server: PrivateRedis | PrivateCluster = (
        PrivateCluster(args.cluster_masters, args.cluster_replicas) if cluster else PrivateRedis()
    )
    server.start()
    prefix = f"lc{uuid.uuid4().hex[:6]}:"
    extra = dict(item.split("=", 1) for item in args.env)
    env = web_env(port=free_port(), workers=args.workers, redis_url=server.url, prefix=prefix,
                  settings={**extra, "REDIS_CLUSTER": "1" if cluster else "0"})
    log_file = tempfile.NamedTemporaryFile(prefix="wsbroadcast-loadtest-", suffix=".log", delete=False)
    log_file.close()
    service = ServiceProcess(env, log_path=Path(log_file.name))
    clients: Clients | None = None
    result = BrokerResult(broker, args.channels, args.subscribers_per_channel, args.channel_rate)
    try:
        service.start()
        service.wait_ready(60)
        log(f"channels/{broker}: service ready on {env['PORT']}; connecting "
            f"{args.channels} x {args.subscribers_per_channel} clients")
        clients = Clients(args.clients)
        names = [f"c{n}" for n in range(args.channels)]
        groups = split(len(names), args.clients)
        start = 0
        for index, count in enumerate(groups):
            for name in names[start : start + count]:
                reply = await clients._call(index, "connect", {
                    "host": "127.0.0.1", "port": int(env["PORT"]), "path": f"/ws?channels={name}",
                    "n": args.subscribers_per_channel, "rate": args.connect_rate, "stall": 0, "ack": True,
                    "timeout": 30.0,
                })
                if reply.ok != args.subscribers_per_channel:
                    raise RuntimeError(f"channels/{broker}: {name}: {reply.failures}")
            start += count
        settings = replace(Settings.from_env(env), redis_pool_size=PUBLISHERS + 1)
        topology = Topology(settings, "wsbroadcast-loadtest")
        await topology.refresh()
        try:
            await _publish_round(topology, settings, names, -1, args.payload)  # warm every channel
            await asyncio.sleep(1.0)
            redis_pids = _redis_pids(server)
            worker_pids = service.worker_pids()
            # What the nodes cost with nothing published (a cluster's bus, heartbeats, canaries).
            idle_from = {node: _cpu_seconds(pid) for node, pid in redis_pids.items()}
            await asyncio.sleep(IDLE_SECONDS)
            result.redis_idle_cpu = {
                node: round((_cpu_seconds(pid) - idle_from[node]) / IDLE_SECONDS, 3) for node, pid in redis_pids.items()
            }
            before = {node: _cpu_seconds(pid) for node, pid in redis_pids.items()}
            workers_before = sum(_cpu_seconds(pid) for pid in worker_pids)
            clients_before = sum(_cpu_seconds(pid) for pid in clients.pids())
            busy_before = _busy_seconds()
            await clients.mark()
            began = time.monotonic()
            rounds = max(1, round(args.duration * args.channel_rate))
            behind = 0.0
            for seq in range(rounds):
                due = began + seq / args.channel_rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    behind = max(behind, -delay)
                ok, failed = await _publish_round(topology, settings, names, seq, args.payload)
                result.published += ok
                result.failed += failed
            # What is still on its way: wait until deliveries stop growing (bounded).
            last = -1
            for _ in range(50):
                await asyncio.sleep(0.2)
                frames = sum(p.frames for p in await clients.progress())
                if frames == last:
                    break
                last = frames
            seconds = time.monotonic() - began
            stats = await clients.stats(0, rounds)
            after = {node: _cpu_seconds(pid) for node, pid in redis_pids.items()}
            workers_cpu = sum(_cpu_seconds(pid) for pid in worker_pids) - workers_before
            clients_cpu = sum(_cpu_seconds(pid) for pid in clients.pids()) - clients_before
            busy = _busy_seconds() - busy_before
        finally:
            await topology.close()
        hist: Counter[int] = Counter()
        for s in stats:
            hist.update(s.hist)
        total = sum(hist.values())
        result.seconds = round(seconds, 2)
        result.publisher_behind_s = round(behind, 3)
        result.expected = result.published * args.subscribers_per_channel
        result.delivered = sum(s.delivered for s in stats)
        result.deliveries_per_s = round(result.delivered / seconds, 1)
        result.p50_ms = round(_percentile(hist, total, 0.50), 1)
        result.p99_ms = round(_percentile(hist, total, 0.99), 1)
        result.redis_cpu = {node: round((after[node] - before[node]) / seconds, 3) for node in before}
        result.redis_cpu_total = round(sum(result.redis_cpu.values()), 3)
        # Over what the nodes cost idle: the cost of the publications themselves.
        marginal = sum(after[n] - before[n] - result.redis_idle_cpu[n] * seconds for n in before)
        result.redis_us_per_publication = round(max(0.0, marginal) / max(1, result.published) * 1e6, 1)
        result.workers_cpu = round(workers_cpu / seconds, 3)
        result.clients_cpu = round(clients_cpu / seconds, 3)
        ours = sum(after[n] - before[n] for n in before) + workers_cpu + clients_cpu
        result.other_processes_cores = round(max(0.0, busy - ours) / seconds, 3)
        log(f"channels/{broker}: {orjson.dumps(result.__dict__).decode()}")
        return result
    finally:
        if clients is not None:
            with contextlib.suppress(Exception):
                await clients.close(5.0)
            clients.stop()
        service.stop()
        server.stop()
        os.unlink(log_file.name)


def _redis_pids(server: PrivateRedis | PrivateCluster) -> dict[str, int]:
    if isinstance(server, PrivateCluster):
        roles = server.roles()
        return {f"{role} :{node.port}": node.pid for node in server.nodes if (role := roles.get(node.port))}
    assert server.process is not None
    return {f"redis :{server.port}": server.process.pid}


async def _publish_round(
    topology: Topology, settings: Settings, names: list[str], seq: int, size: int
) -> tuple[int, int]:
    """One publication on every channel (sequence number ``seq``), PUBLISHERS at a time."""
    keys = Keys(settings.redis_prefix)
    gate = asyncio.Semaphore(PUBLISHERS)
    ok = failed = 0

    async def one(name: str) -> None:
        nonlocal ok, failed
        data: dict[str, Any] = {"s": seq, "t": time.monotonic(), "p": ""}
        pad = size - len(orjson.dumps(data))
        if pad > 0:
            data["p"] = "x" * pad
        cmd = publisher.command(settings, name, orjson.dumps(data))
        async with gate:
            try:
                await publisher.execute(topology.pool(topology.address_of(keys.meta(name))), cmd)
                ok += 1
            except publisher.PublishError:
                failed += 1

    await asyncio.gather(*(one(name) for name in names))
    return ok, failed


def table(results: list[BrokerResult]) -> str:
    rows: list[tuple[str, Callable[[BrokerResult], object]]] = [
        ("channels x subscribers, msg/s per channel", lambda r: f"{r.channels} x {r.subscribers}, {r.rate:g}"),
        ("publications (failed)", lambda r: f"{r.published} ({r.failed})"),
        ("delivered / expected", lambda r: f"{r.delivered} / {r.expected}"),
        ("deliveries/s", lambda r: f"{r.deliveries_per_s:,.0f}"),
        ("latency p50 / p99 ms", lambda r: f"{r.p50_ms} / {r.p99_ms}"),
        ("Redis CPU per node (cores)", lambda r: ", ".join(f"{n} {c}" for n, c in r.redis_cpu.items())),
        ("Redis CPU total (cores)", lambda r: f"{r.redis_cpu_total}"),
        ("Redis CPU idle, per node (cores)", lambda r: ", ".join(f"{c}" for c in r.redis_idle_cpu.values())),
        ("Redis CPU per publication, over idle", lambda r: f"{r.redis_us_per_publication} µs"),
        ("workers / clients / others (cores)",
         lambda r: f"{r.workers_cpu} / {r.clients_cpu} / {r.other_processes_cores}"),
        ("publisher behind schedule", lambda r: f"{r.publisher_behind_s} s"),
    ]
    lines = ["| figure | " + " | ".join(r.broker for r in results) + " |", "| --- |" + " --- |" * len(results)]
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(str(get(r)) for r in results) + " |")
    return "\n".join(lines)
