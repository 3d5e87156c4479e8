"""Settings: one declaration each, and the README's Settings table names exactly those."""

from __future__ import annotations

import re
from dataclasses import fields

from service.config import Settings
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
