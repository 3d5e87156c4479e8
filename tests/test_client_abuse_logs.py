"""What a hostile client can make a worker log: at most a line per kind of abuse per interval, with a
count, never a traceback; and never a connect token, however its name is spelled."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import Iterator

import pytest

from scripts.redis_server import PrivateRedis
from service.gate import mint_token
from tests.support.clients import recv_ack
from tests.support.servers import Service
from tests.support.waits import wait_until
from workers.logfilter import redact

SECRET = "connect-secret-logs-7d1e"


@pytest.fixture(scope="module")
def service(redis_server: PrivateRedis) -> Iterator[Service]:
    with Service(redis_server.url, workers=1, connect_secret=SECRET) as svc:
        yield svc


def _masked(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _handshake(query: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /ws{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def _exchange(port: int, first: bytes, then: bytes = b"") -> tuple[bytes, bytes]:
    """Send ``first`` (and, once the response head is in, ``then``); the response head and the rest
    of what the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(first)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        if then:
            writer.write(then)
        rest = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    return head, rest


def _close_code(data: bytes) -> int:
    """The code of the close frame among the server's (unmasked) frames."""
    while data:
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        offset = 2
        if length == 126:
            length, offset = struct.unpack("!H", data[2:4])[0], 4
        payload = data[offset : offset + length]
        if opcode == 0x8:
            return int(struct.unpack("!H", payload[:2])[0])
        data = data[offset + length :]
    raise AssertionError("no close frame")


def _lines(log: str, needle: str) -> list[str]:
    return [line for line in log.splitlines() if needle in line]


async def test_invalid_utf8_from_200_clients_is_one_line_and_each_is_closed_1007(service: Service) -> None:
    token = mint_token(SECRET, ["*"], 3600)
    before = len(service.log())
    codes: list[int] = []
    for _ in range(10):  # 10 waves of 20 clients at once
        query = f"?channels=&token={token}"
        results = await asyncio.gather(
            *(_exchange(service.port, _handshake(query), _masked(0x1, b"\xff\xfe")) for _ in range(20))
        )
        for head, rest in results:
            assert head.startswith(b"HTTP/1.1 101")
            codes.append(_close_code(rest))
    assert codes == [1007] * 200
    log = service.log()[before:]
    assert "Traceback" not in log
    assert "ERROR" not in log
    mentions = _lines(log, "UTF-8")
    assert 1 <= len(mentions) <= 3, mentions


async def test_refused_handshakes_and_bad_requests_are_a_line_per_kind(service: Service) -> None:
    before = len(service.log())
    for query in ["?channels=x&token=forged"] * 60 + ["?channels=x"] * 60:
        head, _ = await _exchange(service.port, _handshake(query))
        assert head.split(b" ")[1] in (b"401", b"403")
    for _ in range(60):
        head, _ = await _exchange(service.port, b"\x16\x03\x01 not HTTP at all\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400")
    log = service.log()[before:]
    assert "Traceback" not in log and "ERROR" not in log
    assert "without completing handshake" not in log  # uvicorn's ERROR for every denial response
    assert 1 <= len(_lines(log, '" 403')) <= 2
    assert 1 <= len(_lines(log, '" 401')) <= 2
    assert len(_lines(log, '"WebSocket /ws')) <= 4  # nothing else names the refused handshakes
    assert 1 <= len(_lines(log, "invalid HTTP request")) <= 2


async def test_subscriptions_redis_cannot_confirm_are_one_line_and_never_acked_falsely(
    own_redis: PrivateRedis,
) -> None:
    with Service(own_redis.url, workers=1) as svc:
        await asyncio.to_thread(own_redis.stop)
        before = len(svc.log())
        clients = [await svc.connect(f"?channels=c{i}") for i in range(15)]
        await asyncio.to_thread(
            wait_until, lambda: "not confirmed by Redis" in svc.log()[before:], 30, 0.1, "the waiting line"
        )
        for ws in clients:  # no ack while Redis cannot confirm: it would be a promise not kept
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.2)
        await asyncio.to_thread(own_redis.start)
        for i, ws in enumerate(clients):  # restored when Redis is back, then acknowledged
            await recv_ack(ws, f"c{i}", timeout=30)
            await ws.close()
        log = svc.log()[before:]
    assert 1 <= len(_lines(log, "not confirmed by Redis")) <= 2, log


@pytest.mark.parametrize("name", ["%74oken", "t%6Fken", "%74%6F%6B%65%6E"])
async def test_a_percent_encoded_token_name_is_checked_and_never_logged(redis_server: PrivateRedis, name: str) -> None:
    secret_value = f"SECRET-{name.replace('%', '')}-9f3a"
    with Service(redis_server.url, workers=1, connect_secret=SECRET) as svc:
        head, body = await _exchange(svc.port, _handshake(f"?channels=news&{name}={secret_value}"))
        # The parser decodes the name: the value was checked as a token (403 invalid, not 401 missing).
        assert head.startswith(b"HTTP/1.1 403") and b"invalid connect token" in body
        wait_until(lambda: "WebSocket /ws?channels=news" in svc.log(), what="the refusal to be logged")
        assert svc.stop() == 0
        log = svc.log()
    assert f"{name}=***" in log
    assert secret_value not in log


def test_an_access_log_turned_on_shows_no_token(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=1, gunicorn_cmd_args="--access-logfile -") as svc:
        for query in ("?%74oken=SECRET-A-51c0", "?x=1&t%6Fken=SECRET-B-51c0", "?token=SECRET-C-51c0"):
            assert svc.get("/health" + query).status_code == 200
        wait_until(lambda: svc.log().count('"GET /health?') >= 3, what="three access lines")
        log = svc.log()
    assert "%74oken=***" in log and "t%6Fken=***" in log and "?token=***" in log
    assert "SECRET-" not in log


def test_redact_finds_the_token_by_its_decoded_name() -> None:
    for name in ("token", "%74oken", "t%6Fken", "%74%6F%6B%65%6E", "TOKEN", "%2574oken", "tok%65n"):
        for query in (f"{name}=S3CR3T", f"channels=a,b&{name}=S3CR3T&x=1", f"x=1;{name}=S3CR3T"):
            line = f'127.0.0.1:5 - "WebSocket /ws?{query}" 403'
            redacted = redact(line)
            assert "S3CR3T" not in redacted, line
            assert f"{name}=***" in redacted
    # A raw query may hold quotes and brackets: the whole value goes.
    for value in ('ab"cd', "ab'cd", "a<b>c"):
        assert redact(f"/ws?token={value}&x=1") == "/ws?token=***&x=1"
    # Everything else stays as it was.
    for line in ('"WebSocket /ws?channels=tokens&tokenx=1" 403', "is it? yes", "/ws?channels=a&token="):
        assert redact(line) == line
