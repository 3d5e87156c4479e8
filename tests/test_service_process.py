"""scripts/service_process: ready on the workers' heartbeats, stopped within its bound."""

from __future__ import annotations

import functools
import os
import signal
import time
import uuid
from pathlib import Path

import psutil
import redis

from scripts.redis_server import PrivateRedis, free_port
from scripts.service_process import ServiceProcess, web_env
from tests.support.waits import process_gone, wait_until


def _service(tmp_path: Path, redis_url: str, prefix: str) -> ServiceProcess:
    settings = {"HEARTBEAT_INTERVAL": "0.5"}
    env = web_env(port=free_port(), workers=2, redis_url=redis_url, prefix=prefix, settings=settings)
    return ServiceProcess(env, log_path=tmp_path / "web.log")


def test_other_keys_beside_the_heartbeats_do_not_stop_readiness(tmp_path: Path, redis_server: PrivateRedis) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(redis_server.url)
    client.set(f"{prefix}worker:not-json", b"\x00garbage", ex=60)
    client.set(f"{prefix}worker:not-a-worker", b'{"worker": "x"}', ex=60)
    client.close()
    service = _service(tmp_path, redis_server.url, prefix).start()
    try:
        service.wait_ready(60)
        assert {beat["worker"]["pid"] for beat in service.heartbeats()} == service.worker_pids()
    finally:
        assert service.stop(15) == 0
    assert service.metrics_dir is None


def test_a_hung_master_is_killed_with_its_workers_within_the_bound(tmp_path: Path, redis_server: PrivateRedis) -> None:
    service = _service(tmp_path, redis_server.url, f"t{uuid.uuid4().hex[:8]}:").start()
    service.wait_ready(60)
    assert service.pid is not None and service.metrics_dir is not None
    metrics_dir = service.metrics_dir
    processes = [psutil.Process(service.pid), *service.worker_processes()]
    os.kill(service.pid, signal.SIGSTOP)
    started = time.monotonic()
    assert service.stop(2) == -signal.SIGKILL
    assert time.monotonic() - started < 15
    for proc in processes:
        wait_until(functools.partial(process_gone, proc), 10, what=f"{proc.pid} to be gone")
    assert not metrics_dir.exists()
