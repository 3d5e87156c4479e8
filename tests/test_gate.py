"""The handshake gate in-process: the origin allow-list, the connect token's place and validity, the
channels of ``?channels=`` checked against what the token allows, and the refusals' statuses and
reasons (what the service answers the handshake with; test_security.py runs them end to end)."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

import pytest
from starlette.types import Message
from starlette.websockets import WebSocket

from service.config import Settings
from service.gate import CLAIMS_SCOPE_KEY, Claims, Gate, TokenError, mint_token

SECRET = "gate-secret-0123456789abcdef0123456789"
ORIGIN = "https://app.example"


async def _receive() -> Message:
    raise AssertionError("the gate only reads the handshake")


async def _send(message: Message) -> None:
    raise AssertionError("the gate only reads the handshake")


def _handshake(query: dict[str, str] | None = None, **headers: str) -> WebSocket:
    """A handshake as uvicorn hands it to the application: its ASGI scope, nothing received yet."""
    scope: dict[str, Any] = {
        "type": "websocket",
        "path": "/ws",
        "query_string": urlencode(query or {}).encode(),
        "headers": [(name.replace("_", "-").lower().encode(), value.encode()) for name, value in headers.items()],
    }
    return WebSocket(scope, _receive, _send)


def _token(channels: list[str], ttl: float = 60, sub: str | None = None) -> str:
    return mint_token(SECRET, channels, ttl, sub=sub)


async def test_without_origins_or_keys_every_handshake_is_admitted_with_no_claims() -> None:
    gate = Gate(Settings())
    for ws in (_handshake(), _handshake({"channels": "a,b"}, origin="https://anywhere.example")):
        assert await gate.check(ws) is None
        assert CLAIMS_SCOPE_KEY not in ws.scope


@pytest.mark.parametrize(
    ("origins", "origin", "admitted"),
    [
        ((ORIGIN,), ORIGIN, True),
        ((ORIGIN,), ORIGIN + "/", True),  # a trailing slash is the same origin
        ((ORIGIN,), "https://evil.example", False),
        ((ORIGIN,), "http://app.example", False),  # another scheme is another origin
        ((ORIGIN,), None, False),  # a page must name its origin; only non-browsers omit it
        ((ORIGIN, "https://other.example"), "https://other.example", True),
        (("*",), "https://anywhere.example", True),
        (("*",), None, True),
    ],
)
async def test_the_origin_allow_list(origins: tuple[str, ...], origin: str | None, admitted: bool) -> None:
    gate = Gate(Settings(allowed_origins=origins))
    ws = _handshake() if origin is None else _handshake(origin=origin)
    assert await gate.check(ws) == (None if admitted else (403, "origin not allowed"))


async def test_the_origin_is_checked_before_the_token() -> None:
    gate = Gate(Settings(allowed_origins=(ORIGIN,), connect_secret=SECRET))
    assert await gate.check(_handshake(origin="https://evil.example")) == (403, "origin not allowed")
    assert await gate.check(_handshake(origin=ORIGIN)) == (401, "a connect token is required (query parameter token=)")


async def test_a_token_comes_in_the_query_or_as_a_bearer_header() -> None:
    gate = Gate(Settings(connect_secret=SECRET))
    required = (401, "a connect token is required (query parameter token=)")
    assert await gate.check(_handshake({"channels": "a"})) == required
    assert await gate.check(_handshake({"channels": "a"}, authorization="Basic dXNlcjpwdw==")) == required
    assert await gate.check(_handshake({"channels": "a"}, authorization="Bearer ")) == required
    token = _token(["a"], sub="user-7")
    for ws in (
        _handshake({"channels": "a", "token": token}),
        _handshake({"channels": "a"}, authorization=f"Bearer {token}"),
        _handshake({"channels": "a"}, authorization=f"bearer  {token} "),  # the scheme is case-insensitive
    ):
        assert await gate.check(ws) is None
        claims = ws.scope[CLAIMS_SCOPE_KEY]
        assert isinstance(claims, Claims) and claims.channels == {"a"} and claims.sub == "user-7"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("not-a-jwt", "invalid connect token: not a JWT"),
        (mint_token("another-secret-0123456789abcdef0123", ["a"], 60), "invalid connect token: bad signature"),
        (mint_token(SECRET, ["a"], 60, now=time.time() - 120), "connect token expired"),
    ],
    ids=["garbage", "forged", "expired"],
)
async def test_a_bad_token_is_refused_403_saying_what_is_wrong(token: str, reason: str) -> None:
    ws = _handshake({"channels": "a", "token": token})
    assert await Gate(Settings(connect_secret=SECRET)).check(ws) == (403, reason)
    assert CLAIMS_SCOPE_KEY not in ws.scope


@pytest.mark.parametrize(
    ("allowed", "channels", "refused"),
    [
        (["a", "b"], "a,b", None),
        (["a", "b"], "b", None),
        (["a"], "a,b", "b"),
        (["a"], "a,,a", None),  # empty names are skipped, repeated ones asked for once
        (["a"], "", None),  # subscribes to nothing at connect: nothing to allow
        (["a"], None, "broadcast"),  # without ?channels= the default channel is asked for
        (["broadcast"], None, None),
        (["*"], "a,b,anything", None),
        (["*"], None, None),
        (["a"], "x" * 200, "x" * 128),  # the reason names at most 128 characters of it
    ],
)
async def test_the_channels_asked_for_at_connect_must_be_allowed_by_the_token(
    allowed: list[str], channels: str | None, refused: str | None
) -> None:
    query = {"token": _token(allowed)}
    if channels is not None:
        query["channels"] = channels
    ws = _handshake(query)
    expected = None if refused is None else (403, f"the token does not allow channel {refused!r}")
    assert await Gate(Settings(connect_secret=SECRET)).check(ws) == expected
    assert (CLAIMS_SCOPE_KEY in ws.scope) is (refused is None)


async def test_another_default_channel_is_the_one_checked() -> None:
    gate = Gate(Settings(connect_secret=SECRET, default_channel="lobby"))
    assert await gate.check(_handshake({"token": _token(["lobby"])})) is None
    assert await gate.check(_handshake({"token": _token(["broadcast"])})) == (
        403,
        "the token does not allow channel 'lobby'",
    )


def test_the_allow_rule_and_how_log_lines_name_the_client() -> None:
    some = Claims(frozenset({"a", "b"}), exp=100)
    assert some.allows("a") and some.allows("b") and not some.allows("c") and not some.allows("*a")
    assert all(Claims(frozenset({"*"}), exp=100).allows(name) for name in ("a", "zz", "*"))
    assert not Claims(frozenset(), exp=100).allows("a")
    assert some.who() == "-"
    assert Claims(frozenset(), exp=100, sub="alice").who() == "'alice'"
    assert Claims(frozenset(), exp=100, sub="y" * 300).who() == repr("y" * 128)


def test_a_refresh_is_verified_like_a_connect_token() -> None:
    gate = Gate(Settings(connect_secret=SECRET))
    claims = gate.verify(_token(["a"], ttl=30))
    assert claims.channels == {"a"} and claims.exp > time.time()
    with pytest.raises(TokenError, match="bad signature"):
        gate.verify(mint_token("another-secret-0123456789abcdef0123", ["a"], 60))
    with pytest.raises(TokenError, match="this server requires no connect token"):
        Gate(Settings()).verify(_token(["a"]))
