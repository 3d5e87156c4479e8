"""PrivateRedis: its directory lives exactly as long as its process."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest

from scripts.redis_server import PrivateRedis, free_port


@pytest.fixture
def tmpdir_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_failed_start_removes_its_directory_and_says_why(tmpdir_here: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        redis = PrivateRedis(port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="Address already in use"):
            redis.start()
    assert list(tmpdir_here.iterdir()) == []
    assert redis.process is None


def test_stop_removes_the_directory_and_a_restart_keeps_the_port(tmpdir_here: Path) -> None:
    redis = PrivateRedis(port=free_port())
    redis.start()
    try:
        assert [p.name[:17] for p in tmpdir_here.iterdir()] == ["wsbroadcast-redis"]
        redis.stop()
        assert list(tmpdir_here.iterdir()) == []
        redis.start()
        with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as sock:
            sock.sendall(b"PING\r\n")
            assert sock.recv(16).startswith(b"+PONG")
    finally:
        redis.stop()
    assert list(tmpdir_here.iterdir()) == []
