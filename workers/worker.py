"""Our gunicorn worker: uvicorn's, with the WebSocket settings decided by the service.

uvicorn's defaults would turn permessage-deflate on (60-140 KB and a compression pass per
connection per frame) and pick its own ping timing; here they come from Settings, and the protocol
is ours (``workers.protocol``), which offers the fast path.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

from gunicorn.arbiter import Arbiter
from uvicorn.config import Config
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from service.config import Settings
from workers.limits import Limits
from workers.logfilter import ClientLogFilter, RedactingFilter


def config_kwargs(settings: Settings) -> dict[str, Any]:
    """uvicorn's Config arguments for a wsbroadcast worker (the worker class and the breakdown tool)."""
    return {
        "loop": "uvloop",
        "http": "workers.http:BroadcastHttpProtocol",
        "ws": "workers.protocol:BroadcastWebSocketProtocol",
        "ws_per_message_deflate": settings.ws_compression,
        "ws_ping_interval": settings.ws_ping_interval or None,
        "ws_ping_timeout": settings.ws_ping_timeout or None,
        "ws_max_size": settings.max_message_bytes,
        "lifespan": "on",
        # The service reads no client address (per-connection access lines are filtered out),
        # and the proxy-headers middleware would keep one more suspended coroutine alive per
        # idle WebSocket.
        "proxy_headers": False,
        # Leave gunicorn's graceful timeout a second to reap us after our own shutdown.
        "timeout_graceful_shutdown": max(1.0, settings.graceful_timeout - 1.0),
    }


def configure(config: Config, settings: Settings, app: Any) -> None:
    """What our protocols read from uvicorn's config beyond its own options."""
    config.wsbroadcast_send_buffer_bytes = settings.send_buffer_bytes  # type: ignore[attr-defined]
    config.wsbroadcast_limits = Limits.from_settings(settings)  # type: ignore[attr-defined]
    # The HTTP protocol counts its rejections in the worker's counters (no per-connection state).
    config.wsbroadcast_counters = getattr(app, "counters", None)  # type: ignore[attr-defined]
    # The lean path (workers.lean) serves /ws with the app's parts, without the ASGI app.
    config.wsbroadcast_node = getattr(app, "node", None)  # type: ignore[attr-defined]


class BroadcastWorker(UvicornWorker):  # type: ignore[misc]  # uvicorn_worker ships no type information
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._settings = settings = Settings.from_env()
        self.CONFIG_KWARGS = config_kwargs(settings)
        super().__init__(*args, **kwargs)
        # Anything a client can trigger is logged rate-limited and without its token (workers.logfilter).
        logging.getLogger("uvicorn.error").addFilter(ClientLogFilter())
        logging.getLogger("uvicorn.access").addFilter(RedactingFilter())
        ours = logging.getLogger("wsbroadcast")
        ours.handlers = self.log.error_log.handlers
        ours.setLevel(self.log.error_log.level)
        ours.propagate = False

    async def _serve(self) -> None:
        # As uvicorn_worker's, but gunicorn's quick shutdown (SIGQUIT, sent on SIGINT to the master)
        # reaches uvicorn's server: the base class's handler only flips a flag nothing reads, so
        # workers sat out the graceful timeout and were SIGKILLed.
        self.config.app = self.wsgi
        configure(self.config, self._settings, self.wsgi)
        server = Server(config=self.config)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGQUIT, server.handle_exit, signal.SIGQUIT, None)
        # uvloop closes a listener's file descriptor in server.close() and then calls close() on the
        # object it was given: gunicorn's socket wrapper would close it a second time (EBADF, logged
        # per worker at every shutdown). Given the plain socket, uvloop detaches it instead.
        await server.serve(sockets=[listener.sock for listener in self.sockets])
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
