"""A real Redis Cluster for tests (3 masters, 3 replicas on free loopback ports), what tests ask its
nodes and do to its slots, and a service on it with clients read in the background."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from websockets.asyncio.client import ClientConnection

from scripts.redis_cluster import PrivateCluster
from tests.support.clients import BackgroundReader, recv_acks, worker_of
from tests.support.servers import Service
from tests.support.view import View

POOL_SIZE = 3


def make_cluster() -> Iterator[PrivateCluster]:
    with PrivateCluster(masters=3, replicas=1) as cluster:
        yield cluster


# One cluster for the tests that leave its topology as they found it (or only move slots);
# a test that kills a node takes a cluster of its own.
shared_cluster = pytest.fixture(scope="module", name="redis_cluster")(make_cluster)
own_cluster = pytest.fixture(name="own_cluster")(make_cluster)


def node(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=5)


def ask(port: int, *args: str) -> Any:
    client = node(port)
    try:
        return client.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        client.close()


def shard_channels(port: int, pattern: str) -> set[str]:
    return {str(c) for c in ask(port, "PUBSUB", "SHARDCHANNELS", pattern)}


def classic_channels(port: int, pattern: str) -> set[str]:
    return {str(c) for c in ask(port, "PUBSUB", "CHANNELS", pattern)}


def slot_of(port: int, key: str) -> int:
    return int(ask(port, "CLUSTER", "KEYSLOT", key))


def node_id(port: int) -> str:
    return str(ask(port, "CLUSTER", "MYID"))


def owner_port(cluster: PrivateCluster, key: str) -> int:
    """The port of the master serving ``key``'s slot, as the first live master sees the map."""
    port = cluster.master_ports()[0]
    key_slot = slot_of(port, key)
    for start, end, master, *_ in ask(port, "CLUSTER", "SLOTS"):
        if int(start) <= key_slot <= int(end):
            return int(master[1])
    raise AssertionError(f"no master serves slot {key_slot}")


def clients_by_name(port: int, prefix: str = "wsbroadcast:") -> dict[str, int]:
    """CLIENT LIST of one node: connections per client name starting with ``prefix``."""
    counts: dict[str, int] = {}
    for entry in node_client_list(port):
        name = entry.get("name", "")
        if name.startswith(prefix):
            counts[name] = counts.get(name, 0) + 1
    return counts


def node_client_list(port: int) -> list[dict[str, str]]:
    client = node(port)
    try:
        return list(client.client_list())
    finally:
        client.close()


def begin_migration(slot: int, source: int, target: int, keys: list[str] | None = None) -> None:
    """Mark one slot migrating and move its keys (or only ``keys``): the source answers ASK for
    the keys it no longer has from then on, TRYAGAIN for a call on keys split between the two."""
    ask(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", node_id(source))
    ask(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", node_id(target))
    if keys is not None:
        ask(source, "MIGRATE", "127.0.0.1", str(target), "", "0", "5000", "KEYS", *keys)
        return
    move_keys(slot, source, target)


def move_keys(slot: int, source: int, target: int) -> None:
    """Move what keys of a migrating slot are still on the source."""
    for _ in range(100):  # bounded: a slot of ours holds a handful of keys
        keys = ask(source, "CLUSTER", "GETKEYSINSLOT", str(slot), "100")
        if not keys:
            break
        ask(source, "MIGRATE", "127.0.0.1", str(target), "", "0", "5000", "KEYS", *keys)


def end_migration(cluster: PrivateCluster, slot: int, source: int, target: int) -> None:
    """Give the slot to the target on every master: the others answer MOVED for it."""
    target_id = node_id(target)
    for port in (target, source, *(p for p in cluster.master_ports() if p not in (source, target))):
        ask(port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)


def migrate_slot(cluster: PrivateCluster, slot: int, source: int, target: int) -> None:
    """Move one slot with its keys, as ``redis-cli --cluster reshard`` does."""
    begin_migration(slot, source, target)
    end_migration(cluster, slot, source, target)


@contextlib.contextmanager
def cluster_service(cluster: PrivateCluster, **settings: Any) -> Iterator[Service]:
    """A service of 2 workers on the cluster, stopped by PID even when it never got ready."""
    service = Service(cluster.url, workers=2, redis_cluster=1, redis_pool_size=POOL_SIZE, **settings)
    try:
        yield service.start()
    finally:
        service.stop()
        service.log_path.unlink(missing_ok=True)


class Reader:
    """A client subscribed at connect, read in the background; its frames checked with ``View``."""

    def __init__(self, ws: ClientConnection, acks: dict[str, dict[str, Any]]) -> None:
        self.ws = ws
        self.acks = acks
        self.background = BackgroundReader(ws)

    def frames(self, channel: str) -> list[dict[str, Any]]:
        return [frame for _, frame in self.background.frames if frame.get("channel") == channel]

    def data(self, channel: str) -> list[Any]:
        return [f["data"] for f in self.frames(channel) if "op" not in f]

    def gaps(self, channel: str) -> int:
        """Gap frames of ``channel``, once every frame so far was checked against the contract."""
        view = View(worker_of(self.ws))
        for name, ack in self.acks.items():
            view.subscribing(name, None)
            view.see(ack)
        for _, frame in self.background.frames:
            view.see(frame)
        assert not view.violations, view.violations
        return sum(1 for gap in view.gaps if gap["channel"] == channel)

    async def close(self) -> None:
        await self.background.stop()


async def readers_on_both_workers(service: Service, channels: list[str], minimum: int = 2) -> list[Reader]:
    readers: list[Reader] = []
    workers: set[str] = set()
    for _ in range(100):
        ws = await service.connect(f"?channels={','.join(channels)}")
        acks = await recv_acks(ws, channels, timeout=15)
        workers.add(worker_of(ws))
        readers.append(Reader(ws, acks))
        if len(readers) >= minimum and len(workers) == 2:
            return readers
    raise AssertionError("100 clients all landed on one worker")
