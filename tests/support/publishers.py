"""Publishers that keep publishing while a test does something to the service."""

from __future__ import annotations

import threading

import httpx

from tests.support.servers import Service


class SteadyPublisher(threading.Thread):
    """Publishes 0, 1, 2, ... on a channel every ``interval`` until stopped; a failed publish is retried."""

    def __init__(self, service: Service, channel: str, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.service, self.channel, self.interval = service, channel, interval
        self.published: list[int] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        seq = 0
        while not self.stopping.wait(self.interval):
            # A new connection each time: a kept-alive one to a worker that is shutting down would
            # stall the publisher for just the moments the test is about.
            try:
                response = httpx.post(
                    self.service.base + "/publish",
                    json={"channel": self.channel, "data": seq},
                    headers={"Authorization": "Bearer test-token"},
                    timeout=10,
                )
            except httpx.HTTPError:
                continue
            if response.status_code == 202:
                self.published.append(seq)
                seq += 1

    def stop(self) -> list[int]:
        self.stopping.set()
        self.join(30)
        return self.published
