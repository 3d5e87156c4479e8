"""Start the service as deployed: the Procfile's ``web:`` line, several workers, a real Redis.

REDIS_URL set: that Redis. Unset: a private redis-server on a free loopback port, started here and
stopped on exit (with REDIS_CLUSTER=1, a private Redis Cluster: 3 masters, 3 replicas).
PUBLISH_TOKEN and ADMIN_TOKEN unset: random ones for this run, printed (the second is the
dashboard's password and opens the health detail). The banner comes once every worker serves; a
port in use or an invalid setting is one line on stderr instead.
"""

from __future__ import annotations

import math
import os
import secrets
import signal
import subprocess
import sys

from scripts.redis_cluster import PrivateCluster
from scripts.redis_server import PrivateRedis
from scripts.service_process import ROOT, ServiceError, ServiceProcess, port_in_use, procfile_web, with_interpreter_path
from service.config import Settings, SettingsError

__all__ = ["ROOT", "main", "procfile_web"]

# Beyond the workers' own graceful timeout, for the master to reap them and run its exit hooks.
STOP_MARGIN = 5.0


def _banner(env: dict[str, str], host: str, redis: PrivateRedis | PrivateCluster | None) -> str:
    port = env["PORT"]
    kind = "Redis Cluster (3 masters, 3 replicas)" if isinstance(redis, PrivateCluster) else "Redis"
    where = f"private {kind} at {env['REDIS_URL']} (stopped on exit)" if redis else "REDIS_URL"
    cluster = "REDIS_CLUSTER=1 " if isinstance(redis, PrivateCluster) or env.get("REDIS_CLUSTER") else ""
    listens = f"all interfaces ({host}:{port})" if host in ("0.0.0.0", "::", "") else f"{host}:{port}"
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"""
wsbroadcast: {env['WEB_CONCURRENCY']} workers listening on {listens}, Redis: {where}
  connect:  ws://{local}:{port}/ws?channels=news
  publish:  curl -X POST http://{local}:{port}/publish -H 'Authorization: Bearer {env['PUBLISH_TOKEN']}' \\
                 -H 'Content-Type: application/json' -d '{{"channel":"news","data":{{"hello":"world"}}}}'
        or  {cluster}REDIS_URL={env['REDIS_URL']} scripts/publish news '{{"hello":"world"}}'
  health:   curl http://{local}:{port}/health/cluster   ·   {cluster}REDIS_URL={env['REDIS_URL']} scripts/health
  metrics:  curl http://{local}:{port}/metrics
  dashboard: http://{local}:{port}/dashboard   (any user name, password {env['ADMIN_TOKEN']})
  browser:  import {{ WsBroadcast }} from "http://{local}:{port}/client.js"   (see the README's Clients)
  stop:     Ctrl-C
"""


def _say(line: str) -> None:
    print(f"wsbroadcast: {line}", file=sys.stderr, flush=True)


def main() -> int:
    env = dict(os.environ)
    env.setdefault("WEB_CONCURRENCY", "2")
    env.setdefault("PORT", "8000")
    env["PATH"] = with_interpreter_path(env.get("PATH", ""))
    try:
        settings = Settings.from_env(env)
    except SettingsError as exc:
        _say(f"invalid setting: {exc}")
        return 2
    host = settings.bind_host
    if port_in_use(host, settings.port):
        _say(f"port {settings.port} on {host} is in use: stop what listens there or set PORT to a free port")
        return 1
    stopping = False
    service: ServiceProcess | None = None

    def stop(signum: int, _frame: object) -> None:
        # Its own session: Ctrl-C reaches only this process, which asks gunicorn for a graceful stop
        # (SIGTERM: clients get close 1012, heartbeats are deleted) instead of a quick one.
        nonlocal stopping
        stopping = True
        if service is not None and service.pid is not None:
            os.kill(service.pid, signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    redis: PrivateRedis | PrivateCluster | None = None
    try:
        if not env.get("REDIS_URL"):
            redis = PrivateCluster() if settings.redis_cluster else PrivateRedis()
            redis.start()
            env["REDIS_URL"] = redis.url
        if stopping:
            return 0
        for name in ("PUBLISH_TOKEN", "ADMIN_TOKEN"):
            if not env.get(name):
                env[name] = secrets.token_urlsafe(16)
        service = ServiceProcess(env, cwd=ROOT).start()
        try:
            service.wait_ready(math.inf, waiting=lambda waited: _say(f"waiting {waited:.0f} s: {service.last_error}"))
        except ServiceError as exc:
            if stopping:
                return 0
            _say(str(exc))
            return 1
        print(_banner(env, host, redis), flush=True)
        process = service.process
        assert process is not None
        while not stopping:
            try:
                return process.wait(1.0)
            except subprocess.TimeoutExpired:
                continue
        # Asked to stop: the stop below is bounded even if the master never exits on its own.
        return 0
    except (RuntimeError, OSError) as exc:
        _say(str(exc))
        return 1
    finally:
        try:
            if service is not None:
                service.stop(settings.graceful_timeout + STOP_MARGIN)
        finally:
            if redis is not None:
                redis.stop()


if __name__ == "__main__":
    sys.exit(main())
