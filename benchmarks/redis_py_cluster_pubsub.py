"""A trial of redis-py's asyncio cluster pub/sub (``RedisCluster.pubsub().ssubscribe``), the
alternative to the broker's per-node listeners: what it does with a burst of publishes over its
connection bound, and under a master's SIGKILL (how long until every channel delivers again).

    .venv/bin/python -m benchmarks.redis_py_cluster_pubsub
"""

from __future__ import annotations

import asyncio
import time

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import MaxConnectionsError, RedisError

from scripts.redis_cluster import PrivateCluster

CHANNELS = [f"trial:{n}" for n in range(12)]


async def trial(cluster: PrivateCluster) -> None:
    client = RedisCluster.from_url(cluster.url, max_connections=3)
    await client.initialize()  # without it, ssubscribe raises SlotNotCoveredError
    try:
        # A burst of 30 publishes with at most 3 connections per node.
        results = await asyncio.gather(*(client.spublish(c, b"x") for c in CHANNELS * 3), return_exceptions=True)
        refused = sum(isinstance(r, MaxConnectionsError) for r in results)
        print(f"burst: {len(results)} concurrent SPUBLISH, max_connections=3: {refused} raised MaxConnectionsError")

        pubsub = client.pubsub()
        await pubsub.ssubscribe(*CHANNELS)
        last: dict[str, float] = {}
        errors: list[str] = []
        stop = asyncio.Event()

        async def read() -> None:
            while not stop.is_set():
                try:
                    message = await pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=0.1)
                except RedisError as exc:
                    errors.append(repr(exc))
                    await asyncio.sleep(0.1)
                    continue
                if message is not None:
                    last[message["channel"].decode()] = time.monotonic()

        async def publish() -> None:
            while not stop.is_set():
                for channel in CHANNELS:
                    try:
                        await client.spublish(channel, b"x")
                    except RedisError:
                        pass
                await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(read()), asyncio.create_task(publish())]
        await asyncio.sleep(2)
        print(f"before the kill: {len(last)} of {len(CHANNELS)} channels delivering")
        victim = cluster.master_ports()[0]
        killed = time.monotonic()
        cluster.kill(victim)
        back = None
        for _ in range(300):  # 30 s at most
            await asyncio.sleep(0.1)
            if all(last.get(c, 0) > killed + 0.5 for c in CHANNELS):
                back = time.monotonic() - killed
                break
        fresh = sum(last.get(c, 0) > killed + 0.5 for c in CHANNELS)
        print(f"after the kill: {fresh} of {len(CHANNELS)} channels delivering again"
              + (f", all after {back:.2f} s" if back is not None else " within 30 s")
              + f"; the reader met {len(errors)} errors ({', '.join(sorted(set(errors)))})")
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pubsub.aclose()
    finally:
        await client.aclose()


def main() -> None:
    with PrivateCluster() as cluster:
        asyncio.run(trial(cluster))


if __name__ == "__main__":
    main()
