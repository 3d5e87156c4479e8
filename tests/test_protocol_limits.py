"""What one connection may cost a worker: frame budgets, unread replies, request heads and bodies, fds."""

from __future__ import annotations

import asyncio
import resource
import socket
import time
from dataclasses import replace

import httpx
import psutil
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from scripts.attack import (
    OP_PING,
    RawClient,
    attack_big_header,
    attack_flood,
    attack_slow_body,
    attack_slow_head,
    client_frame,
)
from scripts.redis_server import PrivateRedis
from tests.support.clients import recv_publication, subscribe_client, worker_of
from tests.support.metrics import scrape, total
from tests.support.servers import Service
from tests.support.waits import async_wait_until, wait_until
from workers.limits import DEFAULT_LIMITS, FrameBudget

HOST = "127.0.0.1"


def _health(service: Service) -> dict:  # type: ignore[type-arg]
    return service.get("/health").json()  # type: ignore[no-any-return]


async def _still_receives(service: Service, ws: ClientConnection, channel: str, n: int = 3) -> None:
    for i in range(n):
        assert (await asyncio.to_thread(service.publish, channel, {"i": i})).status_code == 202
        assert await recv_publication(ws, 10) == {"channel": channel, "data": {"i": i}}


@pytest.mark.parametrize("kind", ["pong", "ping", "cont"])
async def test_a_flood_of_tiny_frames_is_closed_1008(redis_server: PrivateRedis, kind: str) -> None:
    with Service(redis_server.url, workers=1) as service:
        other = await subscribe_client(service, "news")
        pid = _health(service)["worker"]["pid"]
        outcome = await asyncio.to_thread(attack_flood, HOST, service.port, kind)
        assert outcome.answer == "close 1008", outcome
        assert outcome.seconds < 5.0, outcome
        assert outcome.details["worker"] == worker_of(other)
        await _still_receives(service, other, "news")
        health = _health(service)
        assert health["worker"]["pid"] == pid
        assert health["counters"]["abuse_closed"] == 1
        wait_until(lambda: _health(service)["connections"]["current"] == 1, what="the abuser to be gone")
        await other.close()
        assert "Traceback" not in service.log(), service.log()[-3000:]


async def test_a_legitimate_fragmented_message_passes_the_budget(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=1) as service:
        client = RawClient(HOST, service.port).handshake("/ws?channels=")
        text = b'{"op":"ping"}'
        parts = [client_frame(0x1, text[:1], fin=False)]
        parts += [client_frame(0x0, b"", fin=False) for _ in range(50)]
        parts += [client_frame(0x0, bytes([b]), fin=False) for b in text[1:-1]]
        parts.append(client_frame(0x0, text[-1:], fin=True))
        client.sock.sendall(b"".join(parts))
        opcode, payload = await asyncio.to_thread(client.read_frame)
        assert (opcode, payload) == (0x1, b'{"op":"pong"}')
        assert _health(service)["counters"]["abuse_closed"] == 0
        client.close()


async def test_pings_never_read_are_closed_4008_without_growing_memory(redis_server: PrivateRedis) -> None:
    queue_bytes = 262144
    with Service(
        redis_server.url,
        workers=1,
        queue_bytes=queue_bytes,
        send_buffer_bytes=65536,
        # The frame budget would close this client first: here it is the unread replies that count.
        client_frame_rate=1_000_000,
        client_frame_burst=1_000_000,
        client_bytes_rate=1 << 30,
    ) as service:
        other = await subscribe_client(service, "news")
        before = _health(service)
        client = RawClient(HOST, service.port).handshake()
        client.sock.settimeout(3.0)
        batch = client_frame(OP_PING, b"x" * 125) * 500
        sent = 0

        def send() -> None:
            nonlocal sent
            try:
                while sent < 200 << 20:
                    client.sock.sendall(batch)
                    sent += len(batch)
            except OSError:
                pass  # the worker stopped reading from us

        await asyncio.to_thread(send)
        assert sent < 100 << 20, "the worker kept reading pings whose pongs were never read"
        wait_until(lambda: _health(service)["counters"]["slow_closed"] == 1, 20, what="the slow-consumer close")
        # The worker's RSS now, not at its last memory check (/health's figure is up to a second old).
        growth = psutil.Process(before["worker"]["pid"]).memory_info().rss - before["memory"]["rss_bytes"]
        assert growth < queue_bytes + 8_000_000, growth
        assert _health(service)["worker"]["pid"] == before["worker"]["pid"]
        client.sock.settimeout(15.0)
        assert await asyncio.to_thread(client.close_code) in (4008, None)  # read in time, or aborted
        client.close()
        await _still_receives(service, other, "news")
        await other.close()
        assert "Traceback" not in service.log(), service.log()[-3000:]


async def test_a_huge_header_gets_431_and_the_worker_survives(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=1) as service:
        other = await subscribe_client(service, "news")
        pid = _health(service)["worker"]["pid"]
        outcome = await asyncio.to_thread(attack_big_header, HOST, service.port, 100_000)
        assert outcome.answer == "HTTP 431", outcome
        # Just under the limit is fine.
        ok = await asyncio.to_thread(
            httpx.get, service.base + "/health", headers={"X-Fill": "a" * 15000}, timeout=10
        )
        assert ok.status_code == 200
        assert _health(service)["worker"]["pid"] == pid
        await _still_receives(service, other, "news")
        wait_until(lambda: total(scrape(service), "wsbroadcast_http_rejected_total", reason="headers_too_big") == 1,
                   what="the rejection in /metrics")
        await other.close()


