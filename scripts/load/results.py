"""What a run measured, one dataclass per scenario; ``to_json`` gives the report's JSON document.

Field names are the JSON keys (``json_key`` where a key is not a Python name); fractions stay
fractions in the JSON and are shown as percentages by ``report``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from scripts.load.publisher import Published


def _key(name: str) -> dict[str, Any]:
    return {"json_key": name}


# Omitted from the JSON when None (the key was absent before these were dataclasses).
_OPTIONAL: dict[str, Any] = {"omit_none": True}
_INTERNAL: dict[str, Any] = {"internal": True}


@dataclass
class Connected:
    ok: int
    failed: dict[str, int]
    seconds: float


@dataclass
class Latency:
    p50: float
    p99: float
    max: float


@dataclass
class PerSeq:
    """Per published frame: how many fast clients got it, and when the first did (redis-restart)."""

    published: Published
    counts: list[int]
    firsts: list[float]
    fast: int


@dataclass
class StepResult:
    rate: float
    seconds: float
    payload_bytes: int
    subscribers: int
    published: int
    publish_failed: int
    published_without_receivers: int
    publish_rate: float
    expected: int
    delivered: int
    delivered_fraction: float | None
    duplicates: int
    reordered: int
    deliveries_per_s: float
    latency_ms: Latency
    server_workers_measured: int
    server_cpu_s: float | None
    server_cpu_us_per_delivery: float | None
    server_workers_changed: bool
    client_cpu: list[float]
    client_loop_lag_ms: float
    publisher_behind_ms: float
    machine_cpu_percent: float
    test_processes_cores: float
    # Work on this machine by processes outside the test (other jobs): it competes for the cores.
    other_processes_cores: float
    irq_softirq_cores: float
    # The loopback TCP path (both ends) runs in softirq, charged to no process here.
    irq_softirq_us_per_delivery: float | None
    wall_s: float
    client_cpu_peak: float
    client_saturated: list[str]
    load_not_offered: list[str]
    machine_saturated: str | None = field(default=None, metadata=_OPTIONAL)
    # The server's share of the latency: a worker's loop over its local connections.
    server_fanout_ms_mean: float | None = field(default=None, metadata=_OPTIONAL)
    passed: bool | None = field(default=None, metadata={**_key("pass"), **_OPTIONAL})
    per_seq: PerSeq | None = field(default=None, metadata=_INTERNAL)


@dataclass
class IdleResult:
    connections: int
    connected: int
    failed: dict[str, int]
    connect_seconds: float
    established_on_server: int
    server_workers_measured: int
    rss_before_mb: float
    rss_connected_mb: float
    rss_after_close_mb: float
    kb_per_connection: float | None
    given_back_fraction: float | None
    close_seconds: float
    settle_s: float
    warmup: int = 0  # connections opened and closed before the "before" reading


@dataclass
class FanoutResult:
    subscribers: int
    connect_failed: dict[str, int]
    steps: list[StepResult]
    highest_rate_passing: float | None


@dataclass
class SlowSample:
    t: float
    rss_mb: float
    established: int
    send_queue_mb: float


@dataclass
class SlowResult:
    subscribers: int
    stalled: int
    fast: StepResult
    samples: list[SlowSample]
    rss_before_mb: float
    rss_growth_mb: float
    send_queue_peak_mb: float
    stalled_outcomes: dict[str, int]
    stalled_frames_received: int
    server_counters: dict[str, int] | None


@dataclass
class RestartResult:
    subscribers: int
    rate: float
    connections_before: int
    connections_after: int
    redis_down_s: float
    resume_s: float | None
    resume_all_s: float | None
    published_ok: int
    publish_failed_while_down: int
    published_without_receivers: int
    frames_lost: int
    deliveries_lost: int
    step: StepResult


@dataclass
class RecoverResult:
    """Tracked clients closed by a restart of every worker (SIGHUP) under a steady publisher.

    ``frames_lost``: offsets some client never got with nothing explaining it (goal 0), summed over
    clients; ``gap_offsets``/``reload_offsets``: offsets a ``gap`` frame or a ``recovered:false``
    ack announced as lost. ``recover_ms``: per reconnection, its ``subscribed`` ack minus its
    handshake; ``all_recovered_s``: from the SIGHUP to the last client's ack; ``handshake_ms``: how
    long each reconnection waited for its handshake (the new workers starting and accepting).
    """

    clients: int
    connect_failed: dict[str, int]
    rate: float
    history_size: int
    jitter_s: float
    workers_before: list[int]
    workers_after: list[int]
    clients_per_worker_before: dict[str, int]
    clients_per_worker_after: dict[str, int]
    closes: dict[str, int]
    reconnects: int
    reconnect_failures: dict[str, int]
    recovered_true: int
    recovered_false: int
    not_recovered_in_time: int
    published: int
    publish_failed: int
    top_offset: int | None
    frames_checked: int
    frames_lost: int
    duplicates: int
    gaps: int
    gap_offsets: int
    reload_offsets: int
    unchecked_frames: int
    error_frames: int
    behind_at_end: int
    recover_ms: Latency | None
    recover_ms_mean: float | None
    # Per reconnection: from its attempt (after the jitter) to the handshake's 101, ms.
    handshake_ms: Latency | None
    # From the SIGHUP: the first and the last reconnection's handshake done, s.
    first_reopened_s: float | None
    last_reopened_s: float | None
    # Connections at most waiting in the server's listen queue (accepted by no worker yet) after the restart.
    listen_queue_peak: int
    all_recovered_s: float | None
    history_reads: float | None
    server_recoveries: dict[str, float] | None
    server_gaps_sent: float | None
    publisher_behind_ms: float
    passed: bool | None = field(default=None, metadata={**_key("pass"), **_OPTIONAL})


@dataclass
class PublishRate:
    """One way of publishing, as fast as ``concurrency`` sequential publishers can."""

    via: str
    concurrency: int
    seconds: float
    published: int
    failed: int
    per_s: float
    redis_cpu_us_per_publication: float | None
    redis_cores: float | None
    # The publishers share one process (one core at most): near 1.0, it was the limit, not Redis.
    publisher_cores: float


@dataclass
class PublishRateResult:
    subscribers: int
    payload_bytes: int
    history_size: int
    ways: list[PublishRate]


@dataclass
class Skipped:
    skipped: str


@dataclass
class TargetResult:
    target: str
    port: int
    idle: IdleResult | None = field(default=None, metadata=_OPTIONAL)
    fanout: FanoutResult | None = field(default=None, metadata=_OPTIONAL)
    slow: SlowResult | None = field(default=None, metadata=_OPTIONAL)
    redis_restart: RestartResult | Skipped | None = field(default=None, metadata={**_key("redis-restart"), **_OPTIONAL})
    publish_rate: PublishRateResult | None = field(default=None, metadata={**_key("publish-rate"), **_OPTIONAL})
    recover: RecoverResult | Skipped | None = field(default=None, metadata=_OPTIONAL)


def to_json(value: Any) -> Any:
    """``value`` with every dataclass turned into a dict of its JSON keys."""
    if is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in fields(value):
            item = getattr(value, f.name)
            if f.metadata.get("internal") or (item is None and f.metadata.get("omit_none")):
                continue
            out[f.metadata.get("json_key", f.name)] = to_json(item)
        return out
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    return value
