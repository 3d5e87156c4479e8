"""Protocol keepalive on both transports: pings every WS_PING_INTERVAL, 1011 without a pong in
WS_PING_TIMEOUT; a client that answers stays, however long it is quiet."""

from __future__ import annotations

import asyncio
import time

import pytest

from scripts.attack import OP_PING, RawClient
from scripts.redis_server import PrivateRedis
from tests.support.clients import recv_publication, subscribe_client
from tests.support.servers import Service
from tests.support.waits import wait_until

HOST = "127.0.0.1"


@pytest.mark.parametrize("fast_path", [1, 0], ids=["lean-path", "asgi-path"])
async def test_a_client_that_answers_no_ping_is_closed_1011_and_one_that_does_stays(
    redis_server: PrivateRedis, fast_path: int
) -> None:
    with Service(redis_server.url, workers=1, fast_path=fast_path, ws_ping_interval=0.5, ws_ping_timeout=0.5) as svc:
        # websockets answers pings by itself.
        alive = await subscribe_client(svc, "k")
        mute = RawClient(HOST, svc.port).handshake("/ws?channels=")
        started = time.monotonic()

        def read_until_close() -> tuple[int, list[int]]:
            opcodes = []
            while True:
                opcode, payload = mute.read_frame()
                opcodes.append(opcode)
                if opcode == 0x8:
                    return int.from_bytes(payload[:2], "big"), opcodes

        code, opcodes = await asyncio.to_thread(read_until_close)
        waited = time.monotonic() - started
        assert code == 1011 and OP_PING in opcodes, (code, opcodes)
        # A ping within the interval (and a sweep's slack), then the timeout (and its slack).
        assert 0.9 <= waited < 5.0, waited
        mute.close()
        wait_until(lambda: svc.get("/health").json()["connections"]["current"] == 1, what="the mute client gone")
        # The one that answers is still served, after several intervals.
        assert (await asyncio.to_thread(svc.publish, "k", {"n": 1})).status_code == 202
        assert await recv_publication(alive, 10) == {"channel": "k", "data": {"n": 1}}
        await alive.close()
