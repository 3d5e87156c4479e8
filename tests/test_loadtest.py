"""The load test, run small against a service it starts and against one it is pointed at."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from scripts.redis_server import PrivateRedis
from scripts.service_process import ServiceError, procfile_web
from service.keys import Keys
from tests.support.commands import command
from tests.support.servers import Service

SMALL = ["--rates", "20", "--duration", "1", "--clients", "1", "--settle", "0.2", "--connect-rate", "500"]


def _loadtest(*args: str) -> tuple[dict[str, Any], str, str]:
    result = command("load", *args, *SMALL, "--json", "-", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    document = orjson.loads(result.stdout[result.stdout.index("\n{") :])
    return document, result.stdout, result.stderr


def test_starts_its_own_service_and_reports_percentages_and_an_idle_table() -> None:
    document, out, err = _loadtest("fanout", "idle", "--subscribers", "20", "--connections", "20")
    result = document["results"]["wsbroadcast"]
    step = result["fanout"]["steps"][0]
    assert step["delivered_fraction"] == 1.0 and step["pass"] is True  # the JSON keeps fractions
    assert step["server_workers_measured"] == 2 and step["server_cpu_us_per_delivery"] > 0
    assert "delivered 100.0%" in out and "delivered 100.0% of 400" in err
    assert result["idle"]["connected"] == 20
    assert "    given back  " in err and "    per connection  " in err  # a table, not a dict
    assert "{'connections'" not in err


def test_url_mode_finds_the_workers_from_their_heartbeats(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=2) as service:
        document, _, err = _loadtest(
            "fanout", "--url", service.ws_base, "--redis-url", redis_server.url, "--redis-prefix", service.prefix,
            "--subscribers", "10",
        )
        pids = sorted(service.worker_pids())
    assert f"workers {pids}" in err
    step = document["results"]["wsbroadcast"]["fanout"]["steps"][0]
    assert step["delivered_fraction"] == 1.0
    assert step["server_workers_measured"] == 2 and step["server_cpu_us_per_delivery"] > 0


def test_help_shows_each_default_and_the_installed_name() -> None:
    help_text = command("load", "--help").stdout
    assert help_text.startswith("usage: scripts/loadtest ")
    assert "wsbroadcast-loadtest" in help_text
    for default in ("(default: 2000)", "(default: 20,50,100,200)", "(default: 5000)", "(default: wsbroadcast)"):
        assert default in help_text


def test_without_a_clone_starting_a_service_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match=r"needs a clone of the repository.*--url"):
        procfile_web(tmp_path)


def test_recover_counts_every_offset_across_a_restart_of_every_worker() -> None:
    """Clients closed by a SIGHUP (every worker replaced) reconnect with since: each offset seen
    once; with HISTORY_SIZE=0 every recovery is recovered:false and the jump is counted as announced."""
    document, out, err = _loadtest(
        "recover", "--recover-clients", "20", "--recover-rate", "20", "--recover-before", "0.5",
        "--recover-after", "0.5", "--recover-jitter", "0.2", "--compare-env", "HISTORY_SIZE=0",
    )
    results = document["results"]
    on, off = results["wsbroadcast"]["recover"], results["wsbroadcast HISTORY_SIZE=0"]["recover"]
    for result in (on, off):
        # A client may reconnect to the other old worker before it closes too: closed twice.
        assert result["clients"] == 20 and set(result["closes"]) == {"close 1012"}
        assert result["closes"]["close 1012"] >= 20 and result["reconnects"] == result["closes"]["close 1012"]
        assert not set(result["workers_before"]) & set(result["workers_after"])
        assert len(result["workers_after"]) == 2
        assert result["frames_lost"] == 0 and result["duplicates"] == 0 and result["behind_at_end"] == 0
        assert result["not_recovered_in_time"] == 0 and result["top_offset"] == result["published"]
        # Every client checked every offset it was sent after its first ack.
        assert result["frames_checked"] >= 20 * 10
        assert result["recover_ms"]["max"] > 0 and result["handshake_ms"]["max"] > 0
    # Every client's last connection subscribed with since and was answered (one that reconnected
    # to the other old worker may have been closed again before its answer).
    assert 20 <= on["recovered_true"] <= on["reconnects"] and on["recovered_false"] == 0 and on["reload_offsets"] == 0
    assert on["history_reads"] >= 1 and on["pass"] is True
    server = on["server_recoveries"]
    assert on["recovered_true"] <= server['wsbroadcast_recoveries_total{recovered="true"}'] <= on["reconnects"]
    assert server['wsbroadcast_recoveries_total{recovered="false"}'] == 0
    assert off["history_size"] == 0 and 20 <= off["recovered_false"] <= off["reconnects"]
    # Without history only a client that missed nothing recovers (a second reconnect, closed again by
    # the other old worker before anything new was published); frames_lost == 0 says none lost any.
    assert off["recovered_true"] + off["recovered_false"] <= off["reconnects"]
    assert off["reload_offsets"] > 0  # what they missed while away, announced by recovered:false
    assert "recover: 20 clients, workers restarted  frames lost 0" in out
    assert "| wsbroadcast | wsbroadcast HISTORY_SIZE=0 |" in out
    assert "SIGHUP to the gunicorn master" in err


def test_publish_rate_measures_the_function_and_plain_publish() -> None:
    document, out, _ = _loadtest("publish-rate", "--publish-seconds", "0.5", "--publish-concurrency", "2",
                                 "--publish-subscribers", "5")
    result = document["results"]["wsbroadcast"]["publish-rate"]
    assert [way["via"] for way in result["ways"]] == ["function", "publish"]
    for way in result["ways"]:
        assert way["published"] > 10 and way["failed"] == 0 and way["per_s"] > 20
        assert way["redis_cpu_us_per_publication"] > 0
    assert result["subscribers"] == 5 and result["history_size"] == 100
    assert "| publications/s via function (2 publishers) |" in out


def test_fanout_frames_published_through_the_function_carry_offsets(redis_server: PrivateRedis) -> None:
    """The default publishes through wsb_publish: the channel's offsets advance by every frame."""
    with Service(redis_server.url, workers=2) as service:
        document, _, _ = _loadtest(
            "fanout", "--url", service.ws_base, "--redis-url", redis_server.url, "--redis-prefix", service.prefix,
            "--subscribers", "10",
        )
        client = redis.Redis.from_url(redis_server.url)
        try:
            top = int(client.hget(Keys(service.prefix).meta("bench"), "top") or 0)
        finally:
            client.close()
    step = document["results"]["wsbroadcast"]["fanout"]["steps"][0]
    assert step["delivered_fraction"] == 1.0 and step["duplicates"] == 0
    assert top >= step["published"] + 1  # the warm-up frames too


