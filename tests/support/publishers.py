"""Publishers for tests: steady ones that keep going while a test does something to the service, and
a backlog of numbered frames for clients that stop reading."""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import threading
import time

import httpx
import orjson
import redis
import redis.asyncio as aredis

from tests.support.clients import BackgroundReader
from tests.support.servers import Service
from tests.support.waits import async_wait_until


class SteadyPublisher(threading.Thread):
    """Publishes 0, 1, 2, ... on a channel every ``interval`` until stopped; a failed publish is retried."""

    def __init__(self, service: Service, channel: str, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.service, self.channel, self.interval = service, channel, interval
        self.published: list[int] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        seq = 0
        while not self.stopping.wait(self.interval):
            # A new connection each time: a kept-alive one to a worker that is shutting down would
            # stall the publisher for just the moments the test is about.
            try:
                response = httpx.post(
                    self.service.base + "/publish",
                    json={"channel": self.channel, "data": seq},
                    headers={"Authorization": "Bearer test-token"},
                    timeout=10,
                )
            except httpx.HTTPError:
                continue
            if response.status_code == 202:
                self.published.append(seq)
                seq += 1

    def stop(self) -> list[int]:
        self.stopping.set()
        self.join(30)
        return self.published


class Prober:
    """Publishes a numbered probe straight into Redis every 10 ms, ignoring failures while it is down."""

    def __init__(self, url: str, redis_channel: str, channel: str) -> None:
        self._client = aredis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        self._redis_channel = redis_channel
        self._channel = channel
        self._stopped = False
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        seq = 0
        # A flag as well as cancel(): redis-py can turn a cancellation inside a command into a
        # ConnectionError, which this loop ignores, and would then publish for ever.
        while not self._stopped:
            seq += 1
            try:
                await self._client.publish(
                    self._redis_channel, orjson.dumps({"channel": self._channel, "data": {"probe": seq}})
                )
            except (redis.RedisError, OSError):
                pass
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stopped = True
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self._client.aclose()


async def publish_numbered(
    service: Service, channel: str, count: int, size: int, reader: BackgroundReader | None = None, batch: int = 20
) -> dict[int, float]:
    """Publish ``{"seq": n, "pad": <size random characters>}`` for n < ``count`` straight into Redis.

    In batches; after each, wait until ``reader`` (a client that reads) has every frame so far: it
    never lags more than one batch, however loaded the machine, while a stalled client falls
    further behind. Random pads, so that permessage-deflate cannot shrink the backlog away.
    Returns when each frame was published (seq -> monotonic time).
    """
    pads = [base64.b64encode(os.urandom(size * 3 // 4 + 3)).decode()[:size] for _ in range(count)]
    sent_at: dict[int, float] = {}
    raw = aredis.Redis.from_url(service.redis_url)
    try:
        for start in range(0, count, batch):
            for seq in range(start, min(start + batch, count)):
                frame = orjson.dumps({"channel": channel, "data": {"seq": seq, "pad": pads[seq]}})
                sent_at[seq] = time.monotonic()
                await raw.publish(f"{service.prefix}{channel}", frame)
            if reader is not None:
                caught_up = functools.partial(_has_read, reader, len(sent_at))
                await async_wait_until(caught_up, 20, what=f"the reading client to get {len(sent_at)} frames")
    finally:
        await raw.aclose()
    return sent_at


async def _has_read(reader: BackgroundReader, count: int) -> bool:
    return len(reader.frames) >= count or reader.closed
