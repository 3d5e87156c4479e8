"""Security: the publish token compared in constant time, signed connect tokens, the origin
allow-list, and no secret in /health, heartbeats, logs or error frames."""

from __future__ import annotations

import hmac
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis
from websockets.exceptions import ConnectionClosed, InvalidStatus

from scripts.redis_server import PrivateRedis
from service.app import create_app
from service.config import Settings
from service.gate import TokenError, mint_token, verify_token
from tests.support.clients import recv_ack, recv_json, recv_publication
from tests.support.commands import command
from tests.support.servers import Service
from tests.support.waits import wait_until

SECRET = "connect-secret-5f1c9a"
ORIGIN = "https://app.example"


def token_cli(*args: str, secret: str = SECRET) -> subprocess.CompletedProcess[str]:
    """The token command as users run it (scripts/token is a shim for this)."""
    env = {**os.environ, "CONNECT_SECRET": secret}
    return command("token", *args, env=env, timeout=30)


def minted(channels: str, ttl: str = "3600") -> str:
    done = token_cli("--channels", channels, "--ttl", ttl)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def refused(service: Service, query: str, **kwargs: Any) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as caught:
        ws = await service.connect(query, **kwargs)
        await ws.close()
    response = caught.value.response
    return response.status_code, response.body.decode() if response.body else ""


# --- PUBLISH_TOKEN -------------------------------------------------------------------------------


