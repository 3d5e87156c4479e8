"""Recovery against a real Redis: holes filled by the worker, clients recovered, reads coalesced."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
from redis.asyncio import Redis

from service.config import Settings
from service.history import History, Position
from service.hub import Hub
from service.keys import Keys
from service.publisher import publish
from service.recovery import Recovery
from tests.support.recorder import Recorder


class _Worker:
    """A hub, its recovery and one listener of channel "c", fed the frames Redis built."""

    def __init__(self, redis: Redis, size: int = 50) -> None:
        self.redis = redis
        self.keys = Keys(f"r{uuid.uuid4().hex[:8]}:")
        self.settings = Settings(redis_prefix=self.keys.prefix, history_size=size, history_ttl=60.0)
        self.history = History(redis, self.keys, self.settings)
        self.hub = Hub(lambda c: None, lambda c: None, on_hole=self._on_hole)
        self.recovery = Recovery(self.history, self.hub)
        self.out = Recorder()
        self.frames: dict[int, bytes] = {}

    def _on_hole(self, channel: str, offset: int, epoch: str) -> None:
        self.recovery.on_hole(channel, offset, epoch)

    async def start(self) -> tuple[int, str]:
        self.hub.add("c", self.out)
        position = await self.recovery.position("c")
        self.hub.activate("c", self.out)
        return position

    async def publish(self, count: int) -> str:
        """Publish through the function; keep each frame as pub/sub carried it."""
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(self.keys.channel("c"))
        await pubsub.get_message(timeout=2)
        epoch = ""
        for _ in range(count):
            published = await publish(self.redis, "c", b'{"x":1}', settings=self.settings)
            epoch = published.epoch
            message = await pubsub.get_message(timeout=2)
            assert message is not None
            self.frames[published.offset] = message["data"]
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        return epoch

    def deliver(self, *offsets: int, epoch: str) -> None:
        """As the pub/sub listener would: only these reach the worker (the others were lost)."""
        for offset in offsets:
            self.hub.publish("c", self.frames[offset], offset, epoch)




async def _settled(out: Recorder, expected: list[Any]) -> None:
    for _ in range(500):
        if out.seen() == expected:
            return
        await asyncio.sleep(0.01)
    assert out.seen() == expected


async def test_the_worker_fills_a_hole_from_the_history_before_what_followed(redis: Redis) -> None:
    w = _Worker(redis)
    assert (await w.start())[0] == 0
    epoch = await w.publish(5)
    w.deliver(1, 4, 5, epoch=epoch)  # 2 and 3 were lost between Redis and the worker
    await _settled(w.out, [1, 2, 3, 4, 5])
    assert w.hub.counters.holes_filled == 1 and w.hub.counters.gaps_sent == 0


async def test_after_a_reconnect_the_worker_reads_what_it_missed(redis: Redis) -> None:
    w = _Worker(redis)
    await w.start()
    epoch = await w.publish(3)
    w.deliver(1, epoch=epoch)
    w.recovery.check_all(_confirmed)  # nothing else arrived: 2 and 3 were published while it was away
    await _settled(w.out, [1, 2, 3])


async def test_what_the_history_no_longer_holds_reaches_the_listeners_as_a_gap(redis: Redis) -> None:
    w = _Worker(redis, size=3)
    await w.start()
    epoch = await w.publish(8)
    w.deliver(1, 8, epoch=epoch)
    await _settled(w.out, [1, ("gap", 5, epoch), 6, 7, 8])


async def test_two_thousand_clients_recovering_one_channel_cost_a_handful_of_reads(redis: Redis) -> None:
    w = _Worker(redis)
    await w.start()
    epoch = await w.publish(20)
    w.deliver(*range(1, 21), epoch=epoch)
    results = await asyncio.gather(*(w.recovery.recover("c", Position(10 + n % 5, epoch)) for n in range(2000)))
    assert all(r.recovered and r.offset == 20 and r.epoch == epoch for r in results)
    for n, result in enumerate(results):
        assert [offset for offset, _ in result.frames] == list(range(11 + n % 5, 21))
    assert w.hub.counters.history_reads <= 3, w.hub.counters.history_reads


async def test_a_client_too_far_behind_or_of_another_epoch_is_told_it_did_not_recover(redis: Redis) -> None:
    w = _Worker(redis, size=3)
    await w.start()
    epoch = await w.publish(10)
    w.deliver(*range(1, 11), epoch=epoch)
    behind = await w.recovery.recover("c", Position(2, epoch))
    assert (behind.recovered, behind.frames, behind.offset) == (False, [], 10)
    other = await w.recovery.recover("c", Position(9, "another"))
    assert (other.recovered, other.frames, other.offset, other.epoch) == (False, [], 10, epoch)
    near = await w.recovery.recover("c", Position(8, epoch))
    assert near.recovered and [o for o, _ in near.frames] == [9, 10]


async def _confirmed(channel: str) -> None:
    """Stands for the broker's confirmation: these tests feed the hub themselves, no pub/sub."""


async def test_a_joining_client_gets_what_it_missed_then_its_ack_then_live_ones_without_a_seam(redis: Redis) -> None:
    w = _Worker(redis)
    await w.start()
    epoch = await w.publish(6)
    w.deliver(1, 2, 3, 4, 5, epoch=epoch)
    late, fresh = Recorder(), Recorder()
    recovered = await w.recovery.join("c", late, Position(2, epoch), _confirmed)
    joined = await w.recovery.join("c", fresh, None, _confirmed)
    w.deliver(6, epoch=epoch)
    await asyncio.sleep(0)
    ack = {"op": "subscribed", "channel": "c", "offset": 5, "epoch": epoch}
    assert (recovered.recovered, recovered.offset, joined.offset) == (True, 5, 5)
    frames = [orjson.loads(t) for m in late.messages for t in m.texts]
    assert [f.get("offset") for f in frames[:3]] == [3, 4, 5]
    assert frames[3] == {**ack, "recovered": True}
    assert frames[4]["offset"] == 6 and len(frames) == 5
    assert [orjson.loads(t) for m in fresh.messages for t in m.texts] == [ack, orjson.loads(w.frames[6])]


async def test_clients_too_far_behind_cost_one_read_not_one_each(redis: Redis) -> None:
    w = _Worker(redis, size=3)
    await w.start()
    epoch = await w.publish(10)
    w.deliver(*range(1, 11), epoch=epoch)
    # One after another, as a reconnect storm spreads over a second: no read to share.
    behind = [await w.recovery.recover("c", Position(4 - n % 5, epoch)) for n in range(500)]
    assert all(not r.recovered and r.frames == [] and r.offset == 10 for r in behind)
    near = await w.recovery.recover("c", Position(8, epoch))
    assert near.recovered and [o for o, _ in near.frames] == [9, 10]
    assert w.hub.counters.history_reads <= 2, w.hub.counters.history_reads
