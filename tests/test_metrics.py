"""GET /metrics across real gunicorn workers: counters and gauges summed over the host's workers.

Figures are read with prometheus-client's own parser. Whichever worker answers a scrape serves
every worker's files, each at most a sync interval (1 s) old, so every check waits on a condition.
"""

from __future__ import annotations

import functools
import os
import re
import signal
from collections import Counter as Tally
from pathlib import Path

import orjson
import redis

from scripts.redis_server import PrivateRedis
from tests.support.clients import clients_on_both_workers, recv_json, worker_of
from tests.support.metrics import per_worker, scrape, total
from tests.support.publishers import publish_numbered
from tests.support.servers import Service
from tests.support.stalled import abandon, stalled_on_both_workers
from tests.support.waits import wait_until


def _heartbeat_sum(service: Service, counter: str) -> int:
    return sum(beat["counters"][counter] for beat in service.heartbeats())


def _sums_match(service: Service, metric: str, labels: dict[str, str], counter: str) -> bool:
    return total(scrape(service), metric, **labels) == _heartbeat_sum(service, counter)


async def test_counters_move_with_clients_summed_over_two_workers(redis_server: PrivateRedis) -> None:
    with Service(
        redis_server.url,
        workers=2,
        send_buffer_bytes=4096,
        queue_bytes=262144,
        max_connections=100000,
        memory_limit=400_000_000,
    ) as svc:
        # Connect: clients on both workers; the gauges split them as the handshake headers say.
        clients = await clients_on_both_workers(svc, "news")
        n = len(clients)
        split = Tally(worker_of(ws).rsplit(":", 1)[1] for ws in clients)
        wait_until(
            lambda: (m := scrape(svc))
            and total(m, "wsbroadcast_connections") == n
            and total(m, "wsbroadcast_connections_accepted_total") == n
            and per_worker(m, "wsbroadcast_worker_connections") == {pid: float(c) for pid, c in split.items()},
            15,
            0.2,
            f"{n} connections in /metrics, split {dict(split)}",
        )

        # Receive: 5 publications over HTTP and 5 straight into Redis reach every client.
        raw = redis.Redis.from_url(redis_server.url)
        for seq in range(10):
            if seq % 2:
                assert svc.publish("news", seq).status_code == 202
            else:
                raw.publish(f"{svc.prefix}news", orjson.dumps({"channel": "news", "data": seq}))
        raw.close()
        for ws in clients:
            assert [(await recv_json(ws))["data"] for _ in range(10)] == list(range(10))
        m = wait_until(
            lambda: (m := scrape(svc)) and total(m, "wsbroadcast_frames_delivered_total") == 10 * n and m,
            15, 0.2, "delivered frames",
        )
        assert total(m, "wsbroadcast_publishes_received_total", source="http") == 5
        assert total(m, "wsbroadcast_publishes_received_total", source="redis") == 20  # 10 in each worker
        # One fan-out observation per message per worker, never one per connection (publications
        # that arrive together go out as one message, so a busy worker may observe fewer).
        observed = total(m, "wsbroadcast_fanout_latency_seconds_count")
        assert 2 <= observed <= 20
        assert 0 < total(m, "wsbroadcast_fanout_latency_seconds_sum") < 20 * 1.0
        assert total(m, "wsbroadcast_fanout_latency_seconds_bucket", le="+Inf") == observed
        assert total(m, "wsbroadcast_frames_dropped_total") == 0
        pids = set(split)
        assert set(per_worker(m, "wsbroadcast_worker_redis_connected")) == pids
        assert all(v >= 1 for v in per_worker(m, "wsbroadcast_worker_redis_pool_connections_in_use").values())
        assert all(30e6 < v < 400e6 for v in per_worker(m, "wsbroadcast_worker_resident_memory_bytes").values())
        assert set(per_worker(m, "wsbroadcast_worker_memory_limit_bytes").values()) == {400_000_000}
        # Memory binds before MAX_CONNECTIONS=100000 here: the limit is what 320 MB of headroom allows.
        beats = {str(b["worker"]["pid"]): b for b in svc.heartbeats()}
        limits = per_worker(m, "wsbroadcast_worker_connections_effective_limit")
        assert all(0 < limit < 100000 for limit in limits.values()), limits
        assert limits == {pid: float(beats[pid]["connections"]["effective_limit"]) for pid in pids}

        # Overflow: clients that never read, on both workers. Their queues grow first ...
        stalled = await stalled_on_both_workers(svc, "flood")
        wait_until(lambda: total(scrape(svc), "wsbroadcast_connections") == n + len(stalled), 15, 0.2)
        await publish_numbered(svc, "flood", 24, 4096)  # 96 KiB: past the kernel, under QUEUE_BYTES
        wait_until(
            lambda: (m := scrape(svc))
            and total(m, "wsbroadcast_queued_bytes") > 0
            and all(v > 0 for v in per_worker(m, "wsbroadcast_worker_queue_depth_max_bytes").values()),
            15, 0.2, "queued bytes for the stalled clients",
        )
        # ... then past QUEUE_BYTES the slow-consumer policy closes them, on both workers.
        await publish_numbered(svc, "flood", 96, 4096)
        m = wait_until(
            lambda: (m := scrape(svc))
            and total(m, "wsbroadcast_connections_closed_total", reason="slow_consumer") == len(stalled)
            and total(m, "wsbroadcast_connections") == n
            and m,
            15, 0.2, f"{len(stalled)} slow consumers closed",
        )
        assert total(m, "wsbroadcast_queued_bytes") == 0
        for ws in stalled:
            abandon(ws)

        # Disconnect: the gauges fall back to zero; the counters keep what happened.
        for ws in clients:
            await ws.close()
        m = wait_until(
            lambda: (m := scrape(svc))
            and total(m, "wsbroadcast_connections") == 0
            and set(per_worker(m, "wsbroadcast_worker_connections").values()) == {0.0}
            and m,
            15, 0.2, "no connections",
        )
        assert total(m, "wsbroadcast_connections_accepted_total") == n + len(stalled)
        # The sums are the workers' own counters added up (each heartbeat is one worker's).
        for metric, labels, counter in [
            ("wsbroadcast_connections_accepted_total", {}, "accepted"),
            ("wsbroadcast_frames_delivered_total", {}, "delivered"),
            ("wsbroadcast_publishes_received_total", {"source": "redis"}, "received_redis"),
            ("wsbroadcast_connections_closed_total", {"reason": "slow_consumer"}, "slow_closed"),
        ]:
            wait_until(functools.partial(_sums_match, svc, metric, labels, counter), 15, 0.2, metric)


