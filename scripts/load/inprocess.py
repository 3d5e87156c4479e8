"""One wsbroadcast worker in this process, under measurement: the breakdown tool's server.

It runs what a gunicorn worker runs (``workers.worker``'s uvicorn options and config: uvloop, our
HTTP and WebSocket protocols, the service app with its lifespan, memory monitor included), on
uvicorn's ``Server`` in this process, so that tracemalloc and the garbage collector can be read
where the connections live. The service has no code for this: everything here is outside it.

Commands arrive as JSON lines on stdin and are run on the event loop between its callbacks; each
answer is one JSON line on stdout (``{"ready": port}`` first). Logs go to stderr.

* ``state``: RSS and the connections uvicorn holds;
* ``trace_start``: the object census, then tracemalloc started and a first snapshot;
* ``trace_connected``: a second snapshot and census; their differences by allocation site (the
  traceback, innermost frame first) and by object type;
* ``trace_closed``: a third snapshot, and what it holds beyond the first (what outlived the
  connections); tracing stops;
* ``quit``: a graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import inspect
import json
import os
import sys
import threading
import tracemalloc
from collections import Counter
from typing import Any

import psutil
from uvicorn._compat import asyncio_run
from uvicorn.config import Config
from uvicorn.server import Server

from service import allocator
from service.app import create_app
from service.config import Settings
from workers.worker import config_kwargs, configure

# Deep enough to reach from an allocation in a library up to the call in uvicorn or the service
# that caused it: the grouping looks along the whole traceback.
FRAMES = 30

Census = tuple[Counter[str], Counter[str]]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _find_mallinfo2() -> Any:
    """glibc's mallinfo2 (2.33 and later), or None."""
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


_mallinfo2 = _find_mallinfo2()


def heap() -> dict[str, int] | None:
    """glibc's view of its heap: bytes obtained from the system, in use, and free but kept."""
    if _mallinfo2 is None or allocator.NAME != "glibc":
        return None
    info = _mallinfo2()
    return {"system": info.arena + info.hblkhd, "in_use": info.uordblks + info.hblkhd, "free_kept": info.fordblks}


def _type_name(obj: object) -> str:
    kind = type(obj)
    module = kind.__module__
    return kind.__qualname__ if module in ("builtins", "__main__") else f"{module}.{kind.__qualname__}"


def census(exclude: tuple[object, ...] = ()) -> Census:
    """(count, bytes) by type of every object the collector tracks and of the untracked objects they
    refer to directly (bytes, str, int... are never tracked themselves), each counted once; the
    census's own containers and ``exclude`` (and what they hold) are not counted."""
    tracked = gc.get_objects()
    seen = {id(obj) for obj in tracked}
    skip = {id(obj) for obj in exclude}
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for obj in tracked:
        if id(obj) in skip:
            continue
        name = _type_name(obj)
        counts[name] += 1
        sizes[name] += sys.getsizeof(obj, 0)
        for ref in gc.get_referents(obj):
            if gc.is_tracked(ref) or id(ref) in seen:
                continue
            seen.add(id(ref))
            ref_name = _type_name(ref)
            counts[ref_name] += 1
            sizes[ref_name] += sys.getsizeof(ref, 0)
    del tracked
    return counts, sizes


