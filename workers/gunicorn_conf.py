"""gunicorn settings for wsbroadcast, from the environment (Heroku's PORT and WEB_CONCURRENCY).

Invalid settings stop the master here, before any worker starts, with one line naming the
variable. The control socket is off so several instances on one host never collide on it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from service.config import Settings, SettingsError
from workers import metrics_dir, versions

_unsupported = versions.problems(versions.declared())
if _unsupported:
    print(f"wsbroadcast: unsupported library version: {'; '.join(_unsupported)}", file=sys.stderr)
    sys.exit(2)

try:
    _settings = Settings.from_env()
except SettingsError as exc:
    print(f"wsbroadcast: invalid setting: {exc}", file=sys.stderr)
    sys.exit(2)

# Before any worker forks: every worker inherits the directory of the host's metric files.
_metrics_dir = metrics_dir.prepare(_settings.port)

bind = [f"{os.environ.get('BIND_HOST', '0.0.0.0')}:{_settings.port}"]
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
loglevel = os.environ.get("LOG_LEVEL", "info")
proc_name = f"wsbroadcast:{_settings.port}"


def on_starting(server: Any) -> None:
    removed = metrics_dir.wipe()
    server.log.info("metrics: multiprocess files in %s (%d stale files removed)", _metrics_dir, removed)


def child_exit(server: Any, worker: Any) -> None:
    # A dead worker's live gauges (connections, RSS...) must leave the host's sums.
    metrics_dir.worker_exited(worker.pid)


def on_exit(server: Any) -> None:
    metrics_dir.remove_owned()
