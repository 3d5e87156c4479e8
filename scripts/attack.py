"""Attack a running service as one hostile client would, and measure what the other clients see.

``python -m scripts.attack --url http://127.0.0.1:8000 --redis-url redis://... --token PUBLISH_TOKEN``

Each attack (frame floods, pings never read, a huge header, a slow request head, a never-ending
body) runs from a raw socket while a publisher sends ``--rate`` publications a second through
POST /publish and one probe subscriber per worker measures their latency. Per attack it prints how
the attacker was answered, and per worker its pid before and after (from the heartbeats in Redis),
its RSS growth and the probe's latency p99. The raw client (hand-written masked frames) is also
what tests/test_protocol_limits.py uses.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect

OP_CONT, OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x8, 0x9, 0xA


def client_frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """A masked client-to-server frame (RFC 6455 section 5.2)."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        header = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, n)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


class RawClient:
    """A WebSocket client on a bare socket: sends whatever bytes it is given, reads server frames."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.host, self.port = host, port
        self._buf = b""
        self.status = 0
        self.headers: dict[str, str] = {}

    def handshake(self, path: str = "/ws?channels=") -> RawClient:
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.status, self.headers = self.read_head()
        if self.status != 101:
            raise ConnectionError(f"handshake answered {self.status}")
        return self

    def read_head(self) -> tuple[int, dict[str, str]]:
        """Read an HTTP response head; (status, lower-cased headers)."""
        while b"\r\n\r\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before a response head")
            self._buf += chunk
        head, self._buf = self._buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = dict((k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:]))
        return int(lines[0].split()[1]), headers

    @property
    def worker(self) -> str:
        return self.headers.get("x-wsbroadcast-worker", "")

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(262144)
            if not chunk:
                raise ConnectionError("EOF")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def read_frame(self) -> tuple[int, bytes]:
        first, second = self._read(2)
        n = second & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        return first & 0x0F, self._read(n)

    def close_code(self) -> int | None:
        """Read until the server's close frame: its code, or None when the connection ended without one."""
        try:
            while True:
                opcode, payload = self.read_frame()
                if opcode == OP_CLOSE:
                    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
        except (OSError, ConnectionError):
            return None

    def close(self) -> None:
        self.sock.close()


def flood(client: RawClient, batch: bytes, stop: threading.Event) -> int:
    """Send ``batch`` again and again until ``stop`` or the server stops us; bytes sent."""
    sent = 0
    try:
        while not stop.is_set():
            client.sock.sendall(batch)
            sent += len(batch)
    except OSError:
        pass
    return sent


def flood_batch(kind: str, frames: int = 10000) -> bytes:
    """``frames`` 6-byte frames: empty pongs, empty pings, or empty continuations of an open message."""
    if kind == "pong":
        return client_frame(OP_PONG) * frames
    if kind == "ping":
        return client_frame(OP_PING) * frames
    if kind == "cont":
        return client_frame(OP_CONT, fin=False) * frames
    raise ValueError(f"unknown flood kind {kind!r}")


@dataclass
class Outcome:
    what: str
    answer: str
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def attack_flood(host: str, port: int, kind: str) -> Outcome:
    client = RawClient(host, port).handshake()
    if kind == "cont":
        client.sock.sendall(client_frame(OP_TEXT, b"{", fin=False))
    stop = threading.Event()
    started = time.monotonic()
    sender = threading.Thread(target=flood, args=(client, flood_batch(kind), stop), daemon=True)
    sender.start()
    code = client.close_code()
    elapsed = time.monotonic() - started
    stop.set()
    try:
        client.sock.shutdown(socket.SHUT_RDWR)  # unblocks the sender
    except OSError:
        pass
    sender.join(10)
    client.close()
    return Outcome(f"flood of empty {kind} frames", f"close {code}", elapsed, {"worker": client.worker})


