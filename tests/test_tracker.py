"""The tracker's idle rule: a client is idle when neither it nor its channels have spoken lately."""

from __future__ import annotations

from service.tracker import Tracker


def test_idle_rule_counts_publications_on_the_clients_channels() -> None:
    last = {"busy": 100.0}
    tracker = Tracker(10, idle_timeout=10, last_publish=lambda c: last.get(c, 0.0))
    quiet = tracker.admit(lambda why: True)
    listener = tracker.admit(lambda why: True)
    quiet.last_received = listener.last_received = 50.0
    listener.channels.add("busy")
    assert tracker.idle_connections(now=105.0) == [quiet]
    assert tracker.idle_connections(now=115.0) == [quiet, listener]
