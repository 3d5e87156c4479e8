"""Nothing lost silently, end to end: real Redis, the web line with 2 workers, real websockets clients.

Every client's frames go through ``View`` (tests.support.view), which checks the contract's invariant
as they arrive. Each test asserts that no client saw a violation.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from scripts.redis_server import PrivateRedis
from service.config import Settings
from service.history import History, Position, publish_call
from service.hub import Hub
from service.keys import Keys
from service.publisher import PublishError, publish
from service.recovery import Recovery
from tests.support.metrics import scrape, summed
from tests.support.recorder import Recorder
from tests.support.servers import Service
from tests.support.stalled import stalling_connection
from tests.support.view import View
from tests.support.waits import async_wait_until, wait_until

CHANNEL = "feed"


class Client:
    """A real websockets client that records into its ``View`` and can reconnect with ``since``."""

    def __init__(self, service: Service, name: str) -> None:
        self.service = service
        self.view = View(name)
        self.ws: ClientConnection | None = None
        self.reader: asyncio.Task[None] | None = None
        self.close_codes: list[int | None] = []
        self.worker = ""
        self.reading = asyncio.Event()  # cleared: the client stops reading (a slow consumer)
        self.reading.set()

    async def connect(self, stalling: bool = False) -> Client:
        """Connect with no channel (subscribes go as ops, each with its position when it has one);
        ``stalling``: a connection that stops reading from its socket while ``reading`` is clear."""
        query = "?channels="
        self.ws = await (stalling_connection(self.service, query) if stalling else self.service.connect(query))
        assert self.ws.response is not None
        self.worker = self.ws.response.headers["x-wsbroadcast-worker"]
        self.reader = asyncio.create_task(self._read(self.ws))
        return self

    async def subscribe(self, channel: str = CHANNEL, since: tuple[int, str] | None = None) -> None:
        assert self.ws is not None
        self.view.subscribing(channel, since)
        op: dict[str, Any] = {"op": "subscribe", "channel": channel}
        if since is not None:
            op["since"] = {"offset": since[0], "epoch": since[1]}
        await self.ws.send(orjson.dumps(op).decode())

    async def resume(self, channel: str = CHANNEL) -> None:
        """Subscribe from where this client is (a reconnect's recovery), or plainly if nowhere yet."""
        await self.subscribe(channel, self.view.position.get(channel))

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                await self.reading.wait()
                self.view.see(orjson.loads(raw))
        except ConnectionClosed:
            pass
        self.close_codes.append(ws.close_code)
        self.view.disconnected()

    @property
    def open(self) -> bool:
        return self.reader is not None and not self.reader.done()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            await self.reader

    def acked(self, channel: str = CHANNEL) -> bool:
        return self.open and channel in self.view.position and channel not in self.view.pending


class Publisher:
    """Publishes ``{"n": i}`` through the Python API (the Redis function) at a steady rate."""

    def __init__(self, redis_url: str, service: Service, rate: float, channel: str = CHANNEL, pad: int = 0) -> None:
        self.redis = Redis.from_url(redis_url, socket_timeout=2)
        history = int(service.env.get("HISTORY_SIZE", "100"))
        self.settings = Settings(redis_prefix=service.prefix, history_size=history)
        self.rate = rate
        self.channel = channel
        self.pad = "x" * pad
        self.made: list[tuple[int, str]] = []  # (offset, epoch) of each publication answered
        self.receivers: list[int] = []  # how many workers' listeners Redis handed each one to
        self.failed = 0
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    async def one(self, n: int) -> None:
        try:
            data = orjson.dumps({"n": n, "pad": self.pad})
            done = await publish(self.redis, self.channel, data, settings=self.settings)
        except (PublishError, OSError, redis.RedisError):
            self.failed += 1
            await asyncio.sleep(0.05)
        else:
            self.made.append((done.offset, done.epoch))
            self.receivers.append(done.workers)

    async def _run(self) -> None:
        started = time.monotonic()
        n = 0
        while True:
            await self.one(n)
            n += 1
            await asyncio.sleep(max(0.0, started + n / self.rate - time.monotonic()))

    def start(self) -> Publisher:
        self.task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not self.closed:
            self.closed = True
            await self.redis.aclose()


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    """The test's clients, closed at its end."""
    made: list[Client] = []
    try:
        yield made
    finally:
        await asyncio.gather(*(c.close() for c in made), return_exceptions=True)


async def _connect(service: Service, made: list[Client], count: int, both: bool = True) -> list[Client]:
    """``count`` clients subscribed to CHANNEL (acknowledged), on both workers when ``both``."""
    new: list[Client] = []
    for attempt in range(count + 200):
        client = await Client(service, f"client{len(made)}").connect()
        made.append(client)
        new.append(client)
        await client.subscribe()
        if len(new) >= count and (not both or len({c.worker for c in new}) == 2):
            break
        assert attempt < count + 199, "every client landed on one worker"
    await _all(new, lambda c: c.acked(), "every client's ack")
    return new


async def _all(made: list[Client], condition: Any, what: str, timeout: float = 20.0) -> None:
    async def check() -> bool:
        return all(condition(c) for c in made)

    await async_wait_until(check, timeout, 0.02, what)


def _violations(made: list[Client]) -> list[str]:
    return [v for c in made for v in c.view.violations]


def _post(service: Service, n: int, channel: str = CHANNEL) -> dict[str, Any]:
    reply = service.publish(channel, {"n": n})
    assert reply.status_code == 202, reply.text
    body: dict[str, Any] = reply.json()
    return body


async def _publish(service: Service, count: int, channel: str = CHANNEL) -> list[dict[str, Any]]:
    return [await asyncio.to_thread(_post, service, n, channel) for n in range(count)]


def _metric(service: Service, name: str) -> float:
    """A counter of /metrics summed over its labels (the host's workers)."""
    return summed(scrape(service), name)


# --- 1, 2, 3: a client that reconnects with since ----------------------------------------------------


async def test_a_client_back_from_a_disconnect_recovers_what_it_missed_then_live(
    redis_server: PrivateRedis, clients: list[Client]
) -> None:
    with Service(redis_server.url, workers=2) as service:
        client = (await _connect(service, clients, 2))[0]
        await _publish(service, 3)
        await _all(clients, lambda c: c.view.offsets(CHANNEL) == [1, 2, 3], "1..3 live")
        await client.close()
        await _publish(service, 5)
        await client.connect()
        await client.resume()
        await _all([client], lambda c: c.acked(), "the recovery's ack")
        ack = client.view.acks[-1]
        assert ack["recovered"] is True and ack["offset"] == 8, ack
        assert client.view.offsets(CHANNEL) == [1, 2, 3, 4, 5, 6, 7, 8]
        await _publish(service, 1)
        await _all(clients, lambda c: c.view.offsets(CHANNEL) == list(range(1, 10)), "9 live, after the recovered ones")
        assert not _violations(clients)
        assert not any(c.view.gaps for c in clients)


async def test_a_client_too_far_behind_is_told_it_did_not_recover_and_gets_no_old_frames(
    redis_server: PrivateRedis, clients: list[Client]
) -> None:
    with Service(redis_server.url, workers=2, history_size=5) as service:
        client = (await _connect(service, clients, 1, both=False))[0]
        await _publish(service, 2)
        await _all([client], lambda c: c.view.offsets(CHANNEL) == [1, 2], "1..2 live")
        await client.close()
        await _publish(service, 20)  # 3..22: the history keeps 18..22
        await client.connect()
        await client.resume()
        await _all([client], lambda c: c.acked(), "the ack")
        ack = client.view.acks[-1]
        assert ack["recovered"] is False and ack["offset"] == 22, ack
        assert client.view.offsets(CHANNEL) == [1, 2]
        await _publish(service, 1)
        await _all([client], lambda c: c.view.offsets(CHANNEL) == [1, 2, 23], "23 live")
        assert not _violations(clients)


async def test_a_client_with_another_epoch_is_told_it_did_not_recover(
    redis_server: PrivateRedis, clients: list[Client]
) -> None:
    with Service(redis_server.url, workers=2) as service:
        await _publish(service, 4)
        client = await Client(service, "stranger").connect()
        clients.append(client)
        await client.subscribe(since=(2, "not-the-epoch"))
        await _all([client], lambda c: c.acked(), "the ack")
        ack = client.view.acks[-1]
        assert ack["recovered"] is False and ack["offset"] == 4 and ack["epoch"] != "not-the-epoch", ack
        assert client.view.publications == []
        await _publish(service, 1)
        await _all([client], lambda c: c.view.offsets(CHANNEL) == [5], "5 live")
        assert not _violations(clients)


# --- 4: a worker restarting (1012) under a steady publisher -------------------------------------------


async def _keep_connected(client: Client, reconnects: list[float]) -> None:
    """Whenever the client is closed, reconnect (to whichever worker answers) and resume with since."""
    while True:
        assert client.reader is not None
        await asyncio.shield(client.reader)
        for _ in range(100):
            try:
                await client.connect()
                break
            except (OSError, ConnectionClosed, TimeoutError) as exc:
                await asyncio.sleep(0.05)
                last = exc
        else:
            raise AssertionError(f"{client.view.name} could not reconnect: {last!r}")
        reconnects.append(time.monotonic())
        await client.resume()


def _caught_up(client: Client, top: tuple[int, str]) -> bool:
    return client.acked() and client.view.position.get(CHANNEL) == top


async def test_a_worker_restart_loses_nothing_its_clients_recover_on_any_worker(
    redis_server: PrivateRedis, clients: list[Client]
) -> None:
    with Service(redis_server.url, workers=2, history_size=1000) as service:
        made = await _connect(service, clients, 16)
        victim = made[0].worker
        reconnects: list[float] = []
        keepers = [asyncio.create_task(_keep_connected(c, reconnects)) for c in made]
        publisher = Publisher(redis_server.url, service, rate=50).start()
        try:
            await async_wait_until(_count(publisher, 20), 20, what="20 publications")
            os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGTERM)
            moved = [c for c in made if c.worker == victim]
            await _all(moved, lambda c: len(c.close_codes) >= 1 and c.acked(), "the closed clients to be back", 30)
            mark = len(publisher.made)
            await async_wait_until(_count(publisher, mark + 20), 20, what="20 publications after the restart")
            await publisher.stop()
            top = publisher.made[-1]
            await _all(made, lambda c: _caught_up(c, top), f"every client at {top}", 30)
        finally:
            await publisher.stop()
            for keeper in keepers:
                keeper.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
        assert not _violations(made)
        everything = list(range(1, top[0] + 1))
        assert [o for o, _ in publisher.made] == everything, "the publisher's offsets are contiguous"
        for client in made:
            assert client.view.offsets(CHANNEL) == everything, client.view.name
            assert not client.view.gaps, client.view.gaps
        assert {c.close_codes[0] for c in moved} == {1012}
        recoveries = [a for c in moved for a in c.view.acks if "recovered" in a]
        assert len(recoveries) >= len(moved) and all(a["recovered"] for a in recoveries), recoveries
        print(
            f"worker restart: {len(moved)} of {len(made)} clients closed 1012, reconnected and recovered; "
            f"{top[0]} publications, each client got all of them once; {publisher.failed} publish failures"
        )


