"""The handshake gate: origin allow-list and signed, expiring connect tokens.

A connect token is ``itsdangerous``-signed JSON ``{"channels": [...], "exp": <unix time>}``; with
``CONNECT_SECRET`` set, /ws requires one (query ``token=`` for browsers, or a Bearer header) and
limits the client to the channels it names (``*`` for any). All checks run before accept.
"""

from __future__ import annotations

import time
from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer
from starlette.websockets import WebSocket

from service.config import CHANNEL_RE, Settings

_SALT = "wsbroadcast-connect"


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


def verify_token(secret: str, token: str, now: float | None = None) -> frozenset[str]:
    """The channels a valid token allows; raises TokenError naming what is wrong."""
    try:
        payload: Any = _serializer(secret).loads(token)
    except BadSignature:
        raise TokenError("invalid connect token") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("channels"), list):
        raise TokenError("invalid connect token")
    expires = payload.get("exp")
    if not isinstance(expires, int) or expires < (time.time() if now is None else now):
        raise TokenError("connect token expired")
    return frozenset(c for c in payload["channels"] if isinstance(c, str))


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
                allowed = verify_token(self._secret, token)
            except TokenError as exc:
                return 403, str(exc)
            # The channels asked for at connect are checked here too, so a token that does not
            # cover them is refused before accept; later subscribe ops get an error frame instead.
            if "*" not in allowed:
                raw = ws.query_params.get("channels")
                for name in [self._default] if raw is None else raw.split(","):
                    if name and name not in allowed:
                        return 403, f"the token does not allow channel {name[:128]!r}"
            ws.scope["wsbroadcast.allowed_channels"] = allowed
        return None
