"""The handshake gate: origin allow-list and signed, expiring connect tokens (JWT).

A connect token is a JWT (RFC 7519) with the claims ``exp`` (required, unix time), ``channels`` (a
list of channel names, ``*`` for any) and ``sub`` (optional: the client's identity, shown in the log
lines about its connection). Any backend mints one with its usual JWT library: HS256 with
``CONNECT_SECRET``, or RS256/ES256 signed by a private key whose public half is ``CONNECT_PUBLIC_KEY``.
With either set, /ws requires one (query ``token=`` for browsers, or a Bearer header) and limits the
client to the channels it names. All checks run before accept. The connection lives until ``exp``
unless the client sends a fresh token (the ``refresh`` op), verified here too: this module is the
one place that mints and verifies tokens.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import jwt
from starlette.websockets import WebSocket

from service.config import Settings, public_key_algorithm
from service.wire import channels_param, is_channel

# Where the gate leaves an admitted connection's Claims for the endpoint.
CLAIMS_SCOPE_KEY = "wsbroadcast.claims"
# A short CONNECT_SECRET is reported once at start-up (workers/startup.py); PyJWT would otherwise
# warn on every handshake.
warnings.filterwarnings("ignore", message=r"The HMAC key is \d+ bytes long")
# HMAC-SHA256's own size: shorter secrets are easier to guess offline from one captured token.
MIN_SECRET_BYTES = 32
_MAX_SUB = 128


class TokenError(ValueError):
    pass


def mint_token(
    secret: str, channels: list[str], ttl: float, now: float | None = None, sub: str | None = None
) -> str:
    """An HS256 connect token for ``channels`` that expires ``ttl`` seconds from now."""
    return mint_with_key(secret, "HS256", channels, ttl, now, sub)


def mint_with_key(
    key: Any, algorithm: str, channels: list[str], ttl: float, now: float | None = None, sub: str | None = None
) -> str:
    """A connect token signed with ``key`` (a secret for HS256, a private key or its PEM for RS256/ES256)."""
    for channel in channels:
        if channel != "*" and not is_channel(channel):
            raise TokenError(f"invalid channel name {channel!r}")
    claims: dict[str, Any] = {"channels": channels, "exp": int((time.time() if now is None else now) + ttl)}
    if sub is not None:
        claims["sub"] = sub
    return jwt.encode(claims, key, algorithm=algorithm)


@dataclass(frozen=True, slots=True)
class Claims:
    """What a valid connect token grants: ``channels`` (``*`` for any) until ``exp`` (unix time),
    to ``sub`` (the client's identity, when the token names one)."""

    channels: frozenset[str]
    exp: int
    sub: str | None = None

    def allows(self, channel: str) -> bool:
        return "*" in self.channels or channel in self.channels

    def who(self) -> str:
        """How log lines name the client: its ``sub``, quoted, or ``-`` when the token names none."""
        return "-" if self.sub is None else repr(self.sub[:_MAX_SUB])


class Verifier:
    """Verifies connect tokens against the configured keys: HS256 with the secret, and RS256/ES256
    (whichever the public key's type implies) with the public key. The token's ``alg`` header only
    chooses among these; ``none`` and any other algorithm are refused."""

    def __init__(self, secret: str = "", public_key_pem: str = "") -> None:
        self.keys: dict[str, Any] = {}
        if secret:
            self.keys["HS256"] = secret
        if public_key_pem:
            algorithm, key = public_key_algorithm(public_key_pem)
            self.keys[algorithm] = key

    def __bool__(self) -> bool:
        return bool(self.keys)

    def verify(self, token: str, now: float | None = None) -> Claims:
        """What a valid token grants; raises TokenError naming what is wrong."""
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.InvalidTokenError:
            raise TokenError("invalid connect token: not a JWT") from None
        key = self.keys.get(algorithm) if isinstance(algorithm, str) else None
        if key is None or not isinstance(algorithm, str):
            accepted = ", ".join(sorted(self.keys)) or "none configured"
            raise TokenError(f"invalid connect token: algorithm {str(algorithm)[:20]!r} is not accepted ({accepted})")
        try:
            # exp is checked below against ``now``; iat is informational (a backend's clock a
            # second ahead must not refuse its fresh tokens).
            payload: Any = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                options={"require": ["exp"], "verify_exp": False, "verify_iat": False},
            )
        except jwt.MissingRequiredClaimError:
            raise TokenError("invalid connect token: the exp claim is required") from None
        except jwt.InvalidSignatureError:
            raise TokenError("invalid connect token: bad signature") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"invalid connect token: {str(exc)[:120]}") from None
        expires = payload.get("exp")
        if isinstance(expires, bool) or not isinstance(expires, int | float):
            raise TokenError("invalid connect token: exp must be a number (unix time)")
        if expires < (time.time() if now is None else now):
            raise TokenError("connect token expired")
        channels = payload.get("channels")
        if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
            raise TokenError("invalid connect token: channels must be a list of channel names")
        sub = payload.get("sub")
        return Claims(frozenset(channels), int(expires), sub if isinstance(sub, str) else None)


def verify_token(secret: str, token: str, now: float | None = None) -> frozenset[str]:
    """The channels a valid HS256 token allows; raises TokenError naming what is wrong."""
    return verify_claims(secret, token, now).channels


def verify_claims(secret: str, token: str, now: float | None = None) -> Claims:
    """What a valid HS256 token grants; raises TokenError naming what is wrong."""
    return Verifier(secret).verify(token, now)


class Gate:
    def __init__(self, settings: Settings) -> None:
        self._origins = frozenset(settings.allowed_origins)
        self._verifier = Verifier(settings.connect_secret, settings.connect_public_key)
        self._default = settings.default_channel

    async def check(self, ws: WebSocket) -> tuple[int, str] | None:
        """None to admit, else (HTTP status, reason) to refuse the handshake."""
        if self._origins and "*" not in self._origins:
            origin = ws.headers.get("origin", "").rstrip("/")
            if origin not in self._origins:
                return 403, "origin not allowed"
        if self._verifier:
            token = ws.query_params.get("token")
            auth = ws.headers.get("authorization", "")
            if token is None and auth.lower().startswith("bearer "):
                token = auth[7:].strip()
            if not token:
                return 401, "a connect token is required (query parameter token=)"
            try:
                claims = self._verifier.verify(token)
            except TokenError as exc:
                return 403, str(exc)
            # The channels asked for at connect are checked here too, so a token that does not
            # cover them is refused before accept; later subscribe ops get an error frame instead.
            for name in channels_param(ws.query_params.get("channels"), self._default):
                if not claims.allows(name):
                    return 403, f"the token does not allow channel {name[:128]!r}"
            ws.scope[CLAIMS_SCOPE_KEY] = claims
        return None

    def verify(self, token: str) -> Claims:
        """A fresh token sent on an open connection (the refresh op); raises TokenError."""
        if not self._verifier:
            raise TokenError("this server requires no connect token")
        return self._verifier.verify(token)
