"""The hub: publications batched per loop turn; per-channel offsets in order, duplicates dropped,
holes held and filled, gaps announced."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from service import hub as hub_module
from service.hub import Hub
from service.outbound import ws_text_frame
from tests.support.recorder import Recorder


def _frame(offset: int, epoch: str = "E", channel: str = "c") -> bytes:
    return orjson.dumps({"channel": channel, "offset": offset, "epoch": epoch, "data": offset})


class _Wired:
    def __init__(self, position: tuple[int, str] | None = (0, "E")) -> None:
        self.holes: list[tuple[str, int, str]] = []
        self.hub = Hub(lambda c: None, lambda c: None, on_hole=lambda *hole: self.holes.append(hole))
        self.out = Recorder()
        self.hub.add("c", self.out)
        if position is not None:
            self.hub.set_position("c", *position)
            assert self.hub.position("c") == position
        self.hub.activate("c", self.out)

    def publish(self, *offsets: int, epoch: str = "E") -> None:
        for offset in offsets:
            self.hub.publish("c", _frame(offset, epoch), offset, epoch)


async def test_publications_in_order_pass_and_duplicates_are_dropped() -> None:
    w = _Wired()
    w.publish(1, 2, 2, 1, 3)
    await asyncio.sleep(0)
    assert w.out.seen() == [1, 2, 3]
    assert w.hub.counters.duplicates == 2 and w.holes == []


async def test_a_parked_listener_receives_nothing_until_activated_then_everything_after_its_position() -> None:
    w = _Wired()
    late = Recorder()
    w.hub.add("c", late)
    w.publish(1, 2)
    assert w.hub.position("c") == (2, "E")  # flushes what waited for the loop
    w.hub.activate("c", late)
    w.publish(3)
    await asyncio.sleep(0)
    assert w.out.seen() == [1, 2, 3]
    assert late.seen() == [3]
    assert w.hub.channels() == {"c": 2}


async def test_until_the_position_is_known_publications_are_held_and_those_before_it_dropped() -> None:
    w = _Wired(position=None)
    w.publish(4, 5, 6)
    assert w.hub.position("c") is None
    await asyncio.sleep(0)
    assert w.out.seen() == []
    w.hub.set_position("c", 5, "E")
    await asyncio.sleep(0)
    assert w.out.seen() == [6]


async def test_a_hole_is_read_once_and_filled_before_what_followed_it() -> None:
    w = _Wired()
    w.publish(1, 4, 5)
    w.publish(6)
    assert w.holes == [("c", 1, "E")]
    await asyncio.sleep(0)
    assert w.out.seen() == [1]
    w.hub.fill("c", "E", 5, [(2, _frame(2)), (3, _frame(3)), (4, _frame(4)), (5, _frame(5))])
    w.publish(7)
    await asyncio.sleep(0)
    assert w.out.seen() == [1, 2, 3, 4, 5, 6, 7]
    assert w.hub.counters.holes == 1 and w.hub.counters.gaps_sent == 0


async def test_what_the_history_no_longer_holds_is_one_gap_then_delivery_goes_on() -> None:
    w = _Wired()
    w.publish(1, 5, 6)
    w.hub.fill("c", "E", 6, [(4, _frame(4)), (5, _frame(5)), (6, _frame(6))])
    await asyncio.sleep(0)
    assert w.out.seen() == [1, ("gap", 3, "E"), 4, 5, 6]
    assert w.hub.counters.gaps_sent == 1


async def test_publications_lost_while_a_hole_is_read_make_another_read() -> None:
    w = _Wired()
    w.publish(1, 3, 9)  # 2 missing; 4-8 lost too, after the read's top
    w.hub.fill("c", "E", 3, [(2, _frame(2)), (3, _frame(3))])
    assert w.holes == [("c", 1, "E"), ("c", 3, "E")]
    w.hub.fill("c", "E", 9, [(n, _frame(n)) for n in range(4, 10)])
    await asyncio.sleep(0)
    assert w.out.seen() == list(range(1, 10))


async def test_a_new_epoch_is_a_gap_and_the_new_lifetime_is_read_from_its_start() -> None:
    w = _Wired()
    w.publish(1, 2)
    w.publish(1, epoch="F")
    w.publish(3, epoch="F")
    assert w.holes == [("c", 1, "F")]
    w.hub.fill("c", "F", 3, [(2, _frame(2, "F"))])
    await asyncio.sleep(0)
    assert w.out.seen() == [1, 2, ("gap", 0, "F"), 1, 2, 3]
    assert w.hub.position("c") == (3, "F")


async def test_a_reconnect_check_delivers_what_the_worker_missed_without_a_gap() -> None:
    w = _Wired()
    w.publish(1)
    assert w.hub.positioned() == ["c"]
    assert w.hub.begin_check("c") == (1, "E")
    assert w.hub.begin_check("c") is None  # one read at a time
    w.publish(4)  # held while the read is under way
    w.hub.fill("c", "E", 3, [(2, _frame(2)), (3, _frame(3))])
    await asyncio.sleep(0)
    assert w.out.seen() == [1, 2, 3, 4] and w.hub.counters.gaps_sent == 0


async def test_frames_without_an_offset_pass_as_they_are() -> None:
    w = _Wired()
    w.hub.publish("c", b'{"channel":"c","data":1}')
    await asyncio.sleep(0)
    assert w.out.frames() == [{"channel": "c", "data": 1}]


async def test_a_hole_held_past_its_bound_is_given_up_as_a_gap(monkeypatch: Any) -> None:
    monkeypatch.setattr(hub_module, "MAX_HELD", 3)
    w = _Wired()
    w.publish(1, 3, 4, 5, 6)
    await asyncio.sleep(0)
    assert w.out.seen() == [1, ("gap", 2, "E"), 3, 4, 5, 6]
    w.hub.fill("c", "E", 6, [(2, _frame(2))])  # the read that came too late changes nothing
    w.publish(7)
    await asyncio.sleep(0)
    assert w.out.seen()[-1] == 7 and w.hub.counters.duplicates == 0


async def test_hub_batches_what_arrives_together_and_flushes_on_the_next_iteration() -> None:
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
