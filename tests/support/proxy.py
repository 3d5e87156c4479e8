"""A TCP proxy to Redis that can make the subscriber connections through it deaf (the canary's case)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

from scripts.redis_server import free_port


class FreezingProxy:
    """A TCP proxy to Redis, run on its own thread, that can make subscriber connections deaf.

    ``deafen()``: every connection that has sent (or later sends) SUBSCRIBE stops receiving
    anything from Redis; its socket stays open and the proxy keeps reading what the worker sends.
    ``heal()``: new connections pass again; connections already deaf stay deaf until the worker
    abandons them, as a half-dead link would.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.deaf = False
        self.frozen = 0
        self._loop = asyncio.new_event_loop()
        self._links: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._loop.run_forever, name="freezing-proxy", daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> FreezingProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def deafen(self) -> None:
        self._call(self._set_deaf(True))

    def heal(self) -> None:
        self._call(self._set_deaf(False))

    def _call(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self._links:
            for writer in (link["client"], link["upstream"]):
                writer.close()
        for link in self._links:
            link["task"].cancel()

    async def _set_deaf(self, deaf: bool) -> None:
        self.deaf = deaf
        if deaf:
            for link in self._links:
                if link["subscriber"]:
                    self._freeze(link)

    def _freeze(self, link: dict[str, Any]) -> None:
        if not link["frozen"]:
            link["frozen"] = True
            self.frozen += 1

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            return
        link: dict[str, Any] = {"client": client_w, "upstream": up_w, "subscriber": False, "frozen": False}
        link["task"] = asyncio.current_task()
        self._links.append(link)
        uplink = asyncio.create_task(self._pump_up(client_r, up_w, link))
        downlink = asyncio.create_task(self._pump_down(up_r, client_w, link))
        try:
            await asyncio.wait({uplink, downlink}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            uplink.cancel()
            downlink.cancel()
            client_w.close()
            up_w.close()
            self._links.remove(link)

    async def _pump_up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: dict[str, Any]) -> None:
        while data := await reader.read(65536):
            if b"SUBSCRIBE" in data.upper():
                link["subscriber"] = True
                if self.deaf:
                    self._freeze(link)
            writer.write(data)
            await writer.drain()

    async def _pump_down(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: dict[str, Any]
    ) -> None:
        while data := await reader.read(65536):
            if link["frozen"]:
                continue  # swallowed: the worker's socket stays open and silent
            writer.write(data)
            await writer.drain()
