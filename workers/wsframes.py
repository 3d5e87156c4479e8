"""RFC 6455 client-to-server frames, parsed incrementally with almost no state per connection.

websockets' sans-I/O ``Protocol`` holds a reader, a suspended generator chain, event and write lists
and the handshake's headers per connection (about 1.1 KB idle before any headers); this parser holds
a partial frame's bytes (usually none), a fragmented message in progress (usually none) and the
limit. It is what a server needs of a client's stream and no more: frames must be masked, no
extension is negotiated (RSV bits are errors), control frames are short and unfragmented, text
messages are valid UTF-8, no message exceeds ``max_size``. It never writes: the connection answers
pings and closes. ``tests/test_wsframes.py`` checks it against websockets' parser.
"""

from __future__ import annotations

from typing import Final

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

CONT: Final = 0x0
TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA

_DATA = frozenset((CONT, TEXT, BINARY))
_CONTROL = frozenset((CLOSE, PING, PONG))
# Close codes a peer may send (RFC 6455 7.4.1 and 7.4.2): 1004-1006 and 1015 are reserved for
# endpoints' own use, never on the wire.
_SENDABLE = frozenset(range(1000, 1015)) - {1004, 1005, 1006}


class ProtocolError(Exception):
    """The client broke the protocol: close with ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        # What the same read held before the violation, to be handled as usual.
        self.events: list[tuple[int, bytes | str]] = []


def close_code(payload: bytes) -> int:
    """The status code of a (validated) close frame's payload; 1005 when it carries none."""
    return int.from_bytes(payload[:2], "big") if payload else 1005


class ClientFrames:
    """Feed it a client's bytes; it returns the complete messages and control frames in them.

    ``feed`` returns ``(opcode, payload)`` pairs: TEXT with the message as ``str``, BINARY with its
    bytes, PING/PONG/CLOSE with the frame's payload (a CLOSE payload is validated: empty, or a
    sendable code and a UTF-8 reason), after which nothing more is parsed. A violation raises
    ``ProtocolError``, which carries the events before it in the same read.

    A connection may be one (subclass it): its state is then a few slots of the connection's own.
    """

    __slots__ = ("_buf", "_closed", "_message", "_opcode", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf: bytes | bytearray = b""  # the start of a frame cut by the end of a read
        self._message: bytearray | None = None  # a fragmented message's payload so far
        self._opcode = 0  # its opcode
        self._closed = False  # a close frame came: nothing after it is parsed

    def feed(self, data: bytes) -> list[tuple[int, bytes | str]]:
        if self._closed:
            return []
        events: list[tuple[int, bytes | str]] = []
        try:
            self._parse(data, events)
        except ProtocolError as exc:
            self._closed = True
            self._buf = b""
            self._message = None
            exc.events = events
            raise
        return events

    def _parse(self, data: bytes, events: list[tuple[int, bytes | str]]) -> None:
        if self._buf:
            self._buf += data
            buf: bytes | bytearray = self._buf
        else:
            buf = data
        n = len(buf)
        pos = 0
        while n - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            if first & 0x70:
                raise ProtocolError(1002, "reserved bits must be 0")
            if not second & 0x80:
                raise ProtocolError(1002, "incorrect masking")
            opcode = first & 0x0F
            fin = first & 0x80
            length = second & 0x7F
            head = pos + 6
            if length == 126:
                head += 2
                if n < head:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            elif length == 127:
                head += 8
                if n < head:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                if length >> 63:
                    raise ProtocolError(1002, "invalid frame length")
            if opcode in _CONTROL:
                if not fin:
                    raise ProtocolError(1002, "fragmented control frame")
                if length > 125:
                    raise ProtocolError(1002, "control frame too long")
            elif opcode not in _DATA:
                raise ProtocolError(1002, f"invalid opcode: {opcode}")
            else:
                so_far = len(self._message) if self._message is not None else 0
                if so_far + length > self.max_size:
                    raise ProtocolError(1009, f"message over {self.max_size} bytes")
            if n - head < length:
                break
            mask = bytes(buf[head - 4 : head])
            end = head + length
            payload = apply_mask(bytes(buf[head:end]), mask) if length else b""
            pos = end
            if opcode in _CONTROL:
                if opcode == CLOSE:
                    _check_close(payload)
                    events.append((opcode, payload))
                    self._closed = True
                    self._buf = b""
                    break
                events.append((opcode, payload))
                continue
            message = self._message
            if opcode == CONT:
                if message is None:
                    raise ProtocolError(1002, "unexpected continuation frame")
                message += payload
                if not fin:
                    continue
                payload, opcode = bytes(message), self._opcode
                self._message = None
            elif message is not None:
                raise ProtocolError(1002, "expected a continuation frame")
            elif not fin:
                # One bytearray per fragmented message: empty continuation frames cost nothing.
                self._message = bytearray(payload)
                self._opcode = opcode
                continue
            if opcode == TEXT:
                try:
                    events.append((TEXT, payload.decode()))
                except UnicodeDecodeError:
                    raise ProtocolError(1007, "invalid UTF-8 in a text message") from None
            else:
                events.append((BINARY, payload))
        if pos == n or self._closed:
            self._buf = b""
        elif pos or buf is data:
            self._buf = bytearray(buf[pos:])


def _check_close(payload: bytes) -> None:
    if not payload:
        return
    if len(payload) < 2:
        raise ProtocolError(1002, "close frame too short")
    try:
        payload[2:].decode()
    except UnicodeDecodeError:
        raise ProtocolError(1007, "invalid UTF-8 in a close reason") from None
    code = close_code(payload)
    if code not in _SENDABLE and not 3000 <= code < 5000:
        raise ProtocolError(1002, f"invalid close code {code}")
