"""scripts/health names the Redis it read (password redacted), in the table, in --json and in its
one-line failure, and says when that is the default because REDIS_URL is unset."""

from __future__ import annotations

import asyncio
import os
import subprocess

import orjson
import pytest
from redis.asyncio import Redis

from scripts.health import format_report, redis_source
from scripts.redis_server import PrivateRedis, free_port
from service.config import Settings
from tests.support.clients import subscribe_client
from tests.support.commands import command
from tests.support.servers import Service
from tests.support.waits import wait_until


def _health(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "REDIS_PREFIX")}
    return command("health", *args, env={**environ, **env})


def test_the_redis_is_named_as_the_client_connects_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    # Not connected: building the client reads nothing (tests never touch the machine's own Redis).
    default = Redis.from_url(Settings.from_env({}).redis_url)
    assert redis_source(default, None) == {"url": "redis://127.0.0.1:6379/0", "source": "default"}
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2@10.0.0.5:6380/3")
    named = redis_source(Redis.from_url("redis://:hunter2@10.0.0.5:6380/3"), None)
    assert named == {"url": "redis://:***@10.0.0.5:6380/3", "source": "REDIS_URL"}
    assert redis_source(Redis.from_url("rediss://app:pw@cache.example/1"), "rediss://app:pw@cache.example/1") == {
        "url": "rediss://app:***@cache.example:6379/1", "source": "--redis-url"
    }
    unreachable = {"status": "failing", "reasons": ["Redis unreachable: refused"], "totals": None,
                   "redis": {"url": "redis://127.0.0.1:6379/0", "source": "default", "prefix": "broadcast:"}}
    assert format_report(unreachable) == (
        "failing: Redis unreachable: refused (redis: redis://127.0.0.1:6379/0 (REDIS_URL is unset: the default)"
        " · prefix broadcast:)"
    )


async def test_the_table_and_json_name_the_redis_they_read(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=1) as service:
        ws = await subscribe_client(service, "named")
        await asyncio.to_thread(wait_until, lambda: service.connections() == 1, 20, 0.1, "the connection counted")
        expected = f"redis://127.0.0.1:{redis_server.port}/0"
        table = await asyncio.to_thread(_health, REDIS_URL=redis_server.url, REDIS_PREFIX=service.prefix)
        assert table.returncode == 0, table.stderr
        first = table.stdout.splitlines()[0]
        assert first.endswith(f" · redis: {expected} (from REDIS_URL) · prefix {service.prefix}"), first
        doc = await asyncio.to_thread(
            _health, "--json", "--redis-url", redis_server.url, REDIS_PREFIX=service.prefix
        )
        assert orjson.loads(doc.stdout)["redis"] == {"url": expected, "source": "--redis-url", "prefix": service.prefix}
        await ws.close()
    # Nothing listens there: the one-line failure says which Redis it could not reach.
    port = free_port()
    failed = await asyncio.to_thread(_health, REDIS_URL=f"redis://:pw@127.0.0.1:{port}/2")
    assert failed.returncode == 2
    assert f"redis: redis://:***@127.0.0.1:{port}/2 (from REDIS_URL)" in failed.stderr
    assert "pw@" not in failed.stderr
