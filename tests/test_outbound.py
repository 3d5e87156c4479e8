"""A connection's bounded outbound paths: the frame built once, the queue (ASGI) path and the direct path,
each bounded in frames and bytes, with the slow-consumer policy acting at the bound."""

from __future__ import annotations

import asyncio

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from service.counters import Counters
from service.outbound import Bounds, DirectOutbound, Message, QueueOutbound, ws_text_frame


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
    counters = Counters()
    link = _Link(room=10_000)
    out = DirectOutbound(link, Bounds(frames=10, bytes=1 << 20, drop_oldest=False), counters, lambda: None)
    frame = Message("c", b'"x"')
    out.offer(frame)
    link.close(4000, "idle timeout")
    out.offer(frame)
    assert counters.delivered == 1 and out.closed and link.room == 10_000 - len(frame.frame)
