"""Health in-process: what makes a heartbeat unreadable, and the cluster's verdict from its workers'
heartbeats (``summarize``: ok, degraded or failing, with a reason for each finding, and the totals).
test_health_truth.py and test_cluster.py read the same from running services."""

from __future__ import annotations

from typing import Any

import orjson

from service import health
from service.keys import Keys

INTERVAL = 5.0
NOW = 1_000_000.0


def heartbeat(
    host: str = "h",
    pid: int = 7,
    age: float = 0.0,
    current: int = 1,
    limit: int = 10,
    status: str = "ok",
    reasons: list[str] | None = None,
    subscriptions: dict[str, int] | None = None,
    rss: int = 100,
    **connections: int,
) -> dict[str, Any]:
    """A heartbeat as a worker writes it, ``age`` seconds before NOW."""
    return {
        "status": status,
        "reasons": reasons or [],
        "worker": {"host": host, "pid": pid, "id": f"{host}:{pid}"},
        "ts": NOW - age,
        "heartbeat_interval": INTERVAL,
        "connections": {
            "current": current, "peak": current + 1, "limit": limit, "effective_limit": limit, **connections
        },
        "subscriptions": {"news": 1} if subscriptions is None else subscriptions,
        "memory": {"rss_bytes": rss, "pressure": False, "limit_bytes": 0, "usage": 0.0},
    }


def test_check_heartbeat_names_what_is_wrong() -> None:
    keys = Keys("p:")
    good = heartbeat()
    key = keys.worker("h", 7)
    assert health.check_heartbeat(key, orjson.dumps(good), keys) == good

    def broken(path: str, value: Any) -> bytes:
        doc = orjson.loads(orjson.dumps(good))
        *parents, last = path.split(".")
        target = doc
        for part in parents:
            target = target[part]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
        return orjson.dumps(doc)

    cases = {
        b"{}": "missing worker.id",
        b"[]": "an array, not a heartbeat object",
        b"42": "a number, not a heartbeat object",
        b'"x"': "a string, not a heartbeat object",
        b"null": "null, not a heartbeat object",
        b"not json": "not JSON",
        broken("connections", KeyError): "missing connections.current",
        broken("connections.current", "3"): "connections.current is a string, expected an integer",
        broken("connections.current", True): "connections.current is a boolean, expected an integer",
        broken("connections.current", -1): "connections.current is negative",
        broken("memory.rss_bytes", 1.5): "memory.rss_bytes is a number, expected an integer",
        broken("ts", None): "ts is null, expected a number",
        broken("subscriptions", []): "subscriptions is an array, expected an object",
        broken("subscriptions", {"a": "1"}): "a subscription count is a string, expected an integer",
        broken("status", "great"): "status 'great' is not one of ok, degraded, failing",
        broken("reasons", [1]): "reasons holds a non-string",
        broken("heartbeat_interval", 0): "heartbeat_interval is not positive",
        broken("connections.effective_limit", "x"): "connections.effective_limit is a string, expected an integer",
        broken("worker.pid", 8): "worker.host and worker.pid do not match the key",
    }
    for raw, why in cases.items():
        assert health.check_heartbeat(key, raw, keys) == why, raw
    # A heartbeat of an older worker without the optional fields is still read.
    older = broken("connections.effective_limit", KeyError)
    assert isinstance(health.check_heartbeat(key, older, keys), dict)


def test_fresh_ok_workers_are_ok_with_their_totals() -> None:
    workers = [
        heartbeat("a", 1, age=1.0, current=3, limit=10, subscriptions={"news": 2, "b": 1}, rss=1000),
        heartbeat("a", 2, age=INTERVAL, current=0, limit=10, subscriptions={}, rss=2000),
        heartbeat("b", 3, age=0.2, current=5, limit=20, subscriptions={"news": 5}, rss=3000),
    ]
    report = health.summarize(workers, now=NOW)
    assert (report["status"], report["reasons"]) == ("ok", [])
    assert report["totals"] == {
        "workers": 3,
        "hosts": 2,
        "connections": 8,
        "limit": 40,
        "utilisation": 0.2,
        "channels": {"b": 1, "news": 7},
        "rss_bytes": 6000,
        "invalid_heartbeats": 0,
    }
    assert [w["age"] for w in report["workers"]] == [1.0, INTERVAL, 0.2]
    assert report["invalid"] == []