def attack_pings_unread(host: str, port: int, limit_bytes: int = 64 << 20) -> Outcome:
    client = RawClient(host, port).handshake()
    client.sock.settimeout(3.0)
    ping = client_frame(OP_PING, b"x" * 125) * 500
    sent = 0
    started = time.monotonic()
    try:
        while sent < limit_bytes:
            client.sock.sendall(ping)
            sent += len(ping)
    except OSError:
        pass  # the server stopped reading: our sends stall
    client.sock.settimeout(15.0)
    code = client.close_code()
    elapsed = time.monotonic() - started
    client.close()
    return Outcome("125-byte pings, replies never read", f"close {code}", elapsed,
                   {"worker": client.worker, "sent_bytes": sent})


def attack_big_header(host: str, port: int, size: int = 100_000) -> Outcome:
    sock = socket.create_connection((host, port), timeout=10)
    started = time.monotonic()
    try:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * size}\r\n\r\n".encode())
    except OSError:
        pass
    client = RawClient.__new__(RawClient)
    client.sock, client._buf = sock, b""
    try:
        status, _ = client.read_head()
        answer = f"HTTP {status}"
    except (OSError, ConnectionError) as exc:
        answer = f"no answer ({exc})"
    sock.close()
    return Outcome(f"{size}-byte header", answer, time.monotonic() - started)


def _slow(host: str, port: int, head: bytes, then: bytes, interval: float, limit: float) -> tuple[str, float]:
    """Send ``head``, then ``then`` a byte at a time every ``interval`` until answered or ``limit`` s."""
    sock = socket.create_connection((host, port), timeout=interval)
    started = time.monotonic()
    sock.sendall(head)
    data = b""
    i = 0
    try:
        while time.monotonic() - started < limit:
            try:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if b"\r\n\r\n" in data:
                    break
            except TimeoutError:
                sock.sendall(then[i % len(then): i % len(then) + 1])
                i += 1
    except OSError:
        pass
    sock.close()
    elapsed = time.monotonic() - started
    answer = data.split(b"\r\n", 1)[0].decode("latin-1") if data else "closed without an answer"
    return answer or "no answer", elapsed


def attack_slow_head(host: str, port: int, limit: float = 60.0) -> Outcome:
    answer, elapsed = _slow(host, port, b"GET /ws HTTP/1.1\r\n", b"X-Slow: " + b"a" * 64 + b"\r\n", 0.5, limit)
    return Outcome("request head a byte every 0.5 s", answer, elapsed)


def attack_slow_body(host: str, port: int, token: str, limit: float = 60.0) -> Outcome:
    head = (f"POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n").encode()
    answer, elapsed = _slow(host, port, head, b"1\r\n \r\n", 0.5, limit)
    return Outcome("chunked /publish body that never ends", answer, elapsed)


def repeat(attack: Callable[[], Outcome], seconds: float) -> Outcome:
    """Run ``attack`` again and again (one attacker reconnecting) for ``seconds``; the answers counted."""
    started = time.monotonic()
    answers: dict[str, int] = {}
    slowest = 0.0
    first: Outcome | None = None
    while True:
        outcome = attack()
        first = first or outcome
        answers[outcome.answer] = answers.get(outcome.answer, 0) + 1
        slowest = max(slowest, outcome.seconds)
        if time.monotonic() - started >= seconds:
            break
    answer = ", ".join(f"{n} x {a}" for a, n in answers.items())
    return Outcome(first.what, answer, slowest, {**first.details, "for_seconds": round(time.monotonic() - started, 1)})


# --- measuring -------------------------------------------------------------------------------------


async def _heartbeats(redis_url: str, prefix: str) -> dict[str, dict[str, Any]]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}worker:*", count=500)]
        raw = await client.mget(keys) if keys else []
    finally:
        await client.aclose()
    docs = [orjson.loads(r) for r in raw if r is not None]
    return {d["worker"]["id"]: d for d in docs if isinstance(d, dict) and "worker" in d}


async def _probes(ws_url: str, channel: str, workers: int) -> dict[str, ClientConnection]:
    """One subscriber per worker (connect until every worker holds one)."""
    probes: dict[str, ClientConnection] = {}
    spare: list[ClientConnection] = []
    for _ in range(100):
        ws = await connect(f"{ws_url}/ws?channels={channel}", open_timeout=10)
        await asyncio.wait_for(ws.recv(), 10)  # the subscribed ack
        worker = ws.response.headers["x-wsbroadcast-worker"] if ws.response else ""
        if worker in probes:
            spare.append(ws)
        else:
            probes[worker] = ws
        if len(probes) >= workers:
            break
    for ws in spare:
        await ws.close()
    return probes


