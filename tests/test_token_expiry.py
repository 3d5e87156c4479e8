"""Connections do not outlive their connect token: closed with 3000 "token expired" at its exp, unless
the client refreshed it in time with {"op":"refresh","token":...}."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from scripts.redis_server import PrivateRedis
from service import wire
from service.gate import mint_token, verify_claims
from tests.support.clients import recv_ack, recv_acks, recv_json, recv_publication
from tests.support.servers import Service
from tests.support.waits import wait_until

SECRET = "connect-secret-expiry-41c2"


@pytest.fixture(scope="module")
def service(redis_server: PrivateRedis) -> Iterator[Service]:
    with Service(redis_server.url, workers=1, connect_secret=SECRET) as svc:
        yield svc


async def _connect(service: Service, channels: str, ttl: float) -> tuple[ClientConnection, int]:
    """A subscribed client whose token expires (exp is whole seconds) 1.5-2.5 s from now for ttl=2.5."""
    token = mint_token(SECRET, channels.split(","), ttl)
    ws = await service.connect(f"?channels={channels}&token={token}")
    await recv_acks(ws, channels.split(","), timeout=10)
    return ws, verify_claims(SECRET, token).exp


async def _closed(ws: ClientConnection, timeout: float = 15.0) -> tuple[int, str, float]:
    """Wait for the server's close, reading (and dropping) whatever comes first."""
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed) as caught:
        while time.monotonic() < deadline:
            await recv_json(ws, timeout=deadline - time.monotonic())
    closed_at = time.time()
    received = caught.value.rcvd
    assert received is not None, f"no close frame from the server: {caught.value!r}"
    return received.code, received.reason, closed_at


async def test_a_connection_is_closed_3000_when_its_token_expires(service: Service) -> None:
    ws, exp = await _connect(service, "news", ttl=2.5)
    assert service.publish("news", "before").status_code == 202
    assert await recv_publication(ws, 10) == {"channel": "news", "data": "before"}
    code, reason, closed_at = await _closed(ws)
    assert wire.Close(code, reason) == wire.TOKEN_EXPIRED == wire.Close(3000, "token expired")
    assert closed_at >= exp - 0.2  # not before the token's exp (clock granularity aside)
    counters = wait_until(
        lambda: (c := service.get("/health").json()["counters"])["token_expired_closed"] >= 1 and c,
        what="the expiry close to be counted",
    )
    assert counters["token_expired_closed"] >= 1
    wait_until(
        lambda: 'wsbroadcast_connections_closed_total{reason="token_expired"}' in service.get("/metrics").text
        and 'reason="token_expired"} 0.0' not in service.get("/metrics").text,
        what="the metric to count the expiry close",
    )


async def test_a_refreshed_connection_keeps_receiving_past_the_first_exp(service: Service) -> None:
    ws, first_exp = await _connect(service, "news,sport", ttl=2.5)
    fresh = mint_token(SECRET, ["news", "sport", "more"], 3600)
    await ws.send(f'{{"op":"refresh","token":"{fresh}"}}')
    assert await recv_json(ws, timeout=10) == {"op": "refreshed", "exp": verify_claims(SECRET, fresh).exp}
    wait_until(lambda: time.time() > first_exp + 1.5, timeout=10, what="the first token's exp to pass")
    assert service.publish("sport", "after").status_code == 202
    assert await recv_publication(ws, 10) == {"channel": "sport", "data": "after"}
    # The new token's channels apply: one it names that the first did not.
    await ws.send('{"op":"subscribe","channel":"more"}')
    await recv_ack(ws, "more", timeout=10)
    await ws.close()


async def test_a_bad_refresh_gets_an_error_frame_and_the_old_exp_still_closes(service: Service) -> None:
    ws, exp = await _connect(service, "news", ttl=2.5)
    forged = mint_token("not-the-secret", ["*"], 3600)
    narrower = mint_token(SECRET, ["sport"], 3600)  # valid, but not for the channel subscribed to
    expired = mint_token(SECRET, ["news"], 60, now=time.time() - 3600)
    for token, error, words in (
        (forged, "invalid_token", "invalid connect token"),
        (expired, "invalid_token", "expired"),
        (narrower, "forbidden_channel", "'news'"),
    ):
        await ws.send(f'{{"op":"refresh","token":"{token}"}}')
        reply = await recv_json(ws, timeout=10)
        assert reply["op"] == "error" and reply["error"] == error and words in reply["detail"], reply
        assert token not in reply["detail"]
    await ws.send('{"op":"refresh"}')
    assert (await recv_json(ws, timeout=10))["error"] == "invalid_frame"
    # Still connected and receiving under the old token...
    assert service.publish("news", "still").status_code == 202
    assert await recv_publication(ws, 10) == {"channel": "news", "data": "still"}
    # ...until its exp.
    code, reason, closed_at = await _closed(ws)
    assert (code, reason) == (3000, "token expired")
    assert closed_at >= exp - 0.2


async def test_without_connect_secret_a_refresh_gets_an_error_frame(
    redis_server: PrivateRedis,
) -> None:
    with Service(redis_server.url, workers=1) as open_service:
        ws = await open_service.connect("?channels=news")
        await recv_ack(ws, "news", timeout=10)
        await ws.send('{"op":"refresh","token":"anything"}')
        reply = await recv_json(ws, timeout=10)
        assert reply["error"] == "invalid_token" and "requires no connect token" in reply["detail"]
        await ws.close()