def test_invalid_settings_are_refused_before_anything_starts() -> None:
    result = command("load", "fanout", "--compare-env", "HISTORY_SIZE=-1")
    assert result.returncode == 2 and "--compare-env: HISTORY_SIZE='-1' is invalid" in result.stderr


def test_the_node_ws_cluster_is_measured_beside_the_service() -> None:
    """``--target wsbroadcast,node``: both in one run; the node workers (the primary's children) measured."""
    document, out, err = _loadtest("idle", "fanout", "--target", "wsbroadcast,node", "--connections", "50",
                                   "--subscribers", "20")
    assert list(document["results"]) == ["wsbroadcast", "node"]
    node = document["results"]["node"]
    assert node["idle"]["connected"] == 50 and node["idle"]["server_workers_measured"] == 2
    assert node["idle"]["kb_per_connection"] > 0
    step = node["fanout"]["steps"][0]
    # The frames arrive as the publisher made them: every one decoded and counted, none twice.
    assert step["delivered_fraction"] == 1.0 and step["duplicates"] == 0
    assert step["server_workers_measured"] == 2 and step["server_cpu_us_per_delivery"] > 0
    assert "| figure | wsbroadcast | node |" in out
    assert "[node] server on 127.0.0.1:" in err


def test_an_unknown_target_is_refused() -> None:
    result = command("load", "idle", "--target", "wsbroadcast,nodejs")
    assert result.returncode == 2 and "--target 'wsbroadcast,nodejs': expected any of" in result.stderr
