"""One client's view of its channels, checked against the wire contract frame by frame: per channel,
offsets rise by one, except where a ``subscribed`` with ``recovered:false`` or a ``gap`` frame
explains a jump; nothing twice."""

from __future__ import annotations

from typing import Any


class View:
    """One client's view of its channels across its connections, checked frame by frame."""

    def __init__(self, name: str) -> None:
        self.name = name
        # channel -> (offset, epoch) of the last publication accounted for (delivered or explained)
        self.position: dict[str, tuple[int, str]] = {}
        # channel -> the ``since`` of a subscribe not acknowledged yet (None: a plain subscribe)
        self.pending: dict[str, tuple[int, str] | None] = {}
        self.seen: set[tuple[str, str, int]] = set()
        self.publications: list[dict[str, Any]] = []
        self.acks: list[dict[str, Any]] = []
        self.gaps: list[dict[str, Any]] = []
        self.violations: list[str] = []

    def subscribing(self, channel: str, since: tuple[int, str] | None) -> None:
        self.pending[channel] = since
        if since is not None:
            self.position[channel] = since  # what it recovers must follow since

    def disconnected(self) -> None:
        self.pending.clear()  # a subscribe the server never acknowledged is made again

    def see(self, frame: dict[str, Any]) -> None:
        op, channel = frame.get("op"), frame.get("channel")
        if op == "subscribed":
            self._ack(str(channel), frame)
        elif op == "gap":
            self.gaps.append(frame)
            here = self.position.get(str(channel))
            if here is None:
                self._violate(f"gap before any position: {frame}")
            elif here[1] == frame["epoch"] and frame["offset"] < here[0]:
                self._violate(f"gap behind the position {here}: {frame}")
            self.position[str(channel)] = (frame["offset"], frame["epoch"])
        elif op is None and "offset" in frame:
            self._publication(str(channel), frame)
        elif op is not None:
            self._violate(f"unexpected frame: {frame}")

    def _ack(self, channel: str, frame: dict[str, Any]) -> None:
        self.acks.append(frame)
        if channel not in self.pending:
            self._violate(f"ack of no subscribe: {frame}")
            return
        since = self.pending.pop(channel)
        here = (frame["offset"], frame["epoch"])
        if since is None:
            if "recovered" in frame:
                self._violate(f"recovered in the ack of a plain subscribe: {frame}")
        elif frame.get("recovered") is True:
            # The recovered publications came first and reached the ack's offset.
            if self.position.get(channel) != here:
                self._violate(f"recovered:true at {here} but the client is at {self.position.get(channel)}")
        elif frame.get("recovered") is not False:
            self._violate(f"ack of a subscribe with since without recovered: {frame}")
        self.position[channel] = here

    def _publication(self, channel: str, frame: dict[str, Any]) -> None:
        offset, epoch = frame["offset"], frame["epoch"]
        key = (channel, epoch, offset)
        if key in self.seen:
            self._violate(f"duplicate {key}")
            return
        self.seen.add(key)
        self.publications.append(frame)
        here = self.position.get(channel)
        if here is None:
            self._violate(f"publication before the ack: {key}")
        elif here != (offset - 1, epoch):
            self._violate(f"publication {key} does not follow {here} and nothing explained the jump")
        self.position[channel] = (offset, epoch)

    def _violate(self, what: str) -> None:
        self.violations.append(f"{self.name}: {what}")

    def offsets(self, channel: str) -> list[int]:
        return [f["offset"] for f in self.publications if f["channel"] == channel]