def _count(publisher: Publisher, count: int) -> Any:
    async def enough() -> bool:
        return len(publisher.made) >= count

    return enough


# --- 5: the workers' pub/sub connections killed under load ------------------------------------------


async def test_client_kill_pubsub_under_load_the_workers_fill_the_hole_and_send_no_gap(
    own_redis: PrivateRedis, clients: list[Client]
) -> None:
    with Service(own_redis.url, workers=2) as service:
        made = await _connect(service, clients, 10)
        publisher = Publisher(own_redis.url, service, rate=100).start()
        raw = redis.Redis.from_url(own_redis.url)
        try:
            holes_before = _metric(service, "wsbroadcast_holes_total")
            for round_ in range(3):
                await async_wait_until(_count(publisher, 30 * (round_ + 1)), 20, what="publications")
                killed = raw.client_kill_filter(_type="pubsub")  # CLIENT KILL TYPE pubsub
                assert killed >= 2, killed  # both workers' listeners
            await async_wait_until(_count(publisher, 120), 20, what="publications after the kills")
        finally:
            await publisher.stop()
            raw.close()
        top = publisher.made[-1]
        await _all(made, lambda c: _caught_up(c, top), f"every client at {top}", 30)
        assert not _violations(made)
        everything = list(range(1, top[0] + 1))
        for client in made:
            assert client.view.offsets(CHANNEL) == everything, client.view.name
            assert not client.view.gaps, client.view.gaps
        # Publications Redis handed to fewer than both workers' listeners: the holes the workers filled.
        missed = sum(1 for workers in publisher.receivers if workers < 2)
        holes = await asyncio.to_thread(_settled_metric, service, "wsbroadcast_holes_total")
        filled = _metric(service, "wsbroadcast_holes_filled_total")
        print(f"CLIENT KILL TYPE pubsub x3 under 100/s: {top[0]} publications ({missed} reached fewer than both "
              f"workers), every client got each once, no gap; holes {holes:.0f}, holes filled {filled:.0f}")
        assert missed > 0, "the kills cost no publication: the test proved nothing"
        # What the workers missed is visible to the operator: holes found, and as many filled.
        assert holes - holes_before >= 1 and filled == holes, (holes_before, holes, filled)


