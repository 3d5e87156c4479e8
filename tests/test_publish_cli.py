"""scripts/publish: straight to Redis (the documented integration point) and through POST /publish."""

from __future__ import annotations

import asyncio
import os

from scripts.redis_server import PrivateRedis
from tests.support.clients import recv_publication, subscribe_client
from tests.support.commands import command
from tests.support.servers import Service


async def test_publish_cli_via_redis_and_http(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=1) as service:
        ws = await subscribe_client(service, "cli")
        env = {**os.environ, "REDIS_URL": redis_server.url, "REDIS_PREFIX": service.prefix}
        done = await asyncio.to_thread(command, "publish", "cli", '{"via":"redis"}', env=env)
        assert done.returncode == 0, done.stderr
        assert "1 workers" in done.stdout
        assert await recv_publication(ws) == {"channel": "cli", "data": {"via": "redis"}}

        env["PUBLISH_TOKEN"] = "test-token"
        done = await asyncio.to_thread(command, "publish", "cli", '"via http"', "--http", service.base, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert await recv_publication(ws) == {"channel": "cli", "data": "via http"}

        env["PUBLISH_TOKEN"] = "wrong"
        done = await asyncio.to_thread(command, "publish", "cli", "1", "--http", service.base, env=env)
        assert done.returncode == 1 and "403" in done.stdout
        await ws.close()


def test_publish_cli_rejects_bad_input_and_unreachable_redis() -> None:
    env = {**os.environ, "REDIS_URL": "redis://127.0.0.1:1/0"}
    bad_json = command("publish", "cli", "{nope", env=env)
    assert bad_json.returncode == 2 and "not valid JSON" in bad_json.stderr
    bad_channel = command("publish", "no spaces", "1", env=env)
    assert bad_channel.returncode == 2 and "channel names" in bad_channel.stderr
    down = command("publish", "cli", "1", env=env)
    assert down.returncode == 2
    assert down.stderr.startswith("publish: Redis unreachable") and "Traceback" not in down.stderr
