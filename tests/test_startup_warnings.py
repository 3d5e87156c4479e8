"""The master warns once at start-up when /ws is open to any web page (neither ALLOWED_ORIGINS nor
connect tokens), when CONNECT_SECRET is too short to resist an offline guess, or when the Procfile's
jemalloc could not be preloaded."""

from __future__ import annotations

from scripts.redis_server import PrivateRedis
from service.config import Settings
from tests.support.servers import Service
from workers.startup import warnings

ORIGIN_WARNING = "neither ALLOWED_ORIGINS nor CONNECT_SECRET is set"


def test_which_settings_warn() -> None:
    assert [line.split(":")[0] for line in warnings(Settings())] == [ORIGIN_WARNING]
    assert warnings(Settings(allowed_origins=("https://app.example",))) == []
    assert warnings(Settings(connect_secret="s" * 32)) == []
    assert warnings(Settings(connect_public_key="(a PEM block)")) == []
    (short,) = warnings(Settings(connect_secret="short-secret"))
    assert short.startswith("CONNECT_SECRET is 12 bytes long") and "at least 32" in short


def test_an_open_service_logs_one_warning_for_all_its_workers(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=2) as open_service:
        log = open_service.log()
        assert log.count(ORIGIN_WARNING) == 1, log
        assert "set ALLOWED_ORIGINS" in log
    with Service(redis_server.url, workers=1, allowed_origins="https://app.example") as guarded:
        assert ORIGIN_WARNING not in guarded.log()


def test_a_jemalloc_preload_that_did_not_load_is_named() -> None:
    settings = Settings(allowed_origins=("https://app.example",))
    (missing,) = warnings(settings, preload="libjemalloc.so.2", allocator_name="glibc")
    assert missing.startswith("LD_PRELOAD names jemalloc (libjemalloc.so.2) but glibc's allocator serves")
    assert "libjemalloc2" in missing
    assert warnings(settings, preload="libjemalloc.so.2", allocator_name="jemalloc") == []
    assert warnings(settings, preload="", allocator_name="glibc") == []
