"""The handshake gate: origin allow-list and signed, expiring connect tokens.

A connect token is ``itsdangerous``-signed JSON ``{"channels": [...], "exp": <unix time>}``; with
``CONNECT_SECRET`` set, /ws requires one (query ``token=`` for browsers, or a Bearer header) and
limits the client to the channels it names (``*`` for any). All checks run before accept. The
connection lives until ``exp`` unless the client sends a fresh token (the ``refresh`` op), which is
verified here too: this module is the one place that mints and verifies tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer
from starlette.websockets import WebSocket

from service.config import CHANNEL_RE, Settings

_SALT = "wsbroadcast-connect"
# Where the gate leaves an admitted connection's Claims for the endpoint.
CLAIMS_SCOPE_KEY = "wsbroadcast.claims"


class TokenError(ValueError):
    pass


def _serializer(secret: str) -> URLSafeSerializer:
    return URLSafeSerializer(secret, salt=_SALT)


def mint_token(secret: str, channels: list[str], ttl: float, now: float | None = None) -> str:
    """A connect token for ``channels`` that expires ``ttl`` seconds from now."""
    for channel in channels:
        if channel != "*" and not CHANNEL_RE.fullmatch(channel):
            raise TokenError(f"invalid channel name {channel!r}")
    expires = (time.time() if now is None else now) + ttl
    return str(_serializer(secret).dumps({"channels": channels, "exp": int(expires)}))


@dataclass(frozen=True, slots=True)
class Claims:
    """What a valid connect token grants: ``channels`` (``*`` for any) until ``exp`` (unix time)."""

    channels: frozenset[str]
    exp: int

    def allows(self, channel: str) -> bool:
        return "*" in self.channels or channel in self.channels


def verify_token(secret: str, token: str, now: float | None = None) -> frozenset[str]:
    """The channels a valid token allows; raises TokenError naming what is wrong."""
    return verify_claims(secret, token, now).channels


def verify_claims(secret: str, token: str, now: float | None = None) -> Claims:
    """What a valid token grants; raises TokenError naming what is wrong."""
    try:
        payload: Any = _serializer(secret).loads(token)
    except BadSignature:
        raise TokenError("invalid connect token") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("channels"), list):
        raise TokenError("invalid connect token")
    expires = payload.get("exp")
    if not isinstance(expires, int) or expires < (time.time() if now is None else now):
        raise TokenError("connect token expired")
    return Claims(frozenset(c for c in payload["channels"] if isinstance(c, str)), expires)


class Gate:
    def __init__(self, settings: Settings) -> None:
        self._origins = frozenset(settings.allowed_origins)
        self._secret = settings.connect_secret
        self._default = settings.default_channel

    async def check(self, ws: WebSocket) -> tuple[int, str] | None:
        """None to admit, else (HTTP status, reason) to refuse the handshake."""
        if self._origins and "*" not in self._origins:
            origin = ws.headers.get("origin", "").rstrip("/")
            if origin not in self._origins:
                return 403, "origin not allowed"
        if self._secret:
            token = ws.query_params.get("token")
            auth = ws.headers.get("authorization", "")
            if token is None and auth.lower().startswith("bearer "):
                token = auth[7:].strip()
            if not token:
                return 401, "a connect token is required (query parameter token=)"
            try:
                claims = verify_claims(self._secret, token)
            except TokenError as exc:
                return 403, str(exc)
            # The channels asked for at connect are checked here too, so a token that does not
            # cover them is refused before accept; later subscribe ops get an error frame instead.
            raw = ws.query_params.get("channels")
            for name in [self._default] if raw is None else raw.split(","):
                if name and not claims.allows(name):
                    return 403, f"the token does not allow channel {name[:128]!r}"
            ws.scope[CLAIMS_SCOPE_KEY] = claims
        return None

    def verify(self, token: str) -> Claims:
        """A fresh token sent on an open connection (the refresh op); raises TokenError."""
        if not self._secret:
            raise TokenError("this server requires no connect token")
        return verify_claims(self._secret, token)
