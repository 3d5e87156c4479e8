"""The breakdown tool, run small: one traced worker, idle connections, a table of where bytes go."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.servers import ROOT


def test_breakdown_tables_account_for_every_traced_byte() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scripts.load", "breakdown", "--connections", "50", "--clients", "1",
         "--settle", "0.3", "--json", "-"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    report = json.loads(out[out.index("\n{") :])
    assert report["connected"] == 50 and report["traced_connected"] == 50
    assert report["env"].get("PYTHONMALLOC") == "malloc"  # the Procfile's allocator
    # Traced bytes are the connections' own; RSS may not grow at all for 50 of them (the allocator
    # reuses the pages the warm-up round freed), so only its shape is checked.
    assert report["traced_per_conn"] > 0 and isinstance(report["rss_per_conn"], float)
    assert report["rss_beyond_traced_per_conn"] == round(report["rss_per_conn"] - report["traced_per_conn"], 1)
    # The groups partition the traced bytes: every site lands in exactly one.
    grouped = sum(row["bytes_per_conn"] for row in report["groups"])
    assert abs(grouped - report["traced_per_conn"]) <= len(report["groups"]) * 0.1
    assert any(row["name"].startswith("our service/") and row["bytes_per_conn"] > 0 for row in report["groups"])
    assert report["sites"] and all(":" in row["name"] for row in report["sites"])
    # The census sees each connection's own objects exactly once per connection.
    assert any(row["name"].startswith("service.") and row["count_per_conn"] == 1.0 for row in report["types"])
    assert set(report["given_back"]) == {"1s", "5s"}
    assert all(-1.0 <= fraction <= 1.0 for fraction in report["given_back"].values())
    for heading in ("RSS per connection", "RSS beyond tracemalloc", "given back 5s", "by allocation site group",
                    "by object type"):
        assert heading in out
