"""A real Redis Cluster for tests (3 masters, 3 replicas on free loopback ports) and what tests ask its nodes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from scripts.redis_cluster import PrivateCluster


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
