"""The library versions we depend on the internals of are checked before any worker starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from scripts.redis_server import free_port
from scripts.run import procfile_web
from workers import versions

ROOT = Path(__file__).resolve().parent.parent


def test_the_installed_environment_is_supported() -> None:
    assert versions.problems(versions.declared()) == []


def test_each_unsupported_or_missing_library_is_named() -> None:
    installed = {"uvicorn": "0.60.1", "redis": "8.1.3"}
    found = versions.problems(["uvicorn>=0.54,<0.55", "redis>=8.1,<8.2", "orjson>=3"], installed.get)
    assert found == [
        "uvicorn 0.60.1 is not supported (need <0.55,>=0.54)",
        "orjson is not installed (need >=3)",
    ]


def test_the_web_line_refuses_an_unsupported_uvicorn_with_one_line(tmp_path: Path) -> None:
    # A distribution record earlier on the path is what importlib.metadata reports: the same as an
    # environment where a newer uvicorn was installed.
    record = tmp_path / "uvicorn-0.99.0.dist-info"
    record.mkdir()
    (record / "METADATA").write_text("Metadata-Version: 2.1\nName: uvicorn\nVersion: 0.99.0\n")
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "PORT": str(free_port()),
        "BIND_HOST": "127.0.0.1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    done = subprocess.run(procfile_web(), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["wsbroadcast: unsupported library version: uvicorn 0.99.0 is not supported (need <0.55,>=0.54)"]
