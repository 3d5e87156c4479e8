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
from typing import Any, ClassVar

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect

from scripts.redis_server import free_port
from scripts.service_process import ServiceError, ServiceProcess
from service.outbound import Message, Owner

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "test-admin"  # every test service's ADMIN_TOKEN; Service.get sends it for the health paths


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

    def __init__(
        self,
        redis_url: str,
        workers: int = 2,
        prefix: str | None = None,
        preexec_fn: Callable[[], None] | None = None,
        **settings: Any,
    ) -> None:
        self.port = free_port()
        # Run in the service's process before gunicorn starts (e.g. resource limits).
        self.preexec_fn = preexec_fn
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
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "GRACEFUL_TIMEOUT": "5",
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        }
        self.env.update({k.upper(): str(v) for k, v in settings.items()})
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_base = f"ws://127.0.0.1:{self.port}"
        self._service: ServiceProcess | None = None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._service.process if self._service is not None else None

    def start(self, wait: bool = True) -> Service:
        # gunicorn makes and removes its own metrics directory, as deployed: the session's
        # leftover check catches it if it ever stays behind.
        self._service = ServiceProcess(
            self.env, log_path=self.log_path, cwd=ROOT, own_metrics_dir=False, preexec_fn=self.preexec_fn
        ).start()
        if wait:
            self.wait_ready()
        return self

    def heartbeats(self) -> list[dict[str, Any]]:
        return self._service.heartbeats() if self._service is not None else []

    def worker_pids(self) -> set[int]:
        return self._service.worker_pids() if self._service is not None else set()

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self._service is not None, "start() first"
        try:
            self._service.wait_ready(timeout)
        except ServiceError as exc:
            raise AssertionError(f"{self.workers} workers connected to Redis: {exc}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int | None:
        service, self._service = self._service, None
        return service.stop(timeout) if service is not None else None

    def get(self, path: str, admin: bool = True) -> httpx.Response:
        """GET ``path``; the health paths with the admin token (their full documents) unless ``admin`` is False."""
        headers = {}
        token = self.env.get("ADMIN_TOKEN", "")
        if admin and token and path.split("?")[0] in ("/health", "/health/cluster"):
            headers["Authorization"] = f"Bearer {token}"
        return httpx.get(self.base + path, timeout=10, headers=headers)

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


async def recv_publication(ws: ClientConnection, timeout: float = 5.0) -> Any:
    """The next frame, a publication: its offset and epoch checked and left out, for comparing."""
    frame = await recv_json(ws, timeout)
    assert isinstance(frame, dict) and "op" not in frame, frame
    if "offset" in frame:  # absent only for frames PUBLISHed raw, bypassing the publish function
        assert isinstance(frame.pop("offset"), int) and isinstance(frame.pop("epoch"), str), frame
    return frame


def check_ack(frame: Any, channel: str) -> dict[str, Any]:
    """``frame`` is the ``subscribed`` ack of ``channel``, with its position (offset and epoch)."""
    assert isinstance(frame, dict) and frame.get("op") == "subscribed" and frame.get("channel") == channel, frame
    assert isinstance(frame.get("offset"), int) and frame["offset"] >= 0, frame
    assert isinstance(frame.get("epoch"), str) and frame["epoch"], frame
    return frame


async def recv_ack(ws: ClientConnection, channel: str, timeout: float = 5.0) -> dict[str, Any]:
    """The next frame, the ``subscribed`` ack of ``channel``."""
    return check_ack(await recv_json(ws, timeout), channel)


async def recv_acks(ws: ClientConnection, names: list[str], timeout: float = 5.0) -> dict[str, dict[str, Any]]:
    """The ``subscribed`` acks of ``names``, in whatever order they come (each channel joins on its own)."""
    acks = [await recv_json(ws, timeout) for _ in names]
    by_channel = {a.get("channel"): a for a in acks}
    return {name: check_ack(by_channel.get(name), name) for name in names}


async def subscribe_client(service: Service, channels: str) -> ClientConnection:
    """Connect with ``?channels=`` and wait for every subscribed ack."""
    ws = await service.connect(f"?channels={channels}")
    await recv_acks(ws, channels.split(","))
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


class Recorder:
    """An outbound path that keeps what the hub offers it, for tests of the hub and recovery."""

    direct: ClassVar[bool] = False

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.owner: Owner | None = None

    def offer(self, message: Message) -> None:
        self.messages.append(message)

    def depth(self) -> tuple[int, int]:
        return 0, 0

    def frames(self) -> list[Any]:
        return [orjson.loads(text) for m in self.messages for text in m.texts]

    def seen(self) -> list[Any]:
        """Each frame as its offset, or ("gap", offset, epoch)."""
        return [("gap", f["offset"], f["epoch"]) if f.get("op") == "gap" else f["offset"] for f in self.frames()]


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
