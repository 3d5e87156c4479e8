"""The publisher: one Redis connection, an absolute schedule, every frame numbered and timestamped."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from scripts.load.targets import CHANNEL, Target


@dataclass
class Published:
    lo: int
    hi: int
    sent_at: dict[int, float]
    failed: set[int]
    no_receivers: set[int]
    max_behind: float
    duration: float


class Publisher:
    def __init__(self, target: Target, seq: int = 0) -> None:
        self.target = target
        self.seq = seq
        self.redis = self._connect()

    def _connect(self) -> Redis:
        # No retries: a publish while Redis is down must fail at once, not stall the schedule.
        return Redis.from_url(self.target.redis_url, socket_connect_timeout=0.5, socket_timeout=1.0,
                              retry=Retry(NoBackoff(), 0))

    @staticmethod
    def frame(seq: int, size: int) -> bytes:
        data: dict[str, Any] = {"s": seq, "t": time.monotonic(), "p": ""}
        pad = size - len(orjson.dumps(data))
        if pad > 0:
            data["p"] = "x" * pad
        return orjson.dumps({"channel": CHANNEL, "data": data})

    async def warm(self) -> None:
        await self.redis.publish(self.target.redis_channel, self.frame(-1, 16))

    async def run(self, rate: float, count: int, size: int) -> Published:
        lo = self.seq
        sent_at: dict[int, float] = {}
        failed: set[int] = set()
        no_receivers: set[int] = set()
        max_behind = 0.0
        start = time.monotonic()
        channel = self.target.redis_channel
        for k in range(count):
            due = start + k / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                max_behind = max(max_behind, -delay)
            seq = self.seq
            self.seq += 1
            frame = self.frame(seq, size)
            sent_at[seq] = time.monotonic()
            try:
                receivers = await asyncio.wait_for(self.redis.publish(channel, frame), 1.0)
            except (RedisError, OSError, TimeoutError):
                failed.add(seq)
                continue
            if not receivers:
                no_receivers.add(seq)
        return Published(lo, self.seq, sent_at, failed, no_receivers, max_behind, time.monotonic() - start)

    async def close(self) -> None:
        await self.redis.aclose()

