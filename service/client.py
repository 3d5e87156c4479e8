"""An asyncio subscriber: the browser client's rules (``/client.js``) for Python apps and tools.

::

    async with Subscriber("ws://127.0.0.1:8000/ws", token=token) as sub:
        sub.subscribe("news", handler)           # handler(data, publication), sync or async
        async for event in sub:                  # or iterate over every event
            ...

It reconnects with full-jitter exponential backoff (``min_delay`` to ``max_delay``, started again
after a connection that lasted ``stable_after``), resubscribes every channel with its last
``{offset, epoch}`` right after each connect, so the server sends what was missed, drops
duplicates by offset, pings and treats a missing pong as a dead connection, and surfaces ``Gap``
events (a ``gap`` frame, or ``recovered:false``) so the app can reload that channel's state.
Publications without an offset (a raw ``PUBLISH``) are delivered as they come, never deduplicated.

Slow handlers and iterators apply backpressure: the socket is not read meanwhile, so memory stays
bounded and the server's slow-consumer policy decides (4008, then a reconnect that recovers).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from service import codec, wire
from service.ratelog import RateLimitedLog

log = logging.getLogger("wsbroadcast.client")
_ratelog = RateLimitedLog(log)

State = Literal["connecting", "connected", "disconnected"]


@dataclass(frozen=True, slots=True)
class Publication:
    channel: str
    data: Any
    offset: int | None  # None for a frame published around the offsets (raw PUBLISH)
    epoch: str | None


@dataclass(frozen=True, slots=True)
class Gap:
    """Publications of ``channel`` up to ``offset`` that this client did not get are lost."""

    channel: str
    offset: int | None
    epoch: str | None
    reason: Literal["gap", "not_recovered"]


@dataclass(frozen=True, slots=True)
class Subscribed:
    channel: str
    offset: int | None
    epoch: str | None
    recovered: bool | None  # None when the subscribe carried no since


@dataclass(frozen=True, slots=True)
class StateChange:
    state: State


@dataclass(frozen=True, slots=True)
class ServerError:
    """An error frame (``code`` 0), a refusing close (``code`` 1008, 3000) or a refused handshake (401, 403)."""

    error: str
    detail: str
    code: int = 0


Event = Publication | Gap | Subscribed | StateChange | ServerError
Handler = Callable[[Any, Publication], Awaitable[None] | None]
TokenSource = str | Callable[[], str | Awaitable[str]] | None


class Position:
    """Where one channel stands: the last offset delivered in its epoch."""

    __slots__ = ("epoch", "handlers", "offset")

    def __init__(self) -> None:
        self.offset: int | None = None
        self.epoch: str | None = None
        self.handlers: list[Handler] = []

    def accept(self, offset: Any, epoch: Any) -> bool:
        """Whether a publication is new (and if so, advance); False for a duplicate."""
        if not isinstance(offset, int):
            return True
        if epoch == self.epoch and self.offset is not None and offset <= self.offset:
            return False
        self.offset, self.epoch = offset, epoch
        return True

    def advance(self, offset: Any, epoch: Any) -> None:
        """Move to an ack's or gap's position; never back within one epoch."""
        if isinstance(offset, int) and isinstance(epoch, str):
            if epoch != self.epoch or self.offset is None or offset > self.offset:
                self.offset, self.epoch = offset, epoch

    def since(self) -> dict[str, Any] | None:
        if self.offset is None or self.epoch is None:
            return None
        return {"offset": self.offset, "epoch": self.epoch}


class Subscription:
    def __init__(self, subscriber: Subscriber, channel: str, handler: Handler | None) -> None:
        self._subscriber = subscriber
        self.channel = channel
        self._handler = handler
        self._active = True

    def unsubscribe(self) -> None:
        if self._active:
            self._active = False
            self._subscriber._drop(self.channel, self._handler)


class Subscriber:
    def __init__(
        self,
        url: str,
        *,
        token: TokenSource = None,
        min_delay: float = 0.5,
        max_delay: float = 20.0,
        policy_delay: float = 60.0,
        stable_after: float = 5.0,
        ping_interval: float = 15.0,
        pong_timeout: float = 10.0,
        events: int = 1000,
    ) -> None:
        self.url = url
        self.token = token
        self.min_delay, self.max_delay, self.policy_delay = min_delay, max_delay, policy_delay
        self.stable_after = stable_after
        self.ping_interval, self.pong_timeout = ping_interval, pong_timeout
        self.state: State = "disconnected"
        self.duplicates = 0  # publications dropped as already delivered
        self.connects = 0
        self.retry_in = 0.0  # the delay before the next connect attempt
        self.worker: str | None = None  # host:pid of the worker holding the connection, as the server names it
        self._queue_size = events
        self._channels: dict[str, Position] = {}
        self._listeners: dict[str, list[Callable[..., Any]]] = {}
        self._queues: list[asyncio.Queue[Event]] = []
        self._ws: ClientConnection | None = None
        self._pong = asyncio.Event()
        self._attempt = 0
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Subscriber:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="wsbroadcast-subscriber")

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if self._ws is not None:
            await self._ws.close()
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._set_state("disconnected")

    def subscribe(self, channel: str, handler: Handler | None = None) -> Subscription:
        """Subscribe at any time; ``handler(data, publication)`` gets each publication once, in order."""
        if not wire.is_channel(channel):
            raise ValueError(f"invalid channel name {channel!r}: {wire.CHANNEL_RULE}")
        position = self._channels.get(channel)
        if position is None:
            position = self._channels[channel] = Position()
            if self.state == "connected":
                self._send_soon({"op": "subscribe", "channel": channel})
        if handler is not None:
            position.handlers.append(handler)
        return Subscription(self, channel, handler)

    def on(self, event: str, callback: Callable[..., Any]) -> Callable[[], None]:
        """Callbacks (sync or async) for ``state`` (state), ``gap`` (Gap), ``subscribed`` (Subscribed),
        ``error`` (ServerError); returns a function that removes it."""
        self._listeners.setdefault(event, []).append(callback)
        return lambda: self._listeners[event].remove(callback)

    async def refresh(self, token: str) -> None:
        """Send a fresh connect token before the current one expires; later reconnects use it too."""
        self.token = token
        await self._send({"op": "refresh", "token": token})

    def __aiter__(self) -> AsyncIterator[Event]:
        """Every event from now on. Registered at once (before the first await), so an iterator
        started right after ``async with`` sees the first ``connecting``; it holds up the reading
        of the socket while full, and an abandoned one is unregistered when collected."""
        queue: asyncio.Queue[Event] = asyncio.Queue(self._queue_size)
        self._queues.append(queue)
        return self._iterate(queue)

    async def _iterate(self, queue: asyncio.Queue[Event]) -> AsyncIterator[Event]:
        try:
            while True:
                yield await queue.get()
        finally:
            self._queues.remove(queue)

    def _drop(self, channel: str, handler: Handler | None) -> None:
        position = self._channels.get(channel)
        if position is None:
            return
        if handler is not None and handler in position.handlers:
            position.handlers.remove(handler)
        if not position.handlers:
            del self._channels[channel]
            if self.state == "connected":
                self._send_soon({"op": "unsubscribe", "channel": channel})

    async def _run(self) -> None:
        while not self._closed:
            await self._set_state("connecting")
            delay: float | None = None
            try:
                token = self.token() if callable(self.token) else self.token
                if inspect.isawaitable(token):
                    token = await token
                async with connect(self._url(token), open_timeout=10, ping_interval=None, max_size=None) as ws:
                    code, reason = await self._session(ws)
                delay = await self._after_close(code, reason)
            except InvalidStatus as exc:
                delay = await self._refused(exc)
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                _ratelog.info("connect_failed", "wsbroadcast: connecting to %s failed: %s", self.url, exc)
            except InvalidURI:
                raise
            except Exception as exc:  # a token callback that failed: keep going
                _ratelog.warning("subscriber_failed", "wsbroadcast: subscriber error: %r", exc)
            self._ws = None
            if self._closed:
                return
            self.retry_in = self._delay() if delay is None else delay
            await self._set_state("disconnected")
            await asyncio.sleep(self.retry_in)

    async def _refused(self, exc: InvalidStatus) -> float | None:
        response = exc.response
        if response.status_code in (401, 403):
            detail = response.body.decode(errors="replace").strip() if response.body else ""
            await self._emit("error", ServerError("refused", detail, response.status_code))
            return self._policy_delay()
        # 503 over the connection limit: back off, at least as long as the server asks.
        retry_after = response.headers.get("Retry-After", "")
        return max(self._delay(), float(retry_after) if retry_after.isdigit() else 0.0)

    def _policy_delay(self) -> float:
        return self.policy_delay * (0.5 + random.random() / 2)

    def _url(self, token: Any) -> str:
        # Subscribe with ops, not at connect, so that each subscribe can carry its since.
        url = self.url + ("&" if "?" in self.url else "?") + "channels="
        return url + "&token=" + urllib.parse.quote(str(token), safe="") if token else url

    async def _session(self, ws: ClientConnection) -> tuple[int, str]:
        opened = time.monotonic()
        self._ws = ws
        self.connects += 1
        self.worker = ws.response.headers.get("x-wsbroadcast-worker") if ws.response is not None else None
        channels = list(self._channels.items())
        await self._set_state("connected")
        for channel, position in channels:
            op: dict[str, Any] = {"op": "subscribe", "channel": channel}
            since = position.since()
            if since is not None:
                op["since"] = since
            await ws.send(codec.dumps(op).decode())
        pinger = asyncio.get_running_loop().create_task(self._pings(ws))
        try:
            async for text in ws:
                await self._dispatch(text)
        except ConnectionClosed:
            pass
        finally:
            pinger.cancel()
            if time.monotonic() - opened >= self.stable_after:
                self._attempt = 0
        code = ws.close_code if ws.close_code is not None else 1006
        return code, ws.close_reason or ""

    async def _after_close(self, code: int, reason: str) -> float | None:
        if code not in (wire.POLICY, wire.TOKEN_EXPIRED.code):
            return None  # 1012 restarting, 1013 full, 4008 slow, 4000 idle, 1006: back off and recover
        await self._emit("error", ServerError("closed", reason, code))
        if code == wire.TOKEN_EXPIRED.code and callable(self.token):
            return None  # the callback gives the next connect a fresh token
        return self._policy_delay()  # the same request would be refused again: no hot loop

    def _delay(self) -> float:
        bound = min(self.max_delay, self.min_delay * 2.0**self._attempt)
        self._attempt = min(self._attempt + 1, 30)
        return random.random() * bound  # full jitter: a crowd of clients spreads out

    async def _pings(self, ws: ClientConnection) -> None:
        while True:
            await asyncio.sleep(self.ping_interval)
            self._pong.clear()
            try:
                await ws.send('{"op":"ping"}')
                await asyncio.wait_for(self._pong.wait(), self.pong_timeout)
            except TimeoutError:
                # No pong: the peer is gone without a close (a frozen worker, a dropped route).
                # A closing handshake would wait for it too: drop the connection now.
                _ratelog.info("no_pong", "wsbroadcast: no pong within %.0f s; reconnecting", self.pong_timeout)
                ws.transport.abort()
                return
            except ConnectionClosed:
                return

    async def _dispatch(self, text: str | bytes) -> None:
        try:
            frame = codec.loads(text)
        except codec.JSONDecodeError:
            return
        if not isinstance(frame, dict):
            return
        op = frame.get("op")
        channel = frame.get("channel")
        if op is None:
            await self._publication(frame)
        elif op == "pong":
            self._pong.set()
        elif op == "subscribed" and channel in self._channels:
            self._channels[channel].advance(frame.get("offset"), frame.get("epoch"))
            recovered = frame.get("recovered")
            ack = Subscribed(channel, frame.get("offset"), frame.get("epoch"), recovered)
            if recovered is False:
                await self._emit("gap", Gap(channel, ack.offset, ack.epoch, "not_recovered"))
            await self._emit("subscribed", ack)
        elif op == "gap" and channel in self._channels:
            self._channels[channel].advance(frame.get("offset"), frame.get("epoch"))
            await self._emit("gap", Gap(channel, frame.get("offset"), frame.get("epoch"), "gap"))
        elif op == "error":
            await self._emit("error", ServerError(str(frame.get("error")), str(frame.get("detail"))))

    async def _publication(self, frame: dict[str, Any]) -> None:
        position = self._channels.get(frame.get("channel"))  # type: ignore[arg-type]
        if position is None:
            return
        offset, epoch = frame.get("offset"), frame.get("epoch")
        if not position.accept(offset, epoch):
            self.duplicates += 1
            return
        publication = Publication(frame["channel"], frame.get("data"), offset, epoch)
        for handler in list(position.handlers):
            await self._call(handler, publication.data, publication)
        for queue in list(self._queues):
            await queue.put(publication)

    async def _emit(self, event: str, value: Event) -> None:
        for callback in list(self._listeners.get(event, ())):
            await self._call(callback, value)
        for queue in list(self._queues):
            await queue.put(value)

    async def _set_state(self, state: State) -> None:
        if state != self.state:
            self.state = state
            await self._emit("state", StateChange(state))

    @staticmethod
    async def _call(callback: Callable[..., Any], *args: Any) -> None:
        try:
            result = callback(*args)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            _ratelog.warning("callback_failed", "wsbroadcast: a subscriber callback failed: %r", exc)

    def _send_soon(self, frame: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._send(frame))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send(self, frame: dict[str, Any]) -> None:
        ws = self._ws
        if ws is None:
            return  # sent with the resubscribe after the next connect
        try:
            await ws.send(codec.dumps(frame).decode())
        except ConnectionClosed:
            pass
