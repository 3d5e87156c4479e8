"""One way to start the service and know it serves: the Procfile's web line under gunicorn.

Used by ``scripts/run``, the load test and the tests. The process gets its own session (a Ctrl-C
in the terminal reaches only whoever started it, which asks for a graceful stop); it is ready once
every worker has written its heartbeat to Redis (``<prefix>worker:*``) and reports Redis connected,
which is what serving needs and, unlike ``/health``'s detail, needs no credentials to read; it is
stopped by PID within a bounded wait, then killed with its whole process group.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import orjson
import psutil
import redis

from scripts.redis_server import terminate
from service.config import MULTIPROC_ENV, Settings
from service.keys import Keys

ROOT = Path(__file__).resolve().parent.parent


class ServiceError(RuntimeError):
    """The service could not be started, or exited before it was ready."""


def procfile_web(root: Path = ROOT) -> list[str]:
    """The ``web:`` command of the Procfile, split into arguments."""
    path = root / "Procfile"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ServiceError(
            f"no Procfile at {path}: starting the service needs a clone of the repository "
            "(an installed package can only drive a running service, e.g. wsbroadcast-loadtest --url)"
        ) from None
    for line in text.splitlines():
        if line.startswith("web:"):
            return shlex.split(line[4:].strip())
    raise ServiceError(f"{path} has no web: line")


def web_env(
    *, port: int, workers: int, redis_url: str, prefix: str, settings: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The web line's environment on 127.0.0.1:``port``, with this interpreter's commands first on PATH."""
    return {
        **os.environ,
        "PORT": str(port),
        "BIND_HOST": "127.0.0.1",
        "WEB_CONCURRENCY": str(workers),
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        "PATH": with_interpreter_path(os.environ.get("PATH", "")),
        **(settings or {}),
    }


def with_interpreter_path(path: str) -> str:
    """``path`` with this interpreter's bin directory first (gunicorn lives beside it in a venv)."""
    return f"{Path(sys.executable).parent}{os.pathsep}{path}" if path else str(Path(sys.executable).parent)


def port_in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails the way gunicorn's bind would (it sets SO_REUSEADDR too)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def read_heartbeats(client: redis.Redis | redis.RedisCluster, keys: Keys) -> list[dict[str, Any]]:
    """Every worker's heartbeat document under ``keys``' prefix; anything else stored there is skipped.

    A cluster client SCANs every master and GETs key by key (the keys lie in many slots).
    """
    names = list(client.scan_iter(match=keys.worker_pattern(), count=500))
    docs: list[dict[str, Any]] = []
    raws = [client.get(name) for name in names] if isinstance(client, redis.RedisCluster) else (
        client.mget(names) if names else []
    )
    for raw in raws:
        try:
            doc = orjson.loads(raw) if raw is not None else None
        except orjson.JSONDecodeError:
            continue
        if not isinstance(doc, dict):
            continue
        worker = doc.get("worker")
        if isinstance(worker, dict) and isinstance(worker.get("pid"), int) and isinstance(worker.get("host"), str):
            docs.append(doc)
    return docs


