"""The baseline: a minimal encode/broadcaster app, as broadcaster's README writes it.

Run by ``scripts/loadtest --target broadcaster`` from its own environment (``.venv-baseline``:
broadcaster 0.3.1 with redis-py 7.4, since 0.3.1 delivers nothing with redis-py 8) under gunicorn
with uvicorn workers. The README's chat room, with two changes the harness needs: the channel comes
from ``?channels=`` (first name) and the Redis URL from ``REDIS_URL``; Starlette 1.x has no
``on_startup``, so the README's startup/shutdown hooks become a lifespan. Publishers PUBLISH the
message text on the channel name itself; subscribers receive that text unchanged.

Not part of the service and not imported by it: mypy and ruff see it only as a plain module.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from broadcaster import Broadcast  # type: ignore[import-not-found, unused-ignore]
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

broadcast = Broadcast(os.environ.get("REDIS_URL", "redis://localhost:6379"))


async def chatroom_ws(websocket: WebSocket) -> None:
    channel = (websocket.query_params.get("channels") or "chatroom").split(",")[0]
    await websocket.accept()
    async with anyio.create_task_group() as task_group:
        # run until first is complete
        async def run_chatroom_ws_receiver() -> None:
            await chatroom_ws_receiver(websocket, channel)
            task_group.cancel_scope.cancel()

        task_group.start_soon(run_chatroom_ws_receiver)
        await chatroom_ws_sender(websocket, channel)


async def chatroom_ws_receiver(websocket: WebSocket, channel: str) -> None:
    async for message in websocket.iter_text():
        await broadcast.publish(channel=channel, message=message)


async def chatroom_ws_sender(websocket: WebSocket, channel: str) -> None:
    async with broadcast.subscribe(channel=channel) as subscriber:
        async for event in subscriber:
            await websocket.send_text(event.message)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await broadcast.connect()
    try:
        yield
    finally:
        await broadcast.disconnect()


routes: list[Any] = [WebSocketRoute("/ws", chatroom_ws)]
app = Starlette(routes=routes, lifespan=lifespan)
