"""Cross-worker delivery through real gunicorn workers, Redis and WebSocket clients."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import orjson
import pytest
import redis

from scripts.redis_server import PrivateRedis
from tests.support.clients import (
    clients_on_both_workers,
    recv_ack,
    recv_json,
    recv_publication,
    subscribe_client,
    worker_of,
)
from tests.support.servers import Service
from tests.support.waits import wait_until


@pytest.fixture(scope="module", params=["fast-path", "asgi-path"])
def service(request: pytest.FixtureRequest, redis_server: PrivateRedis) -> Iterator[Service]:
    """The same behaviour on both outbound paths: frame-once direct writes and the ASGI queue."""
    with Service(redis_server.url, workers=2, fast_path=int(request.param == "fast-path")) as svc:
        yield svc


async def test_every_client_gets_every_frame_once_in_order(service: Service, redis_server: PrivateRedis) -> None:
    clients = await clients_on_both_workers(service, "news")
    assert len({worker_of(ws) for ws in clients}) == 2
    raw = redis.Redis.from_url(redis_server.url)
    expected = []
    for seq in range(40):
        if seq % 2:
            doc = service.publish("news", {"seq": seq}).json()
            assert (doc["channel"], doc["workers"], doc["offset"]) == ("news", 2, (seq + 1) // 2)
        else:
            # Any process may PUBLISH the documented frame on <prefix><channel>.
            assert raw.publish(f"{service.prefix}news", orjson.dumps({"channel": "news", "data": {"seq": seq}})) == 2
        expected.append({"channel": "news", "data": {"seq": seq}})
    raw.close()
    for ws in clients:
        got = [await recv_publication(ws) for _ in expected]
        assert got == expected
        await ws.send('{"op":"ping"}')
        assert await recv_json(ws) == {"op": "pong"}  # nothing extra was queued before the pong
        await ws.close()


async def test_frames_of_every_header_size_arrive_intact(service: Service, redis_server: PrivateRedis) -> None:
    ws = await subscribe_client(service, "sizes")
    paths = service.get("/health").json()["connections"]["paths"]
    fast = service.env["FAST_PATH"] == "1"
    # Each worker answering /health holds 0 or 1 client here; whichever holds it used the right path.
    assert paths["direct" if not fast else "queue"] == 0, paths
    raw = redis.Redis.from_url(redis_server.url)
    overhead = len(orjson.dumps({"channel": "sizes", "data": ""}))
    # 7-bit, 16-bit and 64-bit WebSocket payload lengths, at and around each boundary.
    for total in (overhead, 125, 126, 127, 65535, 65536):
        frame = orjson.dumps({"channel": "sizes", "data": "x" * (total - overhead)})
        assert len(frame) == total
        raw.publish(f"{service.prefix}sizes", frame)
        assert await asyncio.wait_for(ws.recv(decode=False), 5) == frame
    raw.close()
    await ws.close()


async def test_runtime_subscribe_and_unsubscribe_follow_local_listeners(
    service: Service, redis_server: PrivateRedis
) -> None:
    raw = redis.Redis.from_url(redis_server.url)

    def redis_channels() -> set[str]:
        return {c.decode() if isinstance(c, bytes) else c for c in raw.pubsub_channels(f"{service.prefix}room*")}

    ws = await subscribe_client(service, "lobby")
    assert redis_channels() == set()
    await ws.send('{"op":"subscribe","channel":"room1"}')
    await recv_ack(ws, "room1")
    assert redis_channels() == {f"{service.prefix}room1"}
    service.publish("room1", "hello")
    assert await recv_publication(ws) == {"channel": "room1", "data": "hello"}

    await ws.send('{"op":"unsubscribe","channel":"room1"}')
    assert await recv_json(ws) == {"op": "unsubscribed", "channel": "room1"}
    wait_until(lambda: redis_channels() == set(), what="UNSUBSCRIBE after the last local listener")
    service.publish("room1", "not for you")
    service.publish("lobby", "for you")
    assert await recv_publication(ws) == {"channel": "lobby", "data": "for you"}
    await ws.close()
    raw.close()


async def test_default_channel_and_control_errors(service: Service) -> None:
    ws = await service.connect()
    await recv_ack(ws, "broadcast")
    for frame, code in [
        ("not json", "invalid_json"),
        ('{"op":"dance"}', "unknown_op"),
        ('{"op":"subscribe"}', "invalid_frame"),
        ('{"op":"subscribe","channel":"bad name!"}', "invalid_channel"),
        ('{"op":"unsubscribe","channel":"never"}', "not_subscribed"),
    ]:
        await ws.send(frame)
        reply = await recv_json(ws)
        assert reply["op"] == "error" and reply["error"] == code, (frame, reply)
        assert reply["detail"]
    await ws.send(b"\x00binary")
    assert (await recv_json(ws))["error"] == "binary_not_supported"
    service.publish("broadcast", [1, 2])
    assert await recv_publication(ws) == {"channel": "broadcast", "data": [1, 2]}  # still serving
    await ws.close()


async def test_pool_never_exceeds_its_size_under_a_publish_burst(
    service: Service, redis_server: PrivateRedis
) -> None:
    import httpx

    raw = redis.Redis.from_url(redis_server.url)
    peak: dict[str, int] = {}
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            for client in raw.client_list():
                name = client.get("name", "")
                if name.startswith("wsbroadcast:"):
                    peak.setdefault(name, 0)
            counts: dict[str, int] = {}
            for client in raw.client_list():
                name = client.get("name", "")
                if name.startswith("wsbroadcast:"):
                    counts[name] = counts.get(name, 0) + 1
            for name, n in counts.items():
                peak[name] = max(peak.get(name, 0), n)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=200)) as client:
        responses = await asyncio.gather(
            *[
                client.post(
                    service.base + "/publish",
                    json={"channel": "burst", "data": i},
                    headers={"Authorization": "Bearer test-token"},
                    timeout=30,
                )
                for i in range(600)
            ]
        )
    stop.set()
    await watcher
    raw.close()
    assert all(r.status_code == 202 for r in responses), {r.status_code for r in responses}
    ours = {name: n for name, n in peak.items() if any(str(pid) in name for pid in service.worker_pids())}
    assert ours, peak
    print("peak Redis connections per worker:", ours)
    assert max(ours.values()) <= 10, ours
    assert max(ours.values()) > 2, ours  # the burst really did need more than one connection
