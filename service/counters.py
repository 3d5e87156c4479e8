"""A worker's counters, each declared once: its field, its Prometheus counter and label, its help.

The parts bump plain ints (the hot path among them); ``service.metrics`` derives its Prometheus
counters from these declarations and copies the values once a second; /health and the heartbeat
show them as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class Family:
    """One Prometheus counter, ``wsbroadcast_<name>_total``; ``label`` names its one label, if any."""

    name: str
    help: str
    label: str | None = None


CONNECTIONS_ACCEPTED = Family("connections_accepted", "WebSocket connections accepted")
CONNECTIONS_REFUSED = Family(
    "connections_refused", "WebSocket handshakes refused with 503, by reason (full, memory)", "reason"
)
CONNECTIONS_CLOSED = Family(
    "connections_closed", "Connections closed by the server, by reason (idle, slow_consumer, abuse, token_expired)",
    "reason",
)
FRAMES_DELIVERED = Family("frames_delivered", "Publication frames handed to a client's socket")
FRAMES_DROPPED = Family("frames_dropped", "Publication frames dropped by the drop-oldest slow-consumer policy")
PUBLISHES_RECEIVED = Family(
    "publishes_received",
    "Publications received, by source: http (POST /publish answered here), redis (arrived from pub/sub)",
    "source",
)
INVALID_PUBLICATIONS = Family(
    "invalid_publications",
    "Publications from Redis dropped: too big, not UTF-8 JSON, or not an object naming their channel",
)
CLIENT_FRAMES_REJECTED = Family("client_frames_rejected", "Client frames answered with an error frame")
REDIS_RECONNECTS = Family("redis_reconnects", "Times the Redis pub/sub connection was restored")
REDIS_CANARY_MISSES = Family(
    "redis_canary_misses", "Listener canaries Redis did not accept in time or that did not come back"
)
MEMORY_PRESSURE_ALERTS = Family("memory_pressure_alerts", "Times a worker crossed its memory high watermark")
PUBLISH_FAILURES = Family(
    "publish_failures",
    "POST /publish answered 503, by whether it was published: false (surely not), unknown (sent, unanswered)",
    "published",
)
PUBLISH_REPLAYS = Family("publish_replays", "POST /publish answered with the first result of its Idempotency-Key")
RECOVERIES = Family(
    "recoveries", "Subscriptions with since, by outcome: true (recovered), false (told to reload)", "recovered"
)
GAPS_SENT = Family(
    "gaps_sent",
    "Gap frames sent: publications lost to a connection, announced (drop-oldest, history too short, "
    "Redis lost the channel)",
)
HOLES = Family("holes", "Publications missing between Redis and a worker (an offset skipped ahead, a reconnect)")
HOLES_FILLED = Family("holes_filled", "History reads that filled a worker's hole")
HISTORY_READS = Family(
    "history_reads", "Reads of a channel's history in Redis (holes and recoveries, coalesced per channel)"
)
DUPLICATE_PUBLICATIONS = Family(
    "duplicate_publications", "Publications a worker dropped as already delivered (history and live overlap)"
)
HTTP_REJECTED = Family(
    "http_rejected",
    "HTTP requests and handshakes refused by the protocol limits, by reason "
    "(headers_too_big 431, head_timeout 408, body_timeout 408, handshakes_full 503, fds 503)",
    "reason",
)


def _counter(family: Family, label_value: str | None = None) -> Any:
    if (family.label is None) != (label_value is None):
        raise ValueError(f"counter of {family.name}: label {family.label!r}, value {label_value!r}")
    return field(default=0, metadata={"family": family, "label_value": label_value})


@dataclass(slots=True)
class Counters:
    """Monotonic per-worker counters; plain ints because the hot path bumps them."""

    accepted: int = _counter(CONNECTIONS_ACCEPTED)
    refused_full: int = _counter(CONNECTIONS_REFUSED, "full")
    refused_memory: int = _counter(CONNECTIONS_REFUSED, "memory")
    idle_closed: int = _counter(CONNECTIONS_CLOSED, "idle")
    slow_closed: int = _counter(CONNECTIONS_CLOSED, "slow_consumer")
    abuse_closed: int = _counter(CONNECTIONS_CLOSED, "abuse")
    token_expired_closed: int = _counter(CONNECTIONS_CLOSED, "token_expired")
    delivered: int = _counter(FRAMES_DELIVERED)
    dropped: int = _counter(FRAMES_DROPPED)
    published_http: int = _counter(PUBLISHES_RECEIVED, "http")
    received_redis: int = _counter(PUBLISHES_RECEIVED, "redis")
    invalid_payloads: int = _counter(INVALID_PUBLICATIONS)
    bad_client_frames: int = _counter(CLIENT_FRAMES_REJECTED)
    reconnects: int = _counter(REDIS_RECONNECTS)
    canary_misses: int = _counter(REDIS_CANARY_MISSES)
    memory_alerts: int = _counter(MEMORY_PRESSURE_ALERTS)
    publish_refused: int = _counter(PUBLISH_FAILURES, "false")
    publish_unknown: int = _counter(PUBLISH_FAILURES, "unknown")
    publish_replays: int = _counter(PUBLISH_REPLAYS)
    recovered: int = _counter(RECOVERIES, "true")
    not_recovered: int = _counter(RECOVERIES, "false")
    gaps_sent: int = _counter(GAPS_SENT)
    holes: int = _counter(HOLES)
    holes_filled: int = _counter(HOLES_FILLED)
    history_reads: int = _counter(HISTORY_READS)
    duplicates: int = _counter(DUPLICATE_PUBLICATIONS)
    http_rejected_headers_too_big: int = _counter(HTTP_REJECTED, "headers_too_big")
    http_rejected_head_timeout: int = _counter(HTTP_REJECTED, "head_timeout")
    http_rejected_body_timeout: int = _counter(HTTP_REJECTED, "body_timeout")
    http_rejected_handshakes_full: int = _counter(HTTP_REJECTED, "handshakes_full")
    http_rejected_fds: int = _counter(HTTP_REJECTED, "fds")

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def refused(self) -> int:
        """Handshakes refused with 503, for whatever reason."""
        return self.refused_full + self.refused_memory


# Offsets and recovery, as /health shows them under "history".
HISTORY_FIELDS = ("recovered", "not_recovered", "gaps_sent", "holes", "holes_filled", "history_reads", "duplicates")


def series() -> list[tuple[str, Family, str | None]]:
    """Every counter as (field, family, label value), in declaration order."""
    return [(f.name, f.metadata["family"], f.metadata["label_value"]) for f in fields(Counters)]
