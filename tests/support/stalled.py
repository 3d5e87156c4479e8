"""A client that stops reading: the one way the tests build a slow consumer.

A tiny kernel receive buffer (setting it also turns the kernel's autotuning off) and websockets'
own queue of one frame: once a frame waits unread, the library stops reading from the socket, the
kernel's buffers fill, and the server's bounds for the client are reached after a few frames.
"""

from __future__ import annotations

import socket

from websockets.asyncio.client import ClientConnection

from tests.support.clients import recv_acks, worker_of
from tests.support.servers import Service

RECEIVE_BUFFER = 4096


def small_socket(port: int) -> socket.socket:
    """A TCP connection to the service with a receive buffer of RECEIVE_BUFFER bytes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    sock.connect(("127.0.0.1", port))
    return sock


async def stalling_connection(service: Service, query: str) -> ClientConnection:
    """A WebSocket that reads nothing more from its socket once one frame waits unread in it."""
    return await service.connect(query, max_queue=1, sock=small_socket(service.port))


async def stalled_client(service: Service, channels: str) -> ClientConnection:
    """Subscribed to ``channels`` (every ack received), then reading nothing unless asked to."""
    ws = await stalling_connection(service, f"?channels={channels}")
    await recv_acks(ws, channels.split(","))
    return ws


async def stalled_on_both_workers(service: Service, channels: str) -> list[ClientConnection]:
    """Stalled clients until both workers hold one."""
    stalled: list[ClientConnection] = []
    for _ in range(50):
        stalled.append(await stalled_client(service, channels))
        if len({worker_of(ws) for ws in stalled}) == 2:
            return stalled
    raise AssertionError("50 clients all landed on one worker")


def abandon(ws: ClientConnection) -> None:
    """Drop the connection without a closing handshake, as a client that vanished does."""
    ws.transport.abort()
