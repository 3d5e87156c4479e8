"""The load client: processes of one uvloop loop each, holding many raw WebSocket connections.

At 2000 subscribers x 200 msg/s the client must parse 400,000 frames/s, and a general-purpose
client (websockets) adds per frame what this minimal parser does not (a frame object, UTF-8
validation, a queue and a task wake-up per message), on the cores the server needs. Every frame
carries a sequence number and its publish time (``CLOCK_MONOTONIC``, shared by processes on one
host), so loss, duplicates and reordering are counted, and latency is publish-to-receipt.

The ``recover`` scenario's clients are tracked sessions instead (``cmd_sessions``): each
subscribes with an op, checks every frame's ``offset`` against the last it saw (a jump is lost
unless a ``gap`` or a ``recovered:false`` ack announced it), and when closed reconnects after a
jitter and subscribes with ``since`` its last offset, across as many connections as it takes.

The orchestrator drives each process over a pipe (``Clients``); a process answers every command
on its event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import multiprocessing
import os
import random
import resource
import signal
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from typing import Any, cast

import orjson

# Latency histogram: 0.1 ms buckets up to 10 s (the last bucket holds everything slower).
BUCKET = 1e-4
BUCKETS = 100_000


# What a client process answers (pickled over its pipe).


@dataclass
class ConnectReply:
    ok: int
    failed: dict[str, int]

    @staticmethod
    def combined(replies: list[ConnectReply]) -> ConnectReply:
        """The client processes' replies added up: connections made, failures by reason."""
        failed: Counter[str] = Counter()
        for reply in replies:
            failed.update(reply.failed)
        return ConnectReply(sum(reply.ok for reply in replies), dict(failed))


@dataclass
class Progress:
    frames: int
    open: int
    cpu: float  # share of a core since the previous progress
    lag: float  # the event loop's worst lag since the previous progress, s


@dataclass
class WarmState:
    open: int
    warm: int


@dataclass
class Marked:
    fast: int
    stalled: int


@dataclass
class ClientStats:
    """Since the last mark: the fast connections' frames of sequence numbers [lo, hi)."""

    delivered: int
    frames: int
    dups: int
    reordered: int
    unknown: int
    hist: dict[int, int]  # latency bucket -> frames
    max_latency: float
    cpu: float
    lag: float
    open_fast: int
    counts: list[int] | None = None  # per sequence number: how many fast connections got it
    first: list[float] | None = None  # per sequence number: when the first one did


@dataclass
class Outcomes:
    outcomes: dict[str, int]
    received: int


@dataclass
class RecoverState:
    """The tracked sessions of one process (``cmd_sessions``): offsets seen, what explains a jump.

    Offsets are checked per session across its reconnects: each publication must be the one after
    the last seen; a jump is ``lost`` unless a ``gap`` frame or a ``recovered:false`` ack explains
    it (``gap_offsets``, ``reload_offsets``). ``behind``: offsets up to ``top`` not seen yet.
    """

    sessions: int
    open: int
    frames: int
    lost: int
    dups: int
    gaps: int
    gap_offsets: int
    reloads: int
    reload_offsets: int
    recovered: int
    acks: int
    errors: int
    unknown: int
    closes: dict[str, int]
    connect_failures: dict[str, int]
    reconnects: int
    pending: int  # sessions closed since the mark and not acknowledged again yet
    closed_since_mark: int
    ack_delays: list[float]  # each reconnection since the mark: ack minus handshake done, s
    handshakes: list[tuple[float, float, float]]  # each reconnection since the mark: (closed, attempted, opened)
    last_ack: float  # monotonic time of the latest ack since the mark (0: none)
    behind: int
    sessions_behind: int
    workers: dict[str, int]  # open sessions per worker (X-Wsbroadcast-Worker)


@dataclass
class _Failed:
    error: str


class _Session:
    """One logical client of the recover scenario: its position in the channel, across connections."""

    __slots__ = ("ack_at", "acked", "attempt_at", "closed_at", "epoch", "index", "last", "opened_at", "ws")

    def __init__(self, index: int) -> None:
        self.index = index
        self.last: int | None = None  # the last offset seen (None: not subscribed yet)
        self.epoch: str | None = None
        self.ws: _WS | None = None
        self.opened_at = 0.0
        self.ack_at = 0.0
        self.attempt_at = 0.0
        self.acked = False  # the current connection's subscription is acknowledged
        self.closed_at = 0.0


