"""The one settings object, read from the environment (12-factor) and validated."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

CHANNEL_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")

T = TypeVar("T")


class SettingsError(ValueError):
    """An invalid setting; its message is the one line shown at start-up."""


def _int(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if value < lo or (hi is not None and value > hi):
            raise ValueError
        return value

    parse.__doc__ = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
    return parse


def _float(lo: float, hi: float | None = None, *, open_lo: bool = False) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw)
        if value != value or value < lo or (open_lo and value == lo) or (hi is not None and value > hi):
            raise ValueError
        return value

    op = ">" if open_lo else ">="
    parse.__doc__ = f"a number {op} {lo}" + (f" and <= {hi}" if hi is not None else "")
    return parse


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError


_bool.__doc__ = "one of 1, 0, true, false, yes, no, on, off"


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in allowed:
            raise ValueError
        return raw

    parse.__doc__ = "one of " + ", ".join(allowed)
    return parse


def _channel(raw: str) -> str:
    if not CHANNEL_RE.fullmatch(raw):
        raise ValueError
    return raw


_channel.__doc__ = "a channel name matching [A-Za-z0-9_.:-]{1,128}"


def _text(raw: str) -> str:
    return raw


def _origins(raw: str) -> tuple[str, ...]:
    items = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in items:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ValueError
    return items


_origins.__doc__ = "a comma list of origins like https://example.com, or *"

_SECRETS = frozenset({"redis_url", "publish_token", "connect_secret", "admin_token"})
# Not secret, but a PEM block is no figure for /health: shown as (set) like the secrets.
_SHOWN_AS_SET = frozenset({"connect_public_key"})


@dataclass(frozen=True)
class Settings:
    port: int = 8000
    web_concurrency: int = 2
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    redis_prefix: str = "broadcast:"
    redis_pool_size: int = 10
    redis_pool_timeout: float = 5.0
    max_connections: int = 5000
    queue_size: int = 1000
    queue_bytes: int = 1024 * 1024
    send_buffer_bytes: int = 262144
    slow_consumer_policy: str = "disconnect"
    idle_timeout: float = 900.0
    cleanup_interval: float = 300.0
    heartbeat_interval: float = 5.0
    stats_log_interval: float = 60.0
    max_message_bytes: int = 65536
    ws_compression: bool = False
    fast_path: bool = True
    ws_ping_interval: float = 20.0
    ws_ping_timeout: float = 20.0
    default_channel: str = "broadcast"
    max_channels_per_connection: int = 100
    client_rate_limit: float = 50.0
    client_rate_burst: int = 100
    client_frame_rate: float = 200.0
    client_frame_burst: int = 400
    client_bytes_rate: int = 262144
    max_header_bytes: int = 16384
    handshake_timeout: float = 10.0
    body_timeout: float = 10.0
    max_handshakes: int = 1000
    fd_reserve: int = 64
    canary_interval: float = 2.0
    graceful_timeout: float = 10.0
    memory_limit: int = 0
    memory_high_watermark: float = 0.8
    publish_token: str = field(default="", repr=False)
    connect_secret: str = field(default="", repr=False)
    connect_public_key: str = field(default="", repr=False)
    admin_token: str = field(default="", repr=False)
    allowed_origins: tuple[str, ...] = ()
    history_size: int = 100
    history_ttl: float = 300.0
    history_meta_ttl: float = 30 * 86400.0
    redis_command_timeout: float = 5.0
    idempotency_window: float = 300.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from ``env`` (default ``os.environ``); raise SettingsError on the first bad one."""
        source = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, parse in _PARSERS.items():
            raw = source.get(name.upper())
            if raw is None:
                continue
            try:
                values[name] = parse(raw)
            except ValueError:
                allowed = (parse.__doc__ or "").strip()
                shown = _shown(name, raw)
                raise SettingsError(f"{name.upper()}={shown} is invalid: expected {allowed}") from None
        settings = cls(**values)
        if settings.history_ttl > settings.history_meta_ttl:
            raise SettingsError(
                f"HISTORY_TTL={settings.history_ttl:g} is invalid: expected a number <= "
                f"HISTORY_META_TTL ({settings.history_meta_ttl:g})"
            )
        if settings.cleanup_interval > settings.idle_timeout:
            raise SettingsError(
                f"CLEANUP_INTERVAL={settings.cleanup_interval:g} is invalid: expected a number <= "
                f"IDLE_TIMEOUT ({settings.idle_timeout:g})"
            )
        return settings

    @property
    def client_bytes_burst(self) -> int:
        """Bytes a client may send at once: two largest messages (with frame headers) or two seconds' worth."""
        return max(2 * self.client_bytes_rate, 2 * (self.max_message_bytes + 14))

    def public(self) -> dict[str, Any]:
        """The effective settings without secrets, for /health and the logs."""
        out = asdict(self)
        for name in _SECRETS | _SHOWN_AS_SET:
            out[name] = "(set)" if out[name] else "(unset)"
        out["allowed_origins"] = list(self.allowed_origins)
        return out


