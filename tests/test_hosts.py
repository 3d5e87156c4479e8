"""Across hosts: an instance on each of two hosts, Redis on a third, one host's cable pulled and put back.

The hosts are network namespaces on one bridge that the test makes and removes (``tests/netns.py``),
each with its own hostname, so the workers' heartbeats name their host as on separate machines.
Each instance is the web line with 2 workers, started on its host by ``ServiceProcess``; Redis
binds host C's address. Clients connect on their instance's host (loopback there), so cutting a
host's link cuts only its workers' way to Redis, and its clients stay to see what they missed.
Every client's frames go through ``View``, which checks the contract's invariant as they arrive.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from scripts.redis_server import PrivateRedis, free_port
from scripts.service_process import ServiceProcess, web_env
from tests.netns import Host, Lan, NamespacesUnavailable
from tests.support.view import View
from tests.support.waits import async_wait_until

ROOT = Path(__file__).resolve().parent.parent
CHANNEL = "feed"
PREFIX = "hosts:"
TOKEN = "test-token"
ADMIN = "test-admin"
# Heartbeat and canary: a worker cut off turns degraded within about two intervals, and its
# heartbeat (a TTL of three intervals) expires soon after.
INTERVAL = "0.5"
PUBLISH_EVERY = 0.05
MAX_PUBLICATIONS = 2000  # the publisher's bound: 100 s at its rate, far beyond the test's run
CLIENTS_PER_HOST = 3
# Histories: one that holds every publication the test can make within its waits, and one that a
# cut of SHORT_HISTORY + 2 publications outruns.
LONG_HISTORY = MAX_PUBLICATIONS
SHORT_HISTORY = 5


@dataclass
class Instance:
    """One service instance on ``host``, serving on ``port`` of that host's loopback."""

    host: Host
    port: int
    service: ServiceProcess

    @property
    def workers(self) -> set[tuple[str, int]]:
        return {(self.host.hostname, pid) for pid in self.service.worker_pids()}


@pytest.fixture
def lan() -> Iterator[Lan]:
    made = Lan(["a", "b", "c"])
    unavailable = None
    try:
        made.create()
    except NamespacesUnavailable as exc:
        unavailable = str(exc)
    # Never a skip: where hosts cannot be made, the test fails with the reason in one line.
    if unavailable is not None:
        pytest.fail(f"test hosts need network namespaces: {unavailable}", pytrace=False)
    try:
        yield made
    finally:
        made.remove()
    assert made.listed() == [], "namespaces left behind"


@pytest.fixture
def broker(lan: Lan) -> Iterator[PrivateRedis]:
    """Redis on host C, bound to C's address on the LAN."""
    c = lan["c"]
    server = c.call(lambda: PrivateRedis(host=c.address))
    c.call(server.start)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def instances(lan: Lan, broker: PrivateRedis, history_size: int) -> Iterator[dict[str, Instance]]:
    """An instance with 2 workers on each of hosts A and B, started together, ready when both are."""
    made: dict[str, Instance] = {}
    try:
        for name in ("a", "b"):
            host = lan[name]
            port = host.call(free_port)
            settings = {"HEARTBEAT_INTERVAL": INTERVAL, "CANARY_INTERVAL": INTERVAL, "PUBLISH_TOKEN": TOKEN,
                        "ADMIN_TOKEN": ADMIN, "HISTORY_SIZE": str(history_size), "GRACEFUL_TIMEOUT": "5"}
            env = web_env(port=port, workers=2, redis_url=broker.url, prefix=PREFIX, settings=settings)
            log = Path(tempfile.mkstemp(prefix="wsbroadcast-test-", suffix=".log")[1])
            made[name] = Instance(host, port, host.call(ServiceProcess(env, log_path=log).start))
        for future in [i.host.submit(i.service.wait_ready, 60.0) for i in made.values()]:
            future.result(70)
        yield made
    finally:
        for instance in made.values():
            instance.service.stop()


class Client:
    """A websockets client connected from its instance's host, recording into a ``View``."""

    def __init__(self, instance: Instance, name: str) -> None:
        self.instance = instance
        self.view = View(name)
        self.ws: ClientConnection | None = None
        self.reader: asyncio.Task[None] | None = None
        self.worker = ""
        self.closed: int | None = None

    async def connect(self) -> Client:
        sock = await self.instance.host.open(self.instance.port)
        self.view.subscribing(CHANNEL, None)
        self.ws = await connect(f"ws://127.0.0.1:{self.instance.port}/ws?channels={CHANNEL}", sock=sock,
                                open_timeout=10, max_size=None)
        assert self.ws.response is not None
        self.worker = self.ws.response.headers["x-wsbroadcast-worker"]
        self.reader = asyncio.create_task(self._read(self.ws))
        return self

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                self.view.see(orjson.loads(raw))
        except ConnectionClosed:
            pass
        self.closed = ws.close_code

    async def subscribed(self) -> bool:
        return CHANNEL in self.view.position

    def at(self) -> int:
        """The offset up to which every publication is accounted for (delivered or told lost)."""
        return self.view.position.get(CHANNEL, (0, ""))[0]

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            await self.reader


