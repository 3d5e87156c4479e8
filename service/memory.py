"""Memory awareness: the worker's memory limit, pressure alerts, and the limit memory allows.

The limit is MEMORY_LIMIT when set, else the container's cgroup limit (v2 ``memory.max``, v1
``memory.limit_in_bytes``), else the host's RAM; cgroup and host limits are shared among the
WEB_CONCURRENCY workers. Above MEMORY_HIGH_WATERMARK of it the worker is degraded and refuses new
connections until it falls back below (with 5% hysteresis, so one crossing logs one line).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import time
from pathlib import Path
from typing import Any

import psutil

from service import allocator
from service.config import Settings
from service.ratelog import RateLimitedLog
from service.tracker import Tracker

log = logging.getLogger("wsbroadcast.memory")
_ratelog = RateLimitedLog(log)


# cgroup v1 reports "no limit" as a huge page-aligned number; anything above this is unlimited.
_UNLIMITED = 1 << 60
HYSTERESIS = 0.95
DEFAULT_PER_CONNECTION = 16 * 1024
MIN_PER_CONNECTION = 4 * 1024
# Connections gone since the last trim before heap pages are given back (or 5% of the peak, if
# fewer): a collection and a trim cost a few milliseconds, so not after every close, but after any
# sizeable departure.
TRIM_AFTER = 100
# Seconds after a departure's trim to trim again: at the next check (a connection leaves the
# tracker when its close begins, and its transport and buffers are freed when the socket closes,
# usually after that first trim), and beyond the WebSocket protocol's close timeout (10 s).
TRIM_AGAIN_AFTER = (0.5, 12.0)
MEASURE_FROM = 50  # connections needed before the measured per-connection figure is trusted


def cgroup_limit(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The memory limit of this process's cgroup in bytes, or None when there is none.

    The tightest limit on the way from the process's cgroup up to the root counts: a limit set
    on a parent (a pod, a slice) binds its children even when theirs say "max". Walking up also
    finds the limit when the container sees its own cgroup mounted as the root while
    /proc/self/cgroup still names the host's path. When a cgroup v1 line names the memory
    controller (v1 or hybrid hosts), v1 owns memory and the v2 tree has no memory files.
    """
    v2, v1 = _cgroup_paths(proc_cgroup)
    if v1 is not None:
        return _tightest(root / "memory", v1, "memory.limit_in_bytes")
    if v2 is not None:
        return _tightest(root, v2, "memory.max")
    return None


def _cgroup_paths(proc_cgroup: Path) -> tuple[str | None, str | None]:
    v2 = v1 = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _tightest(mount: Path, cgroup: str, filename: str) -> int | None:
    parts = [p for p in cgroup.split("/") if p]
    limit: int | None = None
    for depth in range(len(parts), -1, -1):
        value = _read_limit(mount.joinpath(*parts[:depth]) / filename)
        if value is not None and (limit is None or value < limit):
            limit = value
    return limit


def _read_limit(path: Path) -> int | None:
    """A limit file's value in bytes; None for "max", the v1 unlimited figure, or no such file."""
    try:
        raw = path.read_text().strip()
    except OSError:
        return None
    try:
        value = int(raw)
    except ValueError:
        return None  # "max": no limit at this level
    return None if value >= _UNLIMITED else value


def detect_limit(settings: Settings, root: Path = Path("/sys/fs/cgroup"),
                 proc_cgroup: Path = Path("/proc/self/cgroup")) -> tuple[int, str]:
    """(bytes this worker may use, where the figure comes from)."""
    if settings.memory_limit:
        return settings.memory_limit, "MEMORY_LIMIT"
    workers = max(1, settings.web_concurrency)
    ram = int(psutil.virtual_memory().total)
    limit = cgroup_limit(root, proc_cgroup)
    # A cgroup limit above the host's RAM (a generous pod spec) cannot be reached: RAM binds first.
    if limit is not None and limit < ram:
        return limit // workers, f"cgroup / {workers} workers"
    return ram // workers, f"host RAM / {workers} workers"


