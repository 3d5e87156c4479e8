"""The ASGI transport of /ws: for other servers, permessage-deflate and drop-oldest.

Our own server serves /ws on the lean path (``workers.lean``) when it can; this endpoint is the
other transport of the same ``Session``: it admits (before ``accept`` and before any
per-connection state: a full worker answers HTTP 503 with Retry-After, or close 1013 where the
server has no denial responses), then feeds the session the client's messages from a small
receive loop, and one writer task drains the connection's ``QueueOutbound``. Whatever happens,
``finally`` ends the session (unregisters it from the hub and the tracker).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.responses import PlainTextResponse
from starlette.types import Receive
from starlette.websockets import WebSocket, WebSocketDisconnect

from service import wire
from service.outbound import DIRECT_EXTENSION, Bounds, QueueOutbound
from service.session import Parts, Refusal, Session, admit

log = logging.getLogger("wsbroadcast.endpoint")

# How a send or receive fails once the client is gone or the connection is closed under us.
_GONE = (OSError, RuntimeError, WebSocketDisconnect)


async def websocket_endpoint(ws: WebSocket, receive: Receive) -> None:
    """Serve one WebSocket; ``receive`` is the server's own (Starlette's wrapper would keep one more
    suspended coroutine alive per idle connection)."""
    service: Parts = ws.app.state.node
    # Starlette's headers give the first of a repeated header; a dict built in reverse does too.
    headers = dict(reversed(ws.headers.items()))
    verdict = admit(service, headers, dict(ws.query_params))
    if isinstance(verdict, Refusal):
        await _deny(ws, verdict)
        return
    settings = service.settings
    await ws.accept(headers=[(b"x-wsbroadcast-worker", service.worker_name.encode())])
    bounds = Bounds(settings.queue_size, settings.queue_bytes, settings.slow_consumer_policy == "drop-oldest")
    outbound = QueueOutbound(bounds, service.tracker.counters)
    link = _AsgiLink(ws, outbound)
    session = Session(service, verdict, link, outbound)
    try:
        session.start(ws.query_params.get("channels"))
        # Until the client is gone, also after a close: the server tells the end with a disconnect.
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            if text is None:
                session.on_binary()
            else:
                session.on_text(text)
    except _GONE as exc:
        # The client went away mid-send (uvicorn's ClientDisconnected, which starlette turns
        # into WebSocketDisconnect) or the connection was closed under us.
        log.debug("connection %s ended: %r", session.who(), exc)
    finally:
        # Our protocol closes abusers (1008) and clients that never read its pongs (4008) on its own.
        why = getattr(link.protocol, "verdict", None)
        if why == "abuse":
            service.tracker.counters.abuse_closed += 1
        elif why == "slow":
            service.tracker.counters.slow_closed += 1
        session.ended()
        link.writer.cancel()


async def _deny(ws: WebSocket, refusal: Refusal) -> None:
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        retry = refusal.retry_after
        headers = {"Retry-After": str(retry)} if retry is not None else None
        response = PlainTextResponse(refusal.detail + "\n", status_code=refusal.status, headers=headers)
        await ws.send_denial_response(response)
    else:
        await ws.close(wire.TRY_AGAIN if refusal.status == 503 else wire.POLICY, refusal.detail)


class _AsgiLink:
    """The session's transport on the ASGI path: a writer task draining the queue, and the close.

    With our protocol's scope extension, a close is synchronous (the control frames still queued
    and the close frame are written at once, and the protocol aborts a client that does not answer
    in time); on other servers it is a task that sends them and awaits the close, within a timeout.
    """

    __slots__ = ("closer", "outbound", "protocol", "writer", "ws")

    def __init__(self, ws: WebSocket, outbound: QueueOutbound) -> None:
        self.ws = ws
        self.outbound = outbound
        self.protocol: Any = ws.scope.get("extensions", {}).get(DIRECT_EXTENSION, {}).get("link")
        self.closer: asyncio.Task[None] | None = None
        self.writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        try:
            await self.outbound.run(self.ws.send_text)
        except _GONE as exc:
            log.debug("writer of a connection ended: %r", exc)

    def send_close(self, why: wire.Close) -> None:
        self.writer.cancel()
        texts = self.outbound.take_controls()
        if self.protocol is not None:
            for text in texts:
                self.protocol.send_now(text)
            self.protocol.close(why.code, why.reason)
        else:
            # Kept: a task nobody references may be collected before it runs.
            self.closer = asyncio.get_running_loop().create_task(self._close(texts, why))

    async def _close(self, texts: list[str], why: wire.Close) -> None:
        try:
            async with asyncio.timeout(5.0):
                for text in texts:
                    await self.ws.send_text(text)
                await self.ws.close(why.code, why.reason)
        except (TimeoutError, *_GONE) as exc:
            log.debug("close of a connection failed: %r", exc)
