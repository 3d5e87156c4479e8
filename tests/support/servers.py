"""A real service: the Procfile's web line under gunicorn on a free port, stopped by its PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from scripts.redis_server import free_port
from scripts.service_process import ServiceError, ServiceProcess
from tests.support.waits import wait_until

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "test-admin"  # every test service's ADMIN_TOKEN; Service.get sends it for the health paths


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
            try:
                self.wait_ready()
            except BaseException:
                # ``with`` never reaches __exit__ when __enter__ raises: stop what was started.
                self.stop()
                raise
        return self

    def heartbeats(self) -> list[dict[str, Any]]:
        return self._service.heartbeats() if self._service is not None else []

    def connections(self) -> int:
        """The connections every worker holds, as their latest heartbeats say."""
        return sum(beat["connections"]["current"] for beat in self.heartbeats())

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
