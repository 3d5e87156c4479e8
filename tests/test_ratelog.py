"""RateLimitedLog: one line per key per interval, with the count of what it suppressed."""

from __future__ import annotations

import logging

import pytest

from service.ratelog import RateLimitedLog


def test_one_line_per_interval_then_the_count(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]
    monkeypatch.setattr("service.ratelog.time.monotonic", lambda: clock[0])
    log = RateLimitedLog(logging.getLogger("test.ratelog"), interval=10.0)
    with caplog.at_level(logging.WARNING, logger="test.ratelog"):
        assert log.warning("bad", "bad frame from %s", "a")
        for _ in range(200):
            assert not log.warning("bad", "bad frame from %s", "b")
        assert log.warning("other", "another kind")
        clock[0] += 10.5
        assert log.warning("bad", "bad frame from %s", "c")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["bad frame from a", "another kind", "bad frame from c (200 more like it in the last 10 s)"]
    assert all(r.exc_info is None for r in caplog.records)
