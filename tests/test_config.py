"""Settings: the defaults, one line naming what is wrong with a value, secrets hidden; one declaration
each, and the README's Settings table names exactly those."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest

from service.config import Settings, SettingsError
from tests.support.servers import ROOT

# Read by a library straight from the environment, documented beside our settings.
NOT_SETTINGS = {"PROMETHEUS_MULTIPROC_DIR"}


def _readme_table() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([A-Z0-9_]+)`", line.split("|")[1]))
    return names


def test_the_readme_settings_table_names_every_setting_and_nothing_else() -> None:
    declared = {f.name.upper() for f in fields(Settings)}
    documented = _readme_table()
    assert declared - documented == set(), "settings missing from the README's table"
    assert documented - declared - NOT_SETTINGS == set(), "README rows that are no setting"


def test_every_setting_declares_its_parser_meaning_and_secrecy() -> None:
    for declared in fields(Settings):
        assert callable(declared.metadata["parse"]) and declared.metadata["parse"].__doc__, declared.name
        assert declared.metadata["meaning"], declared.name
        assert isinstance(declared.metadata["secret"], bool), declared.name
    secrets = {f.name for f in fields(Settings) if f.metadata["secret"]}
    assert secrets == {"redis_url", "publish_token", "connect_secret", "connect_public_key", "admin_token"}
    shown = Settings(publish_token="x", connect_secret="y").public()
    assert (shown["publish_token"], shown["connect_secret"], shown["admin_token"]) == ("(set)", "(set)", "(unset)")


def test_defaults_match_the_design() -> None:
    s = Settings.from_env({})
    assert (s.port, s.web_concurrency, s.redis_pool_size, s.max_connections) == (8000, 2, 10, 5000)
    assert (s.queue_size, s.queue_bytes, s.send_buffer_bytes) == (1000, 1048576, 262144)
    assert (s.slow_consumer_policy, s.idle_timeout, s.cleanup_interval) == ("disconnect", 900, 300)
    assert (s.heartbeat_interval, s.max_message_bytes, s.ws_compression) == (5, 65536, False)
    assert s.default_channel == "broadcast" and s.redis_prefix == "broadcast:"
    assert (s.history_size, s.history_ttl, s.history_meta_ttl) == (100, 300, 30 * 86400)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"QUEUE_SIZE": "0"}, "QUEUE_SIZE='0' is invalid: expected an integer >= 1"),
        ({"WS_COMPRESSION": "maybe"}, "WS_COMPRESSION='maybe' is invalid: expected one of 1, 0"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL='http://x' is invalid"),
        ({"REDIS_URL": "tcp://user:pw@x"}, "REDIS_URL='tcp://***@x' is invalid"),
        ({"DEFAULT_CHANNEL": "a b"}, "DEFAULT_CHANNEL='a b' is invalid"),
        ({"IDLE_TIMEOUT": "10", "CLEANUP_INTERVAL": "20"}, "CLEANUP_INTERVAL=20 is invalid"),
        ({"ALLOWED_ORIGINS": "example.com"}, "ALLOWED_ORIGINS='example.com' is invalid"),
        ({"HISTORY_SIZE": "-1"}, "HISTORY_SIZE='-1' is invalid: expected an integer >= 0 and <= 100000"),
        ({"HISTORY_TTL": "0"}, "HISTORY_TTL='0' is invalid"),
        ({"HISTORY_TTL": "7200", "HISTORY_META_TTL": "3600"}, "HISTORY_TTL=7200 is invalid: expected a number <= "),
    ],
)
def test_invalid_settings_name_variable_value_and_what_is_allowed(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_public_settings_hide_secrets() -> None:
    s = Settings.from_env({"PUBLISH_TOKEN": "s3cret", "REDIS_URL": "redis://:pw@h:1/0", "CONNECT_SECRET": "k"})
    text = repr(s.public()) + repr(s)
    assert "s3cret" not in text and "pw@" not in text and "'k'" not in text
