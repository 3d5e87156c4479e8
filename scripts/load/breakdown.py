"""Where each byte of an idle connection goes: ``scripts/loadtest breakdown [--connections N]``.

One worker runs in a process of its own the way production runs it (``scripts/load/inprocess.py``:
the worker's uvicorn options, uvloop, our protocols, the service app, a private Redis, and the
Procfile's allocator environment), so that tracemalloc and the garbage collector can be read
there; N idle connections come from separate client processes (``scripts/load/rawclient.py``).

Two rounds, after a small warm-up round (first-use caches are not per-connection cost):

1. RSS: the worker's RSS before, with N connections open, and 1 s and 5 s after the clients
   closed (the memory given back), tracing off (tracemalloc costs memory of its own);
2. traced: the same N connections again with tracemalloc on; the snapshots' difference by
   allocation site (grouped by what allocated it, see ``GROUPS``) and the census's difference by
   object type (objects the collector tracks and the untracked ones they refer to directly).

"RSS beyond tracemalloc" is round 1's RSS per connection minus round 2's traced bytes per
connection: the allocator's overhead and fragmentation, and what C code allocates past Python's
allocator (libuv's handles and read buffers, the HTTP parser).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import functools
import json
import linecache
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from scripts.load.rawclient import Clients, raise_fd_limit, split
from scripts.redis_server import PrivateRedis, free_port, terminate
from scripts.service_process import ROOT, procfile_web

CHANNEL = "bench"
GIVE_BACK_AT = (1.0, 5.0)  # seconds after the clients closed

# What allocated a block: the first frame of its traceback, innermost first, that one of these
# rules names decides its group. A rule is (group, path fragment, function or "", text in the line
# or ""); the rules are tried in order for each frame.
MODULE = "our {module}"
RULES: list[tuple[str, str, str, str]] = [
    ("ASGI task (+ its callbacks)", "", "", "create_task("),
    ("ASGI task (+ its callbacks)", "", "", "add_done_callback("),
    ("ASGI task (+ its callbacks)", "/uvicorn/protocols/websockets/", "", "self.tasks.add("),
    ("keepalive ping timer", "/uvicorn/protocols/websockets/", "schedule_ping", ""),
    ("keepalive ping timer", "/uvicorn/protocols/websockets/", "start_keepalive", ""),
    ("handshake request + headers (websockets.http11)", "site-packages/websockets/http11.py", "", ""),
    ("handshake request + headers (websockets.http11)", "site-packages/websockets/datastructures.py", "", ""),
    ("ASGI scope + headers", "/uvicorn/protocols/websockets/", "handle_connect", ""),
    ("ASGI scope + headers", "/workers/protocol.py", "handle_connect", ""),
    ("suspended coroutine frames (awaits)", "", "", "await "),
    ("websockets sans-I/O connection + frame parser", "site-packages/websockets/", "", ""),
    ("uvicorn + our WebSocket protocol object", "/uvicorn/protocols/websockets/", "", ""),
    ("uvicorn + our WebSocket protocol object", "/workers/protocol.py", "", ""),
    ("uvicorn protocol utils (addresses)", "/uvicorn/protocols/utils.py", "", ""),
    ("starlette WebSocket + query params", "/starlette/", "", ""),
    # Our own modules, each its own group: "our workers/lean.py", "our service/session.py"...
    (MODULE, "/workers/", "", ""),
    (MODULE, "/service/", "", ""),
    ("HTTP protocol (until the upgrade)", "/uvicorn/protocols/http/", "", ""),
    ("uvicorn server (connection and task sets)", "/uvicorn/", "", ""),
]
# An allocation whose innermost Python frame is the event loop's run call was made by uvloop's C
# code (transports, handles, timers) between Python callbacks.
LOOP_FRAMES = ("asyncio/runners.py", "threading.py")
UVLOOP = "uvloop (C code: transport, handles)"
OTHER = "other"


@dataclass
class Row:
    name: str
    bytes_per_conn: float
    count_per_conn: float


@dataclass
class Breakdown:
    connections: int
    connected: int
    env: dict[str, str]
    rss_before: int
    rss_connected: int
    rss_per_conn: float
    rss_after: dict[str, int]  # "1s", "5s" -> RSS
    # glibc's heap (system, in_use, free_kept) before, connected, 1 s and 5 s after (None: not glibc)
    heap: dict[str, dict[str, int] | None]
    given_back: dict[str, float]  # "1s", "5s" -> fraction of the growth
    closed_in_s: float
    traced_connected: int
    traced_per_conn: float
    traced_blocks_per_conn: float
    rss_beyond_traced_per_conn: float
    tracemalloc_overhead_per_conn: float
    # traced bytes and blocks still allocated after the traced round's close (of the whole round)
    left_after_close: int = 0
    left_blocks_after_close: int = 0
    groups: list[Row] = field(default_factory=list)
    left_sites: list[Row] = field(default_factory=list)
    sites: list[Row] = field(default_factory=list)
    types: list[Row] = field(default_factory=list)


class Worker:
    """The measured worker process and its command pipe."""

    def __init__(self, env: dict[str, str], port: int, log: IO[bytes]) -> None:
        self.port = port
        self.process = subprocess.Popen(
            [sys.executable, "-m", "scripts.load.inprocess", str(port)], cwd=ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
        )

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the measured worker exited ({self.process.poll()})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the measured worker: {answer['error']}")
        return answer

    async def ready(self, timeout: float = 60.0) -> None:
        await asyncio.wait_for(asyncio.to_thread(self._read, timeout), timeout)

    async def call(self, command: str, timeout: float = 120.0) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()
        return await asyncio.wait_for(asyncio.to_thread(self._read, timeout), timeout)

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.process.stdin is not None
            self.process.stdin.write(b"quit\n")
            self.process.stdin.close()
        terminate(self.process, 20)


def procfile_env() -> dict[str, str]:
    """The ``env K=V`` assignments that open the Procfile's web line (the allocator's settings)."""
    words = procfile_web()
    out: dict[str, str] = {}
    if words and words[0] == "env":
        for word in words[1:]:
            if "=" not in word:
                break
            key, value = word.split("=", 1)
            out[key] = value
    return out


@functools.cache
def _functions(filename: str) -> list[tuple[int, int, str]]:
    """(first line, last line, name) of every function in a source file, innermost last."""
    try:
        tree = ast.parse(Path(filename).read_text())
    except (OSError, SyntaxError, ValueError):
        return []
    return sorted(
        ((node.lineno, node.end_lineno or node.lineno, node.name) for node in ast.walk(tree)
         if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)),
    )


def _function(filename: str, lineno: int) -> str:
    name = ""
    for first, last, function in _functions(filename):
        if first <= lineno <= last:
            name = function  # sorted by first line: the last enclosing one is the innermost
    return name


def _group(frames: list[list[Any]]) -> str:
    if frames and any(frames[0][0].endswith(loop) for loop in LOOP_FRAMES):
        return UVLOOP
    for filename, lineno in frames:
        text = linecache.getline(filename, lineno)
        for name, path, function, fragment in RULES:
            if path and path not in filename:
                continue
            if fragment and fragment not in text:
                continue
            if function and function != _function(filename, lineno):
                continue
            if name == MODULE:
                return MODULE.format(module=filename[filename.rindex(path) + 1:])
            return name
    return OTHER


def _short(filename: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/", "/lib/python3"):
        index = filename.find(marker)
        if index >= 0:
            return filename[index + len(marker):] if marker != "/lib/python3" else "stdlib" + filename[
                filename.find("/", index + 1):]
    return filename


def _site_name(frames: list[list[Any]]) -> str:
    """The innermost frame and, when it is in a library's generic code, the first of ours or uvicorn's."""
    filename, lineno = frames[0]
    text = f"{_short(filename)}:{lineno} {linecache.getline(filename, lineno).strip()[:60]}"
    for caller, caller_line in frames[1:]:
        if any(part in caller for part in ("/workers/", "/service/", "/uvicorn/", "/starlette/")):
            if caller != filename:
                text += f"  <- {_short(caller)}:{caller_line}"
            break
    return text


def summarize(answer: dict[str, Any], n: int, top: int) -> tuple[list[Row], list[Row], list[Row]]:
    groups: Counter[str] = Counter()
    group_counts: Counter[str] = Counter()
    sites: Counter[str] = Counter()
    site_counts: Counter[str] = Counter()
    for site in answer["sites"]:
        frames = site["frames"]
        group = _group(frames)
        groups[group] += site["size"]
        group_counts[group] += site["count"]
        name = _site_name(frames)
        sites[name] += site["size"]
        site_counts[name] += site["count"]
    group_rows = [Row(name, round(size / n, 1), round(group_counts[name] / n, 2))
                  for name, size in groups.most_common()]
    site_rows = [Row(name, round(size / n, 1), round(site_counts[name] / n, 2))
                 for name, size in sites.most_common(top)]
    types = answer["types"]
    type_rows = sorted(
        (Row(name, round(v["size"] / n, 1), round(v["count"] / n, 2)) for name, v in types.items()),
        key=lambda row: -row.bytes_per_conn,
    )
    return group_rows, site_rows, [row for row in type_rows[:top] if abs(row.count_per_conn) >= 0.01]


async def _connect(clients: Clients, port: int, n: int, rate: float) -> int:
    parts = split(n, len(clients.pipes))
    replies = await clients.connect([
        {"host": "127.0.0.1", "port": port, "path": f"/ws?channels={CHANNEL}", "n": k,
         "rate": rate / len(parts), "stall": 0, "ack": True, "timeout": 15.0}
        for k in parts
    ])
    failed: Counter[str] = Counter()
    for reply in replies:
        failed.update(reply.failed)
    if failed:
        print(f"breakdown: connections failed: {dict(failed)}", file=sys.stderr)
    return sum(reply.ok for reply in replies)


async def _until_closed(worker: Worker, limit: float = 30.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if (await worker.call("state"))["connections"] == 0:
            break
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@dataclass
class _Readings:
    connected: int
    before: int
    at_peak: int
    after: dict[str, int]
    heaps: dict[str, dict[str, int] | None]
    closed_in: float
    traced_connected: int
    answer: dict[str, Any]
    survivors: dict[str, Any]


async def _rounds(args: argparse.Namespace, env: dict[str, str], log: IO[bytes]) -> _Readings:
    n = args.connections
    clients: Clients | None = None
    worker = Worker(env, free_port(), log)
    try:
        await worker.ready()
        clients = Clients(args.clients)
        # Warm-up: first-use caches, imports and the hub's channel are no connection's cost.
        await _connect(clients, worker.port, min(50, n), args.connect_rate)
        await clients.close(timeout=20.0)
        await _until_closed(worker)
        await asyncio.sleep(args.settle)

        state = await worker.call("state")
        before, heaps = state["rss"], {"before": state["heap"]}
        connected = await _connect(clients, worker.port, n, args.connect_rate)
        await asyncio.sleep(args.settle)
        state = await worker.call("state")
        at_peak, heaps["connected"] = state["rss"], state["heap"]
        closing = time.monotonic()
        await clients.close(timeout=20.0)
        closed_in = await _until_closed(worker)
        after: dict[str, int] = {}
        for at in GIVE_BACK_AT:
            await asyncio.sleep(max(0.0, closing + at - time.monotonic()))
            state = await worker.call("state")
            after[f"{at:g}s"], heaps[f"{at:g}s"] = state["rss"], state["heap"]
        await asyncio.sleep(args.settle)

        await worker.call("trace_start")
        traced = await _connect(clients, worker.port, n, args.connect_rate)
        await asyncio.sleep(args.settle)
        answer = await worker.call("trace_connected", timeout=300.0)
        await clients.close(timeout=20.0)
        await _until_closed(worker)
        survivors = await worker.call("trace_closed", timeout=300.0)
    finally:
        if clients is not None:
            clients.stop()
        await asyncio.to_thread(worker.stop)
    return _Readings(connected, before, at_peak, after, heaps, closed_in, traced, answer, survivors)


def measure(args: argparse.Namespace) -> Breakdown:
    env_extra = {**procfile_env(), **dict(item.split("=", 1) for item in args.env)}
    handle, name = tempfile.mkstemp(prefix="breakdown-worker-", suffix=".log")
    os.close(handle)
    log_path = Path(name)
    redis = PrivateRedis()
    redis.start()
    try:
        env = {**os.environ, "REDIS_URL": redis.url, "REDIS_PREFIX": "breakdown:", "WEB_CONCURRENCY": "1",
               **env_extra}
        with open(log_path, "wb") as log:
            r = asyncio.run(_rounds(args, env, log))
    except BaseException:
        tail = log_path.read_text(errors="replace")[-3000:]
        if tail:
            print(f"breakdown: the measured worker's log ends with:\n{tail}", file=sys.stderr)
        raise
    finally:
        redis.stop()
        log_path.unlink(missing_ok=True)
    sites = r.answer["sites"]
    traced = sum(site["size"] for site in sites)
    blocks = sum(site["count"] for site in sites)
    per = max(1, r.traced_connected)
    grown = r.at_peak - r.before
    rss_per = grown / max(1, r.connected)
    groups, site_rows, types = summarize(r.answer, per, args.top)
    return Breakdown(
        connections=args.connections, connected=r.connected, env=env_extra,
        rss_before=r.before, rss_connected=r.at_peak, rss_per_conn=round(rss_per, 1),
        rss_after=r.after, heap=r.heaps,
        given_back={k: round((r.at_peak - v) / grown, 3) if grown > 0 else 0.0 for k, v in r.after.items()},
        closed_in_s=round(r.closed_in, 2),
        traced_connected=r.traced_connected, traced_per_conn=round(traced / per, 1),
        traced_blocks_per_conn=round(blocks / per, 2),
        rss_beyond_traced_per_conn=round(round(rss_per, 1) - round(traced / per, 1), 1),
        tracemalloc_overhead_per_conn=round(r.answer["tracemalloc_overhead"] / per, 1),
        groups=groups, sites=site_rows, types=types,
        left_after_close=sum(site["size"] for site in r.survivors["sites"]),
        left_blocks_after_close=sum(site["count"] for site in r.survivors["sites"]),
        left_sites=_left(r.survivors["sites"], args.top),
    )


def _left(sites: list[dict[str, Any]], top: int) -> list[Row]:
    """What outlived the connections, by site: totals (bytes, blocks), not per connection."""
    sizes: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for site in sites:
        name = _site_name(site["frames"])
        sizes[name] += site["size"]
        counts[name] += site["count"]
    return [Row(name, size, counts[name]) for name, size in sizes.most_common(top)]


def _kib(value: float) -> str:
    return f"{value / 1024:7.2f} KiB"


def table(b: Breakdown) -> str:
    env = " ".join(f"{k}={v}" for k, v in b.env.items()) or "(none)"
    lines = [
        f"breakdown: {b.connected} of {b.connections} idle connections on one worker (environment: {env})",
        f"  RSS before / connected            {b.rss_before / 1e6:.1f} MB / {b.rss_connected / 1e6:.1f} MB",
        f"  RSS per connection                {_kib(b.rss_per_conn)}",
        f"  traced (tracemalloc) per conn     {_kib(b.traced_per_conn)} in {b.traced_blocks_per_conn:g} blocks",
        f"  RSS beyond tracemalloc per conn   {_kib(b.rss_beyond_traced_per_conn)}",
        f"  all closed on the server after    {b.closed_in_s} s",
    ]
    for key, rss in b.rss_after.items():
        lines.append(f"  given back {key} after the close     {b.given_back[key] * 100:5.1f}%  "
                     f"(RSS {rss / 1e6:.1f} MB)")
    for key, info in b.heap.items():
        if info is not None:
            lines.append(f"  glibc heap {key:9}  from the system {info['system'] / 1e6:6.1f} MB, in use "
                         f"{info['in_use'] / 1e6:6.1f} MB, free but kept {info['free_kept'] / 1e6:6.1f} MB")
    lines.append("")
    lines.append("  by allocation site group                                      bytes/conn  blocks/conn")
    for row in b.groups:
        lines.append(f"    {row.name[:58]:58}  {row.bytes_per_conn:9.1f}  {row.count_per_conn:9.2f}")
    lines.append(f"    {'total':58}  {sum(r.bytes_per_conn for r in b.groups):9.1f}")
    lines.append("")
    lines.append("  by allocation site (innermost frame <- first caller of ours/uvicorn's)   bytes/conn  blocks/conn")
    for row in b.sites:
        lines.append(f"    {row.bytes_per_conn:8.1f}  {row.count_per_conn:6.2f}  {row.name[:130]}")
    lines.append("")
    lines.append(f"  left after the traced round closed: {b.left_after_close / 1e3:.1f} kB in "
                 f"{b.left_blocks_after_close} blocks (bytes, blocks, site)")
    for row in b.left_sites[:10]:
        lines.append(f"    {row.bytes_per_conn:8.0f}  {row.count_per_conn:6.0f}  {row.name[:130]}")
    lines.append("")
    lines.append("  by object type (gc-tracked + their untracked referents)   bytes/conn  objects/conn")
    for row in b.types:
        lines.append(f"    {row.name[:56]:56}  {row.bytes_per_conn:9.1f}  {row.count_per_conn:9.2f}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/loadtest breakdown", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1000, help="idle connections (default 1000)")
    parser.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--connect-rate", type=float, default=1000.0, help="connections opened per second")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before each reading (default 2)")
    parser.add_argument("--top", type=int, default=25, help="rows of the site and type tables (default 25)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for the worker (repeatable), e.g. PYTHONMALLOC=pymalloc")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON ('-': stdout, after the table)")
    args = parser.parse_args(argv)
    bad = [item for item in args.env if "=" not in item]
    if bad:
        parser.error(f"--env {bad[0]!r}: expected KEY=VALUE")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if raise_fd_limit() < args.connections + 100:
        print(f"breakdown: the fd limit is below {args.connections + 100} (raise it: ulimit -Hn)", file=sys.stderr)
        return 2
    result = measure(args)
    print(table(result))
    if args.json == "-":
        print(json.dumps(asdict(result), indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