def test_the_limit_is_what_each_worker_can_admit_and_an_older_heartbeat_has_only_its_setting() -> None:
    older = heartbeat("a", 1, current=2, limit=100)
    del older["connections"]["effective_limit"]
    short = heartbeat("a", 2, current=1, limit=100, effective_limit=20)  # short of file descriptors
    totals = health.summarize([older, short], now=NOW)["totals"]
    assert (totals["limit"], totals["utilisation"]) == (120, 0.025)


def test_no_live_worker_is_failing() -> None:
    report = health.summarize([], now=NOW)
    assert (report["status"], report["reasons"]) == ("failing", ["no live workers"])
    assert report["totals"]["workers"] == report["totals"]["connections"] == 0
    assert report["totals"]["utilisation"] == 0.0
    invalid = [{"key": "p:worker:x", "why": "not JSON"}]
    report = health.summarize([], now=NOW, invalid=invalid)
    assert report["status"] == "failing"
    assert report["reasons"] == [
        "no live workers",
        "1 invalid heartbeat key (not a heartbeat this version can read)",
    ]


def test_a_late_heartbeat_is_degraded_after_one_interval_and_its_slack() -> None:
    assert health.stale_after(INTERVAL) == INTERVAL * 1.5
    assert health.stale_after(0.5) == 1.5  # the slack is at least a second
    late = health.stale_after(INTERVAL) + 0.1
    on_time = health.summarize([heartbeat(age=health.stale_after(INTERVAL))], now=NOW)
    assert on_time["status"] == "ok", on_time["reasons"]
    report = health.summarize([heartbeat(age=late), heartbeat(pid=8)], now=NOW)
    assert (report["status"], report["reasons"]) == ("degraded", [f"h:7: heartbeat {late:.1f} s old"])


def test_a_worker_over_nine_tenths_of_its_limit_is_degraded() -> None:
    assert health.summarize([heartbeat(current=90, limit=100)], now=NOW)["status"] == "ok"
    report = health.summarize([heartbeat(current=91, limit=100)], now=NOW)
    assert (report["status"], report["reasons"]) == ("degraded", ["h:7: 91/100 connections"])
    # Measured against what it can admit now, not its setting.
    report = health.summarize([heartbeat(current=19, limit=100, effective_limit=20)], now=NOW)
    assert report["reasons"] == ["h:7: 19/20 connections"]
    # A worker that can admit nobody (no descriptor to spare) has no utilisation to judge.
    assert health.summarize([heartbeat(current=0, limit=100, effective_limit=0)], now=NOW)["status"] == "ok"


def test_a_worker_that_is_not_ok_makes_the_cluster_degraded_with_its_reasons() -> None:
    workers = [
        heartbeat(pid=1, status="degraded", reasons=["Redis pub/sub disconnected", "canary missed"]),
        heartbeat(pid=2, status="failing", reasons=["Redis unreachable"]),
        heartbeat(pid=3),
    ]
    report = health.summarize(workers, now=NOW)
    assert report["status"] == "degraded"  # the cluster serves while any worker does
    assert report["reasons"] == [
        "h:1: degraded (Redis pub/sub disconnected; canary missed)",
        "h:2: failing (Redis unreachable)",
    ]


def test_invalid_heartbeat_keys_are_counted_all_and_named_up_to_a_bound() -> None:
    invalid = [{"key": f"p:worker:x{n:02d}", "why": "not JSON"} for n in range(health.INVALID_LISTED + 5)]
    report = health.summarize([heartbeat()], now=NOW, invalid=invalid)
    assert report["status"] == "degraded"
    assert report["reasons"] == [f"{len(invalid)} invalid heartbeat keys (not a heartbeat this version can read)"]
    assert report["totals"]["invalid_heartbeats"] == len(invalid)
    assert report["invalid"] == invalid[: health.INVALID_LISTED]
    assert report["totals"]["workers"] == 1  # the readable ones still count


def test_every_finding_is_a_reason_in_worker_order() -> None:
    late = health.stale_after(INTERVAL) + 2
    workers = [
        heartbeat(pid=1, age=late, current=10, limit=10, status="degraded", reasons=["memory pressure"]),
        heartbeat(pid=2, current=10, limit=10),
    ]
    report = health.summarize(workers, now=NOW, invalid=[{"key": "p:worker:x", "why": "not JSON"}])
    assert report["status"] == "degraded"
    assert report["reasons"] == [
        f"h:1: heartbeat {late:.1f} s old",
        "h:1: 10/10 connections",
        "h:1: degraded (memory pressure)",
        "h:2: 10/10 connections",
        "1 invalid heartbeat key (not a heartbeat this version can read)",
    ]