class ServiceProcess:
    """The web line of ``root``'s Procfile run in ``cwd`` with ``env`` (``WEB_CONCURRENCY``, ``REDIS_URL``,
    ``REDIS_PREFIX`` are read from it).

    ``own_metrics_dir``: make the prometheus multiprocess directory here (when ``env`` names none)
    and remove it in ``stop``, so that it goes even when gunicorn never reaches its exit hook (a
    port in use, a kill). Off, gunicorn's config makes and removes its own, as in a deployment.
    """

    def __init__(
        self, env: Mapping[str, str], *, log_path: Path | None = None, cwd: Path = ROOT, root: Path = ROOT,
        own_metrics_dir: bool = True, preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.env = dict(env)
        self.preexec_fn = preexec_fn  # run in the child before gunicorn (a test lowering a limit)
        unset = Settings()  # the defaults the service itself applies to what env leaves unset
        self.workers = int(self.env.get("WEB_CONCURRENCY") or unset.web_concurrency)
        self.redis_url = self.env.get("REDIS_URL") or unset.redis_url
        self.cluster = Settings.from_env({"REDIS_CLUSTER": self.env.get("REDIS_CLUSTER") or "0"}).redis_cluster
        self.keys = Keys(self.env.get("REDIS_PREFIX") or unset.redis_prefix)
        self.log_path = log_path
        self.cwd = cwd
        self.root = root
        self.own_metrics_dir = own_metrics_dir
        self.metrics_dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._redis: redis.Redis | redis.RedisCluster | None = None
        self.last_error: str | None = None
        self._children: dict[int, psutil.Process] = {}

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> ServiceProcess:
        args = procfile_web(self.root)
        if self.own_metrics_dir and not self.env.get(MULTIPROC_ENV):
            self.metrics_dir = Path(tempfile.mkdtemp(prefix="wsbroadcast-metrics-"))
            self.env[MULTIPROC_ENV] = str(self.metrics_dir)
        log: IO[bytes] | None = open(self.log_path, "ab") if self.log_path is not None else None
        try:
            self.process = subprocess.Popen(
                args, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True,
                stdout=log, stderr=subprocess.STDOUT if log is not None else None, preexec_fn=self.preexec_fn,
            )
        except OSError:
            self._remove_metrics_dir()
            raise
        finally:
            if log is not None:
                log.close()
        return self

    def worker_processes(self) -> list[psutil.Process]:
        """The gunicorn master's children, the same object per PID (CPU times are read from it)."""
        if self.process is None:
            return []
        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.Error:
            return []
        return [self._children.setdefault(child.pid, child) for child in children]

    def worker_pids(self) -> set[int]:
        return {proc.pid for proc in self.worker_processes()}

    def heartbeats(self) -> list[dict[str, Any]]:
        """The heartbeat documents of this instance's live workers."""
        if self._redis is None:
            kind = redis.RedisCluster if self.cluster else redis.Redis
            self._redis = kind.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=5)
        pids = self.worker_pids()
        return [doc for doc in read_heartbeats(self._redis, self.keys) if doc["worker"]["pid"] in pids]

    def ready(self) -> bool:
        """Every worker has a heartbeat and is connected to Redis; raises if the service has exited."""
        if self.process is None:
            raise ServiceError("the service was not started")
        if self.process.poll() is not None:
            raise ServiceError(f"the service exited with {self.process.returncode}{self._log_tail()}")
        try:
            beats = self.heartbeats()
        except redis.RedisError as exc:  # the service may well start before its Redis does
            self.last_error = f"Redis at {self.redis_url}: {exc}"
            return False
        self.last_error = f"{len(beats)} of {self.workers} workers have a heartbeat in {self.keys.worker_pattern()!r}"
        connected = [beat for beat in beats if beat["redis"]["connected"]]
        if len(beats) == self.workers:
            self.last_error += f", {len(connected)} connected to Redis"
        return len(beats) == self.workers and len(connected) == self.workers

    def wait_ready(
        self, timeout: float = 60.0, interval: float = 0.1, waiting: Callable[[float], None] | None = None
    ) -> None:
        """Until ``ready``; ``waiting(elapsed)`` is called about every 5 s while it is not."""
        started = time.monotonic()
        told = started
        while True:
            if self.ready():
                return
            now = time.monotonic()
            if now - started >= timeout:
                raise ServiceError(f"not ready within {timeout:.0f} s: {self.last_error}{self._log_tail()}")
            if waiting is not None and now - told >= 5.0:
                told = now
                waiting(now - started)
            time.sleep(interval)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to the master (a graceful stop); after ``timeout`` SIGKILL to its whole group.

        Returns the master's exit code (negative: the signal that ended it), None if not started.
        """
        process, self.process = self.process, None
        code: int | None = None
        try:
            if process is not None:
                code = terminate(process, timeout, group=True)
        finally:
            if self._redis is not None:
                self._redis.close()
                self._redis = None
            self._remove_metrics_dir()
        return code

    def _remove_metrics_dir(self) -> None:
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir = None

    def _log_tail(self, chars: int = 2000) -> str:
        if self.log_path is None:
            return ""
        try:
            return f"; log {self.log_path}:\n{self.log_path.read_text(errors='replace')[-chars:]}"
        except OSError:
            return ""