# --- 6: Redis restarted without persistence ---------------------------------------------------------


async def test_redis_restarted_empty_every_client_is_told_then_gets_the_new_epoch_from_one(
    own_redis: PrivateRedis, clients: list[Client]
) -> None:
    with Service(own_redis.url, workers=2) as service:
        made = await _connect(service, clients, 8)
        publisher = Publisher(own_redis.url, service, rate=40).start()
        try:
            await async_wait_until(_count(publisher, 10), 20, what="publications before the restart")
            old = publisher.made[-1][1]
            await _all(made, lambda c: len(c.view.offsets(CHANNEL)) >= 10, "the first publications delivered")
            await asyncio.to_thread(own_redis.stop)
            failed = publisher.failed
            await async_wait_until(lambda: _true(publisher.failed > failed), 20, what="a publish refused")
            await asyncio.to_thread(own_redis.start)

            async def new_epoch() -> bool:
                return sum(1 for _, e in publisher.made if e != old) >= 20

            await async_wait_until(new_epoch, 40, what="20 publications in the new epoch")
        finally:
            await publisher.stop()
        top = publisher.made[-1]
        assert top[1] != old
        await _all(made, lambda c: _caught_up(c, top), f"every client at {top}", 30)
        assert not _violations(made)
        fresh = [o for o, e in publisher.made if e == top[1]]
        assert fresh == list(range(1, len(fresh) + 1))
        for client in made:
            view = client.view
            told = [g for g in view.gaps if g["epoch"] == top[1]] + [
                a for a in view.acks if a.get("recovered") is False and a["epoch"] == top[1]
            ]
            assert told, (view.name, view.gaps, view.acks)
            new = [f["offset"] for f in view.publications if f["epoch"] == top[1]]
            assert new == fresh, (view.name, new[:5])
        print(
            f"Redis restarted empty: {len(made)} clients each told (gap) and then got offsets 1..{top[0]} of the "
            f"new epoch; {publisher.failed} publishes refused while it was down"
        )