class Measured:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.process = psutil.Process()
        self._snapshot: tracemalloc.Snapshot | None = None
        self._census: Census | None = None
        self._overhead = 0

    def state(self) -> dict[str, Any]:
        return {"rss": int(self.process.memory_info().rss), "connections": len(self.server.server_state.connections),
                "heap": heap(), "allocator": allocator.NAME}

    def trace_start(self) -> dict[str, Any]:
        gc.collect()
        self._census = census()
        tracemalloc.start(FRAMES)
        self._snapshot = tracemalloc.take_snapshot()
        self._overhead = tracemalloc.get_tracemalloc_memory()
        return self.state()

    def _diff(self, snapshot: tracemalloc.Snapshot) -> list[dict[str, Any]]:
        assert self._snapshot is not None, "trace_start first"
        return [
            # tracemalloc keeps the oldest frame first: innermost first here.
            {"frames": [[frame.filename, frame.lineno] for frame in reversed(diff.traceback)],
             "size": diff.size_diff, "count": diff.count_diff}
            for diff in snapshot.compare_to(self._snapshot, "traceback")
            if (diff.size_diff or diff.count_diff)
            # What a command allocates to answer is nobody's connection.
            and not any(frame.filename == __file__ and frame.lineno in _COMMAND_LINES for frame in diff.traceback)
        ]

    def trace_connected(self) -> dict[str, Any]:
        """The differences since trace_start; tracing goes on, for trace_closed."""
        assert self._census is not None, "trace_start first"
        gc.collect()
        snapshot = tracemalloc.take_snapshot()
        overhead = tracemalloc.get_tracemalloc_memory() - self._overhead
        state = self.state()
        sites = self._diff(snapshot)
        del snapshot
        counts0, sizes0 = self._census
        counts1, sizes1 = census(exclude=(counts0, sizes0, sites))
        types = {
            name: {"count": counts1[name] - counts0[name], "size": sizes1[name] - sizes0[name]}
            for name in set(counts0) | set(counts1)
            if counts1[name] != counts0[name] or sizes1[name] != sizes0[name]
        }
        return {**state, "sites": sites, "types": types, "tracemalloc_overhead": overhead}

    def trace_closed(self) -> dict[str, Any]:
        """What is still allocated, since trace_start, once the connections closed; tracing stops."""
        gc.collect()
        snapshot = tracemalloc.take_snapshot()
        tracemalloc.stop()
        sites = self._diff(snapshot)
        self._snapshot = self._census = None
        return {**self.state(), "sites": sites}

    def run(self, command: str) -> dict[str, Any]:
        if command == "state":
            return self.state()
        if command == "trace_start":
            return self.trace_start()
        if command == "trace_connected":
            return self.trace_connected()
        if command == "trace_closed":
            return self.trace_closed()
        if command == "trim":
            # For experiments on giving memory back: what the memory monitor does, now.
            gc.collect()
            allocator.give_back()
            return self.state()
        if command == "quit":
            self.server.should_exit = True
            return {"quitting": True}
        return {"error": f"unknown command {command!r}"}


def _answer(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def _read_commands(loop: asyncio.AbstractEventLoop, measured: Measured) -> None:
    for line in sys.stdin:
        command = line.strip()
        if not command:
            continue
        done = threading.Event()

        def run(command: str = command, done: threading.Event = done) -> None:
            try:
                _answer(measured.run(command))
            except Exception as exc:  # the driver reports it; the server keeps serving
                _answer({"error": f"{command}: {type(exc).__name__}: {exc}"})
            finally:
                done.set()

        loop.call_soon_threadsafe(run)
        done.wait()
    # The driver went away: stop serving.
    loop.call_soon_threadsafe(setattr, measured.server, "should_exit", True)


_source, _first = inspect.getsourcelines(_read_commands)
_COMMAND_LINES = range(_first, _first + len(_source))


async def _serve(server: Server, port: int) -> None:
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():  # noqa: ASYNC110 - uvicorn offers a flag, not an event
        await asyncio.sleep(0.05)
    if task.done():
        await task
        return
    measured = Measured(server)
    threading.Thread(target=_read_commands, args=(asyncio.get_running_loop(), measured), daemon=True).start()
    _answer({"ready": port, "pid": os.getpid()})
    await task


def main(argv: list[str]) -> int:
    port = int(argv[0])
    settings = Settings.from_env()
    app = create_app(settings)
    config = Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                    **config_kwargs(settings))
    configure(config, settings, app)
    server = Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio_run(_serve(server, port), loop_factory=config.get_loop_factory())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
