"""A publication's bytes: the publisher's JSON is validated, never re-encoded.

Subscribers receive ``data`` byte for byte as the publisher sent it (big integers, long decimals,
duplicate keys, escapes and whitespace intact), so ``POST /publish`` finds the span of ``data`` in
its body instead of parsing and serializing it again.

The common body, ``{"channel":"x","data":...}`` with plain keys in that order, is matched by a
regular expression on its first bytes; its ``data`` then runs to the closing brace, and parsing that
span with orjson proves the whole body is one object with exactly those two members (a duplicated
member would leave ``V1,"data":V2``, which is not one JSON value). Any other body (members in the
other order, escaped keys) is parsed whole with orjson and walked member by member with the
standard library's ``raw_decode``, which reports where each value ends.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from service.wire import CHANNEL_RULE, is_channel

# Data may nest this deep, so that its frame (one level more) is within what orjson can serialize:
# every tool built on our codec can re-encode any frame we deliver.
MAX_DEPTH = 253

_WS = b" \t\n\r"
_FAST = re.compile(
    rb'[ \t\n\r]*\{[ \t\n\r]*"channel"[ \t\n\r]*:[ \t\n\r]*"([A-Za-z0-9_.:-]{1,128})"[ \t\n\r]*,'
    rb'[ \t\n\r]*"data"[ \t\n\r]*:'
)
_DECODER = json.JSONDecoder()
_SHAPE = 'body must be a JSON object with exactly "channel" and "data"'


class InvalidPublication(ValueError):
    """Publisher input that cannot be published; the message is the answer to give (HTTP 400)."""


def check_data(data: bytes) -> bytes:
    """Validate ``data`` as one JSON value; return its bytes without surrounding whitespace."""
    stripped = data.strip(_WS)
    try:
        value = orjson.loads(stripped)
    except orjson.JSONDecodeError as exc:
        raise InvalidPublication(_not_json("data", exc)) from None
    _check_depth(stripped, value)
    return stripped


def split_body(body: bytes) -> tuple[str, bytes]:
    """The channel and the exact ``data`` bytes of a ``{"channel":..,"data":..}`` body."""
    match = _FAST.match(body)
    if match is not None:
        end = len(body.rstrip(_WS))
        if body[end - 1 : end] == b"}":
            try:
                return match.group(1).decode(), check_data(body[match.end() : end - 1])
            except InvalidPublication:
                pass  # the full walk names the problem precisely
    return _walk(body)


def _walk(body: bytes) -> tuple[str, bytes]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidPublication(_not_json("body", exc)) from None
    if not isinstance(doc, dict) or set(doc) != {"channel", "data"}:
        raise InvalidPublication(_SHAPE)
    channel = doc["channel"]
    if not isinstance(channel, str) or not is_channel(channel):
        raise InvalidPublication(CHANNEL_RULE)
    # Before raw_decode, whose recursion limit is below orjson's.
    _check_depth(body, doc["data"])
    text = body.decode()
    spans: dict[str, tuple[int, int]] = {}
    at = _skip(text, 0) + 1  # past "{": orjson has validated the structure
    try:
        while True:
            key, at = _DECODER.raw_decode(text, _skip(text, at))
            start = _skip(text, _skip(text, at) + 1)  # past ":"
            _, at = _DECODER.raw_decode(text, start)
            if key in spans:
                raise InvalidPublication(f"duplicate member {key!r} in the body")
            spans[key] = (start, at)
            at = _skip(text, at)
            if text[at] == "}":
                break
            at += 1  # past ","
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, InvalidPublication):
            raise
        raise InvalidPublication(f"data cannot be read: {exc}") from None
    start, end = spans["data"]
    return channel, text[start:end].encode()


def _skip(text: str, at: int) -> int:
    while text[at] in " \t\n\r":
        at += 1
    return at


def _check_depth(raw: bytes, value: Any) -> None:
    # Counting brackets (strings included) is a C-speed bound: only input with that many can be
    # too deep, and only that input pays for the exact test (orjson refuses to serialize it).
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return
    try:
        orjson.dumps([value])
    except orjson.JSONEncodeError:
        raise InvalidPublication(f"data nests too deep: data may nest at most {MAX_DEPTH} levels") from None


def _not_json(what: str, exc: orjson.JSONDecodeError) -> str:
    if "depth limit" in str(exc):
        return f"{what} nests too deep: data may nest at most {MAX_DEPTH} levels"
    return f"{what} is not valid JSON: {exc}"
