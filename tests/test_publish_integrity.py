"""The publisher's bytes reach subscribers unchanged; frames from Redis are checked; idempotent publishing.

Real Redis, a real service (gunicorn), real WebSocket clients.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from redis.asyncio import Redis as AsyncRedis
from websockets.asyncio.client import ClientConnection

from scripts.redis_server import PrivateRedis
from service.publication import MAX_DEPTH, InvalidPublication, split_body
from service.publisher import IdempotencyConflict, Refused, Unknown, publish, publish_sync
from tests.support.clients import recv_publication, subscribe_client
from tests.support.commands import command
from tests.support.servers import Service
from tests.support.waits import wait_until

HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer test-token"}

# Data as a publisher may write it: each must arrive byte for byte.
EXACT = [
    b"123456789012345678901234567890",
    b"1.0000000000000000000001",
    b'{"a":1,"a":2}',
    b'"caf\\u00e9 \\ud83d\\ude00 \\"quoted\\" \\/"',
    b'{ "spaced" : [ 1 ,\n\t2 ] ,  "x" : null }',
    '"déjà vu"'.encode(),
    b"-0.0e-0",
]


@pytest.fixture(scope="module")
def service(redis_server: PrivateRedis) -> Iterator[Service]:
    with Service(redis_server.url, workers=1) as svc:
        yield svc


def _post(service: Service, body: bytes, path: str = "/publish", **headers: str) -> httpx.Response:
    return httpx.post(service.base + path, content=body, headers={**HEADERS, **headers}, timeout=30)


async def _next_raw(ws: ClientConnection, timeout: float = 10) -> bytes:
    frame = await asyncio.wait_for(ws.recv(decode=False), timeout)
    assert isinstance(frame, bytes)
    return frame


_FRAME = re.compile(rb'\{"channel":"([^"]+)","offset":[1-9][0-9]*,"epoch":"[0-9a-f]+","data":(.*)\}', re.S)


def _data(frame: bytes, channel: str) -> bytes:
    """The data bytes of a publication frame, checked to be the publish function's frame on ``channel``."""
    match = _FRAME.fullmatch(frame)
    assert match is not None, frame
    assert match.group(1) == channel.encode(), frame
    return match.group(2)


# --- the publisher's bytes -------------------------------------------------------------------------


async def test_post_publish_forwards_data_byte_for_byte(service: Service) -> None:
    ws = await subscribe_client(service, "exact")
    for data in EXACT:
        bodies = [
            b'{"channel":"exact","data":' + data + b"}",
            b' {\n "channel" : "exact" ,\t"data" :  ' + data + b"  }\n",
            b'{"data":' + data + b',"channel":"exact"}',  # members in the other order
            b'{"ch\\u0061nnel":"\\u0065xact","data":' + data + b"}",  # escaped key and channel
        ]
        for body in bodies:
            response = await asyncio.to_thread(_post, service, body)
            assert response.status_code == 202, response.text
            doc = response.json()
            assert (doc["channel"], doc["workers"], doc["epoch"]) == ("exact", 1, doc["epoch"])
            assert isinstance(doc["offset"], int) and doc["offset"] > 0
            assert _data(await _next_raw(ws), "exact") == data, body
        response = await asyncio.to_thread(_post, service, b" " + data + b"\n", "/publish/exact")
        assert response.status_code == 202, response.text
        assert _data(await _next_raw(ws), "exact") == data
    await ws.close()


@pytest.mark.parametrize(
    ("body", "path", "says"),
    [
        (b'{"channel":"deep","data":' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}", "/publish", ""),
        (b'{"channel":"deep","data":' + b"[" * 254 + b"]" * 254 + b"}", "/publish", "nests too deep"),
        (b'{"channel":"deep","data":' + b"[" * 1023 + b"]" * 1023 + b"}", "/publish", "nests too deep"),
        (b'{"channel":"deep","data":' + b'{"a":' * 600 + b"1" + b"}" * 600 + b"}", "/publish", "nests too deep"),
        (b'{"channel":"deep","data":' + b"[" * 5000 + b"]" * 5000 + b"}", "/publish", "nests too deep"),
        (b'{"data":' + b"[" * 300 + b"]" * 300 + b',"channel":"deep"}', "/publish", "nests too deep"),
        (b"[" * 300 + b"]" * 300, "/publish/deep", "nests too deep"),
        (b"[" * 5000 + b"]" * 5000, "/publish/deep", "nests too deep"),
        (b'{"channel":"deep","data":{"a":1,}}', "/publish", "not valid JSON"),
        (b'{"channel":"deep","data":NaN}', "/publish", "not valid JSON"),
        (b'{"channel":"deep","data":1,"data":2}', "/publish", "duplicate member 'data'"),
        (b'{"channel":"deep","channel":"other","data":2}', "/publish", "duplicate member 'channel'"),
        (b'{"channel":"deep","data":}', "/publish", "not valid JSON"),
        (b"{nope", "/publish/deep", "not valid JSON"),
        (b"", "/publish/deep", "not valid JSON"),
        (b"1", "/publish/bad%20name", "channel names"),
    ],
)
def test_deep_or_bad_json_is_400_with_a_clear_message(service: Service, body: bytes, path: str, says: str) -> None:
    response = _post(service, body, path)
    if not says:  # the deepest allowed is published
        assert response.status_code == 202, response.text
        return
    assert response.status_code == 400, response.text
    assert says in response.json()["error"], response.text


