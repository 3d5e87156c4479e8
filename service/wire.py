"""The public wire contract in code (docs/protocol.md tells it to client authors).

Every frame the server builds for one connection, the client ops it accepts, the close codes with
their reasons, the channel rule with its one message, and the check of frames arriving from Redis.
Publication frames are serialized once, by the publish function in Redis; workers never build them.
Control frames are small and built per connection, which is fine off the hot path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from service import codec

CHANNEL_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
CHANNEL_RULE = "channel names match [A-Za-z0-9_.:-]{1,128}"


def is_channel(name: str) -> bool:
    return CHANNEL_RE.fullmatch(name) is not None


def channels_param(raw: str | None, default: str) -> list[str]:
    """The channels a connect URL's ``?channels=a,b`` asks for, in order, once each; the default
    channel without the parameter. Names are not checked here."""
    if raw is None:
        return [default]
    return list(dict.fromkeys(name for name in raw.split(",") if name))


# --- closes ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Close:
    """Why the server closes a connection: the WebSocket close code and its reason."""

    code: int
    reason: str


POLICY = 1008  # the reason is the detail of the error frame sent just before
TRY_AGAIN = 1013  # a full worker, where the server cannot answer the handshake with HTTP 503
IDLE = Close(4000, "idle timeout")
SLOW = Close(4008, "slow consumer")
# 3000 is "Unauthorized" in IANA's registry: reconnect with a fresh token; not a policy violation.
TOKEN_EXPIRED = Close(3000, "token expired")
TOO_BIG = Close(1009, "frame too big")
TOO_MANY_FRAMES = Close(POLICY, "too many frames")


def policy(detail: str) -> Close:
    """A policy close after an error frame: its reason is the error's detail, within the 123
    bytes a close frame's reason may hold."""
    return Close(POLICY, detail[:120])


# --- frames the server sends ------------------------------------------------------------------------


def control(op: str, **fields: Any) -> str:
    return codec.dumps({"op": op, **fields}).decode()


def error(code: str, detail: str) -> str:
    return control("error", error=code, detail=detail)


def subscribed(channel: str, offset: int, epoch: str, recovered: bool | None = None) -> bytes:
    """The ack of a subscribe: the channel's position; with ``since``, whether it was recovered."""
    if recovered is None:
        return codec.dumps({"op": "subscribed", "channel": channel, "offset": offset, "epoch": epoch})
    return codec.dumps(
        {"op": "subscribed", "channel": channel, "offset": offset, "epoch": epoch, "recovered": recovered}
    )


def gap(channel: str, offset: int, epoch: str) -> bytes:
    """Publications of ``channel`` up to ``offset`` are lost to this connection: reload its state."""
    return codec.dumps({"op": "gap", "channel": channel, "offset": offset, "epoch": epoch})


def unsubscribed(channel: str) -> str:
    return control("unsubscribed", channel=channel)


def refreshed(exp: int) -> str:
    return control("refreshed", exp=exp)


PONG = control("pong")


# --- client ops -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientOp:
    """A valid client frame: ``op`` is subscribe, unsubscribe, ping or refresh; ``channel`` is set for
    the first two, ``token`` (a fresh connect token, not yet verified) for refresh."""

    op: str
    channel: str = ""
    token: str = ""
    # subscribe only: the last publication the client got, as (offset, epoch), to recover from
    since: tuple[int, str] | None = None


@dataclass(frozen=True, slots=True)
class ClientError:
    """Why a client frame was rejected: an error code for the error frame and human text."""

    code: str
    detail: str


_OPS_WITH_CHANNEL = frozenset({"subscribe", "unsubscribe"})
_SINCE_RULE = '"since" must be {"offset": <integer >= 0>, "epoch": "<1-64 characters>"}, as the server sent them'


def parse_client_frame(text: str) -> ClientOp | ClientError:
    """Parse one client text frame. Never raises: anything invalid becomes a ClientError."""
    try:
        value = codec.loads(text)
    except codec.JSONDecodeError:
        return ClientError("invalid_json", "frame is not valid JSON")
    if not isinstance(value, dict):
        return ClientError("invalid_frame", "frame must be a JSON object")
    op = value.get("op")
    if not isinstance(op, str):
        return ClientError("invalid_frame", 'frame needs a string field "op"')
    if op == "ping":
        return ClientOp("ping")
    if op == "refresh":
        token = value.get("token")
        if not isinstance(token, str) or not token:
            return ClientError("invalid_frame", 'op "refresh" needs a string field "token"')
        return ClientOp("refresh", token=token)
    if op not in _OPS_WITH_CHANNEL:
        return ClientError("unknown_op", f"unknown op {op[:64]!r}; expected subscribe, unsubscribe, ping or refresh")
    channel = value.get("channel")
    if not isinstance(channel, str):
        return ClientError("invalid_frame", f'op {op!r} needs a string field "channel"')
    if not is_channel(channel):
        return ClientError("invalid_channel", CHANNEL_RULE)
    since = value.get("since")
    if op == "unsubscribe" or since is None:
        return ClientOp(op, channel)
    if not isinstance(since, dict):
        return ClientError("invalid_since", _SINCE_RULE)
    offset, epoch = since.get("offset"), since.get("epoch")
    if type(offset) is not int or not 0 <= offset < 2**63 or not isinstance(epoch, str) or not 0 < len(epoch) <= 64:
        return ClientError("invalid_since", _SINCE_RULE)
    return ClientOp(op, channel, since=(offset, epoch))


# --- publications arriving from Redis --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Invalid:
    """Why a frame from Redis is dropped instead of delivered."""

    why: str


def check_publication(channel: str, payload: bytes, max_bytes: int) -> tuple[int | None, str | None] | Invalid:
    """A frame from Redis's ``channel``: its (offset, epoch), both None for one published without
    an offset, or why it must not reach any subscriber.

    Anyone who can PUBLISH could otherwise send subscribers of one channel frames claiming another,
    or frames that are not frames at all.
    """
    if len(payload) > max_bytes:
        return Invalid(f"{len(payload)} bytes, over MAX_MESSAGE_BYTES")
    try:
        frame = codec.loads(payload)
    except codec.JSONDecodeError:
        return Invalid("not JSON (or not UTF-8)")
    if not isinstance(frame, dict) or frame.get("channel") != channel:
        return Invalid(f'not a JSON object with "channel": {channel!r}')
    offset, epoch = frame.get("offset"), frame.get("epoch")
    if offset is None and epoch is None:
        return None, None
    if type(offset) is not int or offset < 1 or not isinstance(epoch, str) or not epoch:
        return Invalid("an offset that is not a positive integer, or an epoch that is not a string")
    return offset, epoch
