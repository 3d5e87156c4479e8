"""The lean path: an admitted /ws connection served by one small object, not an ASGI task.

Our HTTP protocol hands a clean WebSocket upgrade of /ws here (``upgrade``) when nothing needs the
ASGI path (no permessage-deflate, no drop-oldest, FAST_PATH on). The handshake is admitted
synchronously (``service.session.admit``: the gate's checks and the connection limit), answered
101 (or refused with an HTTP status) here, and the socket is handed with ``set_protocol`` to a
``LeanConnection``: ``__slots__``, the client-frame parser (``workers.wsframes``), the frame budget
and the session (``service.session``), which it drives from ``data_received``. No task, no
suspended coroutine, no scope or headers stay behind per idle connection; publications go straight
from the hub to the transport (``DirectOutbound``).

What one client may cost is bounded as on the ASGI path: every frame is paid for from its
``FrameBudget`` before it is parsed (an abuser is closed 1008 and read no more), pongs to a client
that does not read count against QUEUE_BYTES (4008), a message over MAX_MESSAGE_BYTES is closed
1009. Keepalive pings (WS_PING_INTERVAL, WS_PING_TIMEOUT) are sent by one sweep per worker, not by
a timer per connection; a connection that closes has a timer until it is gone, so a client that
never answers the close is aborted.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from service import wire
from service.gate import Claims
from service.outbound import Bounds, DirectOutbound
from service.session import OPEN, Parts, Refusal, Session, admit
from workers.limits import FrameBudget, Limits, cap_send_buffer
from workers.wsframes import BINARY, CLOSE, PING, PONG, TEXT, ClientFrames, ProtocolError, close_code

if TYPE_CHECKING:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# uvicorn.error: our log filter (workers.logfilter) turns these lines into rate-limited ones.
_log = logging.getLogger("uvicorn.error")

SHUTDOWN = wire.Close(1012, "")
KEEPALIVE_TIMEOUT = wire.Close(1011, "keepalive ping timeout")


def _frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked server frame with a short payload (control frames: at most 125 bytes)."""
    return bytes((0x80 | opcode, len(payload))) + payload


def _close_frame(why: wire.Close) -> bytes:
    if why.code == 1005:
        return _frame(CLOSE, b"")
    # A close frame's reason holds at most 123 bytes, cut between characters: it must stay UTF-8.
    reason = why.reason.encode()[:123].decode(errors="ignore").encode()
    return _frame(CLOSE, why.code.to_bytes(2, "big") + reason)


class LeanWorker:
    """This worker's share of the lean path: its settings, its open connections and the keepalive sweep."""

    # Seconds a closing connection may take to answer our close frame before it is aborted: a
    # stalled client must not keep its (bounded) buffers alive for ever, but one that resumes
    # reading in time learns why it was closed (4008).
    close_timeout = 10.0
    # An abuser has had its close frame (and FIN) at once: it is aborted sooner, as it is not read.
    abuse_linger = 2.0

    def __init__(self, config: Any, service: Parts, registry: set[Any]) -> None:
        self.service = service
        # uvicorn's set of open connections: its shutdown closes each (shutdown()) and waits for them.
        self.registry = registry
        self.loop = asyncio.get_running_loop()
        self.limits: Limits = config.wsbroadcast_limits
        self.send_buffer: int = getattr(config, "wsbroadcast_send_buffer_bytes", 0)
        self.max_size: int = config.ws_max_size
        self.ping_interval: float = config.ws_ping_interval or 0.0
        self.ping_timeout: float = config.ws_ping_timeout or 0.0
        settings = service.settings
        self.bounds = Bounds(settings.queue_size, settings.queue_bytes, False)
        self.counters = service.tracker.counters
        self.connections: set[LeanConnection] = set()
        self._sweep: asyncio.TimerHandle | None = None

    @staticmethod
    def serves(config: Any) -> bool:
        """Whether this server's /ws connections may take the lean path."""
        service = getattr(config, "wsbroadcast_node", None)
        if service is None or config.ws_per_message_deflate:
            return False
        settings = service.settings
        return bool(settings.fast_path) and settings.slow_consumer_policy != "drop-oldest"

    @classmethod
    def of(cls, config: Any, registry: set[Any]) -> LeanWorker:
        worker: LeanWorker | None = getattr(config, "wsbroadcast_lean", None)
        if worker is None:
            worker = cls(config, config.wsbroadcast_node, registry)
            config.wsbroadcast_lean = worker
        return worker

    # --- keepalive ---------------------------------------------------------------------------------

    def opened(self, conn: LeanConnection) -> None:
        self.registry.add(conn)
        self.connections.add(conn)
        if self.ping_interval and self._sweep is None:
            self._sweep = self.loop.call_later(self._tick(), self.sweep)

    def _tick(self) -> float:
        # A ping goes out between WS_PING_INTERVAL and 1.25 times it after the last; a dead client
        # is noticed between WS_PING_TIMEOUT and 1.25 times it after the ping.
        shortest = min(self.ping_interval, self.ping_timeout or self.ping_interval)
        return max(0.05, shortest / 4)

    def sweep(self) -> None:
        """Ping the connections whose ping is due; close those whose pong is overdue."""
        self._sweep = None
        now = self.loop.time()
        for conn in list(self.connections):
            if conn.pong_due:
                if now >= conn.pong_due:
                    conn.keepalive_timeout()
            elif now >= conn.ping_due:
                conn.ping(now)
        if self.connections:
            self._sweep = self.loop.call_later(self._tick(), self.sweep)


