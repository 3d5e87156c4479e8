"""Pure units: settings parsing, WebSocket framing, the bounded queue, the idle rule."""

from __future__ import annotations

import asyncio

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from service.config import Settings, SettingsError
from service.counters import Counters
from service.outbound import Bounds, Message, QueueOutbound, ws_text_frame
from service.tracker import Tracker
from tests.support import Recorder


def test_defaults_match_the_design() -> None:
    s = Settings.from_env({})
    assert (s.port, s.web_concurrency, s.redis_pool_size, s.max_connections) == (8000, 2, 10, 5000)
    assert (s.queue_size, s.queue_bytes, s.send_buffer_bytes) == (1000, 1048576, 262144)
    assert (s.slow_consumer_policy, s.idle_timeout, s.cleanup_interval) == ("disconnect", 900, 300)
    assert (s.heartbeat_interval, s.max_message_bytes, s.ws_compression) == (5, 65536, False)
    assert s.default_channel == "broadcast" and s.redis_prefix == "broadcast:"
    assert (s.history_size, s.history_ttl, s.history_meta_ttl) == (100, 300, 30 * 86400)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"QUEUE_SIZE": "0"}, "QUEUE_SIZE='0' is invalid: expected an integer >= 1"),
        ({"WS_COMPRESSION": "maybe"}, "WS_COMPRESSION='maybe' is invalid: expected one of 1, 0"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL='http://x' is invalid"),
        ({"REDIS_URL": "tcp://user:pw@x"}, "REDIS_URL='tcp://***@x' is invalid"),
        ({"DEFAULT_CHANNEL": "a b"}, "DEFAULT_CHANNEL='a b' is invalid"),
        ({"IDLE_TIMEOUT": "10", "CLEANUP_INTERVAL": "20"}, "CLEANUP_INTERVAL=20 is invalid"),
        ({"ALLOWED_ORIGINS": "example.com"}, "ALLOWED_ORIGINS='example.com' is invalid"),
        ({"HISTORY_SIZE": "-1"}, "HISTORY_SIZE='-1' is invalid: expected an integer >= 0 and <= 100000"),
        ({"HISTORY_TTL": "0"}, "HISTORY_TTL='0' is invalid"),
        ({"HISTORY_TTL": "7200", "HISTORY_META_TTL": "3600"}, "HISTORY_TTL=7200 is invalid: expected a number <= "),
    ],
)
def test_invalid_settings_name_variable_value_and_what_is_allowed(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_public_settings_hide_secrets() -> None:
    s = Settings.from_env({"PUBLISH_TOKEN": "s3cret", "REDIS_URL": "redis://:pw@h:1/0", "CONNECT_SECRET": "k"})
    text = repr(s.public()) + repr(s)
    assert "s3cret" not in text and "pw@" not in text and "'k'" not in text


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_frame_built_once_parses_as_a_websocket_text_frame(size: int) -> None:
    payload = ("é" * (size // 2) + "x" * (size % 2)).encode()
    reader = StreamReader()
    reader.feed_data(ws_text_frame(payload))
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
        raise AssertionError("parser wanted more bytes")
    except StopIteration as done:
        frame = done.value
    assert frame.opcode is Opcode.TEXT and frame.fin
    assert bytes(frame.data) == payload


def test_message_rejects_non_utf8() -> None:
    with pytest.raises(UnicodeDecodeError):
        Message("c", b"\xff\xfe")


async def _queue(policy_drop_oldest: bool, frames: int = 3, nbytes: int = 1024) -> tuple[QueueOutbound, list[int]]:
    slow: list[int] = []
    queue = QueueOutbound(Bounds(frames, nbytes, policy_drop_oldest), Counters(), lambda: slow.append(1))
    return queue, slow


async def test_queue_bound_in_frames_disconnects() -> None:
    queue, slow = await _queue(False)
    for i in range(3):
        queue.offer(Message("c", b'"%d"' % i))
    assert slow == [] and queue.depth() == (3, 9)
    queue.offer(Message("c", b'"3"'))
    assert slow == [1] and queue.closed
    queue.offer(Message("c", b'"4"'))  # nothing after closing
    assert queue.depth() == (3, 9)


async def test_queue_bound_in_bytes_drops_oldest() -> None:
    counters = Counters()
    queue = QueueOutbound(Bounds(100, 1024, True), counters, lambda: None)
    big = b'"' + b"x" * 400 + b'"'
    for _ in range(3):
        queue.offer(Message("c", big))
    assert queue.depth() == (2, 804) and counters.dropped == 1 and queue.dropped == 1
    queue.offer(Message("c", b'"' + b"y" * 2000 + b'"'))  # larger than the whole bound: dropped itself
    assert queue.depth() == (0, 0) and counters.dropped == 4


async def test_drop_oldest_announces_what_each_channel_lost_with_one_gap_before_its_next_frame() -> None:
    counters = Counters()
    queue = QueueOutbound(Bounds(2, 1 << 20, True), counters, lambda: None)
    for offset in (1, 2, 3, 4):
        queue.offer(Message("a", b"%d" % offset, offset=offset, epoch="E"))
    queue.offer(Message("b", b'"b7"', offset=7, epoch="F"))
    queue.offer(Message("raw", b'"no offset"'))
    queue.offer(Message("raw", b'"again"'))  # drops b7; a frame without offset is never announced
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    task = asyncio.create_task(queue.run(send))
    for _ in range(50):
        if len(sent) == 4:
            break
        await asyncio.sleep(0)
    task.cancel()
    gap = '{"op":"gap","channel":"%s","offset":%d,"epoch":"%s"}'
    # One gap per channel (its latest loss), ahead of the frames that follow.
    assert sent == [gap % ("a", 4, "E"), gap % ("b", 7, "F"), '"no offset"', '"again"']
    assert (counters.dropped, counters.gaps_sent, counters.delivered) == (5, 2, 2)


async def test_queue_writer_sends_in_order() -> None:
    queue, _ = await _queue(False, frames=10)
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    task = asyncio.create_task(queue.run(send))
    for i in range(5):
        queue.offer(Message("c", b"%d" % i))
    for _ in range(50):
        if len(sent) == 5:
            break
        await asyncio.sleep(0)
    task.cancel()
    assert sent == ["0", "1", "2", "3", "4"]


def test_idle_rule_counts_publications_on_the_clients_channels() -> None:
    last = {"busy": 100.0}
    tracker = Tracker(10, idle_timeout=10, last_publish=lambda c: last.get(c, 0.0))
    quiet = tracker.admit(lambda why: True)
    listener = tracker.admit(lambda why: True)
    quiet.last_received = listener.last_received = 50.0
    listener.channels.add("busy")
    assert tracker.idle_connections(now=105.0) == [quiet]
    assert tracker.idle_connections(now=115.0) == [quiet, listener]


async def test_hub_batches_what_arrives_together_and_flushes_on_the_next_iteration() -> None:
    from service.hub import Hub

    firsts: list[str] = []
    hub = Hub(firsts.append, lambda c: None, queue_frames=8, queue_bytes=1 << 20)  # batches of at most 2
    out = Recorder()
    hub.add("c", out)
    hub.activate("c", out)
    assert firsts == ["c"]
    assert hub.publish("c", b'"a"') == 1
    assert out.messages == []  # waits only for the loop to turn
    await asyncio.sleep(0)
    assert [m.texts for m in out.messages] == [['"a"']]
    for text in (b'"b"', b'"c"', b'"d"'):
        hub.publish("c", text)
    assert [m.texts for m in out.messages[1:]] == [['"b"', '"c"']]  # flushed early at the batch bound
    await asyncio.sleep(0)
    assert [m.texts for m in out.messages[1:]] == [['"b"', '"c"'], ['"d"']]
    assert out.messages[1].frame == ws_text_frame(b'"b"') + ws_text_frame(b'"c"')
    assert out.messages[1].count == 2
    assert hub.publish("nobody", b"1") == 0
    with pytest.raises(UnicodeDecodeError):
        hub.publish("c", b"\xff")


class _Link:
    """A connection stand-in whose kernel accepts ``room`` bytes, then buffers the rest in user space."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.buffer = 0
        self.close_sent = False
        self.disconnected = False
        self.transport = self

    def write(self, frame: bytes) -> None:
        taken = 0 if self.buffer else min(self.room, len(frame))
        self.room -= taken
        self.buffer += len(frame) - taken

    def get_write_buffer_size(self) -> int:
        return self.buffer

    def is_closing(self) -> bool:
        return False

    def drain(self, nbytes: int) -> None:
        self.buffer = max(0, self.buffer - nbytes)

    def close(self, code: int, reason: str) -> None:
        self.close_sent = True


def test_direct_path_counts_frames_still_buffered_not_frames_ever_written() -> None:
    from service.outbound import DirectOutbound

    slow: list[int] = []
    link = _Link(room=0)
    out = DirectOutbound(link, Bounds(frames=4, bytes=1 << 20, drop_oldest=False), Counters(), lambda: slow.append(1))
    frame = Message("c", b'"0123456789"')
    # A client that keeps up, with the buffer never quite empty: never more than 2 frames wait.
    for _ in range(100):
        out.offer(frame)
        out.offer(frame)
        link.drain(len(frame.frame) + 1)  # the first frame and a byte of the second leave
        assert out.depth()[0] <= 2
        link.drain(len(frame.frame) - 1)
    assert slow == [] and not out.closed
    # A client that stops reading: over QUEUE_SIZE frames waiting, the policy acts.
    for _ in range(5):
        out.offer(frame)
    assert slow == [1] and out.closed and out.depth()[0] == 4


def test_direct_path_bounds_bytes_and_skips_kernel_accepted_writes() -> None:
    from service.outbound import DirectOutbound

    slow: list[int] = []
    counters = Counters()
    link = _Link(room=10_000)
    out = DirectOutbound(link, Bounds(frames=1000, bytes=300, drop_oldest=False), counters, lambda: slow.append(1))
    frame = Message("c", b'"' + b"x" * 98 + b'"')  # 102-byte frames
    for _ in range(98):  # the kernel takes them all: nothing is queued
        out.offer(frame)
    assert out.depth() == (0, 0) and counters.delivered == 98
    # The kernel takes 4 more bytes: the 99th frame waits with 98 bytes, the 100th makes 200
    # bytes, the 101st would make 302 > 300 bytes: the policy acts.
    for _ in range(3):
        out.offer(frame)
    assert slow == [1] and counters.delivered == 100


def test_direct_path_writes_nothing_once_a_close_frame_is_sent() -> None:
    from service.outbound import DirectOutbound

    counters = Counters()
    link = _Link(room=10_000)
    out = DirectOutbound(link, Bounds(frames=10, bytes=1 << 20, drop_oldest=False), counters, lambda: None)
    frame = Message("c", b'"x"')
    out.offer(frame)
    link.close(4000, "idle timeout")
    out.offer(frame)
    assert counters.delivered == 1 and out.closed and link.room == 10_000 - len(frame.frame)