async def test_publish_token_is_compared_with_hmac_compare_digest(
    redis_server: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The comparison goes through hmac.compare_digest (constant time), for every presented token."""
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the module service.app calls through
    settings = Settings(redis_url=redis_server.url, publish_token="the-real-token")
    # In process and without the lifespan: a refusal never reaches Redis.
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for presented in ("x", "the-real-toke", "the-real-tokenX", "THE-REAL-TOKEN"):
            response = await client.post(
                "/publish", json={"channel": "a", "data": 1}, headers={"Authorization": f"Bearer {presented}"}
            )
            assert response.status_code == 403
    assert [bytes(a) for a, _ in calls] == [b"x", b"the-real-toke", b"the-real-tokenX", b"THE-REAL-TOKEN"]
    assert all(bytes(b) == b"the-real-token" for _, b in calls)


# --- connect tokens ---------------------------------------------------------------------------------


def test_token_helpers_sign_expire_and_name_channels() -> None:
    token = mint_token(SECRET, ["news", "sport"], 60)
    assert verify_token(SECRET, token) == {"news", "sport"}
    with pytest.raises(TokenError, match="invalid"):
        verify_token("another-secret", token)
    with pytest.raises(TokenError, match="invalid"):
        verify_token(SECRET, token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1])
    with pytest.raises(TokenError, match="expired"):
        verify_token(SECRET, mint_token(SECRET, ["news"], 60, now=1000.0))
    with pytest.raises(TokenError, match="invalid channel"):
        mint_token(SECRET, ["no spaces"], 60)


def test_token_command() -> None:
    token = minted("news,sport", "120")
    assert verify_token(SECRET, token) == {"news", "sport"}
    missing = token_cli("--channels", "news", secret="")
    assert missing.returncode == 2 and "CONNECT_SECRET" in missing.stderr
    bad = token_cli("--channels", "bad name")
    assert bad.returncode != 0 and "invalid channel name" in bad.stderr
    assert token_cli("--channels", "news", "--ttl", "0").returncode != 0


@pytest.fixture(scope="module")
def guarded(redis_server: PrivateRedis) -> Iterator[Service]:
    with Service(
        redis_server.url, workers=1, connect_secret=SECRET, allowed_origins=f"{ORIGIN},http://b.example"
    ) as svc:
        yield svc


async def test_connect_token_required_valid_unexpired_and_for_the_channel(guarded: Service) -> None:
    ok = minted("news")
    status, body = await refused(guarded, "?channels=news", origin=ORIGIN)
    assert status == 401 and "connect token is required" in body
    status, body = await refused(guarded, "?channels=news&token=garbage", origin=ORIGIN)
    assert status == 403 and "invalid connect token" in body
    other = mint_token("not-the-secret", ["news"], 60)
    assert (await refused(guarded, f"?channels=news&token={other}", origin=ORIGIN))[0] == 403
    expired = minted("news", "0.001")
    wait_until(lambda: _expired(expired), what="the short token to expire")
    status, body = await refused(guarded, f"?channels=news&token={expired}", origin=ORIGIN)
    assert status == 403 and "expired" in body
    # A channel the token does not name: refused before accept, at connect.
    status, body = await refused(guarded, f"?channels=news,sport&token={ok}", origin=ORIGIN)
    assert status == 403 and "'sport'" in body
    assert (await refused(guarded, f"?token={ok}", origin=ORIGIN))[0] == 403  # default channel not named

    ws = await guarded.connect(f"?channels=news&token={ok}", origin=ORIGIN)
    await recv_ack(ws, "news")
    await ws.send('{"op":"subscribe","channel":"sport"}')
    reply = await recv_json(ws)
    assert reply["error"] == "forbidden_channel"
    assert guarded.publish("news", "hi").status_code == 202
    assert await recv_publication(ws) == {"channel": "news", "data": "hi"}  # still connected, still subscribed
    await ws.close()

    # A Bearer header works too (non-browser clients), and * allows any channel.
    ws = await guarded.connect(
        "?channels=anything", origin=ORIGIN, additional_headers={"Authorization": f"Bearer {minted('*')}"}
    )
    await recv_ack(ws, "anything")
    await ws.close()


def _expired(token: str) -> bool:
    try:
        verify_token(SECRET, token)
    except TokenError:
        return True
    return False


async def test_allowed_origins(guarded: Service) -> None:
    token = minted("news")
    query = f"?channels=news&token={token}"
    status, body = await refused(guarded, query, origin="https://evil.example")
    assert status == 403 and "origin not allowed" in body
    assert (await refused(guarded, query, origin="https://app.example.evil.example"))[0] == 403
    assert (await refused(guarded, query, origin="http://app.example"))[0] == 403  # scheme matters
    assert (await refused(guarded, query))[0] == 403  # no Origin at all
    for origin in (ORIGIN, "http://b.example"):
        ws = await guarded.connect(query, origin=origin)
        await recv_ack(ws, "news")
        await ws.close()
    health = guarded.get("/health").json()
    assert health["connections"]["current"] == 0 or health["connections"]["current"] <= 2


# --- no secret leaks ------------------------------------------------------------------------------------


async def test_no_secret_in_health_heartbeats_logs_or_error_frames(own_redis: PrivateRedis) -> None:
    redis_password = "redis-pass-8d2e71"
    publish_token = "publish-token-3b9f04"
    connect_secret = "connect-secret-a61c55"
    admin = redis.Redis.from_url(own_redis.url)
    admin.config_set("requirepass", redis_password)
    admin.close()
    url = f"redis://:{redis_password}@127.0.0.1:{own_redis.port}/0"
    seen: list[str] = []
    with Service(url, workers=1, publish_token=publish_token, connect_secret=connect_secret) as service:
        token = mint_token(connect_secret, ["news"], 3600)
        secrets = [redis_password, publish_token, connect_secret, token]

        # Refusals of every kind, with their bodies.
        for query in ("?channels=news", "?channels=news&token=bad", f"?channels=other&token={token}"):
            with pytest.raises(InvalidStatus) as caught:
                await service.connect(query)
            seen.append(caught.value.response.body.decode(errors="replace"))
        async with httpx.AsyncClient(base_url=service.base, timeout=10) as http:
            for auth in ("", f"Bearer {connect_secret}", f"Bearer {publish_token}x"):
                response = await http.post(
                    "/publish", json={"channel": "news", "data": 1}, headers={"Authorization": auth}
                )
                seen.append(response.text)
        # Error frames from an admitted connection, and a close reason.
        ws = await service.connect(f"?channels=news&token={token}")
        seen.append(str(await ws.recv()))
        for frame in ("nope", '{"op":"subscribe","channel":"sport"}', '{"op":"x"}', '{"op":"unsubscribe"}'):
            await ws.send(frame)
            seen.append(str(await ws.recv()))
        await ws.send(b"\x00")
        seen.append(str(await ws.recv()))
        for _ in range(10):
            await ws.send("[]")
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(20):
                seen.append(str(await ws.recv()))
        seen.append(str(closed.value))

        # A listener loss and recovery (log lines with the Redis URL in reach).
        admin = redis.Redis.from_url(url)
        admin.client_kill_filter(_type="pubsub")
        admin.close()
        wait_until(lambda: "connection restored" in service.log(), what="the listener to reconnect")

        for path in ("/health", "/health/cluster", "/metrics"):
            response = service.get(path)
            assert response.status_code == 200, (path, response.status_code)
            seen.append(response.text)
        beats = wait_until(service.heartbeats, what="a heartbeat")
        seen.append(orjson.dumps(beats).decode())
        raw = redis.Redis.from_url(url)
        for value in raw.mget(list(raw.scan_iter(match=f"{service.prefix}*"))):
            seen.append(value.decode(errors="replace") if isinstance(value, bytes) else str(value))
        raw.close()
        assert service.stop() == 0
        seen.append(service.log())  # after shutdown: every line the master and the worker wrote
    everything = "\n".join(seen)
    assert "(set)" in everything  # the settings are there, masked
    assert "redis://***@" in everything  # the Redis URL was logged, redacted
    assert "token=***" in everything  # refused handshakes are logged, their token redacted
    for secret in secrets:
        assert secret not in everything, f"a secret leaked: {secret[:6]}..."