async def clients_on_both_workers(instance: Instance, name: str, clients: list[Client]) -> list[Client]:
    """Subscribed clients of ``instance`` into ``clients`` (the caller closes them whatever happens),
    at least CLIENTS_PER_HOST, until both its workers hold some."""
    for n in range(40):
        client = Client(instance, f"{name}{n}")
        clients.append(client)
        await client.connect()
        await async_wait_until(client.subscribed, 10, what=f"{client.view.name} subscribed")
        if len(clients) >= CLIENTS_PER_HOST and len({c.worker for c in clients}) == 2:
            return clients
    raise AssertionError(f"40 clients of host {name} all landed on one worker")


class Publisher:
    """Publishes 0, 1, 2, ... through one instance's POST /publish, from that instance's host."""

    def __init__(self, instance: Instance) -> None:
        self.url = f"http://127.0.0.1:{instance.port}/publish"
        self.offsets: list[int] = []
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(timeout=5) as http:
            for seq in range(MAX_PUBLICATIONS):
                if self.stopping.wait(PUBLISH_EVERY):
                    return
                try:
                    response = http.post(self.url, json={"channel": CHANNEL, "data": seq}, headers=headers)
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                if response.status_code == 202:
                    self.offsets.append(response.json()["offset"])
                else:
                    self.failures.append(f"{response.status_code} {response.text}")

    def top(self) -> int:
        return self.offsets[-1] if self.offsets else 0

    async def reached(self, offset: int) -> bool:
        return self.top() >= offset


def worker_health(instance: Instance) -> dict[int, dict[str, Any]]:
    """Each worker's own GET /health, asked on its host (a new connection each time, until both
    workers have answered)."""
    pids = instance.service.worker_pids()
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(50):
        doc = httpx.get(f"http://127.0.0.1:{instance.port}/health", timeout=2,
                        headers={"Authorization": f"Bearer {ADMIN}"}).json()
        seen[doc["worker"]["pid"]] = doc
        if pids <= set(seen):
            break
    return {pid: doc for pid, doc in seen.items() if pid in pids}


def statuses(instance: Instance) -> list[str]:
    return [doc["status"] for doc in worker_health(instance).values()]


def drop_clients_of(redis_url: str, address: str) -> int:
    """Make Redis close every connection from ``address``, as its TCP keepalive does to a peer
    silent for long (after minutes, by default)."""
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        ids = [entry["id"] for entry in client.client_list() if entry["addr"].rsplit(":", 1)[0] == address]
        for client_id in ids:
            client.client_kill_filter(_id=client_id)
        return len(ids)
    finally:
        client.close()


def coordinator(redis_url: str) -> dict[str, Any]:
    """``scripts/health --json`` against Redis: the coordinator's report of every live worker."""
    done = subprocess.run(
        [sys.executable, "-m", "scripts.health", "--json", "--redis-url", redis_url],
        cwd=ROOT, env={**os.environ, "REDIS_PREFIX": PREFIX}, capture_output=True, timeout=20, check=False,
    )
    assert done.stdout, f"scripts/health exited {done.returncode} without a report: {done.stderr!r}"
    report: dict[str, Any] = orjson.loads(done.stdout)
    return report


def listed(report: dict[str, Any]) -> set[tuple[str, int]]:
    return {(w["worker"]["host"], w["worker"]["pid"]) for w in report["workers"]}


async def everyone_at(clients: list[Client], offset: int, timeout: float, what: str) -> None:
    async def reached() -> bool:
        return all(c.at() >= offset for c in clients)

    await async_wait_until(reached, timeout, interval=0.05,
                           what=f"{what} at offset {offset} (at {[c.at() for c in clients]})")