def raise_fd_limit() -> int:
    """Raise the soft fd limit to the hard one: thousands of sockets per process, inherited by children."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard



class _HandshakeError(Exception):
    pass


class _WS(asyncio.Protocol):
    """One client WebSocket: HTTP/1.1 upgrade, then unmasked server frames parsed from a buffer."""

    def __init__(self, client: _ClientProc, request: bytes, stall: bool, session: _Session | None = None) -> None:
        self.client = client
        self.session = session
        self.worker = ""
        self.request = request
        self.stall = stall
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.open = False
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.acked: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.seen = bytearray()
        self.last = -1
        self.warm = False
        self.received = 0
        self.close_code: int | None = None
        self.outcome = "open"
        self.fragments: bytearray | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_code is not None:
            self.outcome = f"close {self.close_code}"
        else:
            self.outcome = "reset" if exc is not None else "eof"
        self.client.open -= int(self.open)
        self.open = False
        for fut in (self.opened, self.acked):
            if not fut.done():
                fut.set_exception(_HandshakeError(self.outcome))
                fut.exception()  # retrieved: nobody may be waiting (acks the target never sends)
        if not self.lost.done():
            self.lost.set_result(None)
        if self.session is not None:
            self.client.session_lost(self)

    def data_received(self, data: bytes) -> None:
        # One timestamp per read: every frame in the chunk arrived together.
        now = time.monotonic()
        buf = self.buf
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            response = bytes(buf[:end])
            status = response[: response.find(b"\r\n")]
            del buf[: end + 4]
            if not status.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(_HandshakeError(status.decode("latin-1")[9:].strip() or "bad response"))
                assert self.transport is not None
                self.transport.close()
                return
            self.open = True
            self.client.open += 1
            marker = response.lower().find(b"\r\nx-wsbroadcast-worker:")
            if marker >= 0:
                line_end = response.find(b"\r\n", marker + 2)
                self.worker = response[marker + 24 : line_end if line_end > 0 else None].strip().decode("latin-1")
            self.opened.set_result(None)
        pos, n = 0, len(buf)
        on_text = self.client.on_tracked if self.session is not None else self.client.on_text
        while n - pos >= 2:
            b0, length = buf[pos], buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if n - pos < head + length:
                break
            payload = bytes(buf[pos + head : pos + head + length])
            pos += head + length
            opcode = b0 & 0x0F
            if opcode == 1 and b0 & 0x80:
                on_text(self, payload, now)
            elif opcode in (0, 1):
                # Fragmented text: servers here never fragment, but stay correct if one does.
                self.fragments = (self.fragments or bytearray()) + payload
                if b0 & 0x80:
                    whole, self.fragments = bytes(self.fragments), None
                    on_text(self, whole, now)
            elif opcode == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.send(8, payload[:2])
            elif opcode == 9:
                self.send(10, payload)
        if pos:
            del buf[:pos]

    def send(self, opcode: int, payload: bytes) -> None:
        """A masked client frame (control frames, and small text frames: payload < 65536 bytes)."""
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        else:
            head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
        self.transport.write(head + mask + masked)


class _ClientProc:
    """The state of one client process, driven by commands from the orchestrator over a pipe."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.conns: list[_WS] = []
        self.open = 0
        self.frames = 0
        self.dups = 0
        self.reordered = 0
        self.unknown = 0
        self.hist = [0] * BUCKETS
        self.max_latency = 0.0
        self.first: array[float] = array("d")
        self.track_first = False
        self.lag_max = 0.0
        self.progress_lag = 0.0
        self.mark_cpu = time.process_time()
        self.mark_wall = time.monotonic()
        self.progress_cpu = self.mark_cpu
        self.progress_wall = self.mark_wall
        self.done: asyncio.Future[None] | None = None
        # The recover scenario's sessions (cmd_sessions) and what they counted.
        self.sessions: list[_Session] = []
        # (host, port, path, channel, reconnect jitter, timeout) of the sessions.
        self.session_target: tuple[str, int, str, str, float, float] | None = None
        self.stopping = False
        self.reconnecting: set[asyncio.Task[None]] = set()
        self.t: Counter[str] = Counter()
        self.closes: Counter[str] = Counter()
        self.connect_failures: Counter[str] = Counter()
        self.ack_delays: list[float] = []
        self.handshakes: list[tuple[float, float, float]] = []
        self.last_ack = 0.0
        self.session_mark = 0.0

    def on_text(self, ws: _WS, payload: bytes, now: float) -> None:
        if payload.startswith(b'{"op"'):
            if not ws.acked.done():
                ws.acked.set_result(None)
            return
        try:
            data = orjson.loads(payload)["data"]
            seq, sent = data["s"], data["t"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.unknown += 1
            return
        if seq < 0:
            ws.warm = True
            return
        seen = ws.seen
        if seq >= len(seen):
            seen.extend(bytes(seq + 1024 - len(seen)))
        if seen[seq]:
            self.dups += 1
            return
        seen[seq] = 1
        if seq < ws.last:
            self.reordered += 1
        else:
            ws.last = seq
        ws.received += 1
        self.frames += 1
        if ws.stall:
            return
        latency = now - sent
        bucket = int(latency / BUCKET)
        self.hist[bucket if bucket < BUCKETS else BUCKETS - 1] += 1
        if latency > self.max_latency:
            self.max_latency = latency
        if self.track_first:
            first = self.first
            if seq >= len(first):
                first.extend([0.0] * (seq + 1024 - len(first)))
            if first[seq] == 0.0:
                first[seq] = now

    def on_tracked(self, ws: _WS, payload: bytes, now: float) -> None:
        """A frame to a tracked session: check its offset against the session's position."""
        session = ws.session
        assert session is not None
        t = self.t
        try:
            frame = orjson.loads(payload)
            op = frame.get("op")
        except (orjson.JSONDecodeError, AttributeError):
            t["unknown"] += 1
            return
        if op is None:
            offset, epoch = frame.get("offset"), frame.get("epoch")
            if not isinstance(offset, int) or session.last is None:
                t["unknown"] += 1  # no offset, or before the first ack: nothing to check it against
                return
            t["frames"] += 1
            if epoch != session.epoch:
                # A new epoch unannounced: every offset of the old one after ours is unaccounted for.
                t["epoch_unannounced"] += 1
                session.epoch, session.last = epoch, offset
            elif offset <= session.last:
                t["dups"] += 1
            else:
                t["lost"] += offset - session.last - 1
                session.last = offset
            return
        if op == "gap":
            t["gaps"] += 1
            offset = frame.get("offset", 0)
            if frame.get("epoch") != session.epoch:
                session.epoch, session.last = frame.get("epoch"), offset
            elif session.last is not None and offset > session.last:
                t["gap_offsets"] += offset - session.last
                session.last = offset
        elif op == "subscribed":
            offset, epoch, recovered = frame.get("offset", 0), frame.get("epoch"), frame.get("recovered")
            t["acks"] += 1
            if recovered is True:
                t["recovered"] += 1
                if session.last is not None and offset > session.last:
                    t["lost"] += offset - session.last  # acknowledged as recovered, yet not delivered
            elif recovered is False:
                t["reloads"] += 1
                if session.last is not None and epoch == session.epoch and offset > session.last:
                    t["reload_offsets"] += offset - session.last
            if session.last is None or recovered is not True or offset > session.last or epoch != session.epoch:
                session.last, session.epoch = offset, epoch
            if not ws.acked.done():
                ws.acked.set_result(None)
            if not session.acked:
                session.acked = True
                session.ack_at = now
                if session.closed_at >= self.session_mark and session.closed_at > 0:
                    self.ack_delays.append(now - session.opened_at)
                self.last_ack = max(self.last_ack, now)
        elif op == "error":
            t["errors"] += 1

    def session_lost(self, ws: _WS) -> None:
        session = ws.session
        assert session is not None
        if session.ws is not ws:
            return
        session.ws = None
        session.acked = False
        session.closed_at = time.monotonic()
        self.closes[ws.outcome] += 1
        if not self.stopping and self.session_target is not None:
            task = asyncio.get_running_loop().create_task(self._reconnect(session, self.session_target[4]))
            self.reconnecting.add(task)
            task.add_done_callback(self.reconnecting.discard)

    async def _reconnect(self, session: _Session, jitter: float) -> None:
        await asyncio.sleep(random.uniform(0, jitter))
        self.t["reconnects"] += 1
        session.attempt_at = time.monotonic()
        await self._session_open(session, retry=True)

    async def _session_open(self, session: _Session, retry: bool) -> bool:
        """Open a connection for ``session`` and subscribe, with ``since`` once it has a position.

        With ``retry``, a failed handshake (the workers restarting, a full backlog) is tried again
        after a jittered backoff until it works or the process stops.
        """
        assert self.session_target is not None
        host, port, path, channel, _, timeout = self.session_target
        loop = asyncio.get_running_loop()
        delay = 0.05
        while not self.stopping:
            key = base64.b64encode(os.urandom(16)).decode()
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
            made: _WS | None = None
            try:
                _, proto = await asyncio.wait_for(
                    loop.create_connection(functools.partial(_WS, self, request, False), host, port), timeout
                )
                made = proto
                await asyncio.wait_for(asyncio.shield(proto.opened), timeout)
            except (OSError, TimeoutError, _HandshakeError) as exc:
                self.connect_failures[str(exc) if isinstance(exc, _HandshakeError) else type(exc).__name__] += 1
                if made is not None and made.transport is not None:
                    made.transport.abort()
                if not retry:
                    return False
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 1.0)
                continue
            ws: _WS = made
            if self.stopping or not ws.open:
                if ws.transport is not None:
                    ws.transport.abort()
                continue
            # Attached only now: a handshake that failed is no session's connection.
            ws.session = session
            session.ws = ws
            session.acked = False
            session.opened_at = time.monotonic()
            if session.closed_at >= self.session_mark and session.closed_at > 0:
                self.handshakes.append((session.closed_at, session.attempt_at, session.opened_at))
            self.conns.append(ws)
            op: dict[str, object] = {"op": "subscribe", "channel": channel}
            if session.last is not None:
                op["since"] = {"offset": session.last, "epoch": session.epoch}
            ws.send(1, orjson.dumps(op))
            return True
        return False

    async def _lag_monitor(self) -> None:
        interval = 0.05
        while True:
            before = time.monotonic()
            await asyncio.sleep(interval)
            lag = time.monotonic() - before - interval
            self.lag_max = max(self.lag_max, lag)
            self.progress_lag = max(self.progress_lag, lag)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        monitor = asyncio.create_task(self._lag_monitor())
        tasks: set[asyncio.Task[None]] = set()

        def readable() -> None:
            try:
                ident, cmd, kwargs = self.pipe.recv()
            except EOFError:
                if self.done is not None and not self.done.done():
                    self.done.set_result(None)
                return
            task = asyncio.create_task(self._run(ident, cmd, kwargs))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        loop.add_reader(self.pipe.fileno(), readable)
        try:
            await self.done
        finally:
            loop.remove_reader(self.pipe.fileno())
            monitor.cancel()
            for ws in self.conns:
                if ws.transport is not None:
                    ws.transport.abort()

    async def _run(self, ident: int, cmd: str, kwargs: dict[str, Any]) -> None:
        try:
            result: Any = await getattr(self, "cmd_" + cmd.replace("-", "_"))(**kwargs)
        except Exception as exc:  # reported to the orchestrator, which raises it there
            result = _Failed(f"{cmd}: {exc!r}")
        self.pipe.send((ident, result))

    async def cmd_connect(
        self, host: str, port: int, path: str, n: int, rate: float, stall: int, ack: bool, timeout: float
    ) -> ConnectReply:
        loop = asyncio.get_running_loop()
        failures: Counter[str] = Counter()
        start = time.monotonic()
        gate = asyncio.Semaphore(200)

        async def one(index: int) -> None:
            key = base64.b64encode(os.urandom(16)).decode()
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            async with gate:
                ws: _WS | None = None
                try:
                    _, proto = await asyncio.wait_for(
                        loop.create_connection(lambda: _WS(self, request, index < stall), host, port), timeout
                    )
                    ws = proto
                    await asyncio.wait_for(asyncio.shield(ws.opened), timeout)
                    if ack:
                        await asyncio.wait_for(asyncio.shield(ws.acked), timeout)
                    self.conns.append(ws)
                except (OSError, TimeoutError, _HandshakeError) as exc:
                    failures[str(exc) if isinstance(exc, _HandshakeError) else type(exc).__name__] += 1
                    if ws is not None and ws.transport is not None:
                        ws.transport.abort()

        await asyncio.gather(*(one(i) for i in range(n)))
        return ConnectReply(n - sum(failures.values()), dict(failures))

    async def cmd_progress(self) -> Progress:
        now, cpu = time.monotonic(), time.process_time()
        share = (cpu - self.progress_cpu) / max(1e-6, now - self.progress_wall)
        lag, self.progress_lag = self.progress_lag, 0.0
        self.progress_cpu, self.progress_wall = cpu, now
        return Progress(self.frames, self.open, share, lag)

    async def cmd_warm(self) -> WarmState:
        live = [ws for ws in self.conns if ws.open]
        return WarmState(len(live), sum(ws.warm for ws in live))

    async def cmd_mark(self, track_first: bool = False) -> Marked:
        self.frames = self.dups = self.reordered = self.unknown = 0
        self.hist = [0] * BUCKETS
        self.max_latency = 0.0
        self.lag_max = 0.0
        self.track_first = track_first
        if track_first:
            self.first = array("d")
        self.mark_cpu, self.mark_wall = time.process_time(), time.monotonic()
        live = [ws for ws in self.conns if ws.open]
        return Marked(sum(not ws.stall for ws in live), sum(ws.stall for ws in live))

    async def cmd_stats(self, lo: int, hi: int, per_seq: bool = False) -> ClientStats:
        cpu = (time.process_time() - self.mark_cpu) / max(1e-6, time.monotonic() - self.mark_wall)
        fast = [ws for ws in self.conns if not ws.stall]
        out = ClientStats(
            delivered=sum(ws.seen[lo:hi].count(1) for ws in fast),
            frames=self.frames,
            dups=self.dups,
            reordered=self.reordered,
            unknown=self.unknown,
            hist={i: c for i, c in enumerate(self.hist) if c},
            max_latency=self.max_latency,
            cpu=cpu,
            lag=self.lag_max,
            open_fast=sum(ws.open for ws in fast),
        )
        if per_seq:
            counts = [0] * (hi - lo)
            for ws in fast:
                part = ws.seen[lo:hi]
                for i, hit in enumerate(part):
                    counts[i] += hit
            out.counts = counts
            out.first = [self.first[i] if i < len(self.first) else 0.0 for i in range(lo, hi)]
        return out

    async def cmd_stall(self, on: bool) -> int:
        stalled = [ws for ws in self.conns if ws.stall and ws.transport is not None and not ws.transport.is_closing()]
        for ws in stalled:
            assert ws.transport is not None
            if on:
                ws.transport.pause_reading()
            else:
                ws.transport.resume_reading()
        return len(stalled)

    async def cmd_outcomes(self, wait: float) -> Outcomes:
        stalled = [ws for ws in self.conns if ws.stall]
        pending = [ws.lost for ws in stalled if not ws.lost.done()]
        if pending:
            await asyncio.wait(pending, timeout=wait)
        return Outcomes(dict(Counter(ws.outcome for ws in stalled)), sum(ws.received for ws in stalled))

    async def cmd_close(self, timeout: float) -> int:
        self.stopping = True  # sessions closed now stay closed
        for task in list(self.reconnecting):
            task.cancel()
        for ws in self.conns:
            if ws.open:
                ws.send(8, (1000).to_bytes(2, "big"))
        pending = [ws.lost for ws in self.conns if not ws.lost.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        aborted = 0
        for ws in self.conns:
            if not ws.lost.done() and ws.transport is not None:
                ws.transport.abort()
                aborted += 1
        self.conns = []
        self.sessions = []
        self.session_target = None
        self.stopping = False
        return aborted

    async def cmd_sessions(
        self, host: str, port: int, path: str, channel: str, n: int, rate: float, jitter: float, timeout: float
    ) -> ConnectReply:
        """Open ``n`` tracked sessions, each subscribing with an op; they reconnect (after 0-``jitter`` s)
        whenever closed, subscribing with ``since`` their last offset. Answers once every one is acknowledged."""
        self.session_target = (host, port, path, channel, jitter, timeout)
        start = time.monotonic()
        gate = asyncio.Semaphore(200)
        failures: Counter[str] = Counter()

        async def one(index: int) -> None:
            session = _Session(index)
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            async with gate:
                if not await self._session_open(session, retry=False):
                    failures["connect"] += 1
                    return
                self.sessions.append(session)
                assert session.ws is not None
                try:
                    await asyncio.wait_for(asyncio.shield(session.ws.acked), timeout)
                except (TimeoutError, _HandshakeError):
                    failures["no ack"] += 1

        await asyncio.gather(*(one(i) for i in range(n)))
        return ConnectReply(n - sum(failures.values()), dict(failures))

    async def cmd_session_mark(self) -> None:
        self.t.clear()
        self.closes.clear()
        self.connect_failures.clear()
        self.ack_delays = []
        self.handshakes = []
        self.last_ack = 0.0
        self.session_mark = time.monotonic()

    async def cmd_recover_state(self, top: int | None = None) -> RecoverState:
        t = self.t
        open_sessions = [s for s in self.sessions if s.ws is not None and s.ws.open]
        closed = [s for s in self.sessions if s.closed_at >= self.session_mark and s.closed_at > 0]
        behind = [top - (s.last or 0) for s in self.sessions if top is not None and (s.last or 0) < top]
        workers = Counter(s.ws.worker for s in open_sessions if s.ws is not None)
        return RecoverState(
            sessions=len(self.sessions), open=len(open_sessions), frames=t["frames"], lost=t["lost"],
            dups=t["dups"], gaps=t["gaps"], gap_offsets=t["gap_offsets"], reloads=t["reloads"],
            reload_offsets=t["reload_offsets"], recovered=t["recovered"], acks=t["acks"], errors=t["errors"],
            unknown=t["unknown"] + t["epoch_unannounced"], closes=dict(self.closes),
            connect_failures=dict(self.connect_failures), reconnects=t["reconnects"],
            pending=sum(not s.acked for s in closed), closed_since_mark=len(closed), ack_delays=list(self.ack_delays),
            handshakes=list(self.handshakes),
            last_ack=self.last_ack, behind=sum(behind), sessions_behind=len(behind), workers=dict(workers),
        )

    async def cmd_quit(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)



def _client_main(pipe: Pipe) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator stops us with "quit" or SIGTERM
    raise_fd_limit()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        pass
    asyncio.run(_ClientProc(pipe).serve())


class Clients:
    """The orchestrator's handle on the client processes: RPC over pipes, answered on the event loop."""

    def __init__(self, count: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Pipe] = []
        self.procs: list[Any] = []
        for _ in range(count):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_client_main, args=(theirs,), daemon=True)
            proc.start()
            theirs.close()
            self.pipes.append(ours)
            self.procs.append(proc)
        self._next = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        loop = asyncio.get_running_loop()
        for pipe in self.pipes:
            loop.add_reader(pipe.fileno(), self._readable, pipe)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def _readable(self, pipe: Pipe) -> None:
        try:
            ident, result = pipe.recv()
        except EOFError:
            asyncio.get_running_loop().remove_reader(pipe.fileno())
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(RuntimeError("a client process exited"))
            return
        waiting = self._waiting.pop(ident, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(result)

    async def _call(self, index: int, cmd: str, kwargs: dict[str, Any]) -> Any:
        self._next += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = fut
        self.pipes[index].send((self._next, cmd, kwargs))
        result = await fut
        if isinstance(result, _Failed):
            raise RuntimeError(f"client process {index}: {result.error}")
        return result

    async def _all(self, cmd: str, **kwargs: Any) -> list[Any]:
        return list(await asyncio.gather(*(self._call(i, cmd, kwargs) for i in range(len(self.pipes)))))

    async def connect(self, per_client: list[dict[str, Any]]) -> list[ConnectReply]:
        """``per_client``: each process's cmd_connect arguments."""
        return list(await asyncio.gather(*(self._call(i, "connect", kw) for i, kw in enumerate(per_client))))

    async def progress(self) -> list[Progress]:
        return await self._all("progress")

    async def warm(self) -> list[WarmState]:
        return await self._all("warm")

    async def mark(self, track_first: bool = False) -> list[Marked]:
        return await self._all("mark", track_first=track_first)

    async def stats(self, lo: int, hi: int, per_seq: bool = False) -> list[ClientStats]:
        return await self._all("stats", lo=lo, hi=hi, per_seq=per_seq)

    async def stall(self, on: bool) -> list[int]:
        return await self._all("stall", on=on)

    async def outcomes(self, wait: float) -> list[Outcomes]:
        return await self._all("outcomes", wait=wait)

    async def sessions(self, per_client: list[dict[str, Any]]) -> list[ConnectReply]:
        """``per_client``: each process's cmd_sessions arguments."""
        return list(await asyncio.gather(*(self._call(i, "sessions", kw) for i, kw in enumerate(per_client))))

    async def session_mark(self) -> None:
        await self._all("session_mark")

    async def recover_state(self, top: int | None = None) -> list[RecoverState]:
        return await self._all("recover_state", top=top)

    async def close(self, timeout: float) -> list[int]:
        """Close every connection (1000), abort those still open after ``timeout``; how many were aborted."""
        return await self._all("close", timeout=timeout)

    def stop(self) -> None:
        loop = asyncio.get_running_loop()
        for pipe in self.pipes:
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(pipe.fileno())
                pipe.send((0, "quit", {}))
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(5)




def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]

