"""REDIS_CLUSTER=1 against a real Redis Cluster (3 masters + 3 replicas): sharded pub/sub across
workers, connections bounded per node, a slot migration and a master's crash under publishers."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil

from scripts.redis_cluster import PrivateCluster
from scripts.redis_server import free_port
from tests.cluster import (
    POOL_SIZE,
    ask,
    classic_channels,
    clients_by_name,
    cluster_service,
    migrate_slot,
    own_cluster,
    owner_port,
    readers_on_both_workers,
    shard_channels,
    shared_cluster,
    slot_of,
)
from tests.support.clients import worker_of
from tests.support.commands import command
from tests.support.servers import ROOT
from tests.support.waits import async_wait_until, process_gone, wait_until

__all__ = ["own_cluster", "shared_cluster"]  # the fixtures, used by name

CHANNELS = [f"ch{n}" for n in range(48)]


async def test_delivery_across_workers_on_sharded_pubsub_with_bounded_connections(
    redis_cluster: PrivateCluster,
) -> None:
    with cluster_service(redis_cluster) as service:
        readers = await readers_on_both_workers(service, CHANNELS)
        try:
            masters = redis_cluster.master_ports()
            owners = {channel: owner_port(redis_cluster, service.prefix + channel) for channel in CHANNELS}
            assert len(set(owners.values())) >= 2, owners
            # Publishing concurrently makes each worker draw more than one connection per node.
            async with httpx.AsyncClient(base_url=service.base, timeout=15) as http:
                responses = await asyncio.gather(*(
                    http.post("/publish", json={"channel": channel, "data": {"n": n}},
                              headers={"Authorization": "Bearer test-token"})
                    for n in range(3) for channel in CHANNELS
                ))
            assert {r.status_code for r in responses} == {202}, [r.text for r in responses if r.status_code != 202]
            assert all(r.json()["workers"] == 2 for r in responses), [r.json() for r in responses]

            async def delivered() -> bool:
                return all(sorted(n["n"] for n in reader.data(c)) == [0, 1, 2] for reader in readers for c in CHANNELS)

            await async_wait_until(delivered, 15, what="every publication at every client")
            for reader in readers:
                for channel in CHANNELS:
                    assert reader.gaps(channel) == 0

            # Sharded subscriptions, each on the master serving its channel's slot; none classic.
            pattern = service.prefix + "*"
            for port in masters:
                ours = {c for c in shard_channels(port, pattern) if "#canary" not in c}
                assert ours == {service.prefix + c for c, p in owners.items() if p == port}, port
                assert classic_channels(port, pattern) == set(), port
            for port in redis_cluster.roles():
                if port not in masters:
                    assert clients_by_name(port) == {}, f"a connection to the replica {port}"
            for port in masters:  # the function library is on every master, for any publisher
                assert [lib["library_name"] for lib in ask(port, "FUNCTION", "LIST")] == ["wsbroadcast"], port
            # At most REDIS_POOL_SIZE connections per worker per node, its listener included.
            workers = {worker_of(reader.ws) for reader in readers}
            for port in masters:
                counts = clients_by_name(port)
                for worker in workers:
                    assert 1 <= counts.get(f"wsbroadcast:{worker}", 0) <= POOL_SIZE, (port, counts)

            # The commands, pointed at any node: the coordinator reads every master's heartbeats,
            # the publish command calls the function on the channel's master.
            env = {**os.environ, "REDIS_URL": redis_cluster.url, "REDIS_CLUSTER": "1", "REDIS_PREFIX": service.prefix}
            report = command("health", "--json", env=env)
            assert report.returncode == 0, report.stderr
            doc = orjson.loads(report.stdout)
            assert doc["status"] == "ok" and doc["totals"]["workers"] == 2, doc
            for channel in (CHANNELS[0], CHANNELS[-1]):
                done = command("publish", channel, '{"n": 3}', env=env)
                assert done.returncode == 0, done.stdout + done.stderr

            async def by_command() -> bool:
                return all(reader.data(c)[-1:] == [{"n": 3}] for reader in readers for c in (CHANNELS[0], CHANNELS[-1]))

            await async_wait_until(by_command, 10, what="the command's publications")
        finally:
            for reader in readers:
                await reader.close()


async def test_a_slot_migration_keeps_delivering_without_a_hole(redis_cluster: PrivateCluster) -> None:
    with cluster_service(redis_cluster) as service:
        channel = "migrating"
        key = service.prefix + channel
        readers = await readers_on_both_workers(service, [channel])
        try:
            source = owner_port(redis_cluster, key)
            target = next(p for p in redis_cluster.master_ports() if p != source)
            published: list[int] = []
            stop = asyncio.Event()

            async def publish_steadily() -> None:
                async with httpx.AsyncClient(base_url=service.base, timeout=10) as http:
                    n = 0
                    for _ in range(2000):  # bounded: 20 s at most
                        if stop.is_set():
                            return
                        response = await http.post("/publish", json={"channel": channel, "data": n},
                                                   headers={"Authorization": "Bearer test-token"})
                        if response.status_code == 202:
                            published.append(n)
                            n += 1
                        await asyncio.sleep(0.01)

            publisher = asyncio.create_task(publish_steadily())

            def some(count: int) -> Any:
                async def enough() -> bool:
                    return len(published) >= count

                return enough

            await async_wait_until(some(20), 10, what="publications before the migration")
            migrate_slot(redis_cluster, slot_of(source, key), source, target)
            await async_wait_until(some(len(published) + 30), 15, what="publications after the migration")
            stop.set()
            await publisher
            assert owner_port(redis_cluster, key) == target

            async def all_delivered() -> bool:
                return all(reader.data(channel)[-1:] == published[-1:] for reader in readers)

            await async_wait_until(all_delivered, 10, what="the last publication at every client")
            for reader in readers:
                assert reader.gaps(channel) == 0, "a migration loses nothing: no gap"
                assert reader.data(channel) == published
            # Redis dropped the subscriptions when the slot left (a pushed sunsubscribe); the workers
            # re-made them on the new owner.
            assert service.log().count(f"dropped the subscription to {key}") == 2, service.log()
            assert key in shard_channels(target, key)
            assert key not in shard_channels(source, key)
        finally:
            for reader in readers:
                await reader.close()


async def test_a_shard_listener_killed_reconnects_alone_and_fills_its_holes(redis_cluster: PrivateCluster) -> None:
    channels = CHANNELS[:12]
    with cluster_service(redis_cluster) as service:
        readers = await readers_on_both_workers(service, channels)
        try:
            owners = {c: owner_port(redis_cluster, service.prefix + c) for c in channels}
            victim = max(set(owners.values()), key=lambda p: sum(1 for o in owners.values() if o == p))
            published: dict[str, list[int]] = {c: [] for c in channels}
            stop = asyncio.Event()

            async def publish(http: httpx.AsyncClient, channel: str) -> None:
                for n in range(1000):  # bounded: 20 s at most
                    if stop.is_set():
                        return
                    response = await http.post("/publish", json={"channel": channel, "data": n},
                                               headers={"Authorization": "Bearer test-token"})
                    assert response.status_code == 202, response.text
                    published[channel].append(n)
                    await asyncio.sleep(0.02)

            async with httpx.AsyncClient(base_url=service.base, timeout=10) as http:
                tasks = [asyncio.create_task(publish(http, c)) for c in channels]

                async def some() -> bool:
                    return all(len(p) >= 10 for p in published.values())

                await async_wait_until(some, 10, what="publications before the kill")
                # Both workers' sharded listeners on one master lose their connections.
                killed = ask(victim, "CLIENT", "KILL", "TYPE", "pubsub")
                assert killed >= 2, killed
                counts = {c: len(p) for c, p in published.items()}

                async def more() -> bool:
                    return all(len(p) >= counts[c] + 20 for c, p in published.items())

                await async_wait_until(more, 15, what="publications after the kill")
                stop.set()
                await asyncio.gather(*tasks)

            async def all_delivered() -> bool:
                return all(reader.data(c) == published[c] for reader in readers for c in channels)

            await async_wait_until(all_delivered, 15, what="every publication at every client")
            for reader in readers:
                for channel in channels:
                    assert reader.gaps(channel) == 0
            restored = [line for line in service.log().splitlines() if "restored after" in line]
            assert len(restored) == 2 and all(f"(node 127.0.0.1:{victim})" in line for line in restored), restored
        finally:
            for reader in readers:
                await reader.close()


async def test_a_master_killed_under_publishers_fails_over_with_nothing_lost_silently(
    own_cluster: PrivateCluster,
) -> None:
    channels = CHANNELS[:12]
    with cluster_service(own_cluster) as service:
        readers = await readers_on_both_workers(service, channels, minimum=4)
        try:
            owners = {c: owner_port(own_cluster, service.prefix + c) for c in channels}
            victim = max(set(owners.values()), key=lambda p: sum(1 for o in owners.values() if o == p))
            accepted: dict[str, list[tuple[float, int]]] = {c: [] for c in channels}
            epochs: dict[str, dict[int, str]] = {c: {} for c in channels}  # what each publication's 202 said
            statuses: set[str] = set()
            stop = asyncio.Event()

            async def publish(http: httpx.AsyncClient, channel: str) -> None:
                n = 0
                for _ in range(3000):  # bounded: 60 s at most
                    if stop.is_set():
                        return
                    try:
                        response = await http.post("/publish", json={"channel": channel, "data": n},
                                                   headers={"Authorization": "Bearer test-token"})
                    except httpx.HTTPError:
                        response = None
                    if response is not None and response.status_code == 202:
                        accepted[channel].append((time.monotonic(), n))
                        epochs[channel][n] = response.json()["epoch"]
                        n += 1
                    await asyncio.sleep(0.02)

            async def watch_health(http: httpx.AsyncClient) -> None:
                for _ in range(600):
                    if stop.is_set():
                        return
                    response = await http.get("/health")
                    statuses.add(response.json()["status"])
                    await asyncio.sleep(0.05)

            async with httpx.AsyncClient(base_url=service.base, timeout=10) as http:
                tasks = [asyncio.create_task(publish(http, c)) for c in channels]
                tasks.append(asyncio.create_task(watch_health(http)))

                async def everyone_published() -> bool:
                    return all(len(a) >= 5 for a in accepted.values())

                await async_wait_until(everyone_published, 15, what="every channel publishing")
                killed_at = time.monotonic()
                own_cluster.kill(victim)

                def delivered_after(t: float) -> bool:
                    for channel in channels:
                        after = [n for at, n in accepted[channel] if at > t]
                        if not after or not all(after[0] in reader.data(channel) for reader in readers):
                            return False
                    return True

                async def recovered() -> bool:
                    return delivered_after(killed_at)

                await async_wait_until(recovered, 40, interval=0.05, what="every channel publishing and delivering")
                recovery = time.monotonic() - killed_at
                back_at = time.monotonic()

                async def settled() -> bool:
                    return all(len([1 for at, _ in a if at > back_at]) >= 5 for a in accepted.values())

                await async_wait_until(settled, 15, what="publications after the failover")
                stop.set()
                await asyncio.gather(*tasks)

            async def all_delivered() -> bool:
                return all(reader.data(c)[-1:] == [accepted[c][-1][1]] for reader in readers for c in channels)

            await async_wait_until(all_delivered, 15, what="the last publication of every channel at every client")
            gaps = 0
            for reader in readers:
                for channel in channels:
                    found = reader.gaps(channel)
                    gaps += found
                    # The failed master's channels start a new epoch once (what its replica never
                    # got is unknowable); the others go on untouched.
                    assert found == (owners[channel] == victim), (channel, [
                        (f.get("op"), f.get("offset"), f.get("epoch")) for f in reader.frames(channel) if f.get("op")
                    ], [f.get("offset") for f in reader.frames(channel)])
                    got = set(reader.data(channel))
                    # Whatever the new master accepted is delivered, the publications made before
                    # the workers had subscribed there included (read from its history); what the
                    # old master accepted and may not have replicated is covered by the gap.
                    final = epochs[channel][accepted[channel][-1][1]]
                    assert {n for n, e in epochs[channel].items() if e == final} <= got, channel
            print(f"\nfailover: every channel published and delivered again {recovery:.2f} s after the SIGKILL; "
                  f"gap frames {gaps}; worker statuses seen {sorted(statuses)}")
            assert recovery < 30
            assert "degraded" in statuses, "the dead shard was hidden by the healthy ones"
        finally:
            for reader in readers:
                await reader.close()


def test_scripts_run_starts_a_private_cluster_and_stops_every_node(tmp_path: Path) -> None:
    env = {**os.environ, "REDIS_CLUSTER": "1", "PORT": str(free_port()), "BIND_HOST": "127.0.0.1",
           "TMPDIR": str(tmp_path)}
    env.pop("REDIS_URL", None)
    run = subprocess.Popen([sys.executable, "-m", "scripts.run"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert run.stdout is not None
        banner = ""
        for _ in range(200):  # bounded: the banner is a dozen lines
            line = run.stdout.readline()
            assert line, f"scripts/run exited with {run.wait(10)} before its banner"
            banner += line
            if "stop:" in banner:
                break
        assert "private Redis Cluster (3 masters, 3 replicas)" in banner, banner
        assert "REDIS_CLUSTER=1 REDIS_URL=" in banner, banner
        nodes = [p for p in psutil.Process(run.pid).children() if "redis-server" in p.name()]
        assert len(nodes) == 6, nodes
        health = httpx.get(f"http://127.0.0.1:{env['PORT']}/health/cluster", timeout=10)
        assert health.json()["status"] == "ok", health.text
        os.kill(run.pid, signal.SIGTERM)
        assert run.wait(40) == 0
        for node in nodes:
            wait_until(functools.partial(process_gone, node), 10, what=f"redis-server {node.pid} gone")
        assert list(tmp_path.iterdir()) == []  # every node's directory removed
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)  # what the code under test failed to stop
        run.wait(10)
