"""The one place that names Redis keys and pub/sub channels."""

from __future__ import annotations


class Keys:
    """Key and channel names under one prefix (``REDIS_PREFIX``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._prefix_bytes = prefix.encode()

    def channel(self, name: str) -> str:
        """The Redis pub/sub channel that carries publications for the public channel ``name``."""
        return self.prefix + name

    def channel_name(self, redis_channel: bytes) -> str | None:
        """The public channel name of a Redis channel, or None if it is not one of ours."""
        if not redis_channel.startswith(self._prefix_bytes):
            return None
        return redis_channel[len(self._prefix_bytes) :].decode("ascii", "replace")

    def worker(self, host: str, pid: int) -> str:
        """The heartbeat key of one worker."""
        return f"{self.prefix}worker:{host}:{pid}"

    def worker_pattern(self) -> str:
        return f"{self.prefix}worker:*"

    def canary(self, host: str, pid: int) -> str:
        """A worker's private control channel, outside the public channel space (``#`` is not allowed there)."""
        return f"{self.prefix}#canary:{host}:{pid}"

    def idempotency(self, key: str) -> str:
        """The first result of a publication made with ``Idempotency-Key: key`` (kept IDEMPOTENCY_WINDOW)."""
        return f"{self.prefix}idem:{key}"
