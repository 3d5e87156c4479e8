"""Cluster health: heartbeats in Redis, ``scripts/health`` and ``GET /health/cluster``, over real instances.

Two gunicorn instances on two ports (standing for two hosts; both run on this machine, so the
report counts one host) share one private Redis and one REDIS_PREFIX.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection

from scripts.redis_server import PrivateRedis, free_port
from service import health
from tests.support.clients import subscribe_client, worker_of
from tests.support.commands import run_health
from tests.support.servers import ROOT, Service
from tests.support.waits import wait_until

INTERVAL = 0.5  # HEARTBEAT_INTERVAL that tests.support.servers.Service sets


def health_json(redis_url: str, prefix: str) -> tuple[int, dict[str, Any]]:
    done = run_health(redis_url, prefix, "--json")
    assert done.stderr == "", done.stderr
    assert done.stdout.count("\n") == 1, "one JSON document, on one line"
    doc = orjson.loads(done.stdout)
    assert done.returncode == health.EXIT_CODES[doc["status"]], (done.returncode, doc["status"], doc["reasons"])
    return done.returncode, doc


def cluster_http(svc: Service) -> dict[str, Any]:
    response = svc.get("/health/cluster")
    doc: dict[str, Any] = response.json()
    assert response.status_code == (503 if doc["status"] == health.FAILING else 200)
    return doc


def per_worker(doc: dict[str, Any]) -> dict[str, int]:
    return {w["worker"]["id"]: w["connections"]["current"] for w in doc["workers"]}


def pids(doc: dict[str, Any]) -> set[int]:
    return {w["worker"]["pid"] for w in doc["workers"]}


@pytest.fixture(scope="module")
def cluster(redis_server: PrivateRedis) -> Iterator[tuple[Service, Service]]:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    with Service(redis_server.url, prefix=prefix) as a, Service(redis_server.url, prefix=prefix) as b:
        yield a, b


async def _close(clients: list[ClientConnection]) -> None:
    await asyncio.gather(*(ws.close() for ws in clients))


async def test_script_and_endpoint_report_exact_totals_of_two_instances(cluster: tuple[Service, Service]) -> None:
    a, b = cluster
    plan = [(a, "a", 3), (a, "a,b", 2), (b, "b", 2), (b, "c", 1), (b, "a,c", 2)]
    clients: list[ClientConnection] = []
    for svc, channels, count in plan:
        clients += [await subscribe_client(svc, channels) for _ in range(count)]
    held = dict(Counter(worker_of(ws) for ws in clients))
    expected_channels = {"a": 7, "b": 4, "c": 3}
    try:
        # Heartbeats are periodic: wait for one round that includes every client, then read exactly.
        wait_until(lambda: cluster_http(b)["totals"]["connections"] == 10, 20, 0.1, "10 connections in /health/cluster")
        _, doc = wait_until(lambda: (r := health_json(a.redis_url, a.prefix))[0] == 0 and r, 20, 0.2, "exit 0")
        for report in (doc, cluster_http(a)):
            totals = report["totals"]
            assert report["status"] == "ok", report["reasons"]
            assert totals["workers"] == 4
            assert totals["hosts"] == 1  # both instances run on this machine
            assert totals["connections"] == 10
            assert totals["channels"] == expected_channels
            assert totals["limit"] == sum(w["connections"]["effective_limit"] for w in report["workers"])
            assert totals["utilisation"] == round(10 / totals["limit"], 4)
            assert totals["rss_bytes"] == sum(w["memory"]["rss_bytes"] for w in report["workers"]) > 0
            assert pids(report) == a.worker_pids() | b.worker_pids()
            # Exact per worker too: each worker reports the clients that the handshake says it holds.
            assert {k: v for k, v in per_worker(report).items() if v} == held

        text = run_health(a.redis_url, a.prefix)
        assert text.returncode == 0, text.stdout + text.stderr
        out = text.stdout
        assert out.splitlines()[1].split()[:4] == ["WORKER", "STATUS", "AGE", "CONNS"]
        for w in doc["workers"]:
            row = next(line for line in out.splitlines() if line.startswith(w["worker"]["id"] + " "))
            assert row.split()[1:2] == ["ok"] and row.split()[3] == str(w["connections"]["current"])
        assert f"workers 4 on 1 host · connections 10 of {doc['totals']['limit']} " in out
        assert "channels: a 7 · b 4 · c 3" in out
        assert "status: ok" in out
    finally:
        await _close(clients)
    wait_until(lambda: cluster_http(a)["totals"]["connections"] == 0, 20, 0.1, "connections back to 0")


def test_a_late_heartbeat_makes_the_cluster_degraded(cluster: tuple[Service, Service]) -> None:
    a, _ = cluster
    workers = wait_until(lambda: (d := cluster_http(a))["status"] == "ok" and d["workers"], 20, 0.1, "status ok")
    ts = max(w["ts"] for w in workers)
    assert health.summarize(workers, now=ts + INTERVAL)["status"] == "ok"
    late = health.summarize(workers, now=ts + health.stale_after(INTERVAL) + 0.1)
    assert late["status"] == "degraded"
    assert all("heartbeat" in reason and "s old" in reason for reason in late["reasons"]), late["reasons"]
    assert health.summarize([])["status"] == "failing"


async def test_sigkilled_worker_leaves_the_report_within_three_intervals(cluster: tuple[Service, Service]) -> None:
    a, b = cluster
    clients: list[ClientConnection] = []
    for _ in range(200):
        clients.append(await subscribe_client(a, "k"))
        if len(clients) >= 5 and len({worker_of(ws) for ws in clients}) == 2:
            break
    held = Counter(worker_of(ws) for ws in clients)
    assert len(held) == 2, "200 clients all landed on one worker"
    victim_id, victim_held = held.most_common(1)[0]
    victim = int(victim_id.rsplit(":", 1)[1])
    before = a.worker_pids() | b.worker_pids()
    try:
        wait_until(lambda: cluster_http(b)["totals"]["connections"] == len(clients), 20, 0.1, "clients counted")
        assert victim in pids(cluster_http(b))

        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: victim not in pids(cluster_http(b)), 10, 0.02, f"killed worker {victim} gone")
        gone_after = time.monotonic() - killed_at
        print(f"\nSIGKILLed worker left the report after {gone_after:.2f} s (3 intervals = {3 * INTERVAL:.1f} s)")
        # The TTL is 3 intervals from the last beat, itself at most one interval before the kill;
        # the 1 s allowance is for this poll on a loaded machine, not for the TTL.
        assert gone_after <= 3 * INTERVAL + 1.0

        def replaced() -> bool:
            now = a.worker_pids() | b.worker_pids()
            return len(now) == 4 and victim not in now and pids(cluster_http(b)) == now

        wait_until(replaced, 20, 0.1, "gunicorn's replacement worker in the report")
        _, doc = health_json(a.redis_url, a.prefix)
        assert doc["totals"]["workers"] == 4
        assert doc["totals"]["connections"] == len(clients) - victim_held
        assert doc["totals"]["channels"] == {"k": len(clients) - victim_held}
        assert len(pids(doc) - before) == 1  # the replacement, holding nothing yet
        assert per_worker(doc)[next(w["worker"]["id"] for w in doc["workers"] if w["worker"]["pid"] not in before)] == 0
    finally:
        await _close(clients)
    wait_until(lambda: cluster_http(b)["totals"]["connections"] == 0, 20, 0.1, "connections back to 0")


async def test_graceful_stop_removes_its_workers_at_once(cluster: tuple[Service, Service]) -> None:
    a, _ = cluster
    c = Service(a.redis_url, workers=2, prefix=a.prefix).start()
    try:
        clients = [await subscribe_client(c, "g") for _ in range(3)]
        c_pids = c.worker_pids()
        wait_until(lambda: (d := cluster_http(a))["totals"]["workers"] == 6 and d["totals"]["connections"] == 3,
                   20, 0.1, "6 workers and 3 connections")
        assert c.stop() == 0
        # No waiting: each worker deleted its key on the way out, before gunicorn's master exited.
        _, doc = health_json(a.redis_url, a.prefix)
        assert pids(doc).isdisjoint(c_pids)
        assert doc["totals"]["workers"] == 4
        assert doc["totals"]["connections"] == 0
        assert "g" not in doc["totals"]["channels"]
        await _close(clients)
    finally:
        c.stop()
        c.log_path.unlink(missing_ok=True)


async def test_degraded_when_a_worker_is_above_90_percent_of_its_limit(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=1, max_connections=2) as svc:
        clients = [await subscribe_client(svc, "d") for _ in range(2)]
        try:
            rc, doc = wait_until(lambda: (r := health_json(svc.redis_url, svc.prefix))[1]["totals"]["connections"] == 2
                                 and r, 20, 0.2, "2 connections reported")
            assert rc == 1 and doc["status"] == "degraded"
            assert any(reason.endswith(": 2/2 connections") for reason in doc["reasons"]), doc["reasons"]
            assert cluster_http(svc)["status"] == "degraded"  # still 200: degraded is not failing
            text = run_health(svc.redis_url, svc.prefix)
            assert text.returncode == 1
            assert "status: degraded: " in text.stdout and "2/2 connections" in text.stdout
        finally:
            await _close(clients)


def test_failing_without_workers_or_without_redis(own_redis: PrivateRedis) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    rc, doc = health_json(own_redis.url, prefix)
    assert (rc, doc["status"], doc["reasons"]) == (2, "failing", ["no live workers"])

    with Service(own_redis.url, workers=1, prefix=prefix) as svc:
        own_redis.stop()
        response = svc.get("/health/cluster")
        assert response.status_code == 503
        assert response.json()["reasons"][0].startswith("Redis unreachable: ")
    for url in (own_redis.url, f"redis://127.0.0.1:{free_port()}/0"):
        started = time.monotonic()
        done = run_health(url, prefix)
        elapsed = time.monotonic() - started
        assert done.returncode == 2
        assert done.stdout == ""
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert done.stderr.startswith("health: failing: Redis unreachable: "), done.stderr
        assert elapsed < 10, f"took {elapsed:.1f} s"
        rc, doc = health_json(url, prefix)
        assert rc == 2 and doc["totals"] is None and doc["reasons"][0].startswith("Redis unreachable: ")


def test_invalid_settings_are_one_line_and_exit_2(redis_server: PrivateRedis) -> None:
    for env_url, args in (("http://example.com", ()), (redis_server.url, ("--redis-url", "redis://127.0.0.1:x/0"))):
        done = run_health(env_url, "ok:", *args)
        assert done.returncode == 2
        assert done.stderr.startswith("health: invalid setting: ") and done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr
    done = run_health(redis_server.url, "bad prefix")
    assert done.returncode == 2 and done.stderr.startswith("health: invalid setting: REDIS_PREFIX=")


def test_watch_refreshes_until_interrupted(redis_server: PrivateRedis) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    env = {**os.environ, "REDIS_URL": redis_server.url, "REDIS_PREFIX": prefix}
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.health", "--json", "--watch", "0.1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        docs = [orjson.loads(proc.stdout.readline()) for _ in range(3)]  # blocks until each refresh
        assert [d["status"] for d in docs] == ["failing"] * 3
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert proc.returncode == 2  # the last report's status: no live workers under this prefix


def test_a_heartbeat_follows_a_status_change_without_waiting_an_interval(redis_server: PrivateRedis) -> None:
    # The first heartbeat is written before the pub/sub listener is up (status failing); with a
    # 20 s interval, the cluster would read "failing" for 20 s if the next beat waited for it.
    service = Service(redis_server.url, workers=1, heartbeat_interval=20).start(wait=False)
    try:
        started = time.monotonic()
        service.wait_ready(timeout=10)
        assert time.monotonic() - started < 10
        (beat,) = service.heartbeats()
        assert beat["status"] == "ok" and beat["redis"]["connected"]
    finally:
        service.stop()