async def _true(value: bool) -> bool:
    return value


# --- 7: drop-oldest announces what it dropped -------------------------------------------------------


async def _stalled_client(service: Service, clients: list[Client], channel: str = CHANNEL) -> Client:
    """A client subscribed to ``channel`` that then stops reading (tests.support.stalled), so that
    the server's queue for it fills at once."""
    slow = await Client(service, "slow").connect(stalling=True)
    clients.append(slow)
    await slow.subscribe(channel)
    await _all([slow], lambda c: c.acked(channel), f"the slow client's ack of {channel}")
    slow.reading.clear()
    return slow


async def test_drop_oldest_sends_a_gap_that_explains_the_jump(
    redis_server: PrivateRedis, clients: list[Client]
) -> None:
    with Service(
        redis_server.url, workers=2, slow_consumer_policy="drop-oldest", queue_size=8, send_buffer_bytes=4096
    ) as service:
        fast = (await _connect(service, clients, 1, both=False))[0]
        slow = await _stalled_client(service, clients)
        publisher = Publisher(redis_server.url, service, rate=1000, pad=8000)
        try:
            for n in range(200):  # 1.6 MB: far beyond the slow client's queue and socket buffers
                await publisher.one(n)
        finally:
            await publisher.stop()
        top = publisher.made[-1]
        await _all([fast], lambda c: _caught_up(c, top), "the fast client to get everything")
        slow.reading.set()
        await _all([slow], lambda c: _caught_up(c, top), "the slow client to catch up")
        assert not _violations(clients)
        # The reading client is under the same policy: whatever it lost too, its gaps explained.
        assert slow.view.gaps, "the slow client lost publications without a gap"
        assert len(slow.view.offsets(CHANNEL)) < top[0]
        print(
            f"drop-oldest: the slow client got {len(slow.view.offsets(CHANNEL))} of {top[0]} publications and "
            f"{len(slow.view.gaps)} gap frames explaining every jump; the reading one got "
            f"{len(fast.view.offsets(CHANNEL))} and {len(fast.view.gaps)} gaps"
        )


