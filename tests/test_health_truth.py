"""Health must not lie: a stalled Redis, foreign heartbeat keys, and what /health shows to whom."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from typing import Any

import httpx
import orjson
import redis

from scripts.redis_server import PrivateRedis
from service import health
from tests.support.clients import subscribe_client
from tests.support.commands import run_health
from tests.support.servers import ADMIN_TOKEN, Service
from tests.support.waits import async_wait_until, wait_until

CANARY = 1.0  # CANARY_INTERVAL of the stall test
POOL_SOCKET_TIMEOUT = 5.0  # the broker pool's socket_timeout


def health_by_worker(service: Service, admin: bool, n: int = 8) -> dict[int, dict[str, Any]]:
    """The latest /health of each worker that answered one of ``n`` fresh connections."""
    headers = {"Connection": "close"}
    if admin:
        headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
    docs: dict[int, dict[str, Any]] = {}
    for _ in range(n):
        response = httpx.get(service.base + "/health", timeout=10, headers=headers)
        doc = response.json()
        doc["http_status"] = response.status_code
        docs[doc["worker"]["pid"]] = doc
    return docs


def every_worker(service: Service, admin: bool, status: str) -> dict[int, dict[str, Any]] | None:
    docs = health_by_worker(service, admin)
    if set(docs) == service.worker_pids() and all(d["status"] == status for d in docs.values()):
        return docs
    return None


# --- a stalled Redis -----------------------------------------------------------------------------


async def test_stalled_redis_turns_every_worker_degraded_and_back(own_redis: PrivateRedis) -> None:
    assert own_redis.process is not None
    pid = own_redis.process.pid
    with Service(own_redis.url, workers=2, canary_interval=CANARY) as service:
        await asyncio.to_thread(wait_until, lambda: every_worker(service, True, "ok"), 20, 0.1, "both workers ok")
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            docs = await asyncio.to_thread(
                wait_until, lambda: every_worker(service, True, "degraded"), 20, 0.05, "both workers degraded"
            )
            detected = time.monotonic() - stopped_at
            for doc in docs.values():
                assert doc["http_status"] == 200
                assert doc["redis"]["canary_ok"] is False and doc["redis"]["canary_misses"] >= 1, doc["redis"]
                assert any("canary" in reason for reason in doc["reasons"]), doc["reasons"]
            public = await asyncio.to_thread(health_by_worker, service, False)
            assert all(d["status"] == "degraded" and not d["redis"]["canary_ok"] for d in public.values()), public
            # The cluster view answers within its own bound, not after the pool's socket timeout.
            asked = time.monotonic()
            cluster = await asyncio.to_thread(service.get, "/health/cluster")
            cluster_took = time.monotonic() - asked
            assert cluster.status_code == 503 and cluster.json()["status"] == "failing", cluster.text
            assert cluster_took < health.CLUSTER_TIMEOUT + 1.5, f"/health/cluster took {cluster_took:.2f} s"
            # Past the pool's socket timeout the timed-out commands fail for good: still degraded.
            while time.monotonic() - stopped_at < POOL_SOCKET_TIMEOUT + 1.5:
                still = await asyncio.to_thread(health_by_worker, service, False, 4)
                assert all(d["status"] == "degraded" for d in still.values()), still
            detail = await asyncio.to_thread(health_by_worker, service, True)
            misses = {p: d["redis"]["canary_misses"] for p, d in detail.items()}
            assert all(n >= 2 for n in misses.values()), misses
        finally:
            os.kill(pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        await async_wait_until(
            lambda: asyncio.to_thread(every_worker, service, True, "ok"), 20, 0.05, "both workers ok again"
        )
        recovered = time.monotonic() - resumed_at
        print(
            f"stalled Redis (CANARY_INTERVAL {CANARY:g} s): every worker degraded {detected:.2f} s after SIGSTOP, "
            f"ok {recovered:.2f} s after SIGCONT; /health/cluster answered in {cluster_took:.2f} s"
        )
        assert detected < 3 * CANARY + 1.5, f"degraded only {detected:.2f} s after the stall began"
        assert service.process is not None and service.process.poll() is None
        assert "Traceback" not in service.log()


# --- foreign heartbeat keys ----------------------------------------------------------------------


FOREIGN: dict[str, bytes] = {
    "empty-object": b"{}",
    "array": b"[]",
    "number": b"42",
    "string": b'"x"',
    "not-json": b"not json",
}


async def test_foreign_heartbeat_keys_are_listed_and_the_real_figures_stay_right(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=2) as service:
        ws = await subscribe_client(service, "kept")
        await asyncio.to_thread(wait_until, lambda: service.connections() == 1, 20, 0.1, "the connection counted")
        client = redis.Redis.from_url(redis_server.url)
        worker_keys = sorted(k.decode() for k in client.scan_iter(match=f"{service.prefix}worker:*"))
        real = orjson.loads(client.get(worker_keys[0]) or b"")
        mistyped = {**real, "connections": {**real["connections"], "current": "3"}}
        missing = {k: v for k, v in real.items() if k != "memory"}
        written = {f"{service.prefix}worker:{name}": raw for name, raw in FOREIGN.items()}
        written[f"{service.prefix}worker:mistyped"] = orjson.dumps(mistyped)
        written[f"{service.prefix}worker:missing"] = orjson.dumps(missing)
        written[f"{service.prefix}worker:copy"] = orjson.dumps(real)  # another key, a real worker's content
        try:
            for key, raw in written.items():
                client.set(key, raw, ex=600)
            client.hset(f"{service.prefix}worker:a-hash", "f", "v")
            client.expire(f"{service.prefix}worker:a-hash", 600)
            invalid_count = len(written) + 1

            response = await asyncio.to_thread(service.get, "/health/cluster")
            assert response.status_code == 200, response.text
            doc = response.json()
            assert doc["status"] == "degraded"
            assert f"{invalid_count} invalid heartbeat keys (not a heartbeat this version can read)" in doc["reasons"]
            totals = doc["totals"]
            assert totals["invalid_heartbeats"] == invalid_count
            assert (totals["workers"], totals["connections"], totals["channels"]) == (2, 1, {"kept": 1})
            whys = {entry["key"].removeprefix(f"{service.prefix}worker:"): entry["why"] for entry in doc["invalid"]}
            assert whys == {
                "a-hash": "a Redis hash, not a string",
                "array": "an array, not a heartbeat object",
                "copy": "worker.host and worker.pid do not match the key",
                "empty-object": "missing worker.id",
                "missing": "missing memory.rss_bytes",
                "mistyped": "connections.current is a string, expected an integer",
                "not-json": "not JSON",
                "number": "a number, not a heartbeat object",
                "string": "a string, not a heartbeat object",
            }
            public = (await asyncio.to_thread(service.get, "/health/cluster", False)).json()
            assert public["totals"]["invalid_heartbeats"] == invalid_count and "invalid" not in public

            text = await asyncio.to_thread(run_health, redis_server.url, service.prefix)
            assert text.returncode == 1, text.stdout + text.stderr
            assert text.stderr == "" and "Traceback" not in text.stdout
            assert "status: degraded" in text.stdout and "invalid heartbeat: " in text.stdout
            assert "workers 2 on 1 host" in text.stdout
            as_json = await asyncio.to_thread(run_health, redis_server.url, service.prefix, "--json")
            assert as_json.returncode == 1 and as_json.stderr == "", as_json.stderr
            report = orjson.loads(as_json.stdout)
            assert report["totals"]["invalid_heartbeats"] == invalid_count and report["totals"]["workers"] == 2
        finally:
            client.delete(*written, f"{service.prefix}worker:a-hash")
            client.close()
        await ws.close()


def test_only_foreign_keys_is_failing_without_a_traceback(redis_server: PrivateRedis) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(redis_server.url)
    try:
        for name, raw in FOREIGN.items():
            client.set(f"{prefix}worker:{name}", raw, ex=600)
        done = run_health(redis_server.url, prefix)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "Traceback" not in done.stdout + done.stderr
        assert "status: failing: no live workers; 5 invalid heartbeat keys" in done.stdout
        assert done.stderr.startswith("health: failing: no live workers; 5 invalid") and done.stderr.count("\n") == 1
        as_json = run_health(redis_server.url, prefix, "--json")
        assert as_json.returncode == 2 and orjson.loads(as_json.stdout)["totals"]["invalid_heartbeats"] == 5
    finally:
        client.delete(*(f"{prefix}worker:{name}" for name in FOREIGN))
        client.close()


# --- who sees what -------------------------------------------------------------------------------

SECRET_CHANNEL = "user-4711-private"


async def test_health_detail_needs_the_admin_token(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=1) as service:
        ws = await subscribe_client(service, SECRET_CHANNEL)
        await asyncio.to_thread(
            wait_until, lambda: any(SECRET_CHANNEL in b["subscriptions"] for b in service.heartbeats()), 20, 0.1,
            "the channel in the heartbeat",
        )
        for path in ("/health", "/health/cluster"):
            public = await asyncio.to_thread(service.get, path, False)
            assert public.status_code == 200, public.text
            assert SECRET_CHANNEL not in public.text, public.text
            doc = public.json()
            assert "settings" not in doc and "workers" not in doc and "subscriptions" not in doc, doc
            assert doc["status"] == "ok" and "Bearer <ADMIN_TOKEN>" in doc["detail"]
            full = await asyncio.to_thread(service.get, path)
            assert full.status_code == 200 and SECRET_CHANNEL in full.text, full.text
            for headers, status in (
                ({"Authorization": "Bearer wrong"}, 403),
                ({"Authorization": f"Bearer {ADMIN_TOKEN}x"}, 403),
                ({"Authorization": f"Basic {ADMIN_TOKEN}"}, 401),
            ):
                refused = await asyncio.to_thread(httpx.get, service.base + path, headers=headers, timeout=10)
                assert refused.status_code == status and SECRET_CHANNEL not in refused.text, refused.text
        worker = (await asyncio.to_thread(service.get, "/health", False)).json()
        assert set(worker) == {"status", "reasons", "worker", "ts", "connections", "redis", "memory", "detail"}
        assert worker["connections"]["current"] == 1 and worker["redis"]["connected"] is True
        assert "counters" not in worker and "subscriptions" not in worker
        cluster = (await asyncio.to_thread(service.get, "/health/cluster", False)).json()
        assert set(cluster) == {"status", "reasons", "totals", "detail"}
        assert cluster["totals"]["connections"] == 1 and "channels" not in cluster["totals"]
        await ws.close()


async def test_without_admin_token_there_is_no_detail_over_http(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=1, admin_token="") as service:
        ws = await subscribe_client(service, SECRET_CHANNEL)
        for path in ("/health", "/health/cluster"):
            public = await asyncio.to_thread(service.get, path)
            assert public.status_code == 200 and SECRET_CHANNEL not in public.text, public.text
            assert "ADMIN_TOKEN is unset" in public.json()["detail"]
            for token in ("anything", ADMIN_TOKEN):
                refused = await asyncio.to_thread(
                    httpx.get, service.base + path, headers={"Authorization": f"Bearer {token}"}, timeout=10
                )
                assert refused.status_code == 403, refused.text
                assert "ADMIN_TOKEN is unset" in refused.json()["error"]
        # The coordinator reads Redis directly: the full figures stay available to operators there.
        await asyncio.to_thread(
            wait_until, lambda: SECRET_CHANNEL in run_health(redis_server.url, service.prefix).stdout, 30, 0.2,
            "scripts/health to list the channel",
        )
        await ws.close()
