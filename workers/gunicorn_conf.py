"""gunicorn settings for wsbroadcast, from the environment (Heroku's PORT and WEB_CONCURRENCY).

Invalid settings stop the master here, before any worker starts, with one line naming the
variable. The control socket is off so several instances on one host never collide on it.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from service.config import Settings, SettingsError  # noqa: E402

try:
    _settings = Settings.from_env()
except SettingsError as exc:
    print(f"wsbroadcast: invalid setting: {exc}", file=sys.stderr)
    sys.exit(2)

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
