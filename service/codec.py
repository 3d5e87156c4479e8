"""The one JSON codec (orjson) and the wire frames built with it.

Publication frames are serialized once, by the publisher; workers only decode the bytes to text and
frame them. Control frames are small and built per connection, which is fine off the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from service.config import CHANNEL_RE

JSONDecodeError = orjson.JSONDecodeError


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def publication(channel: str, data: Any) -> bytes:
    """The frame every subscriber of ``channel`` receives, for a Python value ``data``."""
    return publication_frame(channel, orjson.dumps(data))


def publication_frame(channel: str, data: bytes) -> bytes:
    """The frame around the publisher's serialized ``data``, which is never re-encoded.

    ``channel`` must match CHANNEL_RE (nothing in it needs escaping); ``data`` must be one valid
    JSON value (see service.publication).
    """
    return b'{"channel":"' + channel.encode() + b'","data":' + data + b"}"


def control(op: str, **fields: Any) -> str:
    return orjson.dumps({"op": op, **fields}).decode()


def error(code: str, detail: str) -> str:
    return control("error", error=code, detail=detail)


PONG = control("pong")


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


def parse_client_frame(text: str) -> ClientOp | ClientError:
    """Parse one client text frame. Never raises: anything invalid becomes a ClientError."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
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
    if not CHANNEL_RE.fullmatch(channel):
        return ClientError("invalid_channel", "channel names match [A-Za-z0-9_.:-]{1,128}")
    since = value.get("since")
    if op == "unsubscribe" or since is None:
        return ClientOp(op, channel)
    if not isinstance(since, dict):
        return ClientError("invalid_since", _SINCE_RULE)
    offset, epoch = since.get("offset"), since.get("epoch")
    if type(offset) is not int or not 0 <= offset < 2**63 or not isinstance(epoch, str) or not 0 < len(epoch) <= 64:
        return ClientError("invalid_since", _SINCE_RULE)
    return ClientOp(op, channel, since=(offset, epoch))


_SINCE_RULE = '"since" must be {"offset": <integer >= 0>, "epoch": "<1-64 characters>"}, as the server sent them'

