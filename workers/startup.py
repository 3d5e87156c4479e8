"""What the master says once at start-up about a configuration that works but is unsafe.

Logged by the gunicorn master (``on_starting``), so a deployment sees each line once, not once
per worker.
"""

from __future__ import annotations

import os

from service import allocator
from service.config import Settings
from service.gate import MIN_SECRET_BYTES


def warnings(settings: Settings, preload: str | None = None, allocator_name: str | None = None) -> list[str]:
    """One line per unsafe setting, naming the fix. ``preload``, ``allocator_name``: this process's
    LD_PRELOAD and the allocator serving it (by default, as they are)."""
    preload = os.environ.get("LD_PRELOAD", "") if preload is None else preload
    allocator_name = allocator.NAME if allocator_name is None else allocator_name
    lines = []
    if "jemalloc" in preload and allocator_name != "jemalloc":
        lines.append(
            f"LD_PRELOAD names jemalloc ({preload}) but {allocator_name}'s allocator serves: workers give back "
            "less memory after a crowd of clients leaves; install jemalloc (the Debian/Ubuntu package "
            "libjemalloc2, or the platform's jemalloc buildpack)"
        )
    if not settings.allowed_origins and not (settings.connect_secret or settings.connect_public_key):
        lines.append(
            "neither ALLOWED_ORIGINS nor CONNECT_SECRET is set: any web page a visitor opens can connect to /ws "
            "from their browser and subscribe to any channel; set ALLOWED_ORIGINS to your sites' origins "
            "(https://app.example.com,...) or require connect tokens (CONNECT_SECRET or CONNECT_PUBLIC_KEY)"
        )
    secret_bytes = len(settings.connect_secret.encode())
    if 0 < secret_bytes < MIN_SECRET_BYTES:
        lines.append(
            f"CONNECT_SECRET is {secret_bytes} bytes long: a captured token lets an attacker guess a short secret "
            f"offline; use at least {MIN_SECRET_BYTES} random bytes (e.g. `openssl rand -base64 48`)"
        )
    return lines
