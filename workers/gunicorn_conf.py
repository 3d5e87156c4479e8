"""gunicorn settings for wsbroadcast, from the environment (Heroku's PORT and WEB_CONCURRENCY).

Invalid settings stop the master here, before any worker starts, with one line naming the
variable. The control socket is off so several instances on one host never collide on it.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from service.config import Settings, SettingsError
from workers import metrics_dir, startup, versions

_unsupported = versions.problems(versions.declared())
if _unsupported:
    print(f"wsbroadcast: unsupported library version: {'; '.join(_unsupported)}", file=sys.stderr)
    sys.exit(2)

try:
    _settings = Settings.from_env()
except SettingsError as exc:
    print(f"wsbroadcast: invalid setting: {exc}", file=sys.stderr)
    sys.exit(2)


def _raise_nofile(needed: int) -> tuple[int, int, int]:
    """Raise this process's soft RLIMIT_NOFILE (inherited by the workers) towards its hard limit when
    ``needed`` (per worker: the limit is per process) is more; (soft before, soft now, needed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return before, soft, needed


# Every connection is a file descriptor; the reserve is for Redis, logs, /health and refusals.
_nofile = _raise_nofile(_settings.max_connections + _settings.fd_reserve)

# Before any worker forks: every worker inherits the directory of the host's metric files.
_metrics_dir = metrics_dir.prepare(_settings.port)

bind = [f"{_settings.bind_host}:{_settings.port}"]
workers = _settings.web_concurrency
worker_class = "workers.worker.BroadcastWorker"
graceful_timeout = int(_settings.graceful_timeout)
# WebSocket workers are busy with long-lived connections, not requests: no request-count restarts.
max_requests = 0
timeout = 30
keepalive = 5
control_socket_disable = True
accesslog = None
errorlog = "-"
loglevel = _settings.log_level
proc_name = f"wsbroadcast:{_settings.port}"


def on_starting(server: Any) -> None:
    before, soft, needed = _nofile
    if soft != resource.RLIM_INFINITY and soft < needed:
        server.log.warning(
            "RLIMIT_NOFILE is %d (hard limit reached): each worker needs MAX_CONNECTIONS + FD_RESERVE = %d "
            "file descriptors; it will refuse connections (503) beyond about %d. Raise `ulimit -n`.",
            soft, needed, soft - _settings.fd_reserve,
        )
    elif soft != before:
        server.log.info("RLIMIT_NOFILE raised from %d to %d (MAX_CONNECTIONS + FD_RESERVE)", before, soft)
    for line in startup.warnings(_settings):
        server.log.warning("%s", line)
    removed = metrics_dir.wipe()
    server.log.info("metrics: multiprocess files in %s (%d stale files removed)", _metrics_dir, removed)


def child_exit(server: Any, worker: Any) -> None:
    # A dead worker's live gauges (connections, RSS...) must leave the host's sums.
    metrics_dir.worker_exited(worker.pid)


def on_exit(server: Any) -> None:
    metrics_dir.remove_owned()