def test_split_body_finds_the_exact_span() -> None:
    assert split_body(b'{"channel":"a","data":[1 , 2]}') == ("a", b"[1 , 2]")
    assert split_body(b'{"data":"}","channel":"a"}') == ("a", b'"}"')
    assert split_body(b'{"channel":"a","data":{"channel":"b","data":1}}') == ("a", b'{"channel":"b","data":1}')
    for bad in (b'{"channel":"a","data":1} x', b'{"channel":"a","data":1,"extra":1}', b'["channel","data"]'):
        with pytest.raises(InvalidPublication):
            split_body(bad)


def test_a_publisher_leaving_mid_body_is_no_error(service: Service) -> None:
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
            sock.sendall(
                b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer test-token\r\nContent-Length: 1000\r\n\r\n" + b'{"channel":"x","data":"'
            )
    # The service keeps serving, and the log has no ERROR and no traceback for it.
    wait_until(lambda: service.get("/health").status_code == 200, 10, what="health")
    assert _post(service, b'{"channel":"x","data":1}').status_code == 202
    log = service.log()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


# --- idempotent publishing -------------------------------------------------------------------------------


async def test_same_idempotency_key_publishes_once_and_replays_the_answer(service: Service) -> None:
    ws = await subscribe_client(service, "idem")
    body = b'{"channel":"idem","data":{"order":42}}'
    first = await asyncio.to_thread(_post, service, body, **{"Idempotency-Key": "order-42"})
    second = await asyncio.to_thread(_post, service, body, **{"Idempotency-Key": "order-42"})
    assert first.status_code == second.status_code == 202, (first.text, second.text)
    assert first.json() == second.json()
    assert (first.json()["channel"], first.json()["workers"], first.json()["offset"]) == ("idem", 1, 1)
    assert "idempotent-replay" not in first.headers
    assert second.headers["idempotent-replay"] == "true"
    other = await asyncio.to_thread(_post, service, body, **{"Idempotency-Key": "order-43"})
    assert other.status_code == 202 and "idempotent-replay" not in other.headers
    # Raw form, same key space: a replay too.
    key = {"Idempotency-Key": "order-42"}
    raw_form = await asyncio.to_thread(_post, service, b'{"order":42}', "/publish/idem", **key)
    assert raw_form.headers.get("idempotent-replay") == "true", raw_form.text
    reused = await asyncio.to_thread(
        _post, service, b'{"channel":"idem","data":"else"}', **{"Idempotency-Key": "order-42"}
    )
    assert reused.status_code == 422 and "different publication" in reused.json()["error"]
    marker = await asyncio.to_thread(_post, service, b'{"channel":"idem","data":"end"}')
    assert marker.status_code == 202
    got = [await _next_raw(ws) for _ in range(3)]
    # order-42 once, 43 once
    assert [_data(frame, "idem") for frame in got] == [b'{"order":42}', b'{"order":42}', b'"end"']
    counters = service.get("/health").json()["counters"]
    assert counters["publish_replays"] >= 2
    await ws.close()


@pytest.mark.parametrize("key", ["", "x" * 201, "caf\u00e9", "tab\there"])
def test_invalid_idempotency_key_is_400(service: Service, key: str) -> None:
    response = httpx.post(
        service.base + "/publish",
        content=b'{"channel":"idem","data":1}',
        headers=[(k.encode(), v.encode()) for k, v in HEADERS.items()] + [(b"Idempotency-Key", key.encode())],
        timeout=30,
    )
    assert response.status_code == 400, response.text
    assert "Idempotency-Key" in response.json()["error"]