def _shown(name: str, raw: str) -> str:
    """The value as an error message may show it: secrets hidden, a URL's password masked."""
    if name in ("publish_token", "connect_secret", "admin_token"):
        return "(hidden)"
    if name == "connect_public_key" and raw.strip().startswith("-----BEGIN"):
        return "(an inline PEM block)"
    if name == "redis_url":
        raw = re.sub(r"://([^@/]*)@", "://***@", raw)
    return repr(raw)


def _redis_url(raw: str) -> str:
    if not re.match(r"(rediss?|unix)://", raw):
        raise ValueError
    return raw


_redis_url.__doc__ = "a redis://, rediss:// or unix:// URL"


def _prefix(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", raw):
        raise ValueError
    return raw


_prefix.__doc__ = "1-64 characters of [A-Za-z0-9_.:-]"


def public_key_algorithm(pem: str) -> tuple[str, Any]:
    """The JWT algorithm a PEM public key verifies (see ``key_algorithm``) and the key."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(pem.encode())
    return key_algorithm(key), key


def key_algorithm(public_key: Any) -> str:
    """RS256 for an RSA key of 2048 bits or more; ES256/384/512 for an EC key on P-256/384/521."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size >= 2048:
        return "RS256"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curves = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        if public_key.curve.name in curves:
            return curves[public_key.curve.name]
    raise ValueError("expected an RSA key of 2048 bits or more, or an EC key on P-256, P-384 or P-521")


def _public_key(raw: str) -> str:
    """The PEM text: given inline, or read from the file the value names."""
    text = raw.strip()
    if not text:
        return ""
    if not text.startswith("-----BEGIN"):
        try:
            with open(text, encoding="ascii") as pem:
                text = pem.read().strip()
        except (OSError, UnicodeDecodeError):
            raise ValueError from None
    try:
        public_key_algorithm(text)
    except Exception:  # cryptography raises ValueError or UnsupportedAlgorithm for what it cannot load
        raise ValueError from None
    return text


_public_key.__doc__ = (
    "a PEM public key (RSA of 2048 bits or more, or EC P-256/P-384/P-521), inline or the path of a readable file"
)


_PARSERS: dict[str, Callable[[str], Any]] = {
    "port": _int(1, 65535),
    "web_concurrency": _int(1, 512),
    "redis_url": _redis_url,
    "redis_prefix": _prefix,
    "redis_pool_size": _int(2, 1000),
    "redis_pool_timeout": _float(0, 300, open_lo=True),
    "max_connections": _int(1),
    "queue_size": _int(1),
    "queue_bytes": _int(1024),
    "send_buffer_bytes": _int(4096),
    "slow_consumer_policy": _choice("disconnect", "drop-oldest"),
    "idle_timeout": _float(0, open_lo=True),
    "cleanup_interval": _float(0, open_lo=True),
    "heartbeat_interval": _float(0.1, 3600),
    "stats_log_interval": _float(1),
    "max_message_bytes": _int(128, 64 * 1024 * 1024),
    "ws_compression": _bool,
    "fast_path": _bool,
    "ws_ping_interval": _float(0),
    "ws_ping_timeout": _float(0),
    "default_channel": _channel,
    "max_channels_per_connection": _int(1, 100000),
    "client_rate_limit": _float(0, open_lo=True),
    "client_rate_burst": _int(1),
    "client_frame_rate": _float(0, open_lo=True),
    "client_frame_burst": _int(1),
    "client_bytes_rate": _int(1024),
    "max_header_bytes": _int(1024, 1024 * 1024),
    "handshake_timeout": _float(0, 3600, open_lo=True),
    "body_timeout": _float(0, 3600, open_lo=True),
    "max_handshakes": _int(1),
    "fd_reserve": _int(16),
    "canary_interval": _float(0.1, 3600),
    "graceful_timeout": _float(1, 3600),
    "memory_limit": _int(0),
    "memory_high_watermark": _float(0, 1, open_lo=True),
    "publish_token": _text,
    "connect_secret": _text,
    "connect_public_key": _public_key,
    "admin_token": _text,
    "allowed_origins": _origins,
    "history_size": _int(0, 100000),
    "history_ttl": _float(1, 30 * 86400),
    "history_meta_ttl": _float(60, 3650 * 86400),
    "redis_command_timeout": _float(0, 300, open_lo=True),
    "idempotency_window": _float(1, 7 * 86400),
}
