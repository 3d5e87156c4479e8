"""service.publisher with redis-py's RedisCluster (asyncio and sync) against a real Redis Cluster and
the service running on it: publications reach the service's subscribers, offsets continue the
service's own, idempotent retries replay, and a migrating or migrated slot still publishes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from redis import RedisCluster
from redis.asyncio import RedisCluster as AsyncRedisCluster
from redis.exceptions import TryAgainError

from scripts.redis_cluster import PrivateCluster
from scripts.redis_server import free_port
from service.publisher import (
    IdempotencyConflict,
    InvalidPublication,
    Published,
    Refused,
    Unknown,
    publish,
    publish_sync,
)
from tests.cluster import (
    Reader,
    ask,
    begin_migration,
    cluster_service,
    end_migration,
    move_keys,
    owner_port,
    readers_on_both_workers,
    shared_cluster,
    slot_of,
)
from tests.support.servers import Service
from tests.support.waits import async_wait_until

__all__ = ["shared_cluster"]  # the fixture, used by name

CHANNELS = [f"py{n}" for n in range(6)]
MOVING = "py-moving"
SPLIT = "py-split"


@pytest.fixture(scope="module")
def service(redis_cluster: PrivateCluster) -> Iterator[Service]:
    with cluster_service(redis_cluster) as svc:
        yield svc


@pytest.fixture
def sync_client(redis_cluster: PrivateCluster) -> Iterator[RedisCluster]:
    client = RedisCluster(host="127.0.0.1", port=redis_cluster.master_ports()[0], socket_timeout=5)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def async_client(redis_cluster: PrivateCluster) -> AsyncIterator[AsyncRedisCluster]:
    client = AsyncRedisCluster(host="127.0.0.1", port=redis_cluster.master_ports()[-1], socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


async def post(service: Service, channel: str, data: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=service.base, timeout=15) as http:
        response = await http.post("/publish", json={"channel": channel, "data": data},
                                   headers={"Authorization": "Bearer test-token"})
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


async def delivered(readers: list[Reader], channel: str, expected: list[Any]) -> None:
    """Every reader got exactly ``expected`` on ``channel``, at consecutive offsets, with no gap."""

    async def arrived() -> bool:
        return all(len(reader.data(channel)) >= len(expected) for reader in readers)

    await async_wait_until(arrived, 15, what=f"every publication on {channel} at every client")
    for reader in readers:
        assert reader.data(channel) == expected
        offsets = [f["offset"] for f in reader.frames(channel) if "op" not in f]
        assert offsets == list(range(offsets[0], offsets[0] + len(expected))), offsets
        assert reader.gaps(channel) == 0


async def test_cluster_clients_publish_on_each_channels_master_after_the_service(
    redis_cluster: PrivateCluster, service: Service, sync_client: RedisCluster, async_client: AsyncRedisCluster,
) -> None:
    owners = {c: owner_port(redis_cluster, service.prefix + c) for c in CHANNELS}
    assert len(set(owners.values())) >= 2, owners
    readers = await readers_on_both_workers(service, CHANNELS)
    try:
        for channel in CHANNELS:
            first = await post(service, channel, "http")
            # REDIS_CLUSTER is not set here: the client's type chooses sharded pub/sub.
            a = await publish(async_client, channel, b'"async"', prefix=service.prefix)
            s = await asyncio.to_thread(publish_sync, sync_client, channel, '"sync"', prefix=service.prefix)
            assert (a.offset, s.offset) == (first["offset"] + 1, first["offset"] + 2), channel
            assert a.epoch == s.epoch == first["epoch"]
            assert a.workers == s.workers == 2  # both workers' sharded listeners on that master
            assert not a.replay and not s.replay
        for channel in CHANNELS:
            await delivered(readers, channel, ["http", "async", "sync"])
    finally:
        for reader in readers:
            await reader.close()


async def test_an_idempotent_retry_replays_on_a_cluster(
    service: Service, sync_client: RedisCluster, async_client: AsyncRedisCluster,
) -> None:
    channel = CHANNELS[0]
    readers = await readers_on_both_workers(service, [channel])
    try:
        data = b'{"order": 42}'
        made = await publish(async_client, channel, data, idempotency_key="paid-42", prefix=service.prefix)
        again = await publish(async_client, channel, data, idempotency_key="paid-42", prefix=service.prefix)
        sync_again = await asyncio.to_thread(
            publish_sync, sync_client, channel, data, idempotency_key="paid-42", prefix=service.prefix
        )
        assert not made.replay
        assert again == sync_again == Published(made.workers, made.offset, made.epoch, replay=True)
        with pytest.raises(IdempotencyConflict):
            await publish(async_client, channel, b'{"order": 43}', idempotency_key="paid-42", prefix=service.prefix)
        with pytest.raises(IdempotencyConflict):
            publish_sync(sync_client, channel, b'{"order": 43}', idempotency_key="paid-42", prefix=service.prefix)
        with pytest.raises(InvalidPublication):
            await publish(async_client, "no spaces", b"1", prefix=service.prefix)
        with pytest.raises(InvalidPublication):
            publish_sync(sync_client, channel, b"{not json", prefix=service.prefix)
        after = await post(service, channel, "after")
        assert after["offset"] == made.offset + 1  # the replays and refusals published nothing
        await delivered(readers, channel, [{"order": 42}, "after"])
    finally:
        for reader in readers:
            await reader.close()


async def test_a_migrating_then_migrated_slot_still_publishes(
    redis_cluster: PrivateCluster, service: Service, sync_client: RedisCluster, async_client: AsyncRedisCluster,
) -> None:
    key = service.prefix + MOVING
    readers = await readers_on_both_workers(service, [MOVING])
    try:
        # Both clients learn the slot map while the source still serves the channel.
        start = await publish(async_client, MOVING, b'"before a"', prefix=service.prefix)
        await asyncio.to_thread(publish_sync, sync_client, MOVING, b'"before s"', prefix=service.prefix)
        source = owner_port(redis_cluster, key)
        target = next(p for p in redis_cluster.master_ports() if p != source)
        slot = slot_of(source, key)
        begin_migration(slot, source, target)
        # The keys left the source: it answers ASK, and the importing node runs the call.
        asked = await publish(async_client, MOVING, b'"asked a"', prefix=service.prefix)
        asked_sync = await asyncio.to_thread(publish_sync, sync_client, MOVING, b'"asked s"', prefix=service.prefix)
        end_migration(redis_cluster, slot, source, target)
        assert owner_port(redis_cluster, key) == target
        # The clients' maps still name the source: it answers MOVED, the call is retried on the target.
        moved = await publish(async_client, MOVING, b'"moved a"', prefix=service.prefix)
        moved_sync = await asyncio.to_thread(publish_sync, sync_client, MOVING, b'"moved s"', prefix=service.prefix)
        last = await post(service, MOVING, "http")
        offsets = [asked.offset, asked_sync.offset, moved.offset, moved_sync.offset, last["offset"]]
        assert offsets == list(range(start.offset + 2, start.offset + 7)), offsets
        assert {asked.epoch, moved.epoch, moved_sync.epoch, last["epoch"]} == {start.epoch}
        # Published on the target before the workers subscribed there, the ASKed publications reach
        # the clients from the channel's history once the slot moved (the workers' hole filling).
        await delivered(readers, MOVING, ["before a", "before s", "asked a", "asked s", "moved a", "moved s", "http"])
        assert async_client.nodes_manager.get_node_from_slot(slot).port == target
        assert sync_client.nodes_manager.get_node_from_slot(slot).port == target
    finally:
        for reader in readers:
            await reader.close()


async def test_a_master_without_the_function_library_gets_it_and_publishes(
    redis_cluster: PrivateCluster, service: Service, sync_client: RedisCluster, async_client: AsyncRedisCluster,
) -> None:
    channel = CHANNELS[1]
    owner = owner_port(redis_cluster, service.prefix + channel)
    readers = await readers_on_both_workers(service, [channel])
    try:
        ask(owner, "FUNCTION", "DELETE", "wsbroadcast")
        a = await publish(async_client, channel, b'"reloaded a"', prefix=service.prefix)
        assert [lib["library_name"] for lib in ask(owner, "FUNCTION", "LIST")] == ["wsbroadcast"]
        ask(owner, "FUNCTION", "DELETE", "wsbroadcast")
        s = await asyncio.to_thread(publish_sync, sync_client, channel, b'"reloaded s"', prefix=service.prefix)
        assert [lib["library_name"] for lib in ask(owner, "FUNCTION", "LIST")] == ["wsbroadcast"]
        assert s.offset == a.offset + 1 and s.epoch == a.epoch
        await delivered(readers, channel, ["reloaded a", "reloaded s"])
    finally:
        for reader in readers:
            await reader.close()


async def test_a_failure_says_what_is_known_and_a_keyed_retry_is_safe(
    redis_cluster: PrivateCluster, service: Service,
) -> None:
    nowhere = AsyncRedisCluster(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    try:
        with pytest.raises(Refused):
            await publish(nowhere, CHANNELS[2], b"1", prefix=service.prefix)
    finally:
        await nowhere.aclose()

    channel = CHANNELS[2]
    owner = owner_port(redis_cluster, service.prefix + channel)
    seed = redis_cluster.master_ports()[0]
    impatient = AsyncRedisCluster(host="127.0.0.1", port=seed, socket_timeout=0.3)
    impatient_sync = RedisCluster(host="127.0.0.1", port=seed, socket_timeout=0.3)
    readers = await readers_on_both_workers(service, [channel])
    try:
        # The master holds every write for a while: the calls go out and get no answer in time.
        ask(owner, "CLIENT", "PAUSE", "1500", "WRITE")
        with pytest.raises(Unknown):
            await publish(impatient, channel, b'"a"', idempotency_key="a", prefix=service.prefix)
        with pytest.raises(Unknown):
            publish_sync(impatient_sync, channel, b'"s"', idempotency_key="s", prefix=service.prefix)

        async def retried() -> list[Published] | None:
            try:
                return [
                    await publish(impatient, channel, b'"a"', idempotency_key="a", prefix=service.prefix),
                    await asyncio.to_thread(publish_sync, impatient_sync, channel, b'"s"', idempotency_key="s",
                                            prefix=service.prefix),
                ]
            except Unknown:
                return None  # still paused

        made = await async_wait_until(retried, 15, interval=0.2, what="the retries answered")
        # A held command whose connection was closed is dropped by Redis: the retries made the
        # publications, and retrying again replays them; each is delivered once.
        assert [p.replay for p in made] == [False, False] and made[1].offset == made[0].offset + 1, made
        again = await retried()
        assert again == [replace(p, replay=True) for p in made], again
        await delivered(readers, channel, ["a", "s"])
    finally:
        ask(owner, "CLIENT", "UNPAUSE")
        impatient_sync.close()
        await impatient.aclose()
        for reader in readers:
            await reader.close()


async def test_a_channel_split_mid_migration_is_refused_then_publishes(
    redis_cluster: PrivateCluster, service: Service, sync_client: RedisCluster, async_client: AsyncRedisCluster,
) -> None:
    key = service.prefix + SPLIT
    readers = await readers_on_both_workers(service, [SPLIT])
    try:
        start = await publish(async_client, SPLIT, b'"before"', prefix=service.prefix)
        source = owner_port(redis_cluster, key)
        target = next(p for p in redis_cluster.master_ports() if p != source)
        slot = slot_of(source, key)
        # Only the metadata moves at first: the source answers TRYAGAIN (retried once, after a
        # moment), and nothing is published while the channel's keys are on two nodes.
        begin_migration(slot, source, target, keys=[f"{service.prefix}meta:{{{key}}}"])
        with pytest.raises(Refused) as refused:
            await publish(async_client, SPLIT, b'"split a"', prefix=service.prefix)
        assert isinstance(refused.value.__cause__, TryAgainError) and refused.value.published is False
        with pytest.raises(Refused) as refused:
            publish_sync(sync_client, SPLIT, b'"split s"', prefix=service.prefix)
        assert isinstance(refused.value.__cause__, TryAgainError)
        move_keys(slot, source, target)
        asked = await publish(async_client, SPLIT, b'"whole"', prefix=service.prefix)
        end_migration(redis_cluster, slot, source, target)
        assert (asked.offset, asked.epoch) == (start.offset + 1, start.epoch)
        await delivered(readers, SPLIT, ["before", "whole"])
    finally:
        for reader in readers:
            await reader.close()
