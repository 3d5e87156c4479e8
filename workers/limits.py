"""Per-connection limits the protocols enforce below the app: what one client may send, and how fast.

``Limits`` is what the worker derives from Settings and hands to the protocols on uvicorn's config
(``config.wsbroadcast_limits``). ``FrameBudget`` charges every WebSocket frame a client sends,
control and continuation frames included, against two token buckets (frames and bytes per second),
by reading only the frame headers of each read: no frame is parsed, answered or queued before it is
paid for, so one read costs at most the frames the budget still allows.
"""

from __future__ import annotations

import logging
import socket
from asyncio import BaseTransport
from dataclasses import dataclass

from service.config import Settings


@dataclass(frozen=True, slots=True)
class Limits:
    frame_rate: float
    frame_burst: int
    bytes_rate: float
    bytes_burst: int
    queue_bytes: int
    max_header_bytes: int
    handshake_timeout: float
    max_handshakes: int
    fd_reserve: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            frame_rate=settings.client_frame_rate,
            frame_burst=settings.client_frame_burst,
            bytes_rate=float(settings.client_bytes_rate),
            bytes_burst=settings.client_bytes_burst,
            queue_bytes=settings.queue_bytes,
            max_header_bytes=settings.max_header_bytes,
            handshake_timeout=settings.handshake_timeout,
            max_handshakes=settings.max_handshakes,
            fd_reserve=settings.fd_reserve,
        )


DEFAULT_LIMITS = Limits.from_settings(Settings())

log = logging.getLogger("wsbroadcast.protocol")


def cap_send_buffer(transport: BaseTransport, send_buffer: int) -> None:
    """Cap the socket's kernel send buffer at ``send_buffer`` (SEND_BUFFER_BYTES), so a stalled
    client holds at most QUEUE_BYTES + SEND_BUFFER_BYTES."""
    sock = transport.get_extra_info("socket")
    if not send_buffer or sock is None:
        return
    try:
        # Linux doubles the value it is given (bookkeeping overhead): halve it, so that the
        # kernel holds at most SEND_BUFFER_BYTES for a stalled client.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(send_buffer // 2, 2048))
    except OSError as exc:  # an exotic transport; the user-space bound still holds
        log.warning("could not set SO_SNDBUF=%d: %s", send_buffer, exc)

# Longest client frame header: 2 bytes, 8 of extended length, 4 of mask.
_MAX_HEADER = 14


class FrameBudget:
    """Two token buckets (frames, bytes) fed by the frame headers found in the client's byte stream.

    The stream is followed across reads: ``_skip`` is what remains of the payload of the frame
    being received, ``_head`` the first bytes of a header cut by the end of a read.
    """

    __slots__ = ("_byte_tokens", "_frame_tokens", "_head", "_limits", "_skip", "_stamp")

    def __init__(self, limits: Limits, now: float) -> None:
        self._limits = limits
        self._frame_tokens = float(limits.frame_burst)
        self._byte_tokens = float(limits.bytes_burst)
        self._stamp = now
        self._skip = 0
        self._head = b""

    def charge(self, data: bytes, now: float) -> bool:
        """Pay for the frames that start in ``data`` and for its bytes; False as soon as either runs out."""
        limits = self._limits
        elapsed = now - self._stamp
        self._stamp = now
        self._frame_tokens = min(limits.frame_burst, self._frame_tokens + elapsed * limits.frame_rate)
        self._byte_tokens = min(limits.bytes_burst, self._byte_tokens + elapsed * limits.bytes_rate)
        n = len(data)
        self._byte_tokens -= n
        if self._byte_tokens < 0:
            return False
        pos = 0
        if self._head:
            # The rest of a header cut by the previous read (already paid for).
            buf = self._head + data[:_MAX_HEADER]
            frame = _frame_length(buf, 0)
            if frame is None:
                self._head = buf
                return True
            pos = frame - len(self._head)
            self._head = b""
        elif self._skip:
            if self._skip >= n:
                self._skip -= n
                return True
            pos = self._skip
        tokens = self._frame_tokens
        while pos < n:
            if tokens < 1.0:
                self._frame_tokens = tokens
                return False
            tokens -= 1.0
            frame = _frame_length(data, pos)
            if frame is None:
                self._head = bytes(data[pos:])
                pos = n
                break
            pos += frame
        self._frame_tokens = tokens
        self._skip = pos - n
        return True


def _frame_length(buf: bytes, pos: int) -> int | None:
    """Header plus payload length of the frame starting at ``pos``, or None when its header is cut."""
    if len(buf) - pos < 2:
        return None
    second = buf[pos + 1]
    length = second & 0x7F
    header = 6 if second & 0x80 else 2
    if length == 126:
        header += 2
        if len(buf) - pos < header:
            return None
        length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
    elif length == 127:
        header += 8
        if len(buf) - pos < header:
            return None
        length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
    elif len(buf) - pos < header:
        return None
    return header + length
