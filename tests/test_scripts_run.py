"""scripts/run: the banner once it serves, one line when it cannot, nothing left behind on exit."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil

from scripts.redis_server import PrivateRedis, free_port
from scripts.service_process import ServiceProcess, web_env
from tests.support.servers import ROOT
from tests.support.waits import process_gone, wait_until


def _run_env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PORT": str(port),
        "BIND_HOST": "127.0.0.1",
        "WEB_CONCURRENCY": "1",
        "TMPDIR": str(tmp_path),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        **extra,
    }
    env.pop("REDIS_URL", None)  # its own private Redis
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def test_a_port_in_use_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "scripts.run"], cwd=ROOT, env=_run_env(tmp_path, port),
            capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 1
    assert "connect:" not in result.stdout  # no banner
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"port {port}" in lines[0] and "in use" in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []  # no Redis directory, no metrics directory


def test_banner_once_serving_and_a_hung_master_still_stops_redis(tmp_path: Path) -> None:
    port = free_port()
    run = subprocess.Popen(
        [sys.executable, "-m", "scripts.run"], cwd=ROOT, env=_run_env(tmp_path, port, GRACEFUL_TIMEOUT="1"),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )
    hung: list[int] = []
    try:
        assert run.stdout is not None
        banner = ""
        while "stop:" not in banner:
            line = run.stdout.readline()
            assert line, f"scripts/run exited with {run.wait(10)} before its banner"
            banner += line
        assert f"listening on 127.0.0.1:{port}" in banner
        # The banner comes once the service serves, not when it is merely launched.
        assert httpx.get(f"http://127.0.0.1:{port}/health/cluster", timeout=10).status_code == 200
        # The made-up admin token it prints opens the dashboard.
        password = re.search(r"/dashboard +\(any user name, password (\S+)\)", banner)
        assert password is not None, banner
        page = httpx.get(f"http://127.0.0.1:{port}/dashboard", auth=("me", password.group(1)), timeout=10)
        assert page.status_code == 200
        children = psutil.Process(run.pid).children()
        redis_server = next(p for p in children if "redis-server" in p.name())
        master = next(p for p in children if p.pid != redis_server.pid)
        hung.append(master.pid)
        workers = master.children()
        assert workers
        os.kill(master.pid, signal.SIGSTOP)  # a master that will not stop
        started = time.monotonic()
        os.kill(run.pid, signal.SIGTERM)
        run.wait(40)
        print(f"scripts/run exited {time.monotonic() - started:.1f} s after SIGTERM with a hung master")
        for proc in (redis_server, master, *workers):
            wait_until(functools.partial(process_gone, proc), 10, what=f"{proc.pid} to be gone")
        assert list(tmp_path.iterdir()) == []  # the Redis directory and the metrics directory went too
    finally:
        for pgid in (run.pid, *hung):  # what the code under test failed to stop
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        run.wait(10)


def test_the_web_line_runs_from_any_directory(tmp_path: Path, redis_server: PrivateRedis) -> None:
    """As an installed package runs it: the gunicorn config is found as a module, not a relative path."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = web_env(port=free_port(), workers=1, redis_url=redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    log_path = tmp_path / "web.log"
    service = ServiceProcess(env, log_path=log_path, cwd=elsewhere).start()
    try:
        service.wait_ready(60)
    finally:
        assert service.stop(15) == 0, log_path.read_text()
