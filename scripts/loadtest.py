"""Load test: ``scripts/loadtest [SCENARIO ...] [--target wsbroadcast|broadcaster|both]``.

Scenarios (issue 6): ``idle`` (RSS per idle connection, memory given back after close), ``fanout``
(deliveries/s, loss, latency and server CPU per delivery at each publish rate), ``slow`` (10% of the
clients stop reading while 2 KB frames flow), ``redis-restart`` (Redis down for 1 s mid-stream).

By default it starts what it measures: a private Redis and the service from the Procfile's web line
(or the encode/broadcaster baseline, ``benchmarks/broadcaster_app.py``, from its own environment
``.venv-baseline``, created on first use), 2 workers on a free loopback port. ``--url`` drives a
running service instead (``--redis-url`` to publish through).

Clients are several processes (``--clients``), each one uvloop event loop holding raw asyncio
WebSocket connections: at 2000 subscribers x 200 msg/s the client must parse 400,000 frames/s, and a
general-purpose client (websockets) adds per frame what this minimal parser does not (a frame
object, UTF-8 validation, a queue and a task wake-up per message), on the cores the server needs. Every frame carries a
sequence number and its publish time (``CLOCK_MONOTONIC``, shared by processes on one host), so loss,
duplicates and reordering are counted, and latency is publish-to-receipt.

The load is checked, never assumed. A step whose publisher fell behind its schedule (over 250 ms, or
under 97% of the rate) did not offer the load it names: it never counts as a pass. A client process
over 90% of a core or whose event loop lagged over 100 ms is reported as saturated: its latency
figures are pessimistic (a frame is timed when the client gets to read it), so a pass still stands,
but a failure may be the client's, and the ladder of rates stops there saying so.

Server CPU per delivery = CPU time of the worker processes (children of the gunicorn master) over
the step, divided by the deliveries counted by the clients.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any, cast

import httpx
import orjson
import psutil
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from scripts.redis_server import PrivateRedis, free_port, terminate
from scripts.run import ROOT, procfile_web

CHANNEL = "bench"
SCENARIOS = ("idle", "fanout", "slow", "redis-restart")
# Latency histogram: 0.1 ms buckets up to 10 s (the last bucket holds everything slower).
BUCKET = 1e-4
BUCKETS = 100_000
# A step is refused when the load client itself was the bottleneck.
CLIENT_CPU_LIMIT = 0.90
CLIENT_LAG_LIMIT = 0.100
PUBLISH_LAG_LIMIT = 0.250
PUBLISH_RATE_SHORTFALL = 0.97
BASELINE_VENV = ROOT / ".venv-baseline"
BASELINE_PINS = (
    "broadcaster==0.3.1",
    "redis==7.4.*",
    "starlette",
    "uvicorn[standard]",
    "gunicorn",
    "uvicorn-worker",
)


def _raise_fd_limit() -> int:
    """Raise the soft fd limit to the hard one: thousands of sockets per process, inherited by children."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ------------------------------------------------------------------------------------------------
# Client side: one process, one uvloop loop, many raw WebSocket connections.


class _HandshakeError(Exception):
    pass


class _WS(asyncio.Protocol):
    """One client WebSocket: HTTP/1.1 upgrade, then unmasked server frames parsed from a buffer."""

    def __init__(self, client: _ClientProc, request: bytes, stall: bool) -> None:
        self.client = client
        self.request = request
        self.stall = stall
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.open = False
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.acked: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.seen = bytearray()
        self.last = -1
        self.warm = False
        self.received = 0
        self.close_code: int | None = None
        self.outcome = "open"
        self.fragments: bytearray | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_code is not None:
            self.outcome = f"close {self.close_code}"
        else:
            self.outcome = "reset" if exc is not None else "eof"
        self.client.open -= int(self.open)
        self.open = False
        for fut in (self.opened, self.acked):
            if not fut.done():
                fut.set_exception(_HandshakeError(self.outcome))
                fut.exception()  # retrieved: nobody may be waiting (acks the target never sends)
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        # One timestamp per read: every frame in the chunk arrived together.
        now = time.monotonic()
        buf = self.buf
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            del buf[: end + 4]
            if not status.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(_HandshakeError(status.decode("latin-1")[9:].strip() or "bad response"))
                assert self.transport is not None
                self.transport.close()
                return
            self.open = True
            self.client.open += 1
            self.opened.set_result(None)
        pos, n = 0, len(buf)
        on_text = self.client.on_text
        while n - pos >= 2:
            b0, length = buf[pos], buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if n - pos < head + length:
                break
            payload = bytes(buf[pos + head : pos + head + length])
            pos += head + length
            opcode = b0 & 0x0F
            if opcode == 1 and b0 & 0x80:
                on_text(self, payload, now)
            elif opcode in (0, 1):
                # Fragmented text: servers here never fragment, but stay correct if one does.
                self.fragments = (self.fragments or bytearray()) + payload
                if b0 & 0x80:
                    whole, self.fragments = bytes(self.fragments), None
                    on_text(self, whole, now)
            elif opcode == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.send(8, payload[:2])
            elif opcode == 9:
                self.send(10, payload)
        if pos:
            del buf[:pos]

    def send(self, opcode: int, payload: bytes) -> None:
        """A masked client frame (control frames only: payload < 126 bytes)."""
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
        self.transport.write(bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked)


