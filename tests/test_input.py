"""Bad input: each gets a clear answer, and the connection or worker keeps its state.

Client frames, handshakes, POST /publish and payloads published straight into Redis, against a
real gunicorn worker; plus a property test of the client-frame parser.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus

from scripts.redis_server import PrivateRedis
from service import wire
from tests.support.clients import recv_ack, recv_json, recv_publication, subscribe_client
from tests.support.metrics import scrape, total
from tests.support.servers import Service
from tests.support.waits import wait_until

MAX_BYTES = 4096


@pytest.fixture(scope="module")
def service(redis_server: PrivateRedis) -> Iterator[Service]:
    limits: dict[str, Any] = {
        "max_message_bytes": MAX_BYTES,
        "max_channels_per_connection": 3,
        "client_rate_limit": 20,
        "client_rate_burst": 40,
    }
    with Service(redis_server.url, workers=1, **limits) as svc:
        yield svc


async def close_code(ws: Any, timeout: float = 10.0) -> int | None:
    """Read until the server closes; the close code it sent."""
    with pytest.raises(ConnectionClosed) as closed:
        for _ in range(1000):
            await asyncio.wait_for(ws.recv(), timeout)
    return closed.value.rcvd.code if closed.value.rcvd is not None else None


# --- client frames -------------------------------------------------------------------------------


async def test_each_bad_frame_gets_an_error_and_the_connection_keeps_its_state(service: Service) -> None:
    ws = await subscribe_client(service, "news,sport")
    for frame, code in [
        ("not json", "invalid_json"),
        ("[1,2]", "invalid_frame"),
        ('{"channel":"news"}', "invalid_frame"),
        ('{"op":"dance"}', "unknown_op"),
        ('{"op":"subscribe"}', "invalid_frame"),
        ('{"op":"unsubscribe","channel":7}', "invalid_frame"),
        ('{"op":"subscribe","channel":"bad name!"}', "invalid_channel"),
        ('{"op":"subscribe","channel":"' + "x" * 129 + '"}', "invalid_channel"),
        ('{"op":"unsubscribe","channel":"never"}', "not_subscribed"),
    ]:  # nine: one short of the abuse limit, so the connection must survive them all
        await ws.send(frame)
        reply = await recv_json(ws)
        assert reply["op"] == "error" and reply["error"] == code, (frame, reply)
        assert reply["detail"], reply
    # Its subscriptions are intact and it still works.
    assert service.publish("sport", "goal").status_code == 202
    assert await recv_publication(ws) == {"channel": "sport", "data": "goal"}
    await ws.send('{"op":"ping"}')
    assert await recv_json(ws) == {"op": "pong"}
    await ws.close()


async def test_binary_frame_is_refused_with_an_error(service: Service) -> None:
    ws = await subscribe_client(service, "news")
    await ws.send(b'{"op":"ping"}')
    reply = await recv_json(ws)
    assert reply["error"] == "binary_not_supported"
    assert service.publish("news", 1).status_code == 202
    assert await recv_publication(ws) == {"channel": "news", "data": 1}
    await ws.close()


async def test_ten_invalid_frames_close_1008(service: Service) -> None:
    ws = await subscribe_client(service, "news")
    for _ in range(10):
        await ws.send("nope")
    codes = []
    for _ in range(10):
        codes.append((await recv_json(ws))["error"])
    assert codes == ["invalid_json"] * 10
    assert (await recv_json(ws))["error"] == "too_many_errors"
    assert await close_code(ws) == 1008


async def test_frame_over_max_message_bytes_closes_1009(service: Service) -> None:
    ws = await subscribe_client(service, "news")
    other = await subscribe_client(service, "news")
    await ws.send('{"op":"ping","pad":"' + "x" * MAX_BYTES + '"}')
    assert await close_code(ws) == 1009
    # The worker is unaffected.
    assert service.publish("news", "ok").status_code == 202
    assert await recv_publication(other) == {"channel": "news", "data": "ok"}
    await other.close()


async def test_frame_flood_is_rate_limited_then_closed_1008(service: Service) -> None:
    ws = await subscribe_client(service, "news")
    # 200 pings back to back against 20/s with bursts of 40.
    for _ in range(200):
        try:
            await ws.send('{"op":"ping"}')
        except ConnectionClosed:
            break
    replies = []
    with pytest.raises(ConnectionClosed) as closed:
        for _ in range(300):
            replies.append(orjson.loads(await asyncio.wait_for(ws.recv(), 10)))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    pongs = [r for r in replies if r == {"op": "pong"}]
    assert 40 <= len(pongs) < 60, len(pongs)  # the burst, and a few refilled tokens
    assert replies[-1]["error"] == "rate_limited"
    health = service.get("/health").json()
    assert health["counters"]["abuse_closed"] >= 1


async def test_too_many_subscriptions_are_refused_and_the_rest_kept(service: Service) -> None:
    ws = await subscribe_client(service, "a,b,c")
    await ws.send('{"op":"subscribe","channel":"d"}')
    reply = await recv_json(ws)
    assert reply["error"] == "too_many_channels" and "3" in reply["detail"]
    await ws.send('{"op":"unsubscribe","channel":"a"}')
    assert await recv_json(ws) == {"op": "unsubscribed", "channel": "a"}
    await ws.send('{"op":"subscribe","channel":"d"}')
    await recv_ack(ws, "d")
    assert service.publish("d", "dee").status_code == 202
    assert await recv_publication(ws) == {"channel": "d", "data": "dee"}
    await ws.close()


# --- handshakes ------------------------------------------------------------------------------------


async def test_unknown_path_is_refused_at_the_handshake(service: Service) -> None:
    from websockets.asyncio.client import connect

    with pytest.raises(InvalidStatus) as refused:
        await connect(f"{service.ws_base}/nope", open_timeout=10)
    assert refused.value.response.status_code in (403, 404)
    assert service.get("/nope").status_code == 404


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("?channels=bad%20name", "invalid_channel"),
        ("?channels=%ZZ", "invalid_channel"),
        ("?channels=" + "x" * 200, "invalid_channel"),
        ("?channels=a,b,c,d", "too_many_channels"),
    ],
)
async def test_bad_query_string_gets_an_error_frame_then_1008(service: Service, query: str, code: str) -> None:
    ws = await service.connect(query)
    reply = await recv_json(ws)
    assert reply["op"] == "error" and reply["error"] == code, reply
    assert await close_code(ws) == 1008


async def test_garbage_query_string_keys_are_ignored(service: Service) -> None:
    ws = await service.connect("?&&=x&junk&channels=news,,news")
    await recv_ack(ws, "news")
    await ws.send('{"op":"ping"}')
    assert await recv_json(ws) == {"op": "pong"}  # news once, nothing else
    await ws.close()


# --- POST /publish ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "headers", "status", "says"),
    [
        (b"{not json", {}, 400, "not valid JSON"),
        (b"[1,2]", {}, 400, "exactly"),
        (b'{"channel":"news"}', {}, 400, "exactly"),
        (b'{"channel":"news","data":1,"extra":2}', {}, 400, "exactly"),
        (b'{"channel":"bad name","data":1}', {}, 400, "channel names"),
        (b'{"channel":5,"data":1}', {}, 400, "channel names"),
        (b'{"channel":"news","data":1}', {"Content-Type": "text/plain"}, 415, "application/json"),
        (b'{"channel":"news","data":"' + b"x" * MAX_BYTES + b'"}', {}, 413, "MAX_MESSAGE_BYTES"),
        (b'{"channel":"news","data":1}', {"Authorization": ""}, 401, "missing bearer"),
        (b'{"channel":"news","data":1}', {"Authorization": "Basic dGVzdA=="}, 401, "missing bearer"),
        (b'{"channel":"news","data":1}', {"Authorization": "Bearer wrong"}, 403, "wrong bearer"),
    ],
)
def test_publish_rejects_bad_requests_with_a_clear_answer(
    service: Service, body: bytes, headers: dict[str, str], status: int, says: str
) -> None:
    sent = {"Content-Type": "application/json", "Authorization": "Bearer test-token", **headers}
    response = httpx.post(service.base + "/publish", content=body, headers=sent, timeout=10)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]


def test_publish_oversized_streamed_body_is_413(service: Service) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"channel":"news","data":"'
        for _ in range(10):
            yield b"x" * 1024
        yield b'"}'

    response = httpx.post(
        service.base + "/publish",
        content=chunks(),  # chunked: no Content-Length to refuse on, the stream is cut at the limit
        headers={"Content-Type": "application/json", "Authorization": "Bearer test-token"},
        timeout=10,
    )
    assert response.status_code == 413


def test_publish_without_token_configured_says_how_to_enable_it(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=1, publish_token="") as svc:
        response = svc.publish("news", 1, token="anything")
        assert response.status_code == 403
        assert "set PUBLISH_TOKEN" in response.json()["error"]


# --- payloads published straight into Redis -------------------------------------------------------


async def test_bad_payloads_from_redis_are_dropped_counted_logged_once(
    service: Service, redis_server: PrivateRedis
) -> None:
    ws = await subscribe_client(service, "raw")
    before = service.get("/health").json()["counters"]["invalid_payloads"]
    bad = [
        b'{"channel":"raw","data":"\xff\xfe"}',  # not UTF-8
        b"\xc3\x28",
        orjson.dumps({"channel": "raw", "data": "y" * MAX_BYTES}),  # oversized
        b'{"channel":"admin","data":"obey"}',  # not naming the channel it came on: spoofed
        b"hello not json",
        b"[1,2,3]",
        b'{"channel":"raw","data":1,"channel":"admin"}',  # the last duplicate wins in every parser
        b'{"data":1}',
        b'{"channel":"raw","data":1} trailing',
    ]
    good = b'{"channel":"raw","data":"fine"}'
    raw = redis.Redis.from_url(redis_server.url)
    try:
        for payload in [*bad, good]:
            assert raw.publish(f"{service.prefix}raw", payload) == 1
    finally:
        raw.close()
    # The listener kept going: the valid one arrives, and nothing before it did.
    assert await asyncio.wait_for(ws.recv(decode=False), 10) == good
    counters = wait_until(
        lambda: (c := service.get("/health").json()["counters"])["invalid_payloads"] >= before + len(bad) and c,
        10,
        what="the drops counted",
    )
    assert counters["invalid_payloads"] == before + len(bad)
    wait_until(
        lambda: total(scrape(service), "wsbroadcast_invalid_publications_total") == before + len(bad),
        10,
        what="the drops in /metrics",
    )
    # One warning per interval, however many were dropped.
    assert service.log().count("dropped a publication from Redis") == 1, service.log()[-3000:]
    await ws.close()


# --- the parser never raises ------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    # The stdlib encoder, not orjson: it also writes what orjson refuses (ints beyond 64 bits,
    # Infinity), which the parser must survive too.
    return json.dumps(value, ensure_ascii=False)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_frames = st.fixed_dictionaries(
    {},
    optional={
        "op": st.sampled_from(["subscribe", "unsubscribe", "ping", "pong", ""]) | _json_values,
        "channel": st.from_regex(r"[A-Za-z0-9_.:-]{1,130}", fullmatch=True) | _json_values,
    },
).map(_dumps)
_any_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=300)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_any_text, _frames, _json_values.map(_dumps)))
def test_parse_client_frame_never_raises(text: str) -> None:
    result = wire.parse_client_frame(text)
    assert isinstance(result, wire.ClientOp | wire.ClientError)
    if isinstance(result, wire.ClientOp):
        assert result.op in ("subscribe", "unsubscribe", "ping")
    else:
        assert result.code and result.detail


@pytest.mark.parametrize(
    "text",
    ["\ud800", '{"op":"\ud800"}', "[" * 5000 + "]" * 5000, '{"op":"subscribe","channel":"\x00"}', "", " ", "\x00"],
)
def test_parse_client_frame_edge_cases(text: str) -> None:
    assert isinstance(wire.parse_client_frame(text), wire.ClientError)
