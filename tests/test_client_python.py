"""service/client.py's Subscriber against a real service (gunicorn, 2 workers, a private Redis)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from scripts.redis_server import PrivateRedis
from service.client import Gap, Position, Publication, ServerError, StateChange, Subscribed, Subscriber
from service.gate import mint_token
from tests.support.publishers import SteadyPublisher
from tests.support.servers import Service, reload_workers
from tests.support.waits import async_wait_until


async def until(condition: Any, timeout: float = 30.0, what: str = "") -> Any:
    async def check() -> Any:
        return condition()

    return await async_wait_until(check, timeout, interval=0.05, what=what)


class Recorder:
    """Every event a Subscriber surfaces, in arrival order."""

    def __init__(self, sub: Subscriber) -> None:
        self.states: list[str] = []
        self.acks: list[Subscribed] = []
        self.gaps: list[Gap] = []
        self.errors: list[ServerError] = []
        self.data: dict[str, list[Any]] = {}
        self.publications: dict[str, list[Publication]] = {}
        sub.on("state", lambda e: self.states.append(e.state))
        sub.on("subscribed", self.acks.append)
        sub.on("gap", self.gaps.append)
        sub.on("error", self.errors.append)

    def handler(self, data: Any, publication: Publication) -> None:
        self.data.setdefault(publication.channel, []).append(data)
        self.publications.setdefault(publication.channel, []).append(publication)

    def acked(self, channel: str, count: int = 1) -> bool:
        return sum(a.channel == channel for a in self.acks) >= count


@pytest.fixture(scope="module")
def service(redis_server: PrivateRedis) -> Iterator[Service]:
    with Service(redis_server.url, workers=2) as svc:
        yield svc


def subscriber(service: Service, **options: Any) -> Subscriber:
    return Subscriber(service.ws_base + "/ws", **{"min_delay": 0.2, "max_delay": 2.0, **options})


def test_position_drops_duplicates_and_never_goes_back() -> None:
    position = Position()
    assert position.since() is None
    assert position.accept(None, None)  # a raw frame: delivered, no position
    assert position.accept(1, "e1") and position.accept(2, "e1")
    assert not position.accept(2, "e1") and not position.accept(1, "e1")
    assert position.since() == {"offset": 2, "epoch": "e1"}
    position.advance(1, "e1")  # an older ack does not move it back
    assert position.since() == {"offset": 2, "epoch": "e1"}
    position.advance(5, "e1")  # a gap moves it forward
    assert not position.accept(5, "e1") and position.accept(6, "e1")
    assert position.accept(1, "e2")  # a new epoch starts again from 1
    assert position.since() == {"offset": 1, "epoch": "e2"}


async def test_every_publication_in_order(service: Service) -> None:
    async with subscriber(service) as sub:
        record = Recorder(sub)
        sub.subscribe("py-order", record.handler)
        await until(lambda: record.acked("py-order"), what="subscribed")
        for i in range(50):
            assert (await asyncio.to_thread(service.publish, "py-order", {"i": i})).status_code == 202
        await until(lambda: len(record.data.get("py-order", [])) >= 50, what="50 publications")
        assert record.data["py-order"] == [{"i": i} for i in range(50)]
        assert record.states[:2] == ["connecting", "connected"]
        assert sub.duplicates == 0 and not record.gaps


async def test_subscribe_after_connect_and_unsubscribe(service: Service) -> None:
    async with subscriber(service) as sub:
        record = Recorder(sub)
        sub.subscribe("py-first", record.handler)
        await until(lambda: record.acked("py-first"), what="first subscribed")
        late = sub.subscribe("py-late", record.handler)
        await until(lambda: record.acked("py-late"), what="late subscribed")
        await asyncio.to_thread(service.publish, "py-late", "hello")
        await until(lambda: record.data.get("py-late") == ["hello"], what="the late channel's publication")
        late.unsubscribe()
        await asyncio.to_thread(service.publish, "py-late", "after unsubscribe")
        await asyncio.to_thread(service.publish, "py-first", "marker")
        await until(lambda: record.data.get("py-first") == ["marker"], what="the marker")
        assert record.data["py-late"] == ["hello"]


async def test_events_as_an_async_iterator(service: Service) -> None:
    async with subscriber(service) as sub:
        stream = aiter(sub)  # before the first await: it sees every event
        sub.subscribe("py-iter")
        events: list[Any] = []

        async def publish_once_subscribed() -> None:
            async for event in stream:
                events.append(event)
                if isinstance(event, Subscribed):
                    await asyncio.to_thread(service.publish, "py-iter", [1, 2])
                if isinstance(event, Publication):
                    return

        await asyncio.wait_for(publish_once_subscribed(), 30)
        assert events[:2] == [StateChange("connecting"), StateChange("connected")]
        assert isinstance(events[2], Subscribed) and events[2].channel == "py-iter"
        assert isinstance(events[-1], Publication) and events[-1].data == [1, 2]


async def test_missing_pong_means_a_dead_connection(service: Service) -> None:
    # A frozen worker keeps the TCP connection open but answers nothing: only the ping notices.
    async with subscriber(service, ping_interval=0.5, pong_timeout=1.5) as sub:
        record = Recorder(sub)
        sub.subscribe("py-ping", record.handler)
        await until(lambda: record.acked("py-ping"), what="subscribed")
        assert sub.worker is not None
        frozen = int(sub.worker.rsplit(":", 1)[1])
        os.kill(frozen, signal.SIGSTOP)
        try:
            await until(lambda: record.acked("py-ping", 2), 60, what="resubscribed on another worker")
            assert sub.worker is not None and int(sub.worker.rsplit(":", 1)[1]) != frozen
        finally:
            os.kill(frozen, signal.SIGCONT)
        assert record.states.count("disconnected") >= 1
        await asyncio.to_thread(service.publish, "py-ping", "alive")
        await until(lambda: record.data.get("py-ping") == ["alive"], what="a publication after the reconnect")


async def test_reconnects_and_resubscribes_after_a_reload(service: Service) -> None:
    async with subscriber(service) as sub:
        record = Recorder(sub)
        sub.subscribe("py-reload", record.handler)
        await until(lambda: record.acked("py-reload"), what="subscribed")
        await asyncio.to_thread(reload_workers, service)
        await until(lambda: record.states[-1:] == ["connected"] and record.acked("py-reload", 2), 60, what="back")
        assert record.states[1:3] == ["connected", "disconnected"]
        await asyncio.to_thread(service.publish, "py-reload", "after")
        await until(lambda: record.data.get("py-reload") == ["after"], what="a publication after the reload")


async def test_nothing_missing_or_twice_across_a_reload(service: Service) -> None:
    # Needs the server's recovery: the subscribe after the reconnect carries since. The first
    # reconnect waits up to a second, so without recovery publications are surely missed.
    async with subscriber(service, min_delay=1.0) as sub:
        record = Recorder(sub)
        sub.subscribe("py-steady", record.handler)
        await until(lambda: record.acked("py-steady"), what="subscribed")
        publisher = SteadyPublisher(service, "py-steady")
        publisher.start()
        try:
            await until(lambda: len(record.data.get("py-steady", [])) >= 10, what="publications flowing")
            await asyncio.to_thread(reload_workers, service)
            await until(lambda: record.acked("py-steady", 2), 60, what="resubscribed")
            seen = len(record.data["py-steady"])
            await until(lambda: len(record.data["py-steady"]) >= seen + 10, what="publications after the reload")
        finally:
            published = await asyncio.to_thread(publisher.stop)
        # The last one arrives live; in order, everything before it must have arrived by then.
        await until(lambda: published[-1] in record.data["py-steady"], what="the last publication")
        assert record.data["py-steady"] == published
        assert not record.gaps
        offsets = [p.offset for p in record.publications["py-steady"]]
        first = offsets[0]
        assert first is not None and offsets == list(range(first, first + len(offsets)))


async def test_gap_when_redis_lost_its_data(own_redis: PrivateRedis) -> None:
    # Needs the server's offsets: a restarted Redis without persistence starts a new epoch.
    with Service(own_redis.url, workers=1) as svc:
        async with subscriber(svc) as sub:
            record = Recorder(sub)
            sub.subscribe("py-gap", record.handler)
            await until(lambda: record.acked("py-gap"), what="subscribed")
            for i in range(3):
                await asyncio.to_thread(svc.publish, "py-gap", i)
            await until(lambda: len(record.data.get("py-gap", [])) == 3, what="3 publications")
            own_redis.stop()
            own_redis.start()
            await asyncio.to_thread(svc.wait_ready, 60)
            published = await asyncio.to_thread(svc.publish, "py-gap", "new epoch")
            assert published.status_code == 202
            await until(lambda: record.data["py-gap"][-1:] == ["new epoch"], 60, what="the first of the new epoch")
            assert [g.channel for g in record.gaps] == ["py-gap"]
            assert record.publications["py-gap"][-1].offset == 1
            assert record.publications["py-gap"][-1].epoch != record.publications["py-gap"][0].epoch


async def test_refused_token_is_reported_and_not_retried_soon(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=1, connect_secret="s3cret") as svc:
        async with subscriber(svc, token="forged", policy_delay=600) as bad:
            errors = Recorder(bad).errors
            await until(lambda: errors and bad.state == "disconnected", what="the refusal")
            assert errors[0].code == 403 and "invalid connect token" in errors[0].detail
            assert bad.retry_in >= 300 and bad.connects == 0
        # A token function is asked for a token on every connect.
        async with subscriber(svc, token=lambda: mint_token("s3cret", ["py-auth"], 60)) as good:
            record = Recorder(good)
            good.subscribe("py-auth", record.handler)
            await until(lambda: record.acked("py-auth"), what="subscribed with a minted token")
            await asyncio.to_thread(svc.publish, "py-auth", "ok")
            await until(lambda: record.data.get("py-auth") == ["ok"], what="a publication")


async def test_full_worker_is_retried_after_its_retry_after(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=1, max_connections=1) as svc:
        async with await svc.connect("?channels="):  # the one connection it takes
            async with subscriber(svc) as sub:
                record = Recorder(sub)
                await until(lambda: record.states == ["connecting", "disconnected"], what="the 503")
                assert sub.connects == 0 and sub.retry_in >= 1.0  # Retry-After: 1, not the jitter's 0.2 s


def test_invalid_channel_name_is_refused_at_once() -> None:
    sub = Subscriber("ws://127.0.0.1:1/ws")
    with pytest.raises(ValueError, match="invalid channel name"):
        sub.subscribe("no spaces")
