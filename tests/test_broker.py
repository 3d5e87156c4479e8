"""The broker against a real Redis, in-process: subscription acks that can be trusted."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from scripts.redis_server import PrivateRedis
from service.broker import Broker
from service.config import Settings
from service.keys import Keys
from tests.support.waits import async_wait_until


async def _broker(url: str, received: list[tuple[str, bytes]], replies: list[bytes] | None = None) -> Broker:
    settings = Settings(redis_url=url, redis_prefix="bk:")
    broker = Broker(settings, Keys("bk:"), ("test", 1), lambda c, p: received.append((c, p)))
    listener = broker._listeners[broker.topology.masters[0]]
    if replies is not None:
        handle = listener._handle

        def recording(response: Any) -> None:  # notes the (un)subscribe replies for channel x
            if isinstance(response, list) and response[1:2] == [b"bk:x"]:
                replies.append(response[0])
            handle(response)

        listener._handle = recording  # type: ignore[method-assign]
    broker.start()

    async def up() -> bool:
        return broker.connected

    await async_wait_until(up, 10, what="the listener to connect")
    return broker


async def test_a_resubscribe_during_unsubscribe_is_acked_only_once_redis_delivers(
    redis_server: PrivateRedis,
) -> None:
    received: list[tuple[str, bytes]] = []
    replies: list[bytes] = []
    broker = await _broker(redis_server.url, received, replies)
    listener = broker._listeners[broker.topology.masters[0]]
    publisher = aioredis.Redis.from_url(redis_server.url)
    try:
        for attempt in range(10):  # the window is short: try it repeatedly, every time must hold
            broker.want("x")
            assert await broker.confirmed("x", 5)
            broker.unwant("x")  # the last local listener left ...
            for _ in range(1000):
                if "bk:x" not in listener._sent:  # ... and UNSUBSCRIBE is on its way
                    break
                await asyncio.sleep(0)
            del replies[:]
            broker.want("x")  # ... and a new one arrives before Redis answered
            assert await broker.confirmed("x", 5)
            # The ack may only follow Redis's answer to the SUBSCRIBE sent after the UNSUBSCRIBE.
            assert replies == [b"unsubscribe", b"subscribe"], replies
            expected = ("x", b"%d" % attempt)
            assert await publisher.publish("bk:x", expected[1]) == 1

            async def arrived(expected: tuple[str, bytes] = expected) -> bool:
                return expected in received

            await async_wait_until(arrived, 5, what="the publication")
    finally:
        await publisher.aclose()
        await broker.stop()


async def test_confirmed_waits_for_redis_while_it_is_down(own_redis: PrivateRedis) -> None:
    received: list[tuple[str, bytes]] = []
    broker = await _broker(own_redis.url, received)
    try:
        own_redis.stop()
        broker.want("late")
        assert not await broker.confirmed("late", 0.5)
        own_redis.start()
        assert await broker.confirmed("late", 10)
        publisher = aioredis.Redis.from_url(own_redis.url)
        assert await publisher.publish("bk:late", b"1") == 1
        await publisher.aclose()
        async def arrived() -> bool:
            return bool(received)

        await async_wait_until(arrived, 5, what="the publication")
        assert received == [("late", b"1")]
    finally:
        await broker.stop()
