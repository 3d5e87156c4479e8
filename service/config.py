"""The one settings object, read from the environment (12-factor) and validated."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from service.wire import CHANNEL_RULE, is_channel

# prometheus-client's own variable: the directory of the workers' multiprocess files.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


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
    if not is_channel(raw):
        raise ValueError
    return raw


_channel.__doc__ = "a channel name: " + CHANNEL_RULE


def _text(raw: str) -> str:
    return raw


_text.__doc__ = "any text"


def _origins(raw: str) -> tuple[str, ...]:
    items = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in items:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ValueError
    return items


_origins.__doc__ = "a comma list of origins like https://example.com, or *"

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


def redact_url(url: str) -> str:
    """A URL without its password (or whatever stands before ``@``), for logs and documents."""
    return re.sub(r"://([^@/]*)@", "://***@", url)


def _shown_url(raw: str) -> str:
    return repr(redact_url(raw))


def _shown_key(raw: str) -> str:
    return "(an inline PEM block)" if raw.strip().startswith("-----BEGIN") else repr(raw)


_log_level = _choice("critical", "error", "warning", "info", "debug")


def setting(
    default: Any,
    parse: Callable[[str], Any],
    meaning: str,
    *,
    secret: bool = False,
    shown: Callable[[str], str] | None = None,
) -> Any:
    """One setting's whole declaration: its default, its parser (whose docstring says what is
    allowed), what it means, whether it is a secret (shown as (set) or (unset) only) and how an
    invalid value may be shown in the error line (a secret's not at all, unless ``shown`` says)."""
    if shown is None:
        shown = _hidden if secret else repr
    metadata = {"parse": parse, "meaning": meaning, "secret": secret, "shown": shown}
    return field(default=default, repr=not secret, metadata=metadata)


def _hidden(raw: str) -> str:
    return "(hidden)"


@dataclass(frozen=True)
class Settings:
    """Every setting, each declared once; read from the environment variable of its name in capitals."""

    port: int = setting(8000, _int(1, 65535), "bind port")
    bind_host: str = setting("0.0.0.0", _text, "bind address")
    web_concurrency: int = setting(2, _int(1, 512), "gunicorn workers")
    log_level: str = setting("info", _log_level, "gunicorn's and the workers' log level")
    redis_url: str = setting("redis://127.0.0.1:6379/0", _redis_url, "the broker", secret=True, shown=_shown_url)
    redis_cluster: bool = setting(False, _bool, "the broker is a Redis Cluster: sharded pub/sub")
    redis_prefix: str = setting("broadcast:", _prefix, "prefix of every Redis channel and key")
    redis_pool_size: int = setting(10, _int(2, 1000), "Redis connections per worker, pub/sub included")
    redis_pool_timeout: float = setting(5.0, _float(0, 300, open_lo=True), "wait for a pool connection")
    redis_command_timeout: float = setting(5.0, _float(0, 300, open_lo=True), "wait for Redis's answer")
    max_connections: int = setting(5000, _int(1), "WebSockets per worker")
    queue_size: int = setting(1000, _int(1), "frames queued per connection")
    queue_bytes: int = setting(1024 * 1024, _int(1024), "bytes queued per connection")
    send_buffer_bytes: int = setting(262144, _int(4096), "kernel send buffer per connection")
    slow_consumer_policy: str = setting("disconnect", _choice("disconnect", "drop-oldest"), "over the queue bound")
    idle_timeout: float = setting(900.0, _float(0, open_lo=True), "idle cut-off")
    cleanup_interval: float = setting(300.0, _float(0, open_lo=True), "idle sweep period")
    heartbeat_interval: float = setting(5.0, _float(0.1, 3600), "heartbeat to Redis")
    stats_log_interval: float = setting(60.0, _float(1), "stats log line")
    max_message_bytes: int = setting(65536, _int(128, 64 * 1024 * 1024), "largest client and published frame")
    ws_compression: bool = setting(False, _bool, "permessage-deflate")
    fast_path: bool = setting(True, _bool, "frame-once direct writes")
    ws_ping_interval: float = setting(20.0, _float(0), "protocol pings (0: off)")
    ws_ping_timeout: float = setting(20.0, _float(0), "wait for a protocol pong (0: off)")
    default_channel: str = setting("broadcast", _channel, "channel of a connection without ?channels=")
    max_channels_per_connection: int = setting(100, _int(1, 100000), "subscriptions per connection")
    client_rate_limit: float = setting(50.0, _float(0, open_lo=True), "client text frames per second")
    client_rate_burst: int = setting(100, _int(1), "client text frames at once")
    client_frame_rate: float = setting(200.0, _float(0, open_lo=True), "client frames of any kind per second")
    client_frame_burst: int = setting(400, _int(1), "client frames of any kind at once")
    client_bytes_rate: int = setting(262144, _int(1024), "client bytes per second")
    max_header_bytes: int = setting(16384, _int(1024, 1024 * 1024), "request line and headers")
    handshake_timeout: float = setting(10.0, _float(0, 3600, open_lo=True), "time to send a request head")
    body_timeout: float = setting(10.0, _float(0, 3600, open_lo=True), "time to send a request body")
    max_handshakes: int = setting(1000, _int(1), "connections still sending their head, per worker")
    fd_reserve: int = setting(64, _int(16), "file descriptors kept for refusals and health")
    canary_interval: float = setting(2.0, _float(0.1, 3600), "listener self-check period")
    graceful_timeout: float = setting(10.0, _float(1, 3600), "shutdown budget")
    memory_limit: int = setting(0, _int(0), "bytes per worker (0: cgroup or RAM / workers)")
    memory_high_watermark: float = setting(0.8, _float(0, 1, open_lo=True), "memory pressure threshold")
    publish_token: str = setting("", _text, "bearer token for POST /publish", secret=True)
    connect_secret: str = setting("", _text, "require signed connect tokens on /ws (HS256)", secret=True)
    # Not secret, but a PEM block is no figure for /health: shown as (set) like the secrets.
    connect_public_key: str = setting(
        "", _public_key, "verify RS256/ES256 connect tokens with this key", secret=True, shown=_shown_key
    )
    admin_token: str = setting("", _text, "bearer token for the health detail", secret=True)
    allowed_origins: tuple[str, ...] = setting((), _origins, "origins allowed to open /ws")
    history_size: int = setting(100, _int(0, 100000), "publications kept per channel for recovery")
    history_ttl: float = setting(300.0, _float(1, 30 * 86400), "how long the history outlives the last publish")
    history_meta_ttl: float = setting(30 * 86400.0, _float(60, 3650 * 86400), "how long a channel's epoch lives")
    idempotency_window: float = setting(300.0, _float(1, 7 * 86400), "how long an Idempotency-Key is kept")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from ``env`` (default ``os.environ``); raise SettingsError on the first bad one."""
        source = os.environ if env is None else env
        values: dict[str, Any] = {}
        for declared in fields(cls):
            raw = source.get(declared.name.upper())
            if raw is None:
                continue
            parse = declared.metadata["parse"]
            try:
                values[declared.name] = parse(raw)
            except ValueError:
                allowed = (parse.__doc__ or "").strip()
                shown = declared.metadata["shown"](raw)
                raise SettingsError(f"{declared.name.upper()}={shown} is invalid: expected {allowed}") from None
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
        for declared in fields(self):
            if declared.metadata["secret"]:
                out[declared.name] = "(set)" if out[declared.name] else "(unset)"
        out["allowed_origins"] = list(self.allowed_origins)
        return out
