"""Memory awareness: the cgroup reader, the limit's source, pressure alerts and the limit memory allows.

A real worker gives most of a crowd's memory back within 5 s of its close (the allocator and the
trims after a departure).

The pressure and recovery cycle runs twice: in a real gunicorn worker whose MEMORY_LIMIT is below
its own RSS (degraded, 503 with the memory reason, one warning, the metrics), and in this process
on a MemoryMonitor that reads this process's real RSS while the test allocates and frees memory
(settings are environment-only, so a running worker cannot be given a new limit).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import psutil
import pytest
from websockets.exceptions import InvalidStatus

from scripts.load.rawclient import Clients
from scripts.redis_server import PrivateRedis
from service import allocator
from service.config import Settings
from service.memory import (
    DEFAULT_PER_CONNECTION,
    MEASURE_FROM,
    TRIM_AGAIN_AFTER,
    MemoryMonitor,
    cgroup_limit,
    detect_limit,
)
from service.tracker import Tracker
from tests.support.metrics import scrape
from tests.support.servers import Service
from tests.support.waits import async_wait_until, wait_until

MiB = 1024 * 1024
V1_UNLIMITED = "9223372036854771712\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --- the cgroup reader ---------------------------------------------------------------------------


def test_cgroup_v2_takes_the_tightest_limit_up_the_tree(tmp_path: Path) -> None:
    proc = tmp_path / "proc-cgroup"
    _write(proc, "0::/kubepods.slice/pod1.slice/app.scope\n")
    root = tmp_path / "cgroup"
    _write(root / "kubepods.slice/pod1.slice/app.scope/memory.max", "max\n")
    _write(root / "kubepods.slice/pod1.slice/memory.max", "536870912\n")
    _write(root / "kubepods.slice/memory.max", "1073741824\n")
    assert cgroup_limit(root, proc) == 512 * MiB
    _write(root / "kubepods.slice/pod1.slice/app.scope/memory.max", "268435456\n")
    assert cgroup_limit(root, proc) == 256 * MiB


def test_cgroup_v2_unlimited_and_container_root(tmp_path: Path) -> None:
    proc = tmp_path / "proc-cgroup"
    root = tmp_path / "cgroup"
    _write(proc, "0::/user.slice/session.scope\n")
    _write(root / "user.slice/session.scope/memory.max", "max\n")
    assert cgroup_limit(root, proc) is None
    # A container without a cgroup namespace: /proc names the host's path, but the container's
    # own cgroup is mounted at the root.
    _write(proc, "0::/docker/0123abcd\n")
    _write(root / "memory.max", "104857600\n")
    assert cgroup_limit(root, proc) == 100 * MiB


def test_cgroup_v1_and_hybrid_hosts(tmp_path: Path) -> None:
    proc = tmp_path / "proc-cgroup"
    root = tmp_path / "cgroup"
    _write(proc, "12:pids:/docker/abc\n4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    _write(root / "memory/memory.limit_in_bytes", V1_UNLIMITED)
    _write(root / "memory/docker/memory.limit_in_bytes", V1_UNLIMITED)
    _write(root / "memory/docker/abc/memory.limit_in_bytes", "209715200\n")
    assert cgroup_limit(root, proc) == 200 * MiB
    # Hybrid (this machine's layout): v1 owns the memory controller even though a 0:: line exists;
    # a memory.max at the v2 root must not be read.
    _write(proc, "4:memory:/docker/abc\n0::/\n")
    _write(root / "memory.max", "1048576\n")
    assert cgroup_limit(root, proc) == 200 * MiB
    _write(root / "memory/docker/abc/memory.limit_in_bytes", V1_UNLIMITED)
    assert cgroup_limit(root, proc) is None


def test_no_cgroup_file_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_limit(tmp_path / "cgroup", tmp_path / "missing") is None
    _write(tmp_path / "proc-cgroup", "0::/a\n")
    _write(tmp_path / "cgroup/a/memory.max", "garbage\n")
    assert cgroup_limit(tmp_path / "cgroup", tmp_path / "proc-cgroup") is None


def test_the_limit_comes_from_memory_limit_else_cgroup_else_ram(tmp_path: Path) -> None:
    proc, root = tmp_path / "proc-cgroup", tmp_path / "cgroup"
    _write(proc, "0::/app\n")
    _write(root / "app/memory.max", str(1024 * MiB))
    ram = psutil.virtual_memory().total
    assert detect_limit(Settings(memory_limit=300 * MiB, web_concurrency=4), root, proc) == (300 * MiB, "MEMORY_LIMIT")
    assert detect_limit(Settings(web_concurrency=4), root, proc) == (256 * MiB, "cgroup / 4 workers")
    # A cgroup limit above the machine's RAM cannot be reached: RAM is the limit.
    _write(root / "app/memory.max", str(ram * 2))
    assert detect_limit(Settings(web_concurrency=2), root, proc) == (ram // 2, "host RAM / 2 workers")
    assert detect_limit(Settings(web_concurrency=3), tmp_path / "none", tmp_path / "none") == (
        ram // 3,
        "host RAM / 3 workers",
    )


# --- the monitor, in this process on its real RSS -------------------------------------------------


def _touched(nbytes: int) -> bytes:
    # bytes * n writes every page, so the allocation is resident (a zeroed bytearray may not be).
    return b"\x01" * nbytes


def _pressure_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "wsbroadcast.memory" and r.levelno == logging.WARNING]


def test_pressure_is_alerted_once_and_recovers_when_memory_is_freed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wsbroadcast.memory")
    rss = psutil.Process().memory_info().rss
    # The high watermark sits 60 MiB above the current RSS: 120 MiB more crosses it.
    settings = Settings(memory_limit=int((rss + 60 * MiB) / 0.8), memory_high_watermark=0.8)
    tracker = Tracker(5000, 900.0, lambda _channel: 0.0)
    monitor = MemoryMonitor(settings, tracker)
    monitor.check()
    assert not monitor.pressure and tracker.refusal() is None

    blob = _touched(120 * MiB)
    for _ in range(3):
        monitor.check()  # checks while above the watermark: one alert, not one per check
    assert monitor.pressure and tracker.memory_pressure
    assert tracker.refusal() == "memory"
    assert tracker.counters.memory_alerts == 1
    lines = _pressure_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith("memory pressure: RSS") and "MEMORY_LIMIT" in lines[0]
    assert monitor.stats()["pressure"] is True

    del blob  # a large allocation goes back to the OS when freed: RSS falls by ~120 MiB
    for _ in range(3):
        monitor.check()
    assert not monitor.pressure and not tracker.memory_pressure
    assert tracker.refusal() is None
    lines = _pressure_lines(caplog)
    assert len(lines) == 2 and lines[1].startswith("memory pressure over")
    assert tracker.counters.memory_alerts == 1


def test_raising_the_limit_recovers_only_below_the_hysteresis_band(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wsbroadcast.memory")
    rss = psutil.Process().memory_info().rss
    tracker = Tracker(5000, 900.0, lambda _channel: 0.0)
    monitor = MemoryMonitor(Settings(memory_limit=int(rss / 0.8 * 0.9)), tracker)
    monitor.check()  # RSS ~11% over the watermark
    assert monitor.pressure and tracker.refusal() == "memory"
    # The limit raised so that RSS is ~2.5% under the watermark: inside the 5% band, still pressure.
    monitor.limit = int(rss / 0.8 / 0.975)
    monitor.check()
    assert monitor.pressure
    # Raised again, RSS ~9% under the watermark: recovered, admitting again.
    monitor.limit = int(rss / 0.8 / 0.91)
    monitor.check()
    assert not monitor.pressure and tracker.refusal() is None
    assert [line.split(":")[0] for line in _pressure_lines(caplog)] == ["memory pressure", "memory pressure over"]


def test_effective_limit_follows_the_measured_memory_per_connection() -> None:
    rss = psutil.Process().memory_info().rss
    settings = Settings(memory_limit=int((rss + 200 * MiB) / 0.8), max_connections=100000)
    tracker = Tracker(settings.max_connections, 900.0, lambda _channel: 0.0)
    monitor = MemoryMonitor(settings, tracker)
    monitor.check()  # no connections: the baseline
    room = settings.memory_limit * 0.8 - monitor.baseline
    assert tracker.effective_limit == int(room // DEFAULT_PER_CONNECTION)

    # Connections that each hold 512 KiB: the monitor measures that above the baseline.
    held = []
    for _ in range(MEASURE_FROM + 10):
        tracker.admit(lambda _why: True)
        held.append(_touched(512 * 1024))
    monitor.check()
    per_connection = monitor.per_connection()
    assert 400 * 1024 < per_connection < 700 * 1024, per_connection
    assert tracker.effective_limit == int(room // per_connection)
    assert 200 * MiB // (700 * 1024) < tracker.effective_limit < 200 * MiB // (400 * 1024)

    # MAX_CONNECTIONS still binds when it is the smaller one.
    tracker.max_connections = 100
    assert tracker.effective_limit == 100
    del held


def test_heap_is_trimmed_when_connections_leave_again_at_the_next_check_and_after_the_close_timeout() -> None:
    tracker = Tracker(1000, 900.0, lambda _channel: 0.0)
    monitor = MemoryMonitor(Settings(), tracker)
    conns = [tracker.admit(lambda _why: True) for _ in range(40)]
    monitor.check()
    assert monitor.trims == 0
    for conn in conns[:5]:  # fewer than max(10, 5% of the peak): not worth a trim yet
        tracker.remove(conn)
    monitor.check()
    assert monitor.trims == 0
    for conn in conns[5:20]:
        tracker.remove(conn)
    monitor.check()
    assert monitor.trims == 1
    monitor.check()
    assert monitor.trims == 1  # nothing more has left, and the next trim is not due yet
    # A connection leaves the tracker when its close begins; its transport is freed when its socket
    # closes, usually after that trim: the next check trims again.
    soon, late = monitor._trim_again_at
    assert soon <= time.monotonic() + TRIM_AGAIN_AFTER[0] < late
    monitor._trim_again_at[0] = time.monotonic() - 0.001
    monitor.check()
    assert monitor.trims == 2 and monitor._trim_again_at == [late]
    # Transports of clients closed while stalled are aborted up to the close timeout later; the
    # last trim is due then.
    assert late > time.monotonic() + 10
    monitor._trim_again_at[0] = time.monotonic() - 0.001
    monitor.check()
    assert monitor.trims == 3 and monitor._trim_again_at == []


# --- a real worker over its limit ----------------------------------------------------------------


async def test_a_worker_over_its_memory_limit_is_degraded_and_refuses(redis_server: PrivateRedis) -> None:
    # A worker's RSS is ~40-60 MB: a 16 MB limit puts it over the watermark from its first check.
    with Service(redis_server.url, workers=1, memory_limit=16_000_000) as svc:
        started = time.time()
        health = wait_until(lambda: (doc := svc.get("/health").json())["memory"]["pressure"] and doc, 15)
        assert health["status"] == "degraded"
        assert "memory above the high watermark" in health["reasons"]
        assert health["memory"]["limit_bytes"] == 16_000_000 and health["memory"]["limit_source"] == "MEMORY_LIMIT"
        assert health["memory"]["rss_bytes"] > 0.8 * 16_000_000
        assert health["connections"]["effective_limit"] == 0

        with pytest.raises(InvalidStatus) as refused:
            await svc.connect("?channels=news")
        response = refused.value.response
        assert response.status_code == 503
        assert response.body == b"worker is under memory pressure\n"
        assert response.headers["Retry-After"] == "5"

        # Let the worker run three more memory checks (one a second) past the crossing, judged by
        # its own heartbeat clock, then count the warnings: one for the crossing, none per check.
        wait_until(lambda: any(b["ts"] > started + 3.5 for b in svc.heartbeats()), 20, 0.1, "3 s of worker time")
        log = svc.log()
        assert log.count("memory pressure: RSS") == 1, log
        assert "memory pressure over" not in log

        [beat] = svc.heartbeats()
        assert beat["status"] == "degraded" and beat["memory"]["pressure"] is True
        assert beat["counters"]["refused_memory"] == 1
        cluster = svc.get("/health/cluster").json()
        [worker] = cluster["workers"]
        assert cluster["status"] == "degraded"
        assert any("memory above the high watermark" in reason for reason in cluster["reasons"])
        assert worker["memory"]["pressure"] is True and worker["connections"]["effective_limit"] == 0

        metrics = scrape(svc)
        pid = str(beat["worker"]["pid"])
        assert metrics[("wsbroadcast_worker_memory_pressure", (("pid", pid),))] == 1
        assert metrics[("wsbroadcast_workers_under_memory_pressure", ())] == 1
        assert metrics[("wsbroadcast_worker_memory_limit_bytes", (("pid", pid),))] == 16_000_000
        assert metrics[("wsbroadcast_worker_connections_effective_limit", (("pid", pid),))] == 0
        assert metrics[("wsbroadcast_connections_refused_total", (("reason", "memory"),))] == 1
        assert metrics[("wsbroadcast_memory_pressure_alerts_total", ())] == 1


# --- a real worker after a crowd leaves ----------------------------------------------------------


async def _connect_idle(clients: Clients, port: int, n: int) -> int:
    [reply] = await clients.connect([{"host": "127.0.0.1", "port": port, "path": "/ws?channels=news", "n": n,
                                      "rate": 2000.0, "stall": 0, "ack": True, "timeout": 15.0}])
    return int(reply.ok)


async def test_a_worker_gives_back_most_of_a_crowds_memory_within_5_s_of_its_close(
    redis_server: PrivateRedis,
) -> None:
    with Service(redis_server.url, workers=1) as svc:
        [pid] = svc.worker_pids()
        worker = psutil.Process(pid)
        clients = Clients(1)
        try:
            # A first small crowd: what its first use leaves (caches, the channel) is nobody's cost.
            assert await _connect_idle(clients, svc.port, 50) == 50
            await clients.close(timeout=10.0)
            await asyncio.sleep(1.5)
            before = worker.memory_info().rss
            assert await _connect_idle(clients, svc.port, 2500) == 2500
            await asyncio.sleep(1.0)
            peak = worker.memory_info().rss
            assert peak - before > 2 * MiB  # idle connections take memory to give back
            closed = time.monotonic()
            await clients.close(timeout=10.0)
            bound = before + 0.15 * (peak - before)  # at least 85% given back

            async def given_back() -> bool:
                return bool(worker.memory_info().rss <= bound)

            allocator = svc.get("/health").json()["memory"]["allocator"]
            what = (f"RSS back to {bound / MiB:.1f} MiB from {peak / MiB:.1f} MiB (before: {before / MiB:.1f} MiB; "
                    f"allocator {allocator})")
            await async_wait_until(given_back, 5.0 - (time.monotonic() - closed), 0.1, what)
            # Given back for good, not for a moment.
            await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - closed)))
            assert await given_back(), f"5 s after the close: {what}, now {worker.memory_info().rss / MiB:.1f} MiB"
        finally:
            clients.stop()


def test_the_allocator_is_named_and_asked_to_give_back() -> None:
    # This test process is not preloaded: glibc's allocator serves it, and trims on request.
    assert allocator.NAME == "glibc"
    assert allocator.give_back() is True