async def test_a_slow_handshake_is_cut_after_the_handshake_timeout(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=1, handshake_timeout=1.5) as service:
        outcome = await asyncio.to_thread(attack_slow_head, HOST, service.port, 20.0)
        assert outcome.answer.startswith("HTTP/1.1 408"), outcome
        assert 1.2 < outcome.seconds < 6.0, outcome
        wait_until(lambda: total(scrape(service), "wsbroadcast_http_rejected_total", reason="head_timeout") == 1,
                   what="the rejection in /metrics")
        # A connection that never sends a byte is freed too.
        idle = socket.create_connection((HOST, service.port), timeout=10)
        started = time.monotonic()
        assert idle.recv(65536).startswith(b"HTTP/1.1 408")
        assert time.monotonic() - started < 6.0
        idle.close()


async def test_half_open_handshakes_are_capped(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=1, max_handshakes=5, handshake_timeout=30) as service:
        held = [socket.create_connection((HOST, service.port), timeout=10) for _ in range(5)]
        for sock in held:
            sock.sendall(b"GET /ws HTTP/1.1\r\n")

        def sixth() -> bytes:
            sock = socket.create_connection((HOST, service.port), timeout=10)
            try:
                return sock.recv(65536)
            finally:
                sock.close()

        answer = wait_until(lambda: sixth(), what="the sixth connection's answer")
        assert answer.startswith(b"HTTP/1.1 503"), answer
        for sock in held:
            sock.close()
        # Slots freed are slots offered again.
        ws = await async_wait_until(lambda: _try_subscribe(service), what="a handshake to pass again")
        await ws.close()


async def _try_subscribe(service: Service) -> ClientConnection | None:
    try:
        return await subscribe_client(service, "a")
    except (InvalidStatus, OSError):
        return None


async def test_a_never_ending_body_gets_408(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=1, body_timeout=1.5) as service:
        outcome = await asyncio.to_thread(attack_slow_body, HOST, service.port, "test-token", 20.0)
        assert outcome.answer.startswith("HTTP/1.1 408"), outcome
        assert 1.2 < outcome.seconds < 6.0, outcome
        assert _health(service)["counters"]["http_rejected_body_timeout"] == 1
        assert service.publish("news", 1).status_code == 202


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


async def test_out_of_file_descriptors_refusals_are_503(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=1, preexec_fn=_low_nofile) as service:
        clients: list[ClientConnection] = []
        refused = None
        try:
            for _ in range(400):
                try:
                    clients.append(await service.connect("?channels=a"))
                except InvalidStatus as exc:
                    refused = exc
                    break
            assert refused is not None, "400 connections admitted with 256 file descriptors"
            assert refused.response.status_code == 503
            assert 100 < len(clients) < 256
            # More refusals stay answers, not resets; health still answers.
            for _ in range(20):
                with pytest.raises(InvalidStatus) as again:
                    await service.connect("?channels=a")
                assert again.value.response.status_code == 503
            assert service.get("/health").status_code == 200
            assert _health(service)["connections"]["current"] == len(clients)
        finally:
            for ws in clients:
                await ws.close()
        log = service.log()
        assert "Traceback" not in log, log[-3000:]
        assert "RLIMIT_NOFILE is 256" in log


def _budget(frames: int) -> FrameBudget:
    limits = replace(DEFAULT_LIMITS, frame_rate=1e-9, frame_burst=frames, bytes_rate=1e-9, bytes_burst=1 << 30)
    return FrameBudget(limits, now=0.0)


def test_the_frame_budget_follows_frames_across_reads() -> None:
    frames = [client_frame(0x9), client_frame(0x1, b"x" * 125), client_frame(0x1, b"y" * 126),
              client_frame(0x2, b"z" * 70000), client_frame(0xA, b"p" * 3), client_frame(0x0, b"", fin=True)]
    stream = b"".join(frames)
    for cut in [*range(0, 300), *range(len(stream) - 40, len(stream))]:
        reads = [stream[:cut], stream[cut:]]
        exact = _budget(len(frames))
        assert all(exact.charge(r, 0.0) for r in reads), cut
        short = _budget(len(frames) - 1)
        assert not all(short.charge(r, 0.0) for r in reads), cut


def test_the_frame_budget_charges_bytes() -> None:
    limits = replace(DEFAULT_LIMITS, frame_rate=1e6, frame_burst=1 << 20, bytes_rate=1000.0, bytes_burst=10_000)
    budget = FrameBudget(limits, now=0.0)
    assert budget.charge(client_frame(0x1, b"a" * 9000), 0.0)
    assert not budget.charge(client_frame(0x1, b"a" * 2000), 0.0)
    refilled = FrameBudget(limits, now=0.0)
    assert refilled.charge(client_frame(0x1, b"a" * 9000), 0.0)
    assert refilled.charge(client_frame(0x1, b"a" * 2000), 2.0)  # 2 s later: 2000 bytes more


async def test_a_connection_storm_short_of_file_descriptors_meets_503_not_resets(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=1, preexec_fn=_low_nofile) as service:
        held: list[ClientConnection] = []
        outcomes: dict[str, int] = {}

        async def one() -> None:
            try:
                held.append(await service.connect("?channels=a"))
                key = "101"
            except InvalidStatus as exc:
                key = str(exc.response.status_code)
            except Exception as exc:  # a reset or an EOF: what must not happen
                key = type(exc).__name__
            outcomes[key] = outcomes.get(key, 0) + 1

        try:
            await asyncio.gather(*(one() for _ in range(600)))
            assert set(outcomes) <= {"101", "503"}, outcomes
            assert outcomes.get("503", 0) > 0, outcomes
            assert (await asyncio.to_thread(service.get, "/health")).status_code == 200
        finally:
            for ws in held:
                await ws.close()
        assert "Traceback" not in service.log(), service.log()[-3000:]