def _metrics_dir(service: Service) -> Path:
    found = re.search(r"metrics: multiprocess files in (\S+)", service.log())
    assert found is not None, service.log()
    return Path(found.group(1))


async def test_a_dead_workers_gauges_leave_and_its_counts_stay(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=2) as svc, Service(redis_server.url, workers=1) as other:
        directory = _metrics_dir(svc)
        assert directory.is_dir() and directory != _metrics_dir(other)
        clients = await clients_on_both_workers(svc, "news", minimum=4)
        n = len(clients)
        victim = worker_of(clients[0]).rsplit(":", 1)[1]
        survivors = [ws for ws in clients if worker_of(ws).rsplit(":", 1)[1] != victim]
        wait_until(lambda: total(scrape(svc), "wsbroadcast_connections_accepted_total") == n, 15, 0.2)
        # Another instance on the same host keeps its own figures.
        assert total(scrape(other), "wsbroadcast_connections_accepted_total") == 0

        os.kill(int(victim), signal.SIGKILL)
        # gunicorn replaces the worker; child_exit drops the dead one's live gauges.
        wait_until(lambda: len(svc.worker_pids()) == 2 and int(victim) not in svc.worker_pids(), 20, 0.1)
        m = wait_until(
            lambda: (m := scrape(svc))
            and set(per_worker(m, "wsbroadcast_worker_connections")) == {str(p) for p in svc.worker_pids()}
            and total(m, "wsbroadcast_connections") == len(survivors)
            and m,
            20, 0.2, "the dead worker's series gone, the new worker's present",
        )
        # Counters never go backwards: the dead worker's accepted connections still count.
        assert total(m, "wsbroadcast_connections_accepted_total") == n
        for ws in clients:
            await ws.close()
    assert not directory.exists(), "the private metrics directory outlived its instance"
