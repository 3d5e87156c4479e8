"""What is measured: a server, what it can report besides its sockets, and its worker processes.

A target's capabilities are attributes: whether it confirms subscriptions, whether it serves
wsbroadcast's /metrics fan-out histogram, whether its workers write heartbeats to Redis (their
counters, and how ``--url`` mode finds them). Starting a server needs a clone of the repository
(the Procfile, the baseline app); driving a running one (``--url``) works from anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

from scripts.redis_server import free_port, terminate
from scripts.service_process import ROOT, ServiceProcess, read_heartbeats, web_env
from service.config import Settings
from service.keys import Keys

CHANNEL = "bench"
BASELINE_APP = ROOT / "benchmarks" / "broadcaster_app.py"
BASELINE_VENV = ROOT / ".venv-baseline"
BASELINE_PINS = (
    "broadcaster==0.3.1",
    "redis==7.4.*",
    "starlette",
    "uvicorn[standard]",
    "gunicorn",
    "uvicorn-worker",
)
NODE_APP = ROOT / "benchmarks" / "node_ws"


# The kernel's TCP states as /proc/net/tcp writes them.
_ESTABLISHED, _LISTEN = "01", "0A"


def _tcp_sockets(port: int) -> list[tuple[str, tuple[int, int]]]:
    """The TCP sockets bound locally to ``port`` (IPv4 and IPv6): (state, (send queue, receive queue))."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if int(parts[1].rsplit(":", 1)[1], 16) == port:
                tx, rx = parts[4].split(":")
                found.append((parts[3], (int(tx, 16), int(rx, 16))))
    return found