class LeanConnection(ClientFrames, asyncio.Protocol):
    """One admitted WebSocket on the lean path, from the 101 until the transport is gone.

    It is its own client-frame parser (the parser's few slots are its own: one object less per
    connection); its frame budget is made when the client first sends something.
    """

    __slots__ = ("_abort", "_budget", "_reading", "_worker", "ping_due", "pong_due", "session", "transport")

    def __init__(self, worker: LeanWorker, transport: asyncio.Transport) -> None:
        super().__init__(worker.max_size)
        self._worker = worker
        self.transport = transport
        self._budget: FrameBudget | None = None
        self._reading = True  # False once nothing more the client sends is parsed
        self._abort: asyncio.TimerHandle | None = None
        self.ping_due = worker.loop.time() + worker.ping_interval
        self.pong_due = 0.0  # while a ping is unanswered: when the client is given up
        self.session: Session = None  # type: ignore[assignment]  # set right after, by upgrade()

    # --- what the client sends ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self._reading:
            return
        worker = self._worker
        budget = self._budget
        if budget is None:
            budget = self._budget = FrameBudget(worker.limits, worker.loop.time())
        if not budget.charge(data, worker.loop.time()):
            self._abuse(wire.TOO_MANY_FRAMES)
            return
        try:
            events = self.feed(data)
        except ProtocolError as exc:
            self._handle(exc.events)
            self._protocol_error(exc)
            return
        self._handle(events)

    def _handle(self, events: list[tuple[int, bytes | str]]) -> None:
        session = self.session
        for opcode, payload in events:
            if not self._reading:
                return
            if opcode == TEXT:
                session.on_text(payload)  # type: ignore[arg-type]
            elif opcode == PING:
                self._pong(payload)  # type: ignore[arg-type]
            elif opcode == PONG:
                self.pong_due = 0.0
                self.ping_due = self._worker.loop.time() + self._worker.ping_interval
            elif opcode == CLOSE:
                self._peer_closed(payload)  # type: ignore[arg-type]
            elif opcode == BINARY:
                session.on_binary()

    def _pong(self, payload: bytes) -> None:
        if self.session.state != OPEN:
            return
        self.transport.write(_frame(PONG, payload))
        if self.transport.get_write_buffer_size() > self._worker.limits.queue_bytes:
            # A client that pings and never reads would make us buffer its pongs for ever.
            self.session.close(wire.SLOW)
            self._stop_reading()

    def _peer_closed(self, payload: bytes) -> None:
        """The client's close frame: the echo of ours ends the handshake; else we echo its code."""
        self._reading = False
        if self.session.state == OPEN:
            code = close_code(payload)
            self.session.close(wire.Close(code, ""))
        self.transport.close()

    def _protocol_error(self, exc: ProtocolError) -> None:
        if exc.code == 1007:
            _log.warning("Invalid UTF-8 sequence received from client.")
        self.session.close(wire.Close(exc.code, exc.reason))
        self._stop_reading()

    def _abuse(self, why: wire.Close) -> None:
        """Close 1008 and read nothing more: the client's further input is dropped unparsed."""
        if self.session.close(why):
            self._worker.counters.abuse_closed += 1
        self._stop_reading()
        self._arm(self._worker.abuse_linger)

    def _stop_reading(self) -> None:
        """Read nothing more from this client: our close frame goes out, then FIN, then the abort timer."""
        self._reading = False
        transport = self.transport
        if not transport.is_closing():
            if transport.can_write_eof():
                transport.write_eof()
            transport.pause_reading()

    # --- keepalive (driven by the worker's sweep) ------------------------------------------------------

    def ping(self, now: float) -> None:
        if self.session.state != OPEN:
            return
        self.transport.write(_frame(PING, b""))
        worker = self._worker
        if worker.ping_timeout:
            self.pong_due = now + worker.ping_timeout
        else:
            self.ping_due = now + worker.ping_interval

    def keepalive_timeout(self) -> None:
        self.pong_due = 0.0
        self.session.close(KEEPALIVE_TIMEOUT)
        self._reading = False
        # No use waiting for a client that answers nothing: flush, FIN, and the abort timer.
        self.transport.close()

    # --- the session's link -------------------------------------------------------------------------

    def send_close(self, why: wire.Close) -> None:
        """Write the close frame behind what is buffered; abort if the client does not answer in time."""
        transport = self.transport
        if not transport.is_closing():
            transport.write(_close_frame(why))
        self._arm(self._worker.close_timeout)

    def _arm(self, delay: float) -> None:
        if self._abort is not None:
            self._abort.cancel()
        self._abort = self._worker.loop.call_later(delay, self.transport.abort)

    # --- the transport ----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """The server is stopping (uvicorn calls this on every connection it tracks): close 1012."""
        self.session.close(SHUTDOWN)
        self._reading = False
        self.transport.close()

    def pause_writing(self) -> None:
        pass  # the outbound path bounds what is buffered

    def resume_writing(self) -> None:
        pass

    def eof_received(self) -> bool | None:
        # The client half-closed without a close frame: nothing more will come from it.
        self._reading = False
        self.transport.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._reading = False
        if self._abort is not None:
            self._abort.cancel()
            self._abort = None
        worker = self._worker
        worker.connections.discard(self)
        worker.registry.discard(self)
        session, self.session = self.session, None  # type: ignore[assignment]  # the last callback
        if session is not None:
            session.ended()


