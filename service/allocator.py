"""The C allocator behind this process, and how to ask it to give free memory back to the system.

With ``PYTHONMALLOC=malloc`` (the Procfile's) every Python object comes from the C allocator:
glibc's, or jemalloc or mimalloc when one is preloaded (``LD_PRELOAD``). Each keeps freed pages for
reuse unless asked; ``give_back`` asks whichever is loaded: jemalloc purges its arenas' unused
pages, mimalloc collects its free pages, glibc trims its heaps (``malloc_trim``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Any

# jemalloc's MALLCTL_ARENAS_ALL: "arena.<i>.purge" with this index purges every arena.
_JEMALLOC_ALL_ARENAS = 4096


def _symbols() -> Any:
    """The process's global symbols: a preloaded allocator's come before the C library's."""
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def _jemalloc(process: Any) -> Callable[[], None] | None:
    mallctl = getattr(process, "mallctl", None) if process is not None else None
    if mallctl is None:
        return None
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    mallctl.restype = ctypes.c_int
    purge = f"arena.{_JEMALLOC_ALL_ARENAS}.purge".encode()

    def give_back() -> None:
        # This thread's cache holds freed blocks back from their pages: return them first.
        mallctl(b"thread.tcache.flush", None, None, None, 0)
        mallctl(purge, None, None, None, 0)

    return give_back


def _mimalloc(process: Any) -> Callable[[], None] | None:
    collect = getattr(process, "mi_collect", None) if process is not None else None
    if collect is None:
        return None
    collect.argtypes = [ctypes.c_bool]
    collect.restype = None
    return lambda: collect(True)


def _glibc() -> Callable[[], None] | None:
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # a C library without it (musl, macOS)
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def _find() -> tuple[str, Callable[[], None] | None]:
    process = _symbols()
    jemalloc = _jemalloc(process)
    if jemalloc is not None:
        return "jemalloc", jemalloc
    mimalloc = _mimalloc(process)
    if mimalloc is not None:
        return "mimalloc", mimalloc
    glibc = _glibc()
    return ("glibc", glibc) if glibc is not None else ("unknown", None)


NAME, _give_back = _find()


def give_back() -> bool:
    """Ask the allocator to return its free pages to the system; False when it offers no way."""
    if _give_back is None:
        return False
    _give_back()
    return True
