"""A graceful stop is quiet: no socket closed twice."""

from __future__ import annotations

from scripts.redis_server import PrivateRedis
from tests.support.servers import Service


def test_a_graceful_stop_logs_no_socket_error(redis_server: PrivateRedis) -> None:
    service = Service(redis_server.url, workers=2).start()
    try:
        assert service.stop() == 0
        assert "Error while closing socket" not in service.log(), service.log()
    finally:
        service.stop()
        service.log_path.unlink(missing_ok=True)
