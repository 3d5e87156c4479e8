"""Per-worker limits with real workers: the connection limit, the idle sweep, settings (slow consumers:
test_slow_consumers.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from scripts.redis_server import PrivateRedis
from scripts.run import procfile_web
from tests.support.clients import recv_json, recv_publication, subscribe_client
from tests.support.servers import ROOT, Service
from tests.support.waits import async_wait_until, wait_until


async def test_fourth_handshake_is_refused_with_503(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=1, max_connections=3) as service:
        clients = [await subscribe_client(service, "a") for _ in range(3)]
        with pytest.raises(InvalidStatus) as refused:
            await service.connect("?channels=a")
        assert refused.value.response.status_code == 503
        assert refused.value.response.headers["Retry-After"]
        service.publish("a", "still served")
        for ws in clients:
            assert await recv_publication(ws) == {"channel": "a", "data": "still served"}
        health = service.get("/health").json()
        assert health["connections"]["current"] == 3
        assert health["counters"]["refused_full"] == 1
        # A slot freed is a slot offered again.
        await clients.pop().close()
        await async_wait_until(
            lambda: asyncio.to_thread(lambda: service.get("/health").json()["connections"]["current"] == 2),
            what="the closed client to be unregistered",
        )
        clients.append(await subscribe_client(service, "a"))
        for ws in clients:
            await ws.close()


async def test_idle_clients_are_closed_with_4000(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=2, idle_timeout=1, cleanup_interval=0.3) as service:
        clients = [await subscribe_client(service, "quiet") for _ in range(4)]
        wait_until(lambda: service.connections() == 4, what="4 connections in the heartbeats")
        for ws in clients:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 4000
        wait_until(lambda: service.connections() == 0, what="the count to return to 0")
        wait_until(lambda: "closed" in service.log() and "idle connections" in service.log(), what="log line")
        assert sum(b["counters"]["idle_closed"] for b in service.heartbeats()) == 4


async def test_a_talking_client_is_not_idle(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=1, idle_timeout=1, cleanup_interval=0.2) as service:
        talker = await subscribe_client(service, "t")
        quiet = await subscribe_client(service, "q")
        for _ in range(100):  # bounded: 100 x 0.1 s, while the idle timeout is 1 s
            await talker.send('{"op":"ping"}')
            assert await recv_json(talker) == {"op": "pong"}
            try:
                await asyncio.wait_for(quiet.recv(), 0.1)
                raise AssertionError("the quiet client got an unexpected frame")
            except TimeoutError:
                continue
            except ConnectionClosed:
                break
        assert quiet.close_code == 4000
        await talker.send('{"op":"ping"}')
        assert await recv_json(talker) == {"op": "pong"}
        await talker.close()


@pytest.mark.parametrize(
    ("name", "value"),
    [("MAX_CONNECTIONS", "lots"), ("SLOW_CONSUMER_POLICY", "panic"), ("QUEUE_BYTES", "-1"), ("PORT", "99999")],
)
def test_bad_setting_stops_start_up_with_one_line(name: str, value: str) -> None:
    env = {**os.environ, name: value, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    result = subprocess.run(procfile_web(), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert name in lines[0] and repr(value) in lines[0] and "expected" in lines[0]
