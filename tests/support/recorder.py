"""An outbound path that records what the hub offers it, for in-process tests of the hub and recovery."""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from service.outbound import Message


class Recorder:
    """An outbound path that keeps what the hub offers it, for tests of the hub and recovery."""

    direct: ClassVar[bool] = False

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def offer(self, message: Message) -> None:
        self.messages.append(message)

    def depth(self) -> tuple[int, int]:
        return 0, 0

    def frames(self) -> list[Any]:
        return [orjson.loads(text) for m in self.messages for text in m.texts]

    def seen(self) -> list[Any]:
        """Each frame as its offset, or ("gap", offset, epoch)."""
        return [("gap", f["offset"], f["epoch"]) if f.get("op") == "gap" else f["offset"] for f in self.frames()]