@pytest.mark.parametrize(
    ("history_size", "dropped"),
    [
        # Connections outlive the partition: the publications Redis wrote to A meanwhile arrive late.
        pytest.param(LONG_HISTORY, False, id="connections-kept"),
        # Redis dropped A's connections: A resubscribes and its workers fill the hole from the history.
        pytest.param(LONG_HISTORY, True, id="connections-dropped"),
        # The same with a history shorter than the hole: what it no longer holds arrives as a gap.
        pytest.param(SHORT_HISTORY, True, id="history-too-short"),
    ],
)
async def test_a_host_cut_off_turns_degraded_drops_out_and_rejoins_with_no_silent_hole(
    lan: Lan, broker: PrivateRedis, instances: dict[str, Instance], history_size: int, dropped: bool
) -> None:
    a, b = instances["a"], instances["b"]
    on_b, on_c = b.host, lan["c"]  # the coordinator runs on B, which keeps its link

    async def report() -> dict[str, Any]:
        return await on_b.run(coordinator, broker.url)

    clients: dict[str, list[Client]] = {"a": [], "b": []}
    publisher = Publisher(b)
    publishing: Future[None] | None = None
    try:
        for name, mine in clients.items():
            await clients_on_both_workers(instances[name], name, mine)
        everyone = clients["a"] + clients["b"]
        publishing = on_b.submit(publisher.run)
        started = time.monotonic()
        # Both hosts deliver every publication.
        await async_wait_until(lambda: publisher.reached(10), 20, what="10 publications")
        await everyone_at(everyone, publisher.top(), 10, "the clients of both hosts")
        before = await report()
        assert listed(before) == a.workers | b.workers, before
        assert before["status"] == "ok" and before["totals"]["hosts"] == 2, before

        cut_top = publisher.top()
        cut_at = time.monotonic()
        lan.cut("a")

        async def a_degraded() -> bool:
            return await a.host.run(statuses, a) == ["degraded", "degraded"]

        await async_wait_until(a_degraded, 15, interval=0.1, what="host A's workers degraded")
        degraded_after = time.monotonic() - cut_at

        async def a_gone() -> dict[str, Any] | None:
            now = await report()
            return now if listed(now) == b.workers else None

        during = await async_wait_until(a_gone, 15, interval=0.2, what="host A gone from the coordinator")
        gone_after = time.monotonic() - cut_at
        assert during["totals"]["hosts"] == 1, during
        if dropped:
            assert await on_c.run(drop_clients_of, broker.url, a.host.address) > 0
        # Nothing published from here on can reach A before the heal; the cut lasts long enough
        # for the short history to be outrun.
        unreachable = publisher.top() + 1
        await async_wait_until(lambda: publisher.reached(unreachable + SHORT_HISTORY + 1), 20,
                               what="publications during the cut")

        # Host B is unaffected: its workers are ok and its clients have every publication so far;
        # host A's clients have none since the cut.
        await everyone_at(clients["b"], publisher.top(), 5, "host B's clients during the cut")
        assert await on_b.run(statuses, b) == ["ok", "ok"]
        assert all(c.at() < unreachable for c in clients["a"]), ([c.at() for c in clients["a"]], unreachable)

        heal_top = publisher.top()
        healed_at = time.monotonic()
        lan.heal("a")

        async def a_back() -> dict[str, Any] | None:
            now = await report()
            return now if listed(now) == a.workers | b.workers and now["status"] == "ok" else None

        after = await async_wait_until(a_back, 20, interval=0.2, what="host A's workers back in the coordinator")
        rejoined_after = time.monotonic() - healed_at
        assert after["totals"]["hosts"] == 2, after

        async def a_ok() -> bool:
            return await a.host.run(statuses, a) == ["ok", "ok"]

        await async_wait_until(a_ok, 15, interval=0.1, what="host A's workers ok")
        # Every client, host A's included, has every publication, or was told which it lost.
        final = heal_top + 20
        await async_wait_until(lambda: publisher.reached(final), 20, what=f"offset {final} published")
        await everyone_at(everyone, final, 30, "every client after the heal")
        caught_up_after = time.monotonic() - healed_at
        a_health = await a.host.run(worker_health, a)
    finally:
        publisher.stopping.set()
        for client in clients["a"] + clients["b"]:
            await client.close()
        if publishing is not None:
            publishing.result(30)

    assert not publisher.failures, publisher.failures[:5]
    violations = [v for c in everyone for v in c.view.violations]
    assert not violations, violations[:10]
    assert all(c.closed in (None, 1000) for c in everyone), [(c.view.name, c.closed) for c in everyone]
    assert not any(c.view.gaps for c in clients["b"]), [c.view.gaps for c in clients["b"]]
    # What A's clients were owed from the cut to the end: delivered late (on connections that
    # outlived the cut), filled from the history, or announced lost by a gap.
    owed = set(range(cut_top + 1, final + 1))
    lost = [len(owed - {f["offset"] for f in c.view.publications}) for c in clients["a"]]
    gaps = [len(c.view.gaps) for c in clients["a"]]
    workers = {pid: {"reconnects": doc["redis"]["reconnects"], **{k: doc["history"][k] for k in
               ("holes", "holes_filled", "gaps_sent", "history_reads")}} for pid, doc in a_health.items()}
    print(f"\nA cut off for {len(range(cut_top, heal_top))} publications: degraded {degraded_after:.2f} s after "
          f"the cut, gone from the coordinator after {gone_after:.2f} s; back {rejoined_after:.2f} s after the "
          f"heal, its clients caught up after {caught_up_after:.2f} s; of {len(owed)} owed its clients lost "
          f"{lost} with gap frames {gaps}; A's workers {workers}; {time.monotonic() - started:.1f} s in all")
    if dropped:
        # Redis no longer had A subscribed: each worker found its hole and read the history for it.
        assert all(w["reconnects"] >= 1 and w["holes_filled"] >= 1 for w in workers.values()), workers
    if history_size == LONG_HISTORY:
        assert not any(lost) and not any(gaps), (lost, gaps)
    else:
        assert all(gaps) and all(lost), (lost, gaps)