class _ClientProc:
    """The state of one client process, driven by commands from the orchestrator over a pipe."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.conns: list[_WS] = []
        self.open = 0
        self.frames = 0
        self.dups = 0
        self.reordered = 0
        self.unknown = 0
        self.hist = [0] * BUCKETS
        self.max_latency = 0.0
        self.first: array[float] = array("d")
        self.track_first = False
        self.lag_max = 0.0
        self.progress_lag = 0.0
        self.mark_cpu = time.process_time()
        self.mark_wall = time.monotonic()
        self.progress_cpu = self.mark_cpu
        self.progress_wall = self.mark_wall
        self.done: asyncio.Future[None] | None = None

    def on_text(self, ws: _WS, payload: bytes, now: float) -> None:
        if payload.startswith(b'{"op"'):
            if not ws.acked.done():
                ws.acked.set_result(None)
            return
        try:
            data = orjson.loads(payload)["data"]
            seq, sent = data["s"], data["t"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.unknown += 1
            return
        if seq < 0:
            ws.warm = True
            return
        seen = ws.seen
        if seq >= len(seen):
            seen.extend(bytes(seq + 1024 - len(seen)))
        if seen[seq]:
            self.dups += 1
            return
        seen[seq] = 1
        if seq < ws.last:
            self.reordered += 1
        else:
            ws.last = seq
        ws.received += 1
        self.frames += 1
        if ws.stall:
            return
        latency = now - sent
        bucket = int(latency / BUCKET)
        self.hist[bucket if bucket < BUCKETS else BUCKETS - 1] += 1
        if latency > self.max_latency:
            self.max_latency = latency
        if self.track_first:
            first = self.first
            if seq >= len(first):
                first.extend([0.0] * (seq + 1024 - len(first)))
            if first[seq] == 0.0:
                first[seq] = now

    async def _lag_monitor(self) -> None:
        interval = 0.05
        while True:
            before = time.monotonic()
            await asyncio.sleep(interval)
            lag = time.monotonic() - before - interval
            self.lag_max = max(self.lag_max, lag)
            self.progress_lag = max(self.progress_lag, lag)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        monitor = asyncio.create_task(self._lag_monitor())
        tasks: set[asyncio.Task[None]] = set()

        def readable() -> None:
            try:
                ident, cmd, kwargs = self.pipe.recv()
            except EOFError:
                if self.done is not None and not self.done.done():
                    self.done.set_result(None)
                return
            task = asyncio.create_task(self._run(ident, cmd, kwargs))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        loop.add_reader(self.pipe.fileno(), readable)
        try:
            await self.done
        finally:
            loop.remove_reader(self.pipe.fileno())
            monitor.cancel()
            for ws in self.conns:
                if ws.transport is not None:
                    ws.transport.abort()

    async def _run(self, ident: int, cmd: str, kwargs: dict[str, Any]) -> None:
        try:
            result: Any = await getattr(self, "cmd_" + cmd.replace("-", "_"))(**kwargs)
        except Exception as exc:  # reported to the orchestrator, which raises it there
            result = {"error": f"{cmd}: {exc!r}"}
        self.pipe.send((ident, result))

    async def cmd_connect(
        self, host: str, port: int, path: str, n: int, rate: float, stall: int, ack: bool, timeout: float
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        failures: Counter[str] = Counter()
        start = time.monotonic()
        gate = asyncio.Semaphore(200)

        async def one(index: int) -> None:
            key = base64.b64encode(os.urandom(16)).decode()
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            async with gate:
                ws: _WS | None = None
                try:
                    _, proto = await asyncio.wait_for(
                        loop.create_connection(lambda: _WS(self, request, index < stall), host, port), timeout
                    )
                    ws = proto
                    await asyncio.wait_for(asyncio.shield(ws.opened), timeout)
                    if ack:
                        await asyncio.wait_for(asyncio.shield(ws.acked), timeout)
                    self.conns.append(ws)
                except (OSError, TimeoutError, _HandshakeError) as exc:
                    failures[str(exc) if isinstance(exc, _HandshakeError) else type(exc).__name__] += 1
                    if ws is not None and ws.transport is not None:
                        ws.transport.abort()

        await asyncio.gather(*(one(i) for i in range(n)))
        return {"ok": n - sum(failures.values()), "failed": dict(failures)}

    async def cmd_progress(self) -> dict[str, Any]:
        now, cpu = time.monotonic(), time.process_time()
        share = (cpu - self.progress_cpu) / max(1e-6, now - self.progress_wall)
        lag, self.progress_lag = self.progress_lag, 0.0
        self.progress_cpu, self.progress_wall = cpu, now
        return {"frames": self.frames, "open": self.open, "cpu": share, "lag": lag}

    async def cmd_warm(self) -> dict[str, int]:
        live = [ws for ws in self.conns if ws.open]
        return {"open": len(live), "warm": sum(ws.warm for ws in live)}

    async def cmd_mark(self, track_first: bool = False) -> dict[str, int]:
        self.frames = self.dups = self.reordered = self.unknown = 0
        self.hist = [0] * BUCKETS
        self.max_latency = 0.0
        self.lag_max = 0.0
        self.track_first = track_first
        if track_first:
            self.first = array("d")
        self.mark_cpu, self.mark_wall = time.process_time(), time.monotonic()
        live = [ws for ws in self.conns if ws.open]
        return {"fast": sum(not ws.stall for ws in live), "stalled": sum(ws.stall for ws in live)}

    async def cmd_stats(self, lo: int, hi: int, per_seq: bool = False) -> dict[str, Any]:
        cpu = (time.process_time() - self.mark_cpu) / max(1e-6, time.monotonic() - self.mark_wall)
        fast = [ws for ws in self.conns if not ws.stall]
        delivered = sum(ws.seen[lo:hi].count(1) for ws in fast)
        out: dict[str, Any] = {
            "delivered": delivered,
            "frames": self.frames,
            "dups": self.dups,
            "reordered": self.reordered,
            "unknown": self.unknown,
            "hist": {i: c for i, c in enumerate(self.hist) if c},
            "max_latency": self.max_latency,
            "cpu": cpu,
            "lag": self.lag_max,
            "open_fast": sum(ws.open for ws in fast),
        }
        if per_seq:
            counts = [0] * (hi - lo)
            for ws in fast:
                part = ws.seen[lo:hi]
                for i, hit in enumerate(part):
                    counts[i] += hit
            out["counts"] = counts
            out["first"] = [self.first[i] if i < len(self.first) else 0.0 for i in range(lo, hi)]
        return out

    async def cmd_stall(self, on: bool) -> int:
        stalled = [ws for ws in self.conns if ws.stall and ws.transport is not None and not ws.transport.is_closing()]
        for ws in stalled:
            assert ws.transport is not None
            if on:
                ws.transport.pause_reading()
            else:
                ws.transport.resume_reading()
        return len(stalled)

    async def cmd_outcomes(self, wait: float) -> dict[str, Any]:
        stalled = [ws for ws in self.conns if ws.stall]
        pending = [ws.lost for ws in stalled if not ws.lost.done()]
        if pending:
            await asyncio.wait(pending, timeout=wait)
        return {
            "outcomes": dict(Counter(ws.outcome for ws in stalled)),
            "received": sum(ws.received for ws in stalled),
        }

    async def cmd_close(self, timeout: float) -> dict[str, Any]:
        for ws in self.conns:
            if ws.open:
                ws.send(8, (1000).to_bytes(2, "big"))
        pending = [ws.lost for ws in self.conns if not ws.lost.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        aborted = 0
        for ws in self.conns:
            if not ws.lost.done() and ws.transport is not None:
                ws.transport.abort()
                aborted += 1
        self.conns = []
        return {"aborted": aborted}

    async def cmd_quit(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)


def _client_main(pipe: Pipe) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator stops us with "quit" or SIGTERM
    _raise_fd_limit()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        pass
    asyncio.run(_ClientProc(pipe).serve())


class _Clients:
    """The orchestrator's handle on the client processes: RPC over pipes, answered on the event loop."""

    def __init__(self, count: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Pipe] = []
        self.procs: list[Any] = []
        for _ in range(count):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_client_main, args=(theirs,), daemon=True)
            proc.start()
            theirs.close()
            self.pipes.append(ours)
            self.procs.append(proc)
        self._next = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        loop = asyncio.get_running_loop()
        for pipe in self.pipes:
            loop.add_reader(pipe.fileno(), self._readable, pipe)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def _readable(self, pipe: Pipe) -> None:
        try:
            ident, result = pipe.recv()
        except EOFError:
            asyncio.get_running_loop().remove_reader(pipe.fileno())
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(RuntimeError("a client process exited"))
            return
        waiting = self._waiting.pop(ident, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(result)

    async def _call(self, index: int, cmd: str, kwargs: dict[str, Any]) -> Any:
        self._next += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = fut
        self.pipes[index].send((self._next, cmd, kwargs))
        result = await fut
        if isinstance(result, dict) and "error" in result:
            raise RuntimeError(f"client process {index}: {result['error']}")
        return result

    async def all(self, cmd: str, **kwargs: Any) -> list[Any]:
        return list(await asyncio.gather(*(self._call(i, cmd, kwargs) for i in range(len(self.pipes)))))

    async def each(self, cmd: str, per_client: list[dict[str, Any]]) -> list[Any]:
        return list(await asyncio.gather(*(self._call(i, cmd, kw) for i, kw in enumerate(per_client))))

    def stop(self) -> None:
        loop = asyncio.get_running_loop()
        for pipe in self.pipes:
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(pipe.fileno())
                pipe.send((0, "quit", {}))
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(5)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# ------------------------------------------------------------------------------------------------
# What is measured: the target server, its processes, its sockets.


@dataclass
class Target:
    name: str
    host: str
    port: int
    redis_url: str
    redis_channel: str
    ack: bool  # the server confirms each subscription with a control frame
    master: int | None = None
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    _procs: dict[int, psutil.Process] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return f"/ws?channels={CHANNEL}"

    def workers(self) -> list[psutil.Process]:
        if self.master is None:
            return []
        try:
            children = psutil.Process(self.master).children()
        except psutil.Error:
            return []
        out = []
        for child in children:
            # Cached so cpu_times() of the same worker is read from the same object each time.
            out.append(self._procs.setdefault(child.pid, child))
        return out

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
        established = queued = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                parts = line.split()
                if parts[3] != "01" or int(parts[1].rsplit(":", 1)[1], 16) != self.port:
                    continue
                established += 1
                queued += int(parts[4].split(":")[0], 16)
        return established, queued

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            terminate(process, 30)


def _wait(condition: Callable[[], bool], timeout: float, what: str, process: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the server exited with {process.returncode}")
        if condition():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready within {timeout:.0f} s")


# The health documents with per-worker detail need the admin token: the tool sets it for the server it
# starts (and takes ADMIN_TOKEN from the environment for a server it does not).
ADMIN_TOKEN = os.environ.get("ADMIN_TOKEN") or "loadtest-admin"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _start_wsbroadcast(redis_url: str, workers: int, extra_env: dict[str, str]) -> Target:
    port = free_port()
    prefix = "bench:"
    log_path = Path(tempfile.mkstemp(prefix="loadtest-wsbroadcast-", suffix=".log")[1])
    env = {
        **os.environ,
        "PORT": str(port),
        "BIND_HOST": "127.0.0.1",
        "WEB_CONCURRENCY": str(workers),
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        **extra_env,
    }
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            procfile_web(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    target = Target("wsbroadcast", "127.0.0.1", port, redis_url, prefix + CHANNEL, True, process.pid, log_path, process)

    def ready() -> bool:
        try:
            doc = httpx.get(f"http://127.0.0.1:{port}/health/cluster", timeout=2, headers=ADMIN_HEADERS).json()
        except (httpx.HTTPError, ValueError):
            return False
        live = [w for w in doc.get("workers", []) if w["worker"]["pid"] in {p.pid for p in target.workers()}]
        return len(live) == workers and all(w["redis"]["connected"] for w in live)

    return _started(target, ready, "wsbroadcast", process, log_path)


def _started(
    target: Target, ready: Callable[[], bool], name: str, process: subprocess.Popen[bytes], log_path: Path
) -> Target:
    """``target`` once ``ready``; stopped, with the tail of its log in the error, if it never is."""
    try:
        _wait(ready, 60, name, process)
    except RuntimeError:
        target.stop()
        raise RuntimeError(f"{name} did not start; log: {log_path}\n{log_path.read_text()[-2000:]}") from None
    return target


def ensure_baseline_venv() -> Path:
    """``.venv-baseline`` with broadcaster 0.3.1 and redis-py 7.4, created on first use."""
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


def _start_broadcaster(redis_url: str, workers: int) -> Target:
    venv = ensure_baseline_venv()
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="loadtest-broadcaster-", suffix=".log")[1])
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)}
    env.pop("VIRTUAL_ENV", None)
    args = [
        str(venv / "bin" / "gunicorn"), "-w", str(workers), "-k", "uvicorn_worker.UvicornWorker",
        "-b", f"127.0.0.1:{port}", "--graceful-timeout", "5", "benchmarks.broadcaster_app:app",
    ]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    target = Target("broadcaster", "127.0.0.1", port, redis_url, CHANNEL, False, process.pid, log_path, process)

    def ready() -> bool:
        return log_path.read_text(errors="replace").count("Application startup complete") >= workers

    return _started(target, ready, "broadcaster baseline", process, log_path)