# --- 8: any language publishes with the function ------------------------------------------------------


async def test_a_publication_made_with_redis_cli_is_delivered_and_recoverable(
    redis_server: PrivateRedis, clients: list[Client]
) -> None:
    with Service(redis_server.url, workers=2) as service:
        live, late = (await _connect(service, clients, 2))[:2]
        epoch = live.view.position[CHANNEL][1]
        await late.close()
        keys = Keys(service.prefix)
        command = [
            "redis-cli", "-p", str(redis_server.port), "FCALL", "wsb_publish", "2",
            keys.meta(CHANNEL), keys.history(CHANNEL), keys.channel(CHANNEL), CHANNEL, '{"via":"redis-cli"}',
            "100", "300000", str(30 * 86400 * 1000),
        ]
        done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=10)
        assert done.returncode == 0 and done.stdout.split()[:3] == ["0", "1", epoch], done
        await _all([live], lambda c: c.view.offsets(CHANNEL) == [1], "the live client to get it")
        expected = {"channel": CHANNEL, "offset": 1, "epoch": epoch, "data": {"via": "redis-cli"}}
        assert live.view.publications[0] == expected
        await late.connect()
        await late.resume()
        await _all([late], lambda c: c.acked(), "the late client's recovery")
        assert late.view.acks[-1]["recovered"] is True
        assert late.view.publications == live.view.publications
        assert not _violations(clients)


# --- 9: a reconnect storm costs a handful of history reads ------------------------------------------


async def test_a_storm_of_a_thousand_clients_recovering_one_channel_costs_a_handful_of_reads(
    redis_server: PrivateRedis, clients: list[Client]
) -> None:
    count = 1000
    with Service(redis_server.url, workers=2) as service:
        first = (await _connect(service, clients, 1, both=False))[0]
        await _publish(service, 20)
        await _all([first], lambda c: len(c.view.offsets(CHANNEL)) == 20, "20 live")
        epoch = first.view.position[CHANNEL][1]
        storm: list[Client] = []
        for start in range(0, count, 100):
            batch = [Client(service, f"storm{n}") for n in range(start, start + 100)]
            await asyncio.gather(*(c.connect() for c in batch))
            storm += batch
            clients += batch
        assert len({c.worker for c in storm}) == 2
        before = await asyncio.to_thread(_metric, service, "wsbroadcast_history_reads_total")
        began = time.monotonic()
        await asyncio.gather(*(c.subscribe(since=(10 + n % 5, epoch)) for n, c in enumerate(storm)))
        await _all(storm, lambda c: c.acked(), "every client of the storm recovered", 60)
        took = time.monotonic() - began
        assert not _violations(clients)
        for n, client in enumerate(storm):
            assert client.view.acks[-1]["recovered"] is True, client.view.acks
            assert client.view.offsets(CHANNEL) == list(range(11 + n % 5, 21))
        reads = await asyncio.to_thread(_settled_metric, service, "wsbroadcast_history_reads_total")
        print(f"storm: {count} clients recovered one channel in {took:.2f} s with {reads - before:.0f} history reads")
        assert reads - before <= 20, reads - before


