"""The load test, run small against a service it starts and against one it is pointed at."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from scripts.redis_server import PrivateRedis
from scripts.service_process import ServiceError, procfile_web
from tests.support import ROOT, Service

SMALL = ["--rates", "20", "--duration", "1", "--clients", "1", "--settle", "0.2", "--connect-rate", "500"]


def _loadtest(*args: str) -> tuple[dict[str, Any], str, str]:
    result = subprocess.run(
        [sys.executable, "-m", "scripts.load", *args, *SMALL, "--json", "-"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
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
    help_text = subprocess.run(
        [sys.executable, "-m", "scripts.load", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    ).stdout
    assert help_text.startswith("usage: scripts/loadtest ")
    assert "wsbroadcast-loadtest" in help_text
    for default in ("(default: 2000)", "(default: 20,50,100,200)", "(default: 5000)", "(default: wsbroadcast)"):
        assert default in help_text


def test_without_a_clone_starting_a_service_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match=r"needs a clone of the repository.*--url"):
        procfile_web(tmp_path)