async def test_python_publisher_and_cli_forward_bytes_and_honour_idempotency_keys(
    service: Service, redis_server: PrivateRedis
) -> None:
    ws = await subscribe_client(service, "api")
    client = redis.Redis.from_url(redis_server.url)
    try:
        data = b'{"big":123456789012345678901234567890, "big":1}'
        first = publish_sync(client, "api", data, prefix=service.prefix, idempotency_key="k1")
        again = publish_sync(client, "api", data, prefix=service.prefix, idempotency_key="k1")
        assert (first.workers, first.replay, again.workers, again.replay) == (1, False, 1, True)
        assert (again.offset, again.epoch) == (first.offset, first.epoch)
        with pytest.raises(InvalidPublication):
            publish_sync(client, "api", b"[" * 300 + b"]" * 300, prefix=service.prefix)
    finally:
        client.close()
    aclient = AsyncRedis.from_url(redis_server.url)
    try:
        published = await publish(aclient, "api", "1.50", prefix=service.prefix)
        assert (published.workers, published.offset, published.replay) == (1, first.offset + 1, False)
        with pytest.raises(IdempotencyConflict):  # k1 belongs to another publication
            await publish(aclient, "api", "1.50", prefix=service.prefix, idempotency_key="k1")
    finally:
        await aclient.aclose()
    assert _data(await _next_raw(ws), "api") == data
    assert _data(await _next_raw(ws), "api") == b"1.50"

    env = {**os.environ, "REDIS_URL": redis_server.url, "REDIS_PREFIX": service.prefix, "PUBLISH_TOKEN": "test-token"}
    for via in ([], ["--http", service.base]):
        args = ["api", ' {"n": 1.10} ', "--idempotency-key", f"cli-{len(via)}", *via]
        runs = [await asyncio.to_thread(command, "publish", *args, env=env) for _ in range(2)]
        assert [r.returncode for r in runs] == [0, 0], [r.stdout + r.stderr for r in runs]
        assert "replay" in runs[1].stdout and "replay" not in runs[0].stdout
        assert _data(await _next_raw(ws), "api") == b'{"n": 1.10}'
    bad = await asyncio.to_thread(command, "publish", "api", "[" * 300 + "]" * 300, env=env)
    assert bad.returncode == 2 and "nests too deep" in bad.stderr
    assert service.publish("api", "end").status_code == 202
    assert await recv_publication(ws) == {"channel": "api", "data": "end"}  # no second copy before it
    await ws.close()


# --- refused or unknown ---------------------------------------------------------------------------------


async def test_a_stalled_redis_answers_unknown_and_a_stopped_one_refused(own_redis: PrivateRedis) -> None:
    # Canary and heartbeat quiet: they must not take the pool's warm connection during the stall.
    settings: dict[str, Any] = {"redis_command_timeout": 0.5, "canary_interval": 3600, "heartbeat_interval": 3600}
    with Service(own_redis.url, workers=1, **settings) as service:
        ws = await subscribe_client(service, "stall")
        key = {"Idempotency-Key": "stalled-1"}
        body = b'{"channel":"stall","data":"during the stall"}'
        # With a key, so that Redis has the script cached: EVALSHA in the stall must not meet NOSCRIPT.
        warm = await asyncio.to_thread(_post, service, b'{"channel":"stall","data":"warm"}', **{"Idempotency-Key": "w"})
        assert warm.status_code == 202
        assert _data(await _next_raw(ws), "stall") == b'"warm"'
        assert own_redis.process is not None
        api = redis.Redis.from_url(own_redis.url, socket_timeout=0.5)
        assert publish_sync(api, "stall", b'"api warm"', prefix=service.prefix, idempotency_key="aw").workers == 1
        assert _data(await _next_raw(ws), "stall") == b'"api warm"'
        os.kill(own_redis.process.pid, signal.SIGSTOP)
        try:
            stalled = await asyncio.to_thread(_post, service, body, **key)
            with pytest.raises(Unknown):
                publish_sync(api, "stall", b'"api stalled"', prefix=service.prefix, idempotency_key="a1")
        finally:
            os.kill(own_redis.process.pid, signal.SIGCONT)
        assert stalled.status_code == 503, stalled.text
        assert stalled.headers["retry-after"] == "1"
        doc = stalled.json()
        assert doc["published"] == "unknown", doc
        assert "same Idempotency-Key is safe" in doc["error"]
        # Both were in fact published once Redis ran again: "unknown" was the truth. They came on
        # two connections, which a resumed Redis serves in either order.
        after = {_data(await _next_raw(ws), "stall"), _data(await _next_raw(ws), "stall")}
        assert after == {b'"during the stall"', b'"api stalled"'}, after
        replayed = publish_sync(api, "stall", b'"api stalled"', prefix=service.prefix, idempotency_key="a1")
        assert (replayed.workers, replayed.replay) == (1, True)
        retry = await asyncio.to_thread(_post, service, body, **key)
        assert retry.status_code == 202 and retry.headers["idempotent-replay"] == "true", retry.text
        assert (await asyncio.to_thread(_post, service, b'{"channel":"stall","data":"next"}')).status_code == 202
        assert _data(await _next_raw(ws), "stall") == b'"next"'  # the retry published nothing

        await asyncio.to_thread(own_redis.stop)
        with pytest.raises(Refused):
            publish_sync(api, "stall", b'"lost"', prefix=service.prefix, idempotency_key="a2")
        api.close()
        for _ in range(3):
            refused = await asyncio.to_thread(_post, service, b'{"channel":"stall","data":"lost"}', **key)
            assert refused.status_code == 503, refused.text
            assert refused.json()["published"] is False
            assert "nothing was published" in refused.json()["error"]
        counters = service.get("/health").json()["counters"]
        assert counters["publish_unknown"] == 1 and counters["publish_refused"] == 3, counters
        log = service.log()
        assert log.count("failed, nothing published") == 1, log[-3000:]  # one line per interval
        assert "Traceback" not in log
        await ws.close()
