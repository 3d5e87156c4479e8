"""Test helpers: a real service started from the Procfile's web line, waits on conditions, clients."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis
from websockets.asyncio.client import ClientConnection, connect

from scripts.redis_server import free_port, terminate
from scripts.run import procfile_web

ROOT = Path(__file__).resolve().parent.parent


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what or condition} (last: {last!r})")


async def async_wait_until(
    condition: Callable[[], Awaitable[Any]], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await condition()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what} (last: {last!r})")


class Service:
    """One service instance: the Procfile's web line under gunicorn, on a free port, stopped by PID."""

    def __init__(self, redis_url: str, workers: int = 2, prefix: str | None = None, **settings: Any) -> None:
        self.port = free_port()
        self.workers = workers
        self.prefix = prefix or f"t{uuid.uuid4().hex[:8]}:"
        self.redis_url = redis_url
        self.log_path = Path(tempfile.mkstemp(prefix="wsbroadcast-test-", suffix=".log")[1])
        self.env = {
            **os.environ,
            "PORT": str(self.port),
            "BIND_HOST": "127.0.0.1",
            "WEB_CONCURRENCY": str(workers),
            "REDIS_URL": redis_url,
            "REDIS_PREFIX": self.prefix,
            "HEARTBEAT_INTERVAL": "0.5",
            "CANARY_INTERVAL": "0.5",
            "PUBLISH_TOKEN": "test-token",
            "GRACEFUL_TIMEOUT": "5",
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        }
        self.env.update({k.upper(): str(v) for k, v in settings.items()})
        self.process: subprocess.Popen[bytes] | None = None
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_base = f"ws://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> Service:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            procfile_web(), cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        if wait:
            self.wait_ready()
        return self

    def heartbeats(self) -> list[dict[str, Any]]:
        client = redis.Redis.from_url(self.redis_url)
        try:
            keys = list(client.scan_iter(match=f"{self.prefix}worker:*", count=500))
            docs = [orjson.loads(raw) for raw in client.mget(keys) if raw is not None] if keys else []
        finally:
            client.close()
        return [d for d in docs if d["worker"]["pid"] in self.worker_pids()]

    def worker_pids(self) -> set[int]:
        if self.process is None:
            return set()
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return {int(p) for p in out.split()}

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"service exited with {self.process.returncode}:\n{self.log()}")
            beats = self.heartbeats()
            return len(beats) == self.workers and all(b["redis"]["connected"] for b in beats)

        wait_until(ready, timeout, interval=0.1, what=f"{self.workers} workers connected to Redis")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int | None:
        process, self.process = self.process, None
        if process is None:
            return None
        return terminate(process, timeout)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.base + path, timeout=10)

    def publish(self, channel: str, data: Any, token: str = "test-token") -> httpx.Response:
        return httpx.post(
            self.base + "/publish",
            json={"channel": channel, "data": data},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )

    async def connect(self, query: str = "", **kwargs: Any) -> ClientConnection:
        return await connect(f"{self.ws_base}/ws{query}", open_timeout=10, max_size=None, **kwargs)

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> Any:
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


async def subscribe_client(service: Service, channels: str) -> ClientConnection:
    """Connect with ``?channels=`` and wait for every subscribed ack."""
    ws = await service.connect(f"?channels={channels}")
    for name in channels.split(","):
        assert await recv_json(ws) == {"op": "subscribed", "channel": name}
    return ws


def worker_of(ws: ClientConnection) -> str:
    assert ws.response is not None
    return str(ws.response.headers["x-wsbroadcast-worker"])


async def clients_on_both_workers(service: Service, channels: str, minimum: int = 6) -> list[ClientConnection]:
    """Connect subscribed clients until at least ``minimum`` are open and both workers hold some."""
    clients = []
    for _ in range(200):
        clients.append(await subscribe_client(service, channels))
        if len(clients) >= minimum and len({worker_of(ws) for ws in clients}) == 2:
            return clients
    raise AssertionError("200 clients all landed on one worker")


class SteadyPublisher(threading.Thread):
    """Publishes 0, 1, 2, ... on a channel every ``interval`` until stopped; a failed publish is retried."""

    def __init__(self, service: Service, channel: str, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.service, self.channel, self.interval = service, channel, interval
        self.published: list[int] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        seq = 0
        while not self.stopping.wait(self.interval):
            # A new connection each time: a kept-alive one to a worker that is shutting down would
            # stall the publisher for just the moments the test is about.
            try:
                response = httpx.post(
                    self.service.base + "/publish",
                    json={"channel": self.channel, "data": seq},
                    headers={"Authorization": "Bearer test-token"},
                    timeout=10,
                )
            except httpx.HTTPError:
                continue
            if response.status_code == 202:
                self.published.append(seq)
                seq += 1

    def stop(self) -> list[int]:
        self.stopping.set()
        self.join(30)
        return self.published


def reload_workers(service: Service) -> None:
    """SIGHUP: gunicorn starts new workers and stops every old one (close 1012)."""
    assert service.process is not None
    old = service.worker_pids()
    os.kill(service.process.pid, signal.SIGHUP)
    wait_until(
        lambda: (pids := service.worker_pids()) and not pids & old and len(pids) == service.workers,
        60,
        interval=0.1,
        what="every worker replaced",
    )
    service.wait_ready(60)