@dataclass
class Target:
    name: str
    host: str
    port: int
    redis_url: str
    redis_channel: str
    acks_subscriptions: bool  # the server confirms each subscription with a control frame
    fanout_histogram: bool  # /metrics has wsbroadcast_fanout_latency_seconds
    heartbeat_prefix: str | None  # its workers write heartbeats (with their counters) under this prefix
    # The service's history settings and prefix, as its publishers use them (None: no publish function).
    settings: Settings | None = None
    publish_via: str = "publish"  # how the load is published: "function" (wsb_publish) or plain "publish"
    master: int | None = None
    log_path: Path | None = None
    service: ServiceProcess | None = None
    process: subprocess.Popen[bytes] | None = None
    _procs: dict[int, psutil.Process] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return f"/ws?channels={CHANNEL}"

    @property
    def http(self) -> str:
        return f"http://{self.host}:{self.port}"

    def heartbeats(self) -> list[dict[str, Any]]:
        if self.heartbeat_prefix is None:
            return []
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=5)
        try:
            return read_heartbeats(client, Keys(self.heartbeat_prefix))
        except redis.RedisError:
            return []
        finally:
            client.close()

    def workers(self) -> list[psutil.Process]:
        """The worker processes on this host: the master's children, or (no master) the heartbeats' PIDs."""
        if self.master is not None:
            try:
                pids = [child.pid for child in psutil.Process(self.master).children()]
            except psutil.Error:
                return []
        else:
            here = socket.gethostname()
            pids = [beat["worker"]["pid"] for beat in self.heartbeats() if beat["worker"]["host"] == here]
        out = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                # Cached so cpu_times() of the same worker is read from the same object each time.
                out.append(self._procs.setdefault(pid, psutil.Process(pid)))
        return out

    def proc(self, pid: int) -> psutil.Process:
        return self._procs.setdefault(pid, psutil.Process(pid))

    def cpu(self) -> tuple[float, frozenset[int]]:
        total, pids = 0.0, set()
        for proc in self.workers():
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
                pids.add(proc.pid)
        return total, frozenset(pids)

    def rss(self) -> int:
        total = 0
        for proc in self.workers():
            with contextlib.suppress(psutil.Error):
                total += int(proc.memory_info().rss)
        return total

    def sockets(self) -> tuple[int, int]:
        """(established connections on the server port, bytes in their kernel send queues)."""
        established = [queues for state, queues in _tcp_sockets(self.port) if state == _ESTABLISHED]
        return len(established), sum(tx for tx, _ in established)

    def accept_queue(self) -> int:
        """Connections waiting in the server port's listen queue, not accepted by a worker yet."""
        # A listening socket's receive queue is its backlog of connections not accepted yet.
        return sum(rx for state, (_, rx) in _tcp_sockets(self.port) if state == _LISTEN)

    def fanout_metric(self) -> tuple[float, float] | None:
        """(sum, count) of the server's fan-out histogram: arrival in a worker to the last socket."""
        samples = self.metrics()
        if samples is None:
            return None
        total = sum(v for k, v in samples.items() if k.startswith("wsbroadcast_fanout_latency_seconds_sum"))
        count = sum(v for k, v in samples.items() if k.startswith("wsbroadcast_fanout_latency_seconds_count"))
        return (total, count) if count else None

    def metrics(self) -> dict[str, float] | None:
        """Every ``wsbroadcast_*`` sample of /metrics (the host's workers summed), by name with labels."""
        if not self.fanout_histogram:
            return None
        try:
            text = httpx.get(f"{self.http}/metrics", timeout=5).text
        except httpx.HTTPError:
            return None
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("wsbroadcast_"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    samples[name] = samples.get(name, 0.0) + float(value)
        return samples

    def reload(self) -> bool:
        """SIGHUP to the gunicorn master: every worker is replaced. False when no master is known."""
        if self.master is None:
            return False
        os.kill(self.master, signal.SIGHUP)
        return True

    def counters(self) -> dict[str, int] | None:
        """The workers' counters summed, from their heartbeats (None: this server writes none)."""
        if self.heartbeat_prefix is None:
            return None
        total: Counter[str] = Counter()
        for beat in self.heartbeats():
            total.update(beat.get("counters", {}))
        return dict(total)

    def stop(self) -> None:
        service, self.service = self.service, None
        if service is not None:
            service.stop(30)
        process, self.process = self.process, None
        if process is not None:
            terminate(process, 30)


def _wait(ready: Any, timeout: float, what: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what}: the server exited with {process.returncode}")
        if ready():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready within {timeout:.0f} s")


def _settings(prefix: str, env: dict[str, str]) -> Settings:
    return Settings.from_env({**env, "REDIS_PREFIX": prefix})


def start_wsbroadcast(redis_url: str, workers: int, extra_env: dict[str, str], via: str = "function",
                      name: str = "wsbroadcast", prefix: str = "bench:") -> Target:
    settings = _settings(prefix, extra_env)  # an invalid --env stops here, with the service's own message
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="loadtest-wsbroadcast-", suffix=".log")[1])
    env = web_env(port=port, workers=workers, redis_url=redis_url, prefix=prefix, settings=extra_env)
    service = ServiceProcess(env, log_path=log_path).start()
    try:
        service.wait_ready(60)
    except BaseException:
        service.stop(30)
        raise
    return Target(name, "127.0.0.1", port, redis_url, prefix + CHANNEL, acks_subscriptions=True,
                  fanout_histogram=True, heartbeat_prefix=prefix, settings=settings, publish_via=via,
                  master=service.pid, log_path=log_path, service=service)


def ensure_baseline_venv() -> Path:
    """``.venv-baseline`` with broadcaster 0.3.1 and redis-py 7.4, created on first use."""
    if not BASELINE_APP.exists():
        raise RuntimeError(f"no {BASELINE_APP}: the broadcaster baseline runs from a clone of the repository")
    stamp = BASELINE_VENV / ".loadtest-pins"
    want = "\n".join(BASELINE_PINS)
    if stamp.exists() and stamp.read_text() == want and (BASELINE_VENV / "bin" / "gunicorn").exists():
        return BASELINE_VENV
    print(f"loadtest: preparing {BASELINE_VENV} for the broadcaster baseline", file=sys.stderr, flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(BASELINE_VENV)], check=True)
    pip = [str(BASELINE_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *BASELINE_PINS], check=True)
    stamp.write_text(want)
    return BASELINE_VENV


