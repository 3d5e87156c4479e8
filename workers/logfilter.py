"""What uvicorn and websockets log about clients, made fit for a service that faces hostile ones.

Every line a client can trigger (a refused handshake, a frame that is not UTF-8, a request that is
not HTTP) reaches the log at most once per interval, with the count of the others and never with a
traceback; per-connection chatter (opened, closed, accepted) is dropped; and a connect token never
reaches the log, however its name is spelled in the query string.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

from service.ratelog import DEFAULT_INTERVAL, RateLimitedLog

# Query parameters that carry credentials, compared after decoding the name as the query parser does.
SECRET_PARAMS = frozenset({"token"})
REDACTED = "***"

# The raw query after a "?", to the next whitespace: uvicorn logs the path quoted but the query raw,
# and a raw query may hold quotes and brackets, so nothing but whitespace ends it.
_QUERY_RE = re.compile(r"\?(\S*)")
_PAIR_SEPARATORS = re.compile(r"([&;])")

# uvicorn's and websockets' lines that a client triggers, by their format string: the key they are
# rate-limited under, the level and what we say instead. A refused handshake is keyed by its status.
_CLIENT_LINES: dict[str, tuple[str, int, str]] = {
    "Invalid UTF-8 sequence received from client.": (
        "invalid_utf8", logging.WARNING, "a client sent a text frame that is not UTF-8; closed it with 1007"
    ),
    "Invalid HTTP request received.": ("invalid_http", logging.WARNING, "invalid HTTP request; answered 400"),
    "Unsupported upgrade request.": ("unsupported_upgrade", logging.WARNING, "unsupported Upgrade request"),
    "opening handshake failed": ("handshake_failed", logging.WARNING, "WebSocket opening handshake failed"),
    "parser failed": ("frame_parser_failed", logging.WARNING, "WebSocket frame parser failed; closed it with 1011"),
}
_WS_RESPONSE_LINES = ('%s - "WebSocket %s" %d', '%s - "WebSocket %s" 403')
_NOISE_PREFIXES = ("connection rejected",)
_NOISE = frozenset({"connection open", "connection closed"})


def _decoded_name(name: str) -> str:
    # Decode as often as it changes: whatever the parser would read as "token" is redacted, and so
    # is a name encoded twice over.
    for _ in range(5):
        decoded = unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    return name.strip().casefold()


def _redact_query(match: re.Match[str]) -> str:
    parts = _PAIR_SEPARATORS.split(match.group(1))
    for i in range(0, len(parts), 2):
        name, equals, value = parts[i].partition("=")
        if equals and value and _decoded_name(name) in SECRET_PARAMS:
            parts[i] = f"{name}={REDACTED}"
    return "?" + "".join(parts)


def redact(text: str) -> str:
    """``text`` with the value of every secret query parameter of every URL in it replaced by ***."""
    if "?" not in text:
        return text
    return _QUERY_RE.sub(_redact_query, text)


def redact_record(record: logging.LogRecord) -> None:
    if isinstance(record.msg, str):
        record.msg = redact(record.msg)
    if isinstance(record.args, tuple):
        record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)


class RedactingFilter(logging.Filter):
    """Only redaction: for logs meant to hold every line (an access log an operator turned on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


class ClientLogFilter(logging.Filter):
    """For ``uvicorn.error`` (which websockets logs to as well): redacts, drops per-connection
    lines, and turns client-triggered ones into one rate-limited line per kind, without traceback."""

    def __init__(self, interval: float = DEFAULT_INTERVAL) -> None:
        super().__init__()
        # Our own logger: a line logged to uvicorn.error would come back through this filter.
        self._rated = RateLimitedLog(logging.getLogger("wsbroadcast.clients"), interval)

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        template = record.msg
        if template in _WS_RESPONSE_LINES:
            args = record.args if isinstance(record.args, tuple) else ()
            status = args[2] if len(args) > 2 and isinstance(args[2], int) else 403
            # Keyed by status, a bounded vocabulary (HTTP statuses), never by anything the client sent.
            self._rated.info(f"handshake_refused_{status}", "handshake refused: %s", record.getMessage())
            return False
        known = _CLIENT_LINES.get(template) if isinstance(template, str) else None
        if known is not None:
            key, level, text = known
            if record.exc_info and record.exc_info[1] is not None:
                # The exception's text says what was wrong with the input; its traceback says nothing.
                self._rated.log(level, key, "%s (%s)", text, record.exc_info[1])
            else:
                self._rated.log(level, key, "%s", text)
            return False
        if record.levelno > logging.INFO:
            return True
        message = record.getMessage()
        return not (message in _NOISE or message.endswith("[accepted]") or message.startswith(_NOISE_PREFIXES))
