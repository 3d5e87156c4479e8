"""Per-worker limits with real workers: the connection limit, the idle sweep, slow consumers, settings."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import sys

import orjson
import pytest
from redis import asyncio as aioredis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from scripts.redis_server import PrivateRedis
from scripts.run import procfile_web
from tests.support import (
    ROOT,
    Service,
    async_wait_until,
    recv_ack,
    recv_json,
    recv_publication,
    subscribe_client,
    wait_until,
)


def _current(service: Service) -> int:
    return sum(b["connections"]["current"] for b in service.heartbeats())


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
        wait_until(lambda: _current(service) == 4, what="4 connections in the heartbeats")
        for ws in clients:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 4000
        wait_until(lambda: _current(service) == 0, what="the count to return to 0")
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


async def _stall_and_publish(service: Service, policy_check: str) -> tuple[ClientConnection, ClientConnection, int]:
    """One reading and one stalled client on the same worker; publish 2 KB frames until the policy acts."""
    fast = await subscribe_client(service, "feed")
    # A small receive buffer makes the stalled client's bound reachable quickly; the library stops
    # reading from the socket once its own one-frame queue is full.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", service.port))
    slow = await service.connect("?channels=feed", max_queue=1, sock=sock)
    await recv_ack(slow, "feed")
    # Random payloads: permessage-deflate must not shrink the backlog away.
    pads = [base64.b64encode(os.urandom(1536)).decode() for _ in range(400)]
    received: list[int] = []
    raw = aioredis.Redis.from_url(service.redis_url)
    # Publish in batches and let the reading client catch up after each: it never lags more than
    # one batch, however loaded the machine, while the stalled client falls further behind.
    for batch in range(20):
        for seq in range(batch * 20, batch * 20 + 20):
            frame = orjson.dumps({"channel": "feed", "data": {"seq": seq, "pad": pads[seq]}})
            assert await raw.publish(f"{service.prefix}feed", frame) >= 1
        while len(received) < batch * 20 + 20:
            received.append((await recv_json(fast, timeout=20))["data"]["seq"])
    await raw.aclose()
    sent = 400
    assert received == list(range(400)), "the reading client must get every frame, in order"
    return fast, slow, sent


@pytest.mark.parametrize(
    ("fast_path", "compression"), [(1, 0), (0, 0), (1, 1)], ids=["fast-path", "asgi-path", "compressed"]
)
async def test_slow_consumer_is_closed_with_4008_and_others_unaffected(
    redis_server: PrivateRedis, fast_path: int, compression: int
) -> None:
    # Compressed connections take the ASGI path whatever FAST_PATH says; they must be closed too.
    with Service(
        redis_server.url,
        workers=1,
        queue_bytes=65536,
        send_buffer_bytes=16384,
        queue_size=1000,
        fast_path=fast_path,
        ws_compression=compression,
    ) as service:
        fast, slow, _ = await _stall_and_publish(service, "disconnect")
        # Unregistered while it still reads nothing: a client that never reads again must not
        # keep its slot, whichever path it is on.
        health = await asyncio.to_thread(
            wait_until,
            lambda: (h := service.get("/health").json())["connections"]["current"] == 1 and h,
            10,
            0.05,
            "the stalled client to be unregistered",
        )
        assert health["counters"]["slow_closed"] == 1
        with pytest.raises(ConnectionClosed):
            for _ in range(1000):
                await asyncio.wait_for(slow.recv(), 10)  # drain what was buffered, then the close
        assert slow.close_code == 4008
        paths = service.get("/health").json()["connections"]["paths"]
        assert paths == ({"direct": 1, "queue": 0} if fast_path and not compression else {"direct": 0, "queue": 1})
        await fast.close()


async def test_drop_oldest_counts_drops_and_keeps_the_client(redis_server: PrivateRedis) -> None:
    with Service(
        redis_server.url,
        workers=1,
        slow_consumer_policy="drop-oldest",
        queue_size=20,
        queue_bytes=65536,
        send_buffer_bytes=16384,
    ) as service:
        fast, slow, sent = await _stall_and_publish(service, "drop-oldest")
        health = service.get("/health").json()
        dropped = health["counters"]["dropped"]
        assert dropped > 0
        assert health["counters"]["slow_closed"] == 0
        # The stalled client is still connected; draining it yields the newest frames, in order,
        # and exactly `sent - dropped` of them.
        seqs: list[int] = []
        while len(seqs) < sent - dropped:
            seqs.append((await recv_json(slow, timeout=10))["data"]["seq"])
        assert seqs == sorted(seqs) and seqs[-1] == sent - 1
        await slow.send('{"op":"ping"}')
        assert await recv_json(slow) == {"op": "pong"}
        await slow.close()
        await fast.close()


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