def start_broadcaster(redis_url: str, workers: int) -> Target:
    venv = ensure_baseline_venv()
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)}
    env.pop("VIRTUAL_ENV", None)
    args = [
        str(venv / "bin" / "gunicorn"), "-w", str(workers), "-k", "uvicorn_worker.UvicornWorker",
        "-b", f"127.0.0.1:{port}", "--graceful-timeout", "5", "benchmarks.broadcaster_app:app",
    ]
    return _start_baseline("broadcaster", "broadcaster baseline", args, ROOT, env, port, redis_url,
                           "Application startup complete", workers)


def _start_baseline(name: str, label: str, args: list[str], cwd: Path, env: dict[str, str], port: int,
                    redis_url: str, ready_line: str, workers: int) -> Target:
    """Start a baseline server (no acks, no heartbeats, no /metrics) and wait until each of its
    workers has logged ``ready_line``; its master's children are what serves and is measured."""
    log_path = Path(tempfile.mkstemp(prefix=f"loadtest-{name}-", suffix=".log")[1])
    with open(log_path, "ab") as log:
        process = subprocess.Popen(args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    target = Target(name, "127.0.0.1", port, redis_url, CHANNEL, acks_subscriptions=False,
                    fanout_histogram=False, heartbeat_prefix=None, master=process.pid, log_path=log_path,
                    process=process)

    def ready() -> bool:
        return log_path.read_text(errors="replace").count(ready_line) >= workers

    try:
        _wait(ready, 60, label, process)
    except RuntimeError:
        target.stop()
        raise RuntimeError(f"{label} did not start; log: {log_path}\n{log_path.read_text()[-2000:]}") from None
    return target


def ensure_node_modules() -> Path:
    """``benchmarks/node_ws/node_modules`` installed from its lock (``npm ci``) on first use."""
    lock = NODE_APP / "package-lock.json"
    if not lock.exists():
        raise RuntimeError(f"no {lock}: the Node ws baseline runs from a clone of the repository")
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise RuntimeError("the Node ws baseline needs node (20 or later) and npm on PATH")
    stamp = NODE_APP / "node_modules" / ".loadtest-lock"
    want = hashlib.sha256(lock.read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return Path(node)
    print(f"loadtest: npm ci in {NODE_APP} for the Node ws baseline", file=sys.stderr, flush=True)
    subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel", "error"], cwd=NODE_APP, check=True,
                   stdin=subprocess.DEVNULL, stdout=sys.stderr, timeout=300)
    stamp.write_text(want)
    return Path(node)


def start_node(redis_url: str, workers: int) -> Target:
    node = ensure_node_modules()
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "PORT": str(port), "WEB_CONCURRENCY": str(workers),
           "BIND_HOST": "127.0.0.1"}
    # The cluster's primary forks the workers: its children are what serves and is measured.
    return _start_baseline("node", "Node ws baseline", [str(node), "server.js"], NODE_APP, env, port, redis_url,
                           " listening on ", workers)


def attach(url: str, redis_url: str, prefix: str, master: int | None, env: dict[str, str] | None = None,
           via: str = "function") -> Target:
    """A running service at ``url`` (ws://host:port); its workers are found from their heartbeats
    in Redis (the ones on this host can be measured), or as the children of ``master``. ``env``:
    its history settings (HISTORY_SIZE...), which the publish function is called with."""
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port_text = rest.rpartition(":")
    return Target("wsbroadcast", host or "127.0.0.1", int(port_text), redis_url, prefix + CHANNEL,
                  acks_subscriptions=True, fanout_histogram=True, heartbeat_prefix=prefix,
                  settings=_settings(prefix, env or {}), publish_via=via, master=master)
