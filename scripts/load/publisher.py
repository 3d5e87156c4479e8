"""The publisher: one Redis connection, an absolute schedule, every frame numbered and timestamped.

A wsbroadcast target is published to the way its apps publish: through the Redis function
``wsb_publish`` (``service.publisher.publish``: offsets, history), unless ``via="publish"`` asks
for a plain ``PUBLISH`` of a ready frame (no offset, at most once), the only way the broadcaster
baseline can be published to.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from scripts.load.targets import CHANNEL, Target
from service.publisher import PublishError, publish

VIA = ("function", "publish")


@dataclass
class Published:
    lo: int
    hi: int
    sent_at: dict[int, float]
    failed: set[int]
    no_receivers: set[int]
    max_behind: float
    duration: float
    top: int | None = None  # the highest offset the function answered (None: published without offsets)
    epoch: str | None = None


class Publisher:
    def __init__(self, target: Target, seq: int = 0, via: str | None = None) -> None:
        self.target = target
        self.seq = seq
        self.via = via if via is not None else target.publish_via
        if self.via == "function" and target.settings is None:
            raise ValueError(f"{target.name} has no publish function; publish with via='publish'")
        self.redis = self._connect()
        self.top: int | None = None
        self.epoch: str | None = None

    def _connect(self) -> Redis:
        # No retries: a publish while Redis is down must fail at once, not stall the schedule.
        return Redis.from_url(self.target.redis_url, socket_connect_timeout=0.5, socket_timeout=1.0,
                              retry=Retry(NoBackoff(), 0))

    @staticmethod
    def data(seq: int, size: int) -> dict[str, Any]:
        data: dict[str, Any] = {"s": seq, "t": time.monotonic(), "p": ""}
        pad = size - len(orjson.dumps(data))
        if pad > 0:
            data["p"] = "x" * pad
        return data

    @classmethod
    def frame(cls, seq: int, size: int) -> bytes:
        return orjson.dumps({"channel": CHANNEL, "data": cls.data(seq, size)})

    async def send(self, seq: int, size: int) -> int:
        """Publish frame ``seq``; Redis's receiver count. Raises RedisError, OSError, TimeoutError, PublishError."""
        if self.via == "publish":
            return int(await asyncio.wait_for(self.redis.publish(self.target.redis_channel, self.frame(seq, size)),
                                              1.0))
        settings = self.target.settings
        assert settings is not None
        got = await asyncio.wait_for(
            publish(self.redis, CHANNEL, orjson.dumps(self.data(seq, size)), settings=settings), 1.0
        )
        if self.top is None or got.offset > self.top or got.epoch != self.epoch:
            self.top, self.epoch = got.offset, got.epoch
        return got.workers

    async def warm(self) -> None:
        await self.send(-1, 16)

    async def run(self, rate: float, count: int, size: int, stop: asyncio.Event | None = None) -> Published:
        """``count`` frames at ``rate`` on an absolute schedule (fewer if ``stop`` is set first)."""
        lo = self.seq
        sent_at: dict[int, float] = {}
        failed: set[int] = set()
        no_receivers: set[int] = set()
        max_behind = 0.0
        start = time.monotonic()
        for k in range(count):
            if stop is not None and stop.is_set():
                break
            due = start + k / rate
            delay = due - time.monotonic()
            if delay > 0:
                if stop is None:
                    await asyncio.sleep(delay)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    if stop.is_set():
                        break
            else:
                max_behind = max(max_behind, -delay)
            seq = self.seq
            self.seq += 1
            sent_at[seq] = time.monotonic()
            try:
                receivers = await self.send(seq, size)
            except (RedisError, OSError, TimeoutError, PublishError):
                failed.add(seq)
                continue
            if not receivers:
                no_receivers.add(seq)
        return Published(lo, self.seq, sent_at, failed, no_receivers, max_behind, time.monotonic() - start,
                         self.top, self.epoch)

    async def close(self) -> None:
        await self.redis.aclose()