def _settled_metric(service: Service, name: str) -> float:
    """The metric once it has stopped moving for longer than the other workers' sync period."""
    seen: list[tuple[float, float]] = []

    def stable() -> float | None:
        now, value = time.monotonic(), _metric(service, name)
        seen.append((now, value))
        same = [t for t, v in seen if v == value]
        return value if now - min(same) > 1.5 and all(v == value for t, v in seen if t >= min(same)) else None

    result: float = wait_until(stable, 20, 0.2, f"{name} to settle")
    return result


# --- 10: no history at all ----------------------------------------------------------------------------


async def test_without_history_offsets_and_positions_stay_and_every_missed_recovery_is_refused(
    redis_server: PrivateRedis, clients: list[Client]
) -> None:
    with Service(redis_server.url, workers=2, history_size=0) as service:
        client, other = (await _connect(service, clients, 2))[:2]
        await _publish(service, 3)
        await _all(clients, lambda c: c.view.offsets(CHANNEL) == [1, 2, 3], "1..3 live, with offsets")
        await client.close()
        await _publish(service, 2)
        await client.connect()
        await client.resume()  # since 3: 4 and 5 missed, and no history holds them
        await _all([client], lambda c: c.acked(), "the ack")
        ack = client.view.acks[-1]
        assert ack["recovered"] is False and ack["offset"] == 5, ack
        assert client.view.offsets(CHANNEL) == [1, 2, 3]
        await other.close()
        await other.connect()
        await other.resume()  # since 5: nothing missed
        await _all([other], lambda c: c.acked(), "the ack")
        assert other.view.acks[-1]["recovered"] is True and other.view.acks[-1]["offset"] == 5
        await _publish(service, 1)
        await _all(clients, lambda c: c.view.offsets(CHANNEL)[-1:] == [6], "6 live")
        assert not _violations(clients)


async def test_drop_oldest_never_drops_an_ack_queued_behind_a_backlog(
    redis_server: PrivateRedis, clients: list[Client]
) -> None:
    with Service(
        redis_server.url, workers=2, slow_consumer_policy="drop-oldest", queue_size=8, send_buffer_bytes=4096
    ) as service:
        slow = await _stalled_client(service, clients, "other")
        other = Publisher(redis_server.url, service, rate=1000, channel="other", pad=8000)
        feed = Publisher(redis_server.url, service, rate=1000, pad=8000)
        try:
            for n in range(100):  # the slow client's socket is full and its queue holds a backlog
                await other.one(n)
            # This ack waits in the queue behind the backlog, which the next flood pushes out.
            await slow.subscribe()
            meta = Keys(service.prefix).meta(CHANNEL)

            async def positioned() -> bool:  # the worker read the position its ack carries
                return bool(await feed.redis.exists(meta))

            await async_wait_until(positioned, 10, what="the subscription's position")
            for n in range(100):
                await feed.one(n)
        finally:
            await other.stop()
            await feed.stop()
        slow.reading.set()
        tops = {"other": other.made[-1], CHANNEL: feed.made[-1]}
        await _all([slow], lambda c: all(c.view.position.get(ch) == top for ch, top in tops.items()), "catch up")
        assert not _violations(clients)
        assert not slow.view.pending, slow.view.pending
        assert [a["channel"] for a in slow.view.acks] == ["other", CHANNEL]


