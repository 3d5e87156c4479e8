"""A rolling restart as the README's Deploying section describes it: SIGHUP to gunicorn's master
replaces every worker; their clients get 1012, reconnect to the new workers and recover by offset
what was published while they were away."""

from __future__ import annotations

import asyncio
import os
import signal

from websockets.exceptions import ConnectionClosed

from scripts.redis_server import PrivateRedis
from tests.support.clients import clients_on_both_workers, recv_json
from tests.support.servers import Service
from tests.support.waits import async_wait_until


async def test_sighup_replaces_the_workers_and_clients_recover_by_offset(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=2, graceful_timeout=5) as service:
        clients = await clients_on_both_workers(service, "roll", minimum=4)
        assert service.publish("roll", {"n": 0}).status_code == 202
        last = [await recv_json(ws, 10) for ws in clients]
        epoch, offset = last[0]["epoch"], last[0]["offset"]
        assert all((f["epoch"], f["offset"]) == (epoch, offset) for f in last)
        old = service.worker_pids()
        assert service.process is not None and len(old) == 2

        os.kill(service.process.pid, signal.SIGHUP)
        codes = []
        for ws in clients:
            try:
                while True:
                    await recv_json(ws, timeout=20)
            except ConnectionClosed as closed:
                codes.append(closed.rcvd.code if closed.rcvd is not None else None)
        assert codes == [1012] * len(clients), codes

        def replaced() -> bool:
            pids = service.worker_pids()
            return len(pids) == 2 and not pids & old and service._service is not None and service._service.ready()

        await async_wait_until(lambda: asyncio.to_thread(replaced), 30, what="two new workers, ready")
        # Published while the clients were away: recovered on reconnect, in order, then the ack.
        for n in (1, 2, 3):
            assert service.publish("roll", {"n": n}).status_code == 202
        for _ in range(len(clients)):
            ws = await service.connect("?channels=")
            await ws.send(f'{{"op":"subscribe","channel":"roll","since":{{"offset":{offset},"epoch":"{epoch}"}}}}')
            got = [await recv_json(ws, 10) for _ in range(4)]
            assert [(f.get("offset"), f.get("data")) for f in got[:3]] == [
                (offset + n, {"n": n}) for n in (1, 2, 3)
            ], got
            assert got[3] == {"op": "subscribed", "channel": "roll", "recovered": True, "offset": offset + 3,
                              "epoch": epoch}
            await ws.close()
        assert "Traceback" not in service.log()
