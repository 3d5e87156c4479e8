"""Fixtures: a private Redis on a free port (never the machine's 6379, never skipped)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from scripts.redis_server import PrivateRedis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[PrivateRedis]:
    """One Redis for the session; tests isolate themselves with a unique REDIS_PREFIX."""
    with PrivateRedis() as server:
        yield server


@pytest.fixture
def own_redis() -> Iterator[PrivateRedis]:
    """A Redis of this test's own, which it may stop and restart (fault tests)."""
    with PrivateRedis() as server:
        yield server
