"""The ASGI application: ``create_app(settings)`` and the lifespan that wires the parts.

Start-up builds, in order: tracker, hub, broker (pool + listener), memory monitor, metrics,
heartbeat; shutdown tears them down in reverse. HTTP routes: POST /publish, GET /health,
GET /health/cluster, GET /metrics, GET /client.js.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from service import codec, health
from service.broker import Broker, RedisUnavailable
from service.config import CHANNEL_RE, Settings
from service.endpoint import websocket_endpoint
from service.gate import Gate
from service.hub import Hub
from service.keys import Keys
from service.memory import MemoryMonitor
from service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from service.metrics import Metrics
from service.tracker import Tracker

log = logging.getLogger("wsbroadcast.app")


class _JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class Service:
    """Everything one worker holds, built by the lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self.worker_id = health.worker_identity()
        self.worker_name = f"{self.worker_id[0]}:{self.worker_id[1]}"
        self.started_at = time.time()
        self.gate = Gate(settings)
        self.hub = Hub(self._on_first, self._on_last, settings.queue_size, settings.queue_bytes)
        self.tracker = Tracker(settings.max_connections, settings.idle_timeout, self.hub.last_publish)
        self.broker = Broker(settings, self.keys, self.worker_id, self._on_message)
        self.memory = MemoryMonitor(settings, self.tracker)
        self.metrics = Metrics(self)
        self.hub.on_fanout = self.metrics.observe_fanout
        self.heartbeat = health.Heartbeat(self)
        self._invalid_logged = False

    def _on_first(self, channel: str) -> None:
        self.broker.want(channel)

    def _on_last(self, channel: str) -> None:
        self.broker.unwant(channel)

    def _on_message(self, channel: str, payload: bytes) -> None:
        counters = self.tracker.counters
        counters.received_redis += 1
        if len(payload) > self.settings.max_message_bytes:
            self._invalid(channel, f"{len(payload)} bytes, over MAX_MESSAGE_BYTES")
            return
        try:
            self.hub.publish(channel, payload)
        except UnicodeDecodeError:
            self._invalid(channel, "not UTF-8")

    def _invalid(self, channel: str, why: str) -> None:
        self.tracker.counters.invalid_payloads += 1
        # One line per worker lifetime; the counter (in /health and /metrics) tells the rest.
        if not self._invalid_logged:
            self._invalid_logged = True
            log.warning("dropped a publication on %r: %s (further ones are only counted)", channel, why)


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    service: Service = app.state.service
    service.broker.start()
    service.memory.check()
    tasks = [
        asyncio.create_task(service.tracker.run_sweeps(service.settings.cleanup_interval), name="idle-sweep"),
        asyncio.create_task(service.memory.run(), name="memory"),
        asyncio.create_task(service.metrics.run(), name="metrics"),
        asyncio.create_task(service.heartbeat.run(), name="heartbeat"),
    ]
    log.info("worker %s started: %s", service.worker_name, service.settings.public())
    try:
        yield
    finally:
        for task in reversed(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await service.heartbeat.remove()
        await service.broker.stop()
        log.info("worker %s stopped", service.worker_name)


async def publish(request: Request) -> Response:
    service: Service = request.app.state.service
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
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > settings.max_message_bytes:
        return _problem(413, f"body over MAX_MESSAGE_BYTES ({settings.max_message_bytes})")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > settings.max_message_bytes:
            return _problem(413, f"body over MAX_MESSAGE_BYTES ({settings.max_message_bytes})")
    try:
        doc = codec.loads(bytes(body))
    except codec.JSONDecodeError:
        return _problem(400, "body is not valid JSON")
    if not isinstance(doc, dict) or set(doc) != {"channel", "data"}:
        return _problem(400, 'body must be a JSON object with exactly "channel" and "data"')
    channel = doc["channel"]
    if not isinstance(channel, str) or not CHANNEL_RE.fullmatch(channel):
        return _problem(400, "channel names match [A-Za-z0-9_.:-]{1,128}")
    frame = codec.publication(channel, doc["data"])
    if len(frame) > settings.max_message_bytes:
        return _problem(413, f"frame over MAX_MESSAGE_BYTES ({settings.max_message_bytes})")
    try:
        workers = await service.broker.publish(channel, frame)
    except RedisUnavailable as exc:
        log.warning("publish to %r failed: Redis unavailable: %s", channel, exc)
        return _problem(503, "Redis unavailable; nothing was published", {"Retry-After": "1"})
    service.tracker.counters.published_http += 1
    return _JSON({"channel": channel, "workers": workers}, status_code=202)


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return _JSON({"error": detail}, status_code=status, headers=headers)


async def worker_health(request: Request) -> Response:
    doc = health.worker_stats(request.app.state.service)
    return _JSON(doc, status_code=503 if doc["status"] == health.FAILING else 200)


async def cluster_health(request: Request) -> Response:
    service: Service = request.app.state.service
    doc = await health.cluster_report(service.broker.redis, service.keys)
    return _JSON(doc, status_code=503 if doc["status"] == health.FAILING else 200)


async def metrics(request: Request) -> Response:
    service: Service = request.app.state.service
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == "/ws":
            scope["app"] = self
            await websocket_endpoint(WebSocket(scope, receive, send), receive)
            return
        await super().__call__(scope, receive, send)


@functools.cache
def _static(name: str) -> bytes:
    return (Path(__file__).parent / "static" / name).read_bytes()


async def client_js(request: Request) -> Response:
    # no-cache: browsers revalidate, so a deploy's new client reaches them; any origin's page may
    # import it (a module script from another origin needs CORS).
    headers = {"Cache-Control": "no-cache", "Access-Control-Allow-Origin": "*"}
    return Response(_static("client.js"), media_type="text/javascript", headers=headers)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = Settings.from_env() if settings is None else settings
    app = _App(
        routes=[
            Route("/publish", publish, methods=["POST"]),
            Route("/health", worker_health),
            Route("/health/cluster", cluster_health),
            Route("/metrics", metrics),
            Route("/client.js", client_js),
        ],
        lifespan=_lifespan,
    )
    app.state.service = Service(settings)
    return app
