"""Fixtures: a private Redis on a free port (never the machine's 6379, never skipped)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis as AsyncRedis

from scripts.redis_server import PrivateRedis

# The services' logs: kept after a service stops (tests read them), removed with the session.
SERVICE_LOGS = "wsbroadcast-test-*.log"


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every temporary file of the session, the services' and Redis' included, in one directory.

    TMPDIR points there for this process and every process it starts. At the end, once every
    service and Redis is stopped, only the services' logs may remain: anything else (a Redis
    directory, a metrics directory) is a leak, and fails the session.
    """
    tmp_path_factory.getbasetemp()  # pytest's own directory stays where it was
    root = Path(tempfile.mkdtemp(prefix="wsbroadcast-tests-"))
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = tempfile.tempdir = str(root)
    try:
        yield root
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        for log in root.glob(SERVICE_LOGS):
            log.unlink()
        left = sorted(path.name for path in root.iterdir())
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"the tests left these behind in the temporary directory: {left}"


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


@pytest.fixture
async def redis(redis_server: PrivateRedis) -> AsyncIterator[AsyncRedis]:
    """An asyncio client of the session's Redis."""
    client = AsyncRedis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()
