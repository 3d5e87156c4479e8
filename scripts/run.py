"""Start the service as deployed: the Procfile's ``web:`` line, several workers, a real Redis.

REDIS_URL set: that Redis. Unset: a private redis-server on a free loopback port, started here and
stopped on exit. PUBLISH_TOKEN unset: a random one for this run, printed.
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from scripts.redis_server import PrivateRedis

ROOT = Path(__file__).resolve().parent.parent


def procfile_web(root: Path = ROOT) -> list[str]:
    """The ``web:`` command of the Procfile, split into arguments."""
    for line in (root / "Procfile").read_text().splitlines():
        if line.startswith("web:"):
            return shlex.split(line[4:].strip())
    raise RuntimeError("Procfile has no web: line")


def main() -> int:
    env = dict(os.environ)
    env.setdefault("WEB_CONCURRENCY", "2")
    env.setdefault("PORT", "8000")
    redis: PrivateRedis | None = None
    if not env.get("REDIS_URL"):
        redis = PrivateRedis()
        redis.start()
        env["REDIS_URL"] = redis.url
    if not env.get("PUBLISH_TOKEN"):
        env["PUBLISH_TOKEN"] = secrets.token_urlsafe(16)
    port = env["PORT"]
    where = f"private Redis at {env['REDIS_URL']} (stopped on exit)" if redis else "REDIS_URL"
    print(
        f"""
wsbroadcast: {env['WEB_CONCURRENCY']} workers on port {port}, Redis: {where}
  connect:  ws://127.0.0.1:{port}/ws?channels=news
  publish:  curl -X POST http://127.0.0.1:{port}/publish -H 'Authorization: Bearer {env['PUBLISH_TOKEN']}' \\
                 -H 'Content-Type: application/json' -d '{{"channel":"news","data":{{"hello":"world"}}}}'
        or  REDIS_URL={env['REDIS_URL']} scripts/publish news '{{"hello":"world"}}'
  health:   curl http://127.0.0.1:{port}/health/cluster   ·   REDIS_URL={env['REDIS_URL']} scripts/health
  metrics:  curl http://127.0.0.1:{port}/metrics
  stop:     Ctrl-C
""",
        flush=True,
    )
    # Its own session: Ctrl-C reaches only this process, which asks gunicorn for a graceful stop
    # (SIGTERM: clients get close 1012, heartbeats are deleted) instead of a quick one.
    server = subprocess.Popen(procfile_web(), cwd=ROOT, env=env, start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        server.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        return server.wait()
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(30)
        if redis is not None:
            redis.__exit__(None, None, None)


if __name__ == "__main__":
    sys.exit(main())
