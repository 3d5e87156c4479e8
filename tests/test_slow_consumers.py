"""Slow consumers, against real workers: a client that stops reading is handled alone.

``SLOW_CONSUMER_POLICY=disconnect`` closes it with 4008 and frees its slot at once;
``drop-oldest`` keeps it, drops what does not fit its bounds and counts the drops. A client that
reads, on the same worker and channel, gets every frame in order either way: on both outbound
paths (direct writes and the ASGI queue, which compressed connections always take), with small
bounds and with the defaults. Every stalled client is built one way (``tests.support.stalled``)
and fed one way (``publish_numbered``: a backlog that the reading client keeps up with).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from scripts.redis_server import PrivateRedis
from service.config import Settings
from tests.support.clients import BackgroundReader, recv_json, subscribe_client
from tests.support.metrics import scrape, total
from tests.support.publishers import publish_numbered
from tests.support.servers import Service
from tests.support.stalled import abandon, stalled_client, stalled_on_both_workers
from tests.support.waits import wait_until

# Bounds a backlog of 2 KB frames reaches quickly.
SMALL = {"queue_size": 1000, "queue_bytes": 65536, "send_buffer_bytes": 16384}

# (policy, settings, frames published, characters of padding in each)
CASES = {
    "disconnect-fast-path": ("disconnect", {**SMALL, "fast_path": 1, "ws_compression": 0}, 400, 2048),
    "disconnect-asgi-path": ("disconnect", {**SMALL, "fast_path": 0, "ws_compression": 0}, 400, 2048),
    # Compressed connections take the ASGI path whatever FAST_PATH says; they must be closed too.
    "disconnect-compressed": ("disconnect", {**SMALL, "fast_path": 1, "ws_compression": 1}, 400, 2048),
    "drop-oldest": ("drop-oldest", {**SMALL, "queue_size": 20}, 400, 2048),
    # The default bounds (QUEUE_SIZE 1000, QUEUE_BYTES 1 MiB, SEND_BUFFER_BYTES 256 KiB): 4.8 MB
    # is far beyond what the stalled client's queue and socket buffers hold.
    "disconnect-default-bounds": ("disconnect", {}, 300, 16000),
    "drop-oldest-default-bounds": ("drop-oldest", {}, 300, 16000),
}


@pytest.mark.parametrize(("policy", "settings", "count", "size"), CASES.values(), ids=CASES.keys())
async def test_a_stalled_client_is_handled_alone_and_the_reading_one_gets_everything(
    redis_server: PrivateRedis, policy: str, settings: dict[str, Any], count: int, size: int
) -> None:
    with Service(redis_server.url, workers=1, slow_consumer_policy=policy, **settings) as service:
        configured = Settings.from_env(service.env)
        reading = BackgroundReader(await subscribe_client(service, "feed"))
        slow = await stalled_client(service, "feed")
        sent_at = await publish_numbered(service, "feed", count, size, reader=reading)

        assert not reading.closed, reading.ws.close_code
        got = [frame["data"]["seq"] for _, frame in reading.frames]
        assert got == list(range(count)), "the reading client must get every frame, in order"
        latencies = sorted(stamp - sent_at[frame["data"]["seq"]] for stamp, frame in reading.frames)
        print(
            f"slow client ({policy}, {settings}): the reading client got {count}/{count} frames in order, "
            f"latency p50 {latencies[count // 2] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms"
        )

        if policy == "disconnect":
            # Unregistered while it still reads nothing: a client that never reads again must not
            # keep its slot, whichever path it is on.
            health = await asyncio.to_thread(
                wait_until,
                lambda: (h := service.get("/health").json())["connections"]["current"] == 1 and h,
                10,
                0.05,
                "the stalled client to be unregistered",
            )
            assert health["counters"]["slow_closed"] == 1, health["counters"]
            with pytest.raises(ConnectionClosed) as closed:
                for _ in range(count + 1):
                    await asyncio.wait_for(slow.recv(), 10)  # what was buffered, then the close
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4008
            assert slow.close_code == 4008
            remaining = 1
        else:
            health = (await asyncio.to_thread(service.get, "/health")).json()
            dropped = health["counters"]["dropped"]
            assert dropped > 0 and health["counters"]["slow_closed"] == 0, health["counters"]
            # Memory bounded: what waits for the stalled client stays within QUEUE_BYTES.
            assert health["queues"]["depth"]["bytes_total"] <= configured.queue_bytes, health["queues"]
            # Still connected: draining it yields the newest frames, in order, and exactly
            # ``count - dropped`` of them.
            seqs: list[int] = []
            while len(seqs) < count - dropped:
                seqs.append((await recv_json(slow, timeout=10))["data"]["seq"])
            assert seqs == sorted(seqs) and seqs[-1] == count - 1
            await slow.send('{"op":"ping"}')
            assert await recv_json(slow) == {"op": "pong"}
            remaining = 2
        direct = configured.fast_path and not configured.ws_compression and policy == "disconnect"
        paths = (await asyncio.to_thread(service.get, "/health")).json()["connections"]["paths"]
        assert paths == ({"direct": remaining, "queue": 0} if direct else {"direct": 0, "queue": remaining})
        if policy != "disconnect":
            await slow.close()
        await reading.stop()


def _dropped(service: Service) -> int:
    return sum(beat["counters"]["dropped"] for beat in service.heartbeats())


async def test_drop_oldest_counts_dropped_frames_on_each_worker(redis_server: PrivateRedis) -> None:
    with Service(
        redis_server.url, workers=2, slow_consumer_policy="drop-oldest", queue_size=5, send_buffer_bytes=4096
    ) as svc:
        stalled = await stalled_on_both_workers(svc, "flood")
        await publish_numbered(svc, "flood", 80, 4096)  # 320 KiB to clients that read nothing
        wait_until(
            lambda: all(b["counters"]["dropped"] > 0 for b in svc.heartbeats()), 15, 0.2, "drops on both workers"
        )
        wait_until(
            lambda: total(scrape(svc), "wsbroadcast_frames_dropped_total") == _dropped(svc),
            15, 0.2, "dropped frames summed over both workers",
        )
        m = scrape(svc)
        assert total(m, "wsbroadcast_connections_closed_total", reason="slow_consumer") == 0
        assert total(m, "wsbroadcast_connections") == len(stalled)  # dropping frames, not clients
        for ws in stalled:
            abandon(ws)
