"""The ASGI application: ``create_app(settings)``, its routes, and a lifespan that starts and stops
the worker's node (``service.node``).

HTTP routes: POST /publish[/<channel>], GET /health, GET /health/cluster, GET /metrics,
GET /client.js, GET /dashboard; /ws goes to ``service.endpoint``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from service import codec, dashboard, health, publication, publisher, wire
from service.config import Settings
from service.counters import Counters
from service.endpoint import websocket_endpoint
from service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from service.node import Node
from service.ratelog import RateLimitedLog

log = logging.getLogger("wsbroadcast.app")

# What the publish function adds around the data and the channel's name (its offset, epoch and
# field names), at most: a frame over MAX_MESSAGE_BYTES would be dropped by every worker.
FRAME_OVERHEAD = 80
ratelog = RateLimitedLog(log)


class _JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return codec.dumps(content)


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    node: Node = app.state.node
    await node.start()
    try:
        yield
    finally:
        await node.stop()


async def publish(request: Request) -> Response:
    """``POST /publish`` (body ``{"channel":..,"data":..}``) and ``POST /publish/<channel>`` (body: the data)."""
    service: Node = request.app.state.node
    settings = service.settings
    token = settings.publish_token
    if not token:
        return _problem(403, "publishing over HTTP is disabled: set PUBLISH_TOKEN to enable it")
    auth = request.headers.get("authorization", "")
    if not auth.lower().startswith("bearer "):
        return _problem(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
        return _problem(403, "wrong bearer token")
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        return _problem(415, "send Content-Type: application/json")
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is not None and not publisher.IDEMPOTENCY_KEY_RE.fullmatch(idempotency_key):
        return _problem(400, publisher.IDEMPOTENCY_KEY_RULE)
    path_channel: str | None = request.path_params.get("channel")
    if path_channel is not None and not wire.is_channel(path_channel):
        return _problem(400, wire.CHANNEL_RULE)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > settings.max_message_bytes:
        return _problem(413, f"body over MAX_MESSAGE_BYTES ({settings.max_message_bytes})")
    body = bytearray()
    try:
        async with asyncio.timeout(settings.body_timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > settings.max_message_bytes:
                    return _problem(413, f"body over MAX_MESSAGE_BYTES ({settings.max_message_bytes})")
    except TimeoutError:
        service.counters.http_rejected_body_timeout += 1
        return _problem(408, f"body not received within BODY_TIMEOUT ({settings.body_timeout:g} s)",
                        {"Connection": "close"})
    except ClientDisconnect:
        ratelog.info("publish_disconnect", "a publisher disconnected before sending its whole body")
        return Response(status_code=400)  # nobody reads it
    try:
        if path_channel is None:
            channel, data = publication.split_body(bytes(body))
        else:
            channel, data = path_channel, publication.check_data(bytes(body))
    except publication.InvalidPublication as exc:
        return _problem(400, str(exc))
    if len(data) + FRAME_OVERHEAD + len(channel) > settings.max_message_bytes:
        return _problem(413, f"frame over MAX_MESSAGE_BYTES ({settings.max_message_bytes})")
    counters = service.counters
    try:
        result = await service.broker.publish(channel, data, idempotency_key)
    except publisher.IdempotencyConflict as exc:
        return _problem(422, str(exc))
    except publisher.PublishError as exc:
        return _unavailable(service, channel, exc, idempotency_key is not None)
    body_doc = {"channel": channel, "offset": result.offset, "epoch": result.epoch, "workers": result.workers}
    if result.replay:
        counters.publish_replays += 1
        return _JSON(body_doc, status_code=202, headers={"Idempotent-Replay": "true"})
    counters.published_http += 1
    return _JSON(body_doc, status_code=202)


def _unavailable(service: Node, channel: str, exc: publisher.PublishError, keyed: bool) -> Response:
    counters = service.counters
    headers = {"Retry-After": "1"}
    if exc.published is False:
        counters.publish_refused += 1
        ratelog.warning("publish_refused", "publish to %r failed, nothing published: %s", channel, exc)
        doc: dict[str, Any] = {"error": f"Redis unavailable; nothing was published ({exc})", "published": False}
        return _JSON(doc, status_code=503, headers=headers)
    counters.publish_unknown += 1
    ratelog.warning("publish_unknown", "publish to %r unanswered, may have been made: %s", channel, exc)
    retry = (
        "a retry with the same Idempotency-Key is safe"
        if keyed
        else "a retry may publish it twice; send an Idempotency-Key header to make retries safe"
    )
    doc = {
        "error": f"Redis did not answer ({exc}); the publication may or may not have been made: {retry}",
        "published": "unknown",
    }
    return _JSON(doc, status_code=503, headers=headers)


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return _JSON({"error": detail}, status_code=status, headers=headers)


_NO_DETAIL = "health detail is not available over HTTP: ADMIN_TOKEN is unset (scripts/health reads it from Redis)"
_DETAIL_HINT = "channels, counters, queues and settings: send Authorization: Bearer <ADMIN_TOKEN>"


def _health_access(request: Request) -> bool | Response:
    """Whether a health request gets the full document (True), the public one (False), or a refusal.

    No Authorization header: the public document. A bearer token: the full one if it is
    ADMIN_TOKEN, else 403, and 403 when ADMIN_TOKEN is unset (no detail over HTTP at all).
    """
    auth = request.headers.get("authorization")
    if auth is None:
        return False
    if not auth.lower().startswith("bearer "):
        return _problem(401, "health detail needs Authorization: Bearer <ADMIN_TOKEN>", {"WWW-Authenticate": "Bearer"})
    token = request.app.state.node.settings.admin_token
    if not token:
        return _problem(403, _NO_DETAIL)
    if not hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
        return _problem(403, "wrong bearer token")
    return True


def _public(doc: dict[str, Any], settings: Settings) -> dict[str, Any]:
    doc["detail"] = _DETAIL_HINT if settings.admin_token else _NO_DETAIL
    return doc


def _health_json(doc: dict[str, Any]) -> Response:
    return _JSON(doc, status_code=503 if doc["status"] == health.FAILING else 200)


async def worker_health(request: Request) -> Response:
    service: Node = request.app.state.node
    access = _health_access(request)
    if isinstance(access, Response):
        return access
    doc = service.stats()
    return _health_json(doc if access else _public(health.public_worker(doc), service.settings))


async def cluster_health(request: Request) -> Response:
    service: Node = request.app.state.node
    access = _health_access(request)
    if isinstance(access, Response):
        return access
    doc = await health.cluster_report(service.broker.masters(), service.keys, health.CLUSTER_TIMEOUT)
    return _health_json(doc if access else _public(health.public_cluster(doc), service.settings))


async def metrics(request: Request) -> Response:
    service: Node = request.app.state.node
    service.metrics.sync()  # this worker's figures fresh; the others' are at most a second old
    # Reading every worker's file is blocking I/O: keep it off the event loop.
    body = await anyio.to_thread.run_sync(service.metrics.render)
    return Response(body, media_type=METRICS_CONTENT_TYPE)


class _App(Starlette):
    """Starlette for HTTP; /ws goes straight to the endpoint.

    Each open WebSocket keeps its whole call stack alive for its lifetime: Starlette's error,
    exception and routing layers would add about 4 KB of suspended frames to every idle connection,
    for handlers that our endpoint does not need (it catches what it expects, and uvicorn logs
    anything else).
    """

    @property
    def counters(self) -> Counters:
        """The worker's counters, for the server's protocols (workers/http.py counts its rejections)."""
        node: Node = self.state.node
        return node.counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == "/ws":
            scope["app"] = self
            await websocket_endpoint(WebSocket(scope, receive, send), receive)
            return
        await super().__call__(scope, receive, send)


async def client_js(request: Request) -> Response:
    # no-cache: browsers revalidate, so a deploy's new client reaches them; any origin's page may
    # import it (a module script from another origin needs CORS).
    headers = {"Cache-Control": "no-cache", "Access-Control-Allow-Origin": "*"}
    return Response(dashboard.static_file("client.js"), media_type="text/javascript", headers=headers)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = Settings.from_env() if settings is None else settings
    app = _App(
        routes=[
            Route("/publish", publish, methods=["POST"]),
            Route("/publish/{channel}", publish, methods=["POST"]),
            Route("/health", worker_health),
            Route("/health/cluster", cluster_health),
            Route("/metrics", metrics),
            Route("/client.js", client_js),
            *dashboard.ROUTES,
        ],
        lifespan=_lifespan,
    )
    app.state.node = Node(settings)
    return app
