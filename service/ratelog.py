"""Rate-limited log lines for anything a client, a publisher or a peer can trigger.

A hostile client must not be able to flood the operator's log: each kind of event (a ``key``) is
logged at most once per interval, and the line that follows a quiet spell says how many were
suppressed meanwhile. Never a traceback: callers pass the exception's text, not ``exc_info``.
Keys are a fixed vocabulary chosen by the code (``"invalid_utf8"``), never client input, so the
tables stay bounded.
"""

from __future__ import annotations

import logging
import time

DEFAULT_INTERVAL = 60.0


class RateLimitedLog:
    """At most one line per key per ``interval``; suppressed events are counted, not lost."""

    __slots__ = ("_interval", "_last", "_logger", "_suppressed")

    def __init__(self, logger: logging.Logger, interval: float = DEFAULT_INTERVAL) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, message: str, *args: object) -> bool:
        """Log ``message % args`` unless ``key`` was logged within the interval; True when logged."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message += " (%d more like it in the last %.0f s)"
            args = (*args, suppressed, now - last if last is not None else self._interval)
        self._logger.log(level, message, *args)
        return True

    def warning(self, key: str, message: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, message, *args)

    def info(self, key: str, message: str, *args: object) -> bool:
        return self.log(logging.INFO, key, message, *args)
