"""WebSocket clients of a test service: subscribing, reading frames, checking acks, spreading over workers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.support.servers import Service


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> Any:
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


async def recv_publication(ws: ClientConnection, timeout: float = 5.0) -> Any:
    """The next frame, a publication: its offset and epoch checked and left out, for comparing."""
    frame = await recv_json(ws, timeout)
    assert isinstance(frame, dict) and "op" not in frame, frame
    if "offset" in frame:  # absent only for frames PUBLISHed raw, bypassing the publish function
        assert isinstance(frame.pop("offset"), int) and isinstance(frame.pop("epoch"), str), frame
    return frame


def check_ack(frame: Any, channel: str) -> dict[str, Any]:
    """``frame`` is the ``subscribed`` ack of ``channel``, with its position (offset and epoch)."""
    assert isinstance(frame, dict) and frame.get("op") == "subscribed" and frame.get("channel") == channel, frame
    assert isinstance(frame.get("offset"), int) and frame["offset"] >= 0, frame
    assert isinstance(frame.get("epoch"), str) and frame["epoch"], frame
    return frame


async def recv_ack(ws: ClientConnection, channel: str, timeout: float = 5.0) -> dict[str, Any]:
    """The next frame, the ``subscribed`` ack of ``channel``."""
    return check_ack(await recv_json(ws, timeout), channel)


async def recv_acks(ws: ClientConnection, names: list[str], timeout: float = 5.0) -> dict[str, dict[str, Any]]:
    """The ``subscribed`` acks of ``names``, in whatever order they come (each channel joins on its own)."""
    acks = [await recv_json(ws, timeout) for _ in names]
    by_channel = {a.get("channel"): a for a in acks}
    return {name: check_ack(by_channel.get(name), name) for name in names}


async def subscribe_client(service: Service, channels: str) -> ClientConnection:
    """Connect with ``?channels=`` and wait for every subscribed ack."""
    ws = await service.connect(f"?channels={channels}")
    await recv_acks(ws, channels.split(","))
    return ws


def worker_of(ws: ClientConnection) -> str:
    assert ws.response is not None
    return str(ws.response.headers["x-wsbroadcast-worker"])


async def clients_on_both_workers(service: Service, channels: str, minimum: int = 6) -> list[ClientConnection]:
    """Connect subscribed clients until at least ``minimum`` are open and both workers hold some."""
    clients = []
    for _ in range(200):
        clients.append(await subscribe_client(service, channels))
        if len(clients) >= minimum and len({worker_of(ws) for ws in clients}) == 2:
            return clients
    raise AssertionError("200 clients all landed on one worker")


class BackgroundReader:
    """Reads one client in a task of its own, stamping every frame as it arrives; keeps its close code."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[tuple[float, Any]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for raw in self.ws:
                self.frames.append((time.monotonic(), orjson.loads(raw)))
        except ConnectionClosed:
            pass

    def first_probe_after(self, since: float) -> float | None:
        for stamp, frame in self.frames:
            if stamp >= since and isinstance(frame.get("data"), dict) and "probe" in frame["data"]:
                return stamp
        return None

    @property
    def closed(self) -> bool:
        return self.task.done()

    async def stop(self) -> None:
        await self.ws.close()
        await self.task