def _attach(url: str, redis_url: str, prefix: str, master: int | None) -> Target:
    """A running service at ``url`` (ws://host:port): its workers are found through its listening socket."""
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port_text = rest.rpartition(":")
    port = int(port_text)
    if master is None:
        listeners = {
            c.pid for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
        }
        for pid in listeners:
            with contextlib.suppress(psutil.Error):
                if {p.pid for p in psutil.Process(pid).children()} & listeners:
                    master = pid
    return Target("wsbroadcast", host or "127.0.0.1", port, redis_url, prefix + CHANNEL, True, master)


# ------------------------------------------------------------------------------------------------
# The publisher: one Redis connection, an absolute schedule, every frame numbered and timestamped.


@dataclass
class Published:
    lo: int
    hi: int
    sent_at: dict[int, float]
    failed: set[int]
    no_receivers: set[int]
    max_behind: float
    duration: float


class Publisher:
    def __init__(self, target: Target, seq: int = 0) -> None:
        self.target = target
        self.seq = seq
        self.redis = self._connect()

    def _connect(self) -> Redis:
        # No retries: a publish while Redis is down must fail at once, not stall the schedule.
        return Redis.from_url(self.target.redis_url, socket_connect_timeout=0.5, socket_timeout=1.0,
                              retry=Retry(NoBackoff(), 0))

    @staticmethod
    def frame(seq: int, size: int) -> bytes:
        data: dict[str, Any] = {"s": seq, "t": time.monotonic(), "p": ""}
        pad = size - len(orjson.dumps(data))
        if pad > 0:
            data["p"] = "x" * pad
        return orjson.dumps({"channel": CHANNEL, "data": data})

    async def warm(self) -> None:
        await self.redis.publish(self.target.redis_channel, self.frame(-1, 16))

    async def run(self, rate: float, count: int, size: int) -> Published:
        lo = self.seq
        sent_at: dict[int, float] = {}
        failed: set[int] = set()
        no_receivers: set[int] = set()
        max_behind = 0.0
        start = time.monotonic()
        channel = self.target.redis_channel
        for k in range(count):
            due = start + k / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                max_behind = max(max_behind, -delay)
            seq = self.seq
            self.seq += 1
            frame = self.frame(seq, size)
            sent_at[seq] = time.monotonic()
            try:
                receivers = await asyncio.wait_for(self.redis.publish(channel, frame), 1.0)
            except (RedisError, OSError, TimeoutError):
                failed.add(seq)
                continue
            if not receivers:
                no_receivers.add(seq)
        return Published(lo, self.seq, sent_at, failed, no_receivers, max_behind, time.monotonic() - start)

    async def close(self) -> None:
        await self.redis.aclose()


