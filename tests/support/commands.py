"""The project's commands run as users run them: ``python -m scripts.<name>`` from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

from tests.support.servers import ROOT


def command(
    name: str, *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``scripts.<name>`` with ``args`` in the environment ``env`` (this process's by default)."""
    return subprocess.run(
        [sys.executable, "-m", f"scripts.{name}", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def run_health(redis_url: str, prefix: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The health command as an operator runs it: its own process, configured by the environment."""
    return command("health", *args, env={**os.environ, "REDIS_URL": redis_url, "REDIS_PREFIX": prefix}, timeout=timeout)