async def test_a_channel_that_got_a_new_epoch_while_the_listeners_were_away_is_caught_up_at_once(
    own_redis: PrivateRedis, clients: list[Client]
) -> None:
    with Service(own_redis.url, workers=2) as service:
        made = await _connect(service, clients, 4)
        await _publish(service, 3)
        await _all(made, lambda c: c.view.offsets(CHANNEL) == [1, 2, 3], "1..3 live")
        old = made[0].view.position[CHANNEL][1]
        keys, settings = Keys(service.prefix), Settings(redis_prefix=service.prefix)
        raw = redis.Redis.from_url(own_redis.url)
        try:
            # In one transaction: the listeners cut, the channel lost (as by eviction or expiry: a
            # new epoch), and two publications of the new epoch that no listener hears. Nothing is
            # published after: the workers' check after their reconnect alone must deliver them.
            pipe = raw.pipeline(transaction=True)
            pipe.client_kill_filter(_type="pubsub")
            pipe.delete(keys.meta(CHANNEL), keys.history(CHANNEL))
            for n in range(2):
                call_keys, args = publish_call(keys, settings, CHANNEL, orjson.dumps({"n": n}))
                pipe.fcall("wsb_publish", len(call_keys), *call_keys, *args)
            killed, _, first, second = pipe.execute()
        finally:
            raw.close()
        assert killed >= 2 and first[3] == 0 and second[3] == 0, (killed, first, second)
        new = second[2].decode()
        assert new != old and second[1] == 2
        await _all(made, lambda c: c.view.position.get(CHANNEL) == (2, new), "every client in the new epoch at 2")
        assert not _violations(made)
        for client in made:
            assert [g["epoch"] for g in client.view.gaps] == [new], client.view.gaps
            assert [f["offset"] for f in client.view.publications if f["epoch"] == new] == [1, 2]


async def test_a_repeated_subscribe_is_answered_in_order_with_the_publications_queued_before_it(
    redis_server: PrivateRedis, clients: list[Client]
) -> None:
    # drop-oldest takes the queued (ASGI) path; the queue is long enough that nothing is dropped.
    with Service(
        redis_server.url, workers=2, slow_consumer_policy="drop-oldest", send_buffer_bytes=4096
    ) as service:
        slow = await _stalled_client(service, clients)
        feed = Publisher(redis_server.url, service, rate=1000, pad=8000)
        try:
            for n in range(40):  # more than the client's socket buffers hold: a backlog waits
                await feed.one(n)
        finally:
            await feed.stop()
        await slow.subscribe()  # again: the answer is the position after everything queued before it
        slow.reading.set()
        top = feed.made[-1]
        await _all([slow], lambda c: _caught_up(c, top), "the client to catch up")
        assert not _violations(clients)
        assert slow.view.offsets(CHANNEL) == list(range(1, top[0] + 1)) and not slow.view.gaps
        assert len(slow.view.acks) == 2 and slow.view.acks[1]["offset"] <= top[0], slow.view.acks


# --- recovery while publications keep arriving --------------------------------------------------------


async def test_a_recovery_whose_read_is_overtaken_by_a_live_publication_still_recovers(
    redis_server: PrivateRedis,
) -> None:
    # One worker's parts on a real Redis: the live publication reaches the hub after Redis answered
    # the read and before the worker handled the answer, as it does under a fast publisher.
    client = Redis.from_url(redis_server.url)
    keys = Keys(f"r{os.getpid()}x{time.monotonic_ns()}:")
    settings = Settings(redis_prefix=keys.prefix)
    hub = Hub(lambda c: None, lambda c: None)
    recovery = Recovery(History(client, keys, settings), hub)
    try:
        hub.add("c", Recorder())
        _, epoch = await recovery.position("c")
        for n in range(5):
            done = await publish(client, "c", orjson.dumps({"n": n}), settings=settings)
            frame = orjson.dumps({"channel": "c", "offset": done.offset, "epoch": epoch, "data": {"n": n}})
            hub.publish("c", frame, done.offset, epoch)
        task = asyncio.create_task(recovery.recover("c", Position(2, epoch)))
        for _ in range(100_000):  # until the read is under way: Redis's top is 5
            if hub.counters.history_reads:
                break
            await asyncio.sleep(0)
        assert hub.counters.history_reads == 1
        late = orjson.dumps({"channel": "c", "offset": 6, "epoch": epoch, "data": {"n": 5}})
        hub.publish("c", late, 6, epoch)
        got = await asyncio.wait_for(task, 10)
        assert got.recovered and got.offset == 6, got
        assert [offset for offset, _ in got.frames] == [3, 4, 5, 6]
    finally:
        await recovery.stop()
        await client.aclose()
