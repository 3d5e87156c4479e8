"""The directory of prometheus-client multiprocess files, managed by the gunicorn master.

Every worker writes its figures to files in PROMETHEUS_MULTIPROC_DIR and /metrics sums them. The
variable must be set before any worker imports prometheus_client (it picks its storage at
import), so the master sets it while reading its config, and the workers inherit it when they
fork. Nothing here imports prometheus_client at module level for the same reason.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from service.config import MULTIPROC_ENV

# Set next to MULTIPROC_ENV when the directory is ours to remove on exit.
OWNED_ENV = "WSBROADCAST_METRICS_DIR_OWNED"


def prepare(port: int) -> Path:
    """This instance's directory, made and exported when PROMETHEUS_MULTIPROC_DIR is unset.

    A fresh private directory per gunicorn instance, so several instances on one host never mix
    their figures. A directory given in PROMETHEUS_MULTIPROC_DIR must belong to this instance
    alone, since the master wipes it at start. A config reload finds the variable set and keeps it.
    """
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        return path
    path = Path(tempfile.mkdtemp(prefix=f"wsbroadcast-metrics-{port}-"))
    os.environ[MULTIPROC_ENV] = str(path)
    os.environ[OWNED_ENV] = str(path)
    return path


def wipe() -> int:
    """Delete the files a previous run left (figures of dead processes); returns how many."""
    given = os.environ.get(MULTIPROC_ENV)
    if not given:
        return 0
    removed = 0
    for file in Path(given).glob("*.db"):
        file.unlink(missing_ok=True)
        removed += 1
    return removed


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live gauges; its counter files stay, so totals never go backwards."""
    if os.environ.get(MULTIPROC_ENV):
        # Imported here, after prepare() has set the variable (see the module docstring).
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid)  # type: ignore[no-untyped-call]


def remove_owned() -> None:
    """Remove the directory prepare() made; a directory given by the operator stays."""
    owned = os.environ.get(OWNED_ENV)
    if owned and owned == os.environ.get(MULTIPROC_ENV):
        shutil.rmtree(owned, ignore_errors=True)