class MemoryMonitor:
    def __init__(self, settings: Settings, tracker: Tracker) -> None:
        self._settings = settings
        self._tracker = tracker
        self._process = psutil.Process()
        self.limit, self.source = detect_limit(settings)
        self.watermark = settings.memory_high_watermark
        self.rss = self._read_rss()
        self.baseline = self.rss
        self.pressure = False
        self.trims = 0
        self._high_since_trim = 0
        self._trim_again_at: list[float] = []

    def _read_rss(self) -> int:
        return int(self._process.memory_info().rss)

    def per_connection(self) -> int:
        current = self._tracker.current
        if current < MEASURE_FROM:
            return DEFAULT_PER_CONNECTION
        return max(MIN_PER_CONNECTION, (self.rss - self.baseline) // current)

    def _give_back(self) -> None:
        """Return freed heap pages to the system once many connections have gone.

        Python frees a closed connection's objects at once, but the allocator keeps the pages for
        reuse unless asked: without this, RSS stays at its peak after a crowd leaves.
        """
        current = self._tracker.current
        now = time.monotonic()
        self._high_since_trim = max(self._high_since_trim, current)
        gone = self._high_since_trim - current
        if gone >= min(TRIM_AFTER, max(10, self._high_since_trim // 20)):
            self._trim()
            self._high_since_trim = current
            self._trim_again_at = [now + after for after in TRIM_AGAIN_AFTER]
        elif self._trim_again_at and now >= self._trim_again_at[0]:
            self._trim()
            # Past several due times at once (a stalled loop): one trim serves them all.
            self._trim_again_at = [due for due in self._trim_again_at if due > now]

    def _trim(self) -> None:
        # A closed connection leaves some reference cycles (tasks, exceptions and their frames)
        # that only the cyclic collector frees; collect them before trimming.
        gc.collect()
        allocator.give_back()
        self.trims += 1

    def check(self) -> None:
        self._give_back()
        self.rss = rss = self._read_rss()
        if self._tracker.current == 0:
            # What no connection accounts for (the event loop, Redis, pages the allocator kept
            # after a crowd left): per-connection memory is measured above it.
            self.baseline = rss
        high = self.limit * self.watermark
        if not self.pressure and rss > high:
            self.pressure = True
            self._tracker.counters.memory_alerts += 1
            log.warning(
                "memory pressure: RSS %.1f MB is above %.0f%% of the %.1f MB limit (%s); "
                "refusing new connections",
                rss / 1e6, self.watermark * 100, self.limit / 1e6, self.source,
            )
        elif self.pressure and rss < high * HYSTERESIS:
            self.pressure = False
            log.warning("memory pressure over: RSS %.1f MB is below the high watermark; admitting again", rss / 1e6)
        self._tracker.memory_pressure = self.pressure
        room = max(0.0, high - self.baseline)
        self._tracker.memory_limit_connections = int(room // self.per_connection())

    def check_fds(self) -> None:
        """The connections the file descriptors still allow: RLIMIT_NOFILE - FD_RESERVE - in use.

        Between checks every admitted connection is one more descriptor, which the limit (set as
        current + room) counts exactly; the reserve covers the rest (HTTP requests, handshakes).
        """
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            self._tracker.fd_limit_connections = None
            return
        try:
            in_use = self._process.num_fds()
        except (OSError, psutil.Error) as exc:
            # Reading /proc takes a descriptor: none left means none for new connections either.
            self._tracker.fd_limit_connections = self._tracker.current
            _ratelog.warning("fds", "cannot count file descriptors (%s): refusing new connections", exc)
            return
        room = soft - self._settings.fd_reserve - in_use
        self._tracker.fd_limit_connections = max(0, self._tracker.current + room)

    async def run(self, interval: float = 1.0) -> None:
        while True:
            try:
                self.check_fds()
                self.check()
            except (OSError, psutil.Error) as exc:
                # Typically out of file descriptors (EMFILE): once a minute, not a traceback a second.
                _ratelog.warning("check", "memory check failed: %s", exc)
            except Exception:
                # Admission depends on this loop: it must outlive any one bad check.
                log.exception("memory check failed; will retry in %.0f s", interval)
            await asyncio.sleep(interval)

    def stats(self) -> dict[str, Any]:
        return {
            "rss_bytes": self.rss,
            "limit_bytes": self.limit,
            "limit_source": self.source,
            "high_watermark": self.watermark,
            "usage": round(self.rss / self.limit, 4) if self.limit else 0.0,
            "pressure": self.pressure,
            "per_connection_bytes": self.per_connection(),
            "baseline_rss_bytes": self.baseline,
            "trims": self.trims,
            "allocator": allocator.NAME,
        }