def upgrade(http: HttpToolsProtocol) -> bool:
    """Serve the upgrade request ``http`` has just parsed on the lean path, if it is a clean one
    for /ws: True when done (accepted or refused); False leaves it to uvicorn and websockets."""
    config = http.config
    if not LeanWorker.serves(config) or http.scope.get("method") != "GET":
        return False
    url = httptools.parse_url(http.url)
    if url.path != b"/ws":
        return False
    headers: dict[str, str] = {}
    for name, value in http.scope["headers"]:
        headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    key = headers.get("sec-websocket-key", "").strip()
    if headers.get("sec-websocket-version", "").strip() != "13" or not _valid_key(key):
        return False  # websockets answers these with the right status
    raw_query = (url.query or b"").decode("latin-1")
    query = dict(parse_qsl(raw_query, keep_blank_values=True))
    worker = LeanWorker.of(config, http.server_state.connections)
    service = worker.service
    verdict = admit(service, headers, query)
    transport = http.transport
    http.connections.discard(http)
    if isinstance(verdict, Refusal):
        _refuse(http, verdict, raw_query)
        return True
    accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest())
    head = [STATUS_LINE[101]]
    for name, value in http.server_state.default_headers:
        head += [name, b": ", value, b"\r\n"]
    head += [
        b"upgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: ", accept, b"\r\n",
        b"x-wsbroadcast-worker: ", service.worker_name.encode(), b"\r\n\r\n",
    ]
    transport.write(b"".join(head))
    # The HTTP protocol and its parser refer to each other: freed now, not by the cyclic GC.
    http.parser = None  # type: ignore[assignment]
    cap_send_buffer(transport, worker.send_buffer)
    _open(worker, transport, verdict, query.get("channels"))
    return True


def _open(worker: LeanWorker, transport: asyncio.Transport, claims: Claims | None, channels: str | None) -> None:
    conn = LeanConnection(worker, transport)
    conn.session = Session(worker.service, claims, conn, DirectOutbound(transport, worker.bounds, worker.counters))
    transport.set_protocol(conn)
    worker.opened(conn)
    conn.session.start(channels)


def _valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key.encode(), validate=True)) == 16
    except (ValueError, UnicodeEncodeError):
        return False


def answer_plain(http: HttpToolsProtocol, status: int, detail: str, retry_after: int | None = None) -> None:
    """Answer an HTTP request with ``status`` and ``detail`` as plain text, and close."""
    body = detail.encode() + b"\n"
    head = [STATUS_LINE[status]]
    for name, value in http.server_state.default_headers:
        head += [name, b": ", value, b"\r\n"]
    if retry_after is not None:
        head.append(b"retry-after: %d\r\n" % retry_after)
    head += [
        b"content-type: text/plain; charset=utf-8\r\n",
        b"content-length: ", str(len(body)).encode(), b"\r\n",
        b"connection: close\r\n\r\n",
        body,
    ]
    http.transport.write(b"".join(head))
    http.transport.close()


def _refuse(http: HttpToolsProtocol, refusal: Refusal, raw_query: str) -> None:
    answer_plain(http, refusal.status, refusal.detail, refusal.retry_after)
    client = f"{http.client[0]}:{http.client[1]}" if http.client else ""
    path = "/ws" + (f"?{raw_query}" if raw_query else "")
    # The line uvicorn logs for a denial response, which the log filter rate-limits per status.
    _log.info('%s - "WebSocket %s" %d', client, path, refusal.status)