async def _listen(ws: ClientConnection, latencies: list[float]) -> None:
    async for raw in ws:
        doc = orjson.loads(raw)
        data = doc.get("data")
        if isinstance(data, dict) and "t" in data:
            latencies.append(time.time() - float(data["t"]))


async def _publish(base: str, token: str, channel: str, rate: float, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        while not stop.is_set():
            try:
                await http.post("/publish", json={"channel": channel, "data": {"t": time.time()}},
                                headers={"Authorization": f"Bearer {token}"})
            except httpx.HTTPError:
                pass
            await asyncio.sleep(1 / rate)


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def measure(args: argparse.Namespace, name: str, run: Callable[[], Outcome]) -> dict[str, Any]:
    before = await _heartbeats(args.redis_url, args.prefix)
    channel = f"attack-probe-{os.getpid()}"
    ws_url = args.url.replace("http", "ws", 1)
    probes = await _probes(ws_url, channel, len(before))
    latencies: dict[str, list[float]] = {w: [] for w in probes}
    listeners = [asyncio.create_task(_listen(ws, latencies[w])) for w, ws in probes.items()]
    stop = asyncio.Event()
    publisher = asyncio.create_task(_publish(args.url, args.token, channel, args.rate, stop))
    peak: dict[str, int] = {w: d["memory"]["rss_bytes"] for w, d in before.items()}
    attack = asyncio.create_task(asyncio.to_thread(run))
    while not attack.done():
        await asyncio.wait({attack}, timeout=0.5)
        for w, d in (await _heartbeats(args.redis_url, args.prefix)).items():
            peak[w] = max(peak.get(w, 0), d["memory"]["rss_bytes"])
    await asyncio.sleep(2.0)  # publications after the attack too
    stop.set()
    await publisher
    after = await _heartbeats(args.redis_url, args.prefix)
    for task in listeners:
        task.cancel()
    for ws in probes.values():
        await ws.close()
    outcome = attack.result()
    return {
        "attack": name,
        "what": outcome.what,
        "answer": outcome.answer,
        "slowest_answer_s": round(outcome.seconds, 2),
        **outcome.details,
        "workers_before": sorted(before),
        "workers_after": sorted(after),
        "rss_growth_mb": {w: round((peak.get(w, 0) - d["memory"]["rss_bytes"]) / 1e6, 1) for w, d in before.items()},
        "probe_p99_ms": {w: round(p99(v) * 1000, 1) for w, v in latencies.items()},
        "probe_received": {w: len(v) for w, v in latencies.items()},
    }


ATTACKS: dict[str, Callable[[str, int, str], Outcome]] = {
    "flood-pong": lambda h, p, t: attack_flood(h, p, "pong"),
    "flood-ping": lambda h, p, t: attack_flood(h, p, "ping"),
    "flood-cont": lambda h, p, t: attack_flood(h, p, "cont"),
    "pings-unread": lambda h, p, t: attack_pings_unread(h, p),
    "big-header": lambda h, p, t: attack_big_header(h, p),
    "slow-head": lambda h, p, t: attack_slow_head(h, p),
    "slow-body": lambda h, p, t: attack_slow_body(h, p, t),
}


async def main(args: argparse.Namespace) -> int:
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    for name in args.attacks.split(","):
        attack = ATTACKS[name]

        def run(a: Callable[[str, int, str], Outcome] = attack) -> Outcome:
            return repeat(lambda: a(host, port, args.token), args.seconds)

        result = await measure(args, name, run)
        print(orjson.dumps(result).decode(), flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.attack", description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--redis-url", required=True, help="its Redis (the workers' heartbeats are read there)")
    parser.add_argument("--prefix", default=os.environ.get("REDIS_PREFIX", "broadcast:"), help="its REDIS_PREFIX")
    parser.add_argument("--token", required=True, help="its PUBLISH_TOKEN")
    parser.add_argument("--rate", type=float, default=20.0, help="probe publications per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each attack goes on (reconnecting)")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma list of: " + ", ".join(ATTACKS))
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse_args())))