# ------------------------------------------------------------------------------------------------
# Scenarios.


def _percentile(hist: Counter[int], total: int, q: float) -> float:
    """Upper edge (ms) of the bucket holding the q-quantile."""
    if not total:
        return float("nan")
    rank = q * total
    seen = 0
    for index in sorted(hist):
        seen += hist[index]
        if seen >= rank:
            return (index + 1) * BUCKET * 1000
    return float("nan")


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Run:
    def __init__(self, args: argparse.Namespace, clients: _Clients, target: Target, redis: PrivateRedis | None) -> None:
        self.args = args
        self.clients = clients
        self.target = target
        self.redis = redis
        self.tag = f"[{target.name}]"
        # Sequence numbers never repeat within a run, so a frame is never mistaken for another step's.
        self.seq = 0

    def _own_cpu(self) -> float:
        """CPU seconds of every process this test runs: server (master too), clients, Redis, us."""
        pids = [*self.clients.pids(), os.getpid()]
        if self.target.master is not None:
            pids.append(self.target.master)
        if self.redis is not None and self.redis.process is not None:
            pids.append(self.redis.process.pid)
        total = 0.0
        for proc in [*self.target.workers(), *(self._proc(pid) for pid in pids)]:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
        return total

    def _proc(self, pid: int) -> psutil.Process:
        return self.target._procs.setdefault(pid, psutil.Process(pid))

    @staticmethod
    def _busy() -> tuple[float, float]:
        """(CPU seconds the whole machine spent busy, of which in interrupts and softirqs).

        Where the kernel accounts IRQ time separately, the loopback network path that a server's
        send() runs in softirq context is charged to no process: it is reported on its own.
        """
        times = psutil.cpu_times()
        irq = getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)
        return float(sum(times)) - times.idle - getattr(times, "iowait", 0.0), irq

    async def connect(self, n: int, stall: int = 0) -> dict[str, Any]:
        parts = _split(n, len(self.clients.pipes))
        stalls = _split(stall, len(self.clients.pipes))
        rate = self.args.connect_rate / len(parts)
        t = self.target
        task = asyncio.ensure_future(self.clients.each("connect", [
            {"host": t.host, "port": t.port, "path": t.path, "n": k, "rate": rate, "stall": s, "ack": t.ack,
             "timeout": 15.0}
            for k, s in zip(parts, stalls, strict=True)
        ]))
        started = time.monotonic()
        while not task.done():
            await asyncio.wait([task], timeout=1.0)
            if not task.done():
                opened = sum(p["open"] for p in await self.clients.all("progress"))
                _log(f"{self.tag} connecting: {opened}/{n} open after {time.monotonic() - started:.0f} s")
        results = task.result()
        failed: Counter[str] = Counter()
        for r in results:
            failed.update(r["failed"])
        ok = sum(r["ok"] for r in results)
        _log(f"{self.tag} connected {ok}/{n} in {time.monotonic() - started:.1f} s"
             + (f"; failed: {dict(failed)}" if failed else ""))
        return {"ok": ok, "failed": dict(failed), "seconds": round(time.monotonic() - started, 2)}

    async def warm(self) -> None:
        """Publish unnumbered frames until every open connection got one: subscriptions are live."""
        publisher = Publisher(self.target)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                await publisher.warm()
                await asyncio.sleep(0.1)
                states = await self.clients.all("warm")
                if all(s["warm"] == s["open"] for s in states):
                    return
            raise RuntimeError(f"{self.tag} not every connection received the warm-up frames within 20 s")
        finally:
            await publisher.close()

    async def close_all(self) -> None:
        await self.clients.all("close", timeout=20.0)

    async def _progress(self, label: str, stop: asyncio.Event, samples: list[dict[str, Any]]) -> None:
        """A line a second; ``samples`` gets each client's CPU share and loop lag of every full second."""
        started = time.monotonic()
        last_frames, last = 0, started
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            full = not stop.is_set()
            states = await self.clients.all("progress")
            if full:
                samples.extend(states)
            now = time.monotonic()
            frames = sum(s["frames"] for s in states)
            rate = (frames - last_frames) / max(1e-6, now - last)
            last_frames, last = frames, now
            cpu = " ".join(f"{s['cpu'] * 100:.0f}%" for s in states)
            lag = max(s["lag"] for s in states) * 1000
            _log(f"{self.tag} {label} {now - started:5.1f} s  deliveries {rate / 1000:7.1f}k/s  "
                 f"client cpu {cpu}  loop lag {lag:.0f} ms  machine {psutil.cpu_percent():.0f}%  "
                 f"load {os.getloadavg()[0]:.2f}")

    async def _drain(self, expected: int, quiet: float = 1.0, limit: float = 5.0) -> None:
        """Wait for late frames: until all expected arrived, nothing came for ``quiet`` s, or ``limit``."""
        deadline = time.monotonic() + limit
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            frames = sum(s["frames"] for s in await self.clients.all("progress"))
            if frames >= expected:
                return
            if frames != last:
                last, since = frames, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            await asyncio.sleep(0.2)

    async def step(
        self, label: str, rate: float, seconds: float, size: int,
        during: Callable[[], Coroutine[Any, Any, None]] | None = None, per_seq: bool = False,
    ) -> dict[str, Any]:
        """Publish ``rate`` x ``seconds`` frames, then collect what every client counted."""
        marks = await self.clients.all("mark", track_first=per_seq)
        fast = sum(m["fast"] for m in marks)
        count = max(1, round(rate * seconds))
        publisher = Publisher(self.target, self.seq)
        stop = asyncio.Event()
        samples: list[dict[str, Any]] = []
        progress = asyncio.create_task(self._progress(label, stop, samples))
        fanout0 = await asyncio.to_thread(self._fanout_metric)
        cpu0, pids0 = self.target.cpu()
        own0, busy0 = self._own_cpu(), self._busy()
        wall0 = time.monotonic()
        profilers = self._profile(label, seconds)
        side: asyncio.Task[None] | None = asyncio.create_task(during()) if during is not None else None
        try:
            published = await publisher.run(rate, count, size)
            self.seq = publisher.seq
            if side is not None:
                await side
            ok_seqs = published.hi - published.lo - len(published.failed)
            await self._drain(ok_seqs * fast)
        finally:
            stop.set()
            await progress
            await publisher.close()
        cpu1, pids1 = self.target.cpu()
        own1, busy1 = self._own_cpu(), self._busy()
        wall = time.monotonic() - wall0
        busy, irq = busy1[0] - busy0[0], busy1[1] - busy0[1]
        machine = round(busy / (wall * (os.cpu_count() or 1)) * 100, 1)
        for profiler in profilers:
            profiler.wait(30)
        stats = await self.clients.all("stats", lo=published.lo, hi=published.hi, per_seq=per_seq)
        fanout1 = await asyncio.to_thread(self._fanout_metric)
        hist: Counter[int] = Counter()
        for s in stats:
            hist.update({int(k): v for k, v in s["hist"].items()})
        measured = sum(hist.values())
        delivered = sum(s["delivered"] for s in stats)
        expected = ok_seqs * fast
        result: dict[str, Any] = {
            "rate": rate,
            "seconds": seconds,
            "payload_bytes": size,
            "subscribers": fast,
            "published": published.hi - published.lo,
            "publish_failed": len(published.failed),
            "published_without_receivers": len(published.no_receivers),
            "publish_rate": round((published.hi - published.lo) / max(1e-6, published.duration), 1),
            "expected": expected,
            "delivered": delivered,
            "delivered_fraction": round(delivered / expected, 6) if expected else None,
            "duplicates": sum(s["dups"] for s in stats),
            "reordered": sum(s["reordered"] for s in stats),
            "deliveries_per_s": round(delivered / max(1e-6, published.duration), 1),
            "latency_ms": {
                "p50": round(_percentile(hist, measured, 0.50), 2),
                "p99": round(_percentile(hist, measured, 0.99), 2),
                "max": round(max(s["max_latency"] for s in stats) * 1000, 2),
            },
            "server_cpu_s": round(cpu1 - cpu0, 3),
            "server_cpu_us_per_delivery": round((cpu1 - cpu0) / delivered * 1e6, 2) if delivered else None,
            "server_workers_changed": pids0 != pids1,
            "client_cpu": [round(s["cpu"], 3) for s in stats],
            "client_loop_lag_ms": round(max(s["lag"] for s in stats) * 1000, 1),
            "publisher_behind_ms": round(published.max_behind * 1000, 1),
            "machine_cpu_percent": machine,
            "test_processes_cores": round((own1 - own0) / wall, 2),
            # Work on this machine by processes outside the test (other jobs): it competes for the cores.
            "other_processes_cores": round(max(0.0, busy - irq - (own1 - own0)) / wall, 2),
            "irq_softirq_cores": round(irq / wall, 2),
            # The loopback TCP path (both ends) runs in softirq, charged to no process here.
            "irq_softirq_us_per_delivery": round(irq / delivered * 1e6, 2) if delivered else None,
            "wall_s": round(wall, 2),
        }
        if machine >= 95:
            result["machine_saturated"] = (
                f"the machine's {os.cpu_count()} cores were {machine:.0f}% busy (other processes: "
                f"{result['other_processes_cores']} cores): latency includes waiting for a core"
            )
        if fanout0 is not None and fanout1 is not None and fanout1[1] > fanout0[1]:
            # The server's share of the latency: a worker's loop over its local connections.
            result["server_fanout_ms_mean"] = round((fanout1[0] - fanout0[0]) / (fanout1[1] - fanout0[1]) * 1000, 2)
        saturated = []
        # Per-second samples while publishing: a client busy for a second is saturated even when the
        # whole step's average (drain included) looks fine.
        peak_cpu = max((s["cpu"] for s in samples), default=max(s["cpu"] for s in stats))
        peak_lag = max([s["lag"] for s in samples] + [s["lag"] for s in stats])
        result["client_cpu_peak"] = round(peak_cpu, 3)
        result["client_loop_lag_ms"] = round(peak_lag * 1000, 1)
        if peak_cpu > CLIENT_CPU_LIMIT:
            saturated.append(f"a client process used {peak_cpu * 100:.0f}% of a core")
        if peak_lag > CLIENT_LAG_LIMIT:
            saturated.append(f"a client event loop lagged {peak_lag * 1000:.0f} ms")
        offered = []
        if not published.failed:
            if published.max_behind > PUBLISH_LAG_LIMIT:
                offered.append(f"the publisher fell {published.max_behind * 1000:.0f} ms behind its schedule")
            if result["publish_rate"] < rate * PUBLISH_RATE_SHORTFALL:
                offered.append(f"the publisher reached {result['publish_rate']:g} of {rate:g} msg/s")
        result["client_saturated"] = saturated
        result["load_not_offered"] = offered
        if per_seq:
            counts = [sum(c) for c in zip(*(s["counts"] for s in stats), strict=True)]
            firsts = [min((f for f in fs if f > 0), default=0.0) for fs in zip(*(s["first"] for s in stats),
                                                                                  strict=True)]
            result["_per_seq"] = (published, counts, firsts, fast)
        lat = result["latency_ms"]
        if result.get("machine_saturated"):
            _log(f"{self.tag} {label}: MACHINE SATURATED: {result['machine_saturated']}")
        _log(f"{self.tag} {label}: delivered {result['delivered_fraction']} of {expected}  "
             f"p50 {lat['p50']} ms p99 {lat['p99']} ms max {lat['max']} ms  "
             f"server {result['server_cpu_us_per_delivery']} us/delivery"
             + (f"  CLIENT SATURATED: {'; '.join(saturated)}" if saturated else "")
             + (f"  LOAD NOT OFFERED: {'; '.join(offered)}" if offered else ""))
        return result

    def _profile(self, label: str, seconds: float) -> list[subprocess.Popen[bytes]]:
        """With --profile DIR: py-spy samples each worker for the step (collapsed stacks, one file each)."""
        if not self.args.profile:
            return []
        out = Path(self.args.profile)
        out.mkdir(parents=True, exist_ok=True)
        spy = Path(sys.executable).parent / "py-spy"
        procs = []
        for worker in self.target.workers():
            name = f"{self.target.name}-{label.replace(' ', '-').replace('/', '')}-{worker.pid}.txt"
            procs.append(subprocess.Popen(
                [str(spy), "record", "--pid", str(worker.pid), "--duration", str(max(1, int(seconds))),
                 "--rate", "250", "--nonblocking", "--format", "raw", "--output", str(out / name)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
        return procs

    # --- the scenarios -------------------------------------------------------------------------

    async def idle(self) -> dict[str, Any]:
        n = self.args.connections
        await asyncio.sleep(1.0)
        before = self.target.rss()
        conn = await self.connect(n)
        await asyncio.sleep(self.args.settle)
        connected = self.target.rss()
        established, _ = self.target.sockets()
        started = time.monotonic()
        await self.close_all()
        deadline = time.monotonic() + 30
        while self.target.sockets()[0] and time.monotonic() < deadline:  # noqa: ASYNC110 - polls the kernel
            await asyncio.sleep(0.2)
        closed_in = time.monotonic() - started
        await asyncio.sleep(self.args.settle)
        after = self.target.rss()
        grown = connected - before
        result = {
            "connections": n,
            "connected": conn["ok"],
            "failed": conn["failed"],
            "connect_seconds": conn["seconds"],
            "established_on_server": established,
            "rss_before_mb": round(before / 1e6, 2),
            "rss_connected_mb": round(connected / 1e6, 2),
            "rss_after_close_mb": round(after / 1e6, 2),
            "kb_per_connection": round(grown / max(1, conn["ok"]) / 1024, 2),
            "given_back_fraction": round((connected - after) / grown, 3) if grown > 0 else None,
            "close_seconds": round(closed_in, 2),
            "settle_s": self.args.settle,
        }
        _log(f"{self.tag} idle: {result}")
        return result

    async def fanout(self) -> dict[str, Any]:
        conn = await self.connect(self.args.subscribers)
        await self.warm()
        steps = []
        best: float | None = None
        for rate in self.args.rates:
            step = await self.step(f"fanout {rate:g}/s", rate, self.args.duration, self.args.payload)
            steps.append(step)
            fraction = step["delivered_fraction"] or 0.0
            good = fraction >= 0.999 and step["latency_ms"]["p99"] < 200
            step["pass"] = good and not step["load_not_offered"]
            if step["load_not_offered"]:
                _log(f"{self.tag} refusing {rate:g}/s and above: {'; '.join(step['load_not_offered'])}, "
                     "so this tool cannot claim that rate")
                break
            if not good:
                if step["client_saturated"]:
                    _log(f"{self.tag} {rate:g}/s failed with the load client saturated "
                         f"({'; '.join(step['client_saturated'])}): the limit may be the client's, not the server's")
                break
            best = rate
        await self.close_all()
        return {"subscribers": conn["ok"], "connect_failed": conn["failed"], "steps": steps,
                "highest_rate_passing": best}

    async def slow(self) -> dict[str, Any]:
        n = self.args.subscribers
        stall = round(n * self.args.slow_fraction)
        conn = await self.connect(n, stall=stall)
        await self.warm()
        rss0 = self.target.rss()
        samples: list[dict[str, Any]] = []
        started = time.monotonic()

        def sample() -> dict[str, Any]:
            established, queued = self.target.sockets()
            row = {"t": round(time.monotonic() - started, 1), "rss_mb": round(self.target.rss() / 1e6, 2),
                   "established": established, "send_queue_mb": round(queued / 1e6, 2)}
            samples.append(row)
            _log(f"{self.tag} slow sample: {row}")
            return row

        sample()
        await self.clients.all("stall", on=True)

        async def sampler() -> None:
            while time.monotonic() - started < self.args.slow_duration:
                await asyncio.sleep(min(self.args.sample_every, self.args.slow_duration - (time.monotonic() - started)))
                sample()

        step = await self.step("slow", self.args.slow_rate, self.args.slow_duration, self.args.slow_payload,
                               during=sampler)
        sample()
        server_counters = self._server_counters()
        await self.clients.all("stall", on=False)
        outcomes: Counter[str] = Counter()
        received = 0
        for o in await self.clients.all("outcomes", wait=10.0):
            outcomes.update(o["outcomes"])
            received += o["received"]
        peak = max(s["rss_mb"] for s in samples)
        await self.close_all()
        result = {
            "subscribers": conn["ok"],
            "stalled": stall,
            "fast": step,
            "samples": samples,
            "rss_before_mb": round(rss0 / 1e6, 2),
            "rss_growth_mb": round(peak - rss0 / 1e6, 2),
            "send_queue_peak_mb": max(s["send_queue_mb"] for s in samples),
            "stalled_outcomes": dict(outcomes),
            "stalled_frames_received": received,
            "server_counters": server_counters,
        }
        _log(f"{self.tag} slow: stalled clients {dict(outcomes)}; RSS growth {result['rss_growth_mb']} MB")
        return result

    def _fanout_metric(self) -> tuple[float, float] | None:
        """(sum, count) of wsbroadcast's own fan-out histogram: arrival in a worker to the last socket."""
        if self.target.name != "wsbroadcast":
            return None
        try:
            text = httpx.get(f"http://{self.target.host}:{self.target.port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return None
        total = count = 0.0
        for line in text.splitlines():
            if line.startswith("wsbroadcast_fanout_latency_seconds_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith("wsbroadcast_fanout_latency_seconds_count"):
                count += float(line.rsplit(" ", 1)[1])
        return (total, count) if count else None

    def _server_counters(self) -> dict[str, int] | None:
        if self.target.name != "wsbroadcast":
            return None
        try:
            url = f"http://{self.target.host}:{self.target.port}/health/cluster"
            doc = httpx.get(url, timeout=5, headers=ADMIN_HEADERS).json()
        except (httpx.HTTPError, ValueError):
            return None
        total: Counter[str] = Counter()
        for w in doc.get("workers", []):
            total.update(w.get("counters", {}))
        return dict(total)

    async def redis_restart(self) -> dict[str, Any]:
        if self.redis is None:
            _log(f"{self.tag} redis-restart skipped: it needs the private Redis this tool starts (no --redis-url)")
            return {"skipped": "needs the tool's private Redis"}
        redis = self.redis
        n, rate = self.args.restart_subscribers, self.args.restart_rate
        conn = await self.connect(n)
        await self.warm()
        before = sum(s["open"] for s in await self.clients.all("progress"))
        times: dict[str, float] = {}

        async def outage() -> None:
            await asyncio.sleep(2.0)
            times["down"] = time.monotonic()
            await asyncio.to_thread(redis.stop)
            await asyncio.sleep(self.args.outage)
            await asyncio.to_thread(redis.start)
            times["back"] = time.monotonic()
            _log(f"{self.tag} Redis down {times['back'] - times['down']:.2f} s (stop, {self.args.outage:g} s, start)")

        step = await self.step("redis-restart", rate, 6.0, self.args.payload, during=outage, per_seq=True)
        published, counts, firsts, fast = step.pop("_per_seq")
        after = sum(s["open"] for s in await self.clients.all("progress"))
        back = times["back"]
        seqs = range(published.lo, published.hi)
        after_back = [i for i, seq in enumerate(seqs) if published.sent_at[seq] >= back]
        firsts_after = [firsts[i] for i in after_back if firsts[i] > 0]
        full = next((i for i in after_back if counts[i] >= fast * 0.999), None)
        ok = [i for i, seq in enumerate(seqs) if seq not in published.failed]
        lost_frames = sum(1 for i in ok if counts[i] < fast)
        result = {
            "subscribers": conn["ok"],
            "rate": rate,
            "connections_before": before,
            "connections_after": after,
            "redis_down_s": round(back - times["down"], 3),
            "resume_s": round(min(firsts_after) - back, 3) if firsts_after else None,
            "resume_all_s": round(published.sent_at[seqs[full]] - back, 3) if full is not None else None,
            "published_ok": len(ok),
            "publish_failed_while_down": len(published.failed),
            "published_without_receivers": len(published.no_receivers),
            "frames_lost": lost_frames,
            "deliveries_lost": sum(fast - counts[i] for i in ok),
            "step": step,
        }
        await self.close_all()
        _log(f"{self.tag} redis-restart: resume {result['resume_s']} s; frames lost {lost_frames}")
        return result


# ------------------------------------------------------------------------------------------------
# Report.


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}{unit}" if abs(value) < 1000 else f"{value:.0f}{unit}"
    return f"{value}{unit}"


def _rows(result: dict[str, Any]) -> Iterator[tuple[str, str]]:
    fanout = result.get("fanout")
    if fanout:
        for step in fanout["steps"]:
            tag = " (CLIENT SATURATED)" if step["client_saturated"] else ""
            tag += " (LOAD NOT OFFERED)" if step["load_not_offered"] else ""
            if step.get("machine_saturated"):
                tag += f" (MACHINE SATURATED; other processes {step['other_processes_cores']} cores)"
            lat = step["latency_ms"]
            yield (f"fanout {step['rate']:g}/s x {step['subscribers']} subs",
                   f"{_fmt(step['server_cpu_us_per_delivery'])} us/delivery, delivered "
                   f"{_fmt(step['delivered_fraction'])}, p50/p99/max {lat['p50']}/{lat['p99']}/{lat['max']} ms, "
                   f"{step['deliveries_per_s'] / 1000:.1f}k deliveries/s, dup {step['duplicates']}, "
                   f"reordered {step['reordered']}{tag}")
        yield ("highest rate >= 99.9% and p99 < 200 ms", _fmt(fanout["highest_rate_passing"], " msg/s"))
    idle = result.get("idle")
    if idle:
        yield (f"idle RSS per connection ({idle['connected']})", f"{_fmt(idle['kb_per_connection'])} KB "
               f"(workers {idle['rss_before_mb']} -> {idle['rss_connected_mb']} MB)")
        yield ("memory given back after close", f"{_fmt(idle['given_back_fraction'])} "
               f"(-> {idle['rss_after_close_mb']} MB after {idle['settle_s']} s)")
    slow = result.get("slow")
    if slow:
        fast = slow["fast"]
        yield (f"slow: {slow['stalled']} stalled of {slow['subscribers']}",
               f"stalled {slow['stalled_outcomes']}, RSS growth {slow['rss_growth_mb']} MB, "
               f"send queue peak {slow['send_queue_peak_mb']} MB")
        yield ("slow: fast clients", f"delivered {_fmt(fast['delivered_fraction'])}, p99 {fast['latency_ms']['p99']} ms"
               + (" (CLIENT SATURATED)" if fast["client_saturated"] else ""))
    restart = result.get("redis-restart")
    if restart and "skipped" not in restart:
        yield ("redis restart", f"resume {_fmt(restart['resume_s'], ' s')} "
               f"(all clients {_fmt(restart['resume_all_s'], ' s')}), "
               f"frames lost {restart['frames_lost']} of {restart['published_ok']}, connections "
               f"{restart['connections_before']} -> {restart['connections_after']}")


def _step_at(result: dict[str, Any], rate: float) -> dict[str, Any] | None:
    steps: list[dict[str, Any]] = (result.get("fanout") or {}).get("steps", [])
    return next((step for step in steps if step["rate"] == rate), None)


def _issue_rows(result: dict[str, Any]) -> dict[str, str]:
    """Issue 6's table, one cell per figure, for one target."""
    cells: dict[str, str] = {}
    for rate in (20.0, 50.0):
        step = _step_at(result, rate)
        if step is not None:
            flag = " (client saturated)" if step["client_saturated"] else ""
            cells[f"server CPU per delivery, {step['subscribers']} subs x {rate:g} msg/s"] = (
                f"{_fmt(step['server_cpu_us_per_delivery'])} us{flag}")
    step = _step_at(result, 20.0)
    if step is not None:
        cells["p99 latency at 20 msg/s"] = f"{step['latency_ms']['p99']} ms (p50 {step['latency_ms']['p50']})"
    fanout = result.get("fanout")
    if fanout:
        last = fanout["steps"][-1] if fanout["steps"] else None
        why = ""
        if last is not None and not last.get("pass"):
            why = f" ({last['rate']:g} msg/s: delivered {last['delivered_fraction']}, " \
                  f"p99 {last['latency_ms']['p99']} ms"
            if last["load_not_offered"]:
                why = f" ({last['rate']:g} msg/s: load not offered"
            elif last["client_saturated"]:
                why += ", client saturated"
            if last.get("machine_saturated"):
                why += f", machine {last['machine_cpu_percent']:.0f}% busy"
            why += ")"
        cells["highest rate with >= 99.9% delivered and p99 < 200 ms"] = (
            _fmt(fanout["highest_rate_passing"], " msg/s") + why)
    idle = result.get("idle")
    if idle:
        cells[f"RSS per idle connection ({idle['connected']})"] = f"{_fmt(idle['kb_per_connection'])} KB"
        given = idle["given_back_fraction"]
        cells["memory given back after close"] = "n/a" if given is None else f"{given * 100:.0f}%"
    slow = result.get("slow")
    if slow:
        fast = slow["fast"]
        counters = slow.get("server_counters") or {}
        closed = f", server slow_closed {counters['slow_closed']}" if "slow_closed" in counters else ""
        cells["slow clients: stalled ones"] = f"{slow['stalled_outcomes']}{closed}"
        cells["slow clients: RSS growth"] = f"{slow['rss_growth_mb']} MB (kernel send queue peak " \
                                            f"{slow['send_queue_peak_mb']} MB)"
        cells["slow clients: fast ones"] = f"{_fmt(fast['delivered_fraction'])} delivered, p99 " \
                                           f"{fast['latency_ms']['p99']} ms"
    restart = result.get("redis-restart")
    if restart and "skipped" not in restart:
        cells["Redis restart: deliveries resume after Redis is back"] = _fmt(restart["resume_s"], " s") \
            if restart["resume_s"] is not None else "never"
        cells["Redis restart: frames lost"] = f"{restart['frames_lost']} of {restart['published_ok']} published"
    return cells


def print_table(results: dict[str, dict[str, Any]]) -> None:
    """The figures side by side, as a Markdown table."""
    names = list(results)
    cells = {name: _issue_rows(result) for name, result in results.items()}
    rows = list(dict.fromkeys(row for name in names for row in cells[name]))
    print("\n| figure | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for row in rows:
        print(f"| {row} | " + " | ".join(cells[name].get(row, "") for name in names) + " |")


def print_summary(results: dict[str, dict[str, Any]]) -> None:
    for name, result in results.items():
        print(f"\n== {name}")
        rows = list(_rows(result))
        width = max((len(k) for k, _ in rows), default=0)
        for key, value in rows:
            print(f"  {key.ljust(width)}  {value}")


# ------------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"any of {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--target", choices=("wsbroadcast", "broadcaster", "both"), default="wsbroadcast")
    parser.add_argument("--url", help="drive a running service (ws://127.0.0.1:8000) instead of starting one")
    parser.add_argument("--redis-url", help="with --url: the Redis it uses (default $REDIS_URL)")
    parser.add_argument("--redis-prefix", default=os.environ.get("REDIS_PREFIX", "broadcast:"))
    parser.add_argument("--server-pid", type=int, help="with --url: the gunicorn master (default: found by port)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for the service it starts (repeatable), e.g. SEND_BUFFER_BYTES=65536")
    parser.add_argument("--clients", type=int, default=max(2, os.cpu_count() or 2), help="client processes")
    parser.add_argument("--connections", type=int, default=5000, help="idle: connections")
    parser.add_argument("--connect-rate", type=float, default=1000.0, help="connections opened per second")
    parser.add_argument("--settle", type=float, default=3.0, help="idle: seconds before each RSS reading")
    parser.add_argument("--subscribers", type=int, default=2000, help="fanout, slow: subscribers")
    parser.add_argument("--rates", default="20,50,100,200", help="fanout: msg/s steps")
    parser.add_argument("--duration", type=float, default=10.0, help="fanout: seconds per step")
    parser.add_argument("--payload", type=int, default=200, help="bytes of data per frame")
    parser.add_argument("--slow-fraction", type=float, default=0.10)
    parser.add_argument("--slow-rate", type=float, default=20.0)
    parser.add_argument("--slow-payload", type=int, default=2048)
    parser.add_argument("--slow-duration", type=float, default=60.0)
    parser.add_argument("--sample-every", type=float, default=5.0, help="slow: seconds between samples")
    parser.add_argument("--restart-subscribers", type=int, default=200)
    parser.add_argument("--restart-rate", type=float, default=100.0, help="msg/s during redis-restart")
    parser.add_argument("--outage", type=float, default=1.0, help="seconds Redis stays down")
    parser.add_argument("--profile", metavar="DIR",
                        help="py-spy every worker during each step into DIR (inflates server CPU: not for figures)")
    parser.add_argument("--json", metavar="PATH", help="write every figure as JSON ('-' for stdout)")
    args = parser.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario {sorted(unknown)[0]!r}; expected any of {', '.join(SCENARIOS)}")
    args.scenarios = [s for s in SCENARIOS if s in args.scenarios] if args.scenarios else list(SCENARIOS)
    if args.url and args.target != "wsbroadcast":
        parser.error("--url drives one running service; --target applies only to services this tool starts")
    if args.url and not (args.redis_url or os.environ.get("REDIS_URL")):
        parser.error("--url needs --redis-url (or REDIS_URL) to publish through")
    return args


async def _main(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    clients = _Clients(args.clients)
    redis: PrivateRedis | None = None
    results: dict[str, dict[str, Any]] = {}
    try:
        names = ["wsbroadcast", "broadcaster"] if args.target == "both" else [args.target]
        if not args.url:
            redis = PrivateRedis()
            await asyncio.to_thread(redis.start)
            if "broadcaster" in names:
                await asyncio.to_thread(ensure_baseline_venv)
        extra_env = dict(item.split("=", 1) for item in args.env)
        for name in names:
            if args.url:
                target = _attach(args.url, args.redis_url or os.environ["REDIS_URL"], args.redis_prefix,
                                 args.server_pid)
            else:
                assert redis is not None
                start: Callable[[], Target] = (
                    (lambda: _start_wsbroadcast(redis.url, args.workers, extra_env)) if name == "wsbroadcast"
                    else (lambda: _start_broadcaster(redis.url, args.workers))
                )
                target = await asyncio.to_thread(start)
            _log(f"[{name}] server on {target.host}:{target.port}, workers {[p.pid for p in target.workers()]}"
                 + (f", log {target.log_path}" if target.log_path else ""))
            run = Run(args, clients, target, None if args.url else redis)
            result: dict[str, Any] = {"target": name, "port": target.port}
            try:
                for scenario in args.scenarios:
                    result[scenario] = await getattr(run, scenario.replace("-", "_"))()
            finally:
                results[name] = result
                await asyncio.to_thread(target.stop)
    finally:
        clients.stop()
        if redis is not None:
            await asyncio.to_thread(redis.__exit__, None, None, None)
    return results


def _git_state() -> dict[str, Any]:
    """The commit measured, and the files that differed from it (a figure belongs to a tree)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(), "modified": dirty}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    limit = _raise_fd_limit()
    needed = max(args.connections, args.subscribers) + 100
    if limit < needed:
        print(f"loadtest: the fd limit is {limit}; {needed} are needed (raise it: ulimit -Hn)", file=sys.stderr)
        return 2
    started = time.time()
    load = os.getloadavg()
    try:
        results = asyncio.run(_main(args))
    except KeyboardInterrupt:
        return 130
    report = {
        "git": _git_state(),
        "command": " ".join(["scripts/loadtest", *(argv if argv is not None else sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "load_average_at_start": [round(x, 2) for x in load],
        "cpus": os.cpu_count(),
        "results": results,
    }
    print_summary(results)
    print_table(results)
    if args.json:
        text = orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
