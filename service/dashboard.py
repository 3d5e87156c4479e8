"""GET /dashboard: the operator's live page, behind HTTP Basic auth with ADMIN_TOKEN as the password.

The page (service/static/dashboard.html and dashboard.js) polls ``/dashboard/cluster``, the same
report as ``GET /health/cluster`` with every worker's heartbeat, and computes rates in the browser
from successive counter values: the service does nothing per message for it, only one cluster read
(SCAN + MGET of the heartbeats) per poll of an open page.

A browser can send Basic credentials by itself (and asks for them on a 401), where a bearer token
would need a login form, so the page needs nothing but its URL. With ADMIN_TOKEN unset the page
does not exist: 404, as for any unknown path.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service import codec, health

STATIC = Path(__file__).resolve().parent / "static"
REALM = 'Basic realm="wsbroadcast dashboard", charset="UTF-8"'
_FILES = {"dashboard.html": "text/html; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}
# The page and its script are re-validated on every load: after an upgrade the page is the new one.
# It loads nothing from elsewhere and may not be framed by another site (clickjacking).
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


@functools.cache
def static_file(name: str) -> bytes:
    """A file the service serves from service/static/ (the dashboard's, client.js), read once."""
    return (STATIC / name).read_bytes()


def _password(header: str) -> str | None:
    """The password of an ``Authorization: Basic`` header (any user name), or None."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _user, sep, password = decoded.partition(":")
    return password if sep else None


def _refusal(request: Request) -> Response | None:
    """404 with ADMIN_TOKEN unset, 401 (a Basic challenge) without the right password, else None."""
    token: str = request.app.state.node.settings.admin_token
    if not token:
        return Response("Not Found", status_code=404, media_type="text/plain")
    password = _password(request.headers.get("authorization", ""))
    if password is None or not hmac.compare_digest(password.encode(), token.encode()):
        return Response(
            "the dashboard needs HTTP Basic auth: any user name, ADMIN_TOKEN as the password\n",
            status_code=401,
            media_type="text/plain",
            headers={"WWW-Authenticate": REALM},
        )
    return None


async def page(request: Request) -> Response:
    name = request.path_params.get("name", "dashboard.html")
    if (refusal := _refusal(request)) is not None:
        return refusal
    if name not in _FILES:
        return Response("Not Found", status_code=404, media_type="text/plain")
    return Response(static_file(name), media_type=_FILES[name], headers=_HEADERS)


async def cluster(request: Request) -> Response:
    if (refusal := _refusal(request)) is not None:
        return refusal
    service = request.app.state.node
    doc = await health.cluster_report(service.broker.masters(), service.keys, health.CLUSTER_TIMEOUT)
    # Always 200: a failing cluster is what the page is there to show, not an error to fetch.
    return Response(codec.dumps(doc), media_type="application/json", headers={"Cache-Control": "no-store"})


ROUTES = [
    Route("/dashboard", page),
    Route("/dashboard/cluster", cluster),
    Route("/dashboard/{name}", page),
]
