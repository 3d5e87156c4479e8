"""The scenarios, each a method of ``Run``: ``idle``, ``fanout``, ``slow``, ``redis-restart``,
``publish-rate``, ``recover``.

The load is checked, never assumed. A step whose publisher fell behind its schedule (over 250 ms,
or under 97% of the rate) did not offer the load it names: it never counts as a pass. A client
process over 90% of a core or whose event loop lagged over 100 ms is reported as saturated: its
latency figures are pessimistic (a frame is timed when the client gets to read it), so a pass
still stands, but a failure may be the client's, and the ladder of rates stops there saying so.

Server CPU per delivery = CPU time of the worker processes over the step, divided by the
deliveries counted by the clients; n/a when no worker process could be measured.

``recover`` restarts every worker (SIGHUP to the gunicorn master) under a steady publisher and
counts, per client, every offset seen, lost, duplicated or announced lost, the time from each
reconnection's handshake to its ``subscribed`` answer, and the history reads it cost (/metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import psutil
from redis.exceptions import RedisError

from scripts.load.publisher import VIA, Publisher
from scripts.load.rawclient import BUCKET, Clients, ConnectReply, Progress, RecoverState, split
from scripts.load.report import idle_table, number, percent
from scripts.load.results import (
    Connected,
    FanoutResult,
    IdleResult,
    Latency,
    PerSeq,
    PublishRate,
    PublishRateResult,
    RecoverResult,
    RestartResult,
    Skipped,
    SlowResult,
    SlowSample,
    StepResult,
)
from scripts.load.targets import CHANNEL, Target
from scripts.redis_server import PrivateRedis
from service.publisher import PublishError

# A step is refused when the load client itself was the bottleneck.
CLIENT_CPU_LIMIT = 0.90
CLIENT_LAG_LIMIT = 0.100
PUBLISH_LAG_LIMIT = 0.250
PUBLISH_RATE_SHORTFALL = 0.97


def _percentile(hist: Counter[int], total: int, q: float) -> float:
    """Upper edge (ms) of the bucket holding the q-quantile."""
    if not total:
        return float("nan")
    rank = q * total
    seen = 0
    for index in sorted(hist):
        seen += hist[index]
        if seen >= rank:
            return (index + 1) * BUCKET * 1000
    return float("nan")


def _quantiles_ms(sorted_s: list[float]) -> Latency | None:
    """p50, p99 and max of sorted durations in seconds, in ms."""
    if not sorted_s:
        return None
    return Latency(
        p50=round(sorted_s[len(sorted_s) // 2] * 1000, 1),
        p99=round(sorted_s[min(len(sorted_s) - 1, int(len(sorted_s) * 0.99))] * 1000, 1),
        max=round(sorted_s[-1] * 1000, 1),
    )


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Run:
    def __init__(self, args: argparse.Namespace, clients: Clients, target: Target, redis: PrivateRedis | None) -> None:
        self.args = args
        self.clients = clients
        self.target = target
        self.redis = redis
        self.tag = f"[{target.name}]"
        # Sequence numbers never repeat within a run, so a frame is never mistaken for another step's.
        self.seq = 0

    def _own_cpu(self) -> float:
        """CPU seconds of every process this test runs: server (master too), clients, Redis, us."""
        pids = [*self.clients.pids(), os.getpid()]
        if self.target.master is not None:
            pids.append(self.target.master)
        if self.redis is not None and self.redis.process is not None:
            pids.append(self.redis.process.pid)
        total = 0.0
        procs = list(self.target.workers())
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                procs.append(self.target.proc(pid))
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
        return total

    @staticmethod
    def _busy() -> tuple[float, float]:
        """(CPU seconds the whole machine spent busy, of which in interrupts and softirqs).

        Where the kernel accounts IRQ time separately, the loopback network path that a server's
        send() runs in softirq context is charged to no process: it is reported on its own.
        """
        times = psutil.cpu_times()
        irq = getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)
        return float(sum(times)) - times.idle - getattr(times, "iowait", 0.0), irq

    async def connect(self, n: int, stall: int = 0) -> Connected:
        parts = split(n, len(self.clients.pipes))
        stalls = split(stall, len(self.clients.pipes))
        rate = self.args.connect_rate / len(parts)
        t = self.target
        task = asyncio.ensure_future(self.clients.connect([
            {"host": t.host, "port": t.port, "path": t.path, "n": k, "rate": rate, "stall": s,
             "ack": t.acks_subscriptions,
             "timeout": 15.0}
            for k, s in zip(parts, stalls, strict=True)
        ]))
        started = time.monotonic()
        while not task.done():
            await asyncio.wait([task], timeout=1.0)
            if not task.done():
                opened = sum(p.open for p in await self.clients.progress())
                log(f"{self.tag} connecting: {opened}/{n} open after {time.monotonic() - started:.0f} s")
        reply = ConnectReply.combined(task.result())
        log(f"{self.tag} connected {reply.ok}/{n} in {time.monotonic() - started:.1f} s"
             + (f"; failed: {reply.failed}" if reply.failed else ""))
        return Connected(reply.ok, reply.failed, round(time.monotonic() - started, 2))

    async def warm(self) -> None:
        """Publish unnumbered frames until every open connection got one: subscriptions are live."""
        publisher = Publisher(self.target)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                await publisher.warm()
                await asyncio.sleep(0.1)
                states = await self.clients.warm()
                if all(s.warm == s.open for s in states):
                    return
            raise RuntimeError(f"{self.tag} not every connection received the warm-up frames within 20 s")
        finally:
            await publisher.close()

    async def close_all(self) -> None:
        await self.clients.close(timeout=20.0)

    async def _progress(self, label: str, stop: asyncio.Event, samples: list[Progress]) -> None:
        """A line a second; ``samples`` gets each client's CPU share and loop lag of every full second."""
        started = time.monotonic()
        last_frames, last = 0, started
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            full = not stop.is_set()
            states = await self.clients.progress()
            if full:
                samples.extend(states)
            now = time.monotonic()
            frames = sum(s.frames for s in states)
            rate = (frames - last_frames) / max(1e-6, now - last)
            last_frames, last = frames, now
            cpu = " ".join(f"{s.cpu * 100:.0f}%" for s in states)
            lag = max(s.lag for s in states) * 1000
            log(f"{self.tag} {label} {now - started:5.1f} s  deliveries {rate / 1000:7.1f}k/s  "
                 f"client cpu {cpu}  loop lag {lag:.0f} ms  machine {psutil.cpu_percent():.0f}%  "
                 f"load {os.getloadavg()[0]:.2f}")

    async def _drain(self, expected: int, quiet: float = 1.0, limit: float = 5.0) -> None:
        """Wait for late frames: until all expected arrived, nothing came for ``quiet`` s, or ``limit``."""
        deadline = time.monotonic() + limit
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            frames = sum(s.frames for s in await self.clients.progress())
            if frames >= expected:
                return
            if frames != last:
                last, since = frames, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            await asyncio.sleep(0.2)

    async def step(
        self, label: str, rate: float, seconds: float, size: int,
        during: Callable[[], Coroutine[Any, Any, None]] | None = None, per_seq: bool = False,
    ) -> StepResult:
        """Publish ``rate`` x ``seconds`` frames, then collect what every client counted."""
        marks = await self.clients.mark(track_first=per_seq)
        fast = sum(m.fast for m in marks)
        count = max(1, round(rate * seconds))
        publisher = Publisher(self.target, self.seq)
        stop = asyncio.Event()
        samples: list[Progress] = []
        progress = asyncio.create_task(self._progress(label, stop, samples))
        fanout0 = await asyncio.to_thread(self.target.fanout_metric)
        cpu0, pids0 = self.target.cpu()
        own0, busy0 = self._own_cpu(), self._busy()
        wall0 = time.monotonic()
        profilers = self._profile(label, seconds)
        side: asyncio.Task[None] | None = asyncio.create_task(during()) if during is not None else None
        try:
            published = await publisher.run(rate, count, size)
            self.seq = publisher.seq
            if side is not None:
                await side
            ok_seqs = published.hi - published.lo - len(published.failed)
            await self._drain(ok_seqs * fast)
        finally:
            stop.set()
            await progress
            await publisher.close()
        cpu1, pids1 = self.target.cpu()
        own1, busy1 = self._own_cpu(), self._busy()
        wall = time.monotonic() - wall0
        busy, irq = busy1[0] - busy0[0], busy1[1] - busy0[1]
        machine = round(busy / (wall * (os.cpu_count() or 1)) * 100, 1)
        for profiler in profilers:
            profiler.wait(30)
        stats = await self.clients.stats(published.lo, published.hi, per_seq=per_seq)
        fanout1 = await asyncio.to_thread(self.target.fanout_metric)
        hist: Counter[int] = Counter()
        for s in stats:
            hist.update(s.hist)
        measured = sum(hist.values())
        delivered = sum(s.delivered for s in stats)
        expected = ok_seqs * fast
        n_published = published.hi - published.lo
        publish_rate = round(n_published / max(1e-6, published.duration), 1)
        # No worker process measured (a remote server, or none found): no CPU figure rather than 0.
        cpu = round(cpu1 - cpu0, 3) if pids0 or pids1 else None
        other = round(max(0.0, busy - irq - (own1 - own0)) / wall, 2)
        # Per-second samples while publishing: a client busy for a second is saturated even when the
        # whole step's average (drain included) looks fine.
        peak_cpu = max((s.cpu for s in samples), default=max(s.cpu for s in stats))
        peak_lag = max([s.lag for s in samples] + [s.lag for s in stats])
        saturated = []
        if peak_cpu > CLIENT_CPU_LIMIT:
            saturated.append(f"a client process used {peak_cpu * 100:.0f}% of a core")
        if peak_lag > CLIENT_LAG_LIMIT:
            saturated.append(f"a client event loop lagged {peak_lag * 1000:.0f} ms")
        offered = []
        if not published.failed:
            if published.max_behind > PUBLISH_LAG_LIMIT:
                offered.append(f"the publisher fell {published.max_behind * 1000:.0f} ms behind its schedule")
            if publish_rate < rate * PUBLISH_RATE_SHORTFALL:
                offered.append(f"the publisher reached {publish_rate:g} of {rate:g} msg/s")
        result = StepResult(
            rate=rate,
            seconds=seconds,
            payload_bytes=size,
            subscribers=fast,
            published=n_published,
            publish_failed=len(published.failed),
            published_without_receivers=len(published.no_receivers),
            publish_rate=publish_rate,
            expected=expected,
            delivered=delivered,
            delivered_fraction=round(delivered / expected, 6) if expected else None,
            duplicates=sum(s.dups for s in stats),
            reordered=sum(s.reordered for s in stats),
            deliveries_per_s=round(delivered / max(1e-6, published.duration), 1),
            latency_ms=Latency(
                p50=round(_percentile(hist, measured, 0.50), 2),
                p99=round(_percentile(hist, measured, 0.99), 2),
                max=round(max(s.max_latency for s in stats) * 1000, 2),
            ),
            server_workers_measured=len(pids1),
            server_cpu_s=cpu,
            server_cpu_us_per_delivery=round(cpu / delivered * 1e6, 2) if cpu is not None and delivered else None,
            server_workers_changed=pids0 != pids1,
            client_cpu=[round(s.cpu, 3) for s in stats],
            client_loop_lag_ms=round(peak_lag * 1000, 1),
            publisher_behind_ms=round(published.max_behind * 1000, 1),
            machine_cpu_percent=machine,
            test_processes_cores=round((own1 - own0) / wall, 2),
            other_processes_cores=other,
            irq_softirq_cores=round(irq / wall, 2),
            irq_softirq_us_per_delivery=round(irq / delivered * 1e6, 2) if delivered else None,
            wall_s=round(wall, 2),
            client_cpu_peak=round(peak_cpu, 3),
            client_saturated=saturated,
            load_not_offered=offered,
        )
        if machine >= 95:
            result.machine_saturated = (
                f"the machine's {os.cpu_count()} cores were {machine:.0f}% busy (other processes: "
                f"{other} cores): latency includes waiting for a core"
            )
        if fanout0 is not None and fanout1 is not None and fanout1[1] > fanout0[1]:
            result.server_fanout_ms_mean = round((fanout1[0] - fanout0[0]) / (fanout1[1] - fanout0[1]) * 1000, 2)
        if per_seq:
            counts = [sum(c) for c in zip(*(s.counts or [] for s in stats), strict=True)]
            firsts = [min((f for f in fs if f > 0), default=0.0) for fs in zip(*(s.first or [] for s in stats),
                                                                                  strict=True)]
            result.per_seq = PerSeq(published, counts, firsts, fast)
        lat = result.latency_ms
        if result.machine_saturated:
            log(f"{self.tag} {label}: MACHINE SATURATED: {result.machine_saturated}")
        log(f"{self.tag} {label}: delivered {percent(result.delivered_fraction)} of {expected}  "
            f"p50 {lat.p50} ms p99 {lat.p99} ms max {lat.max} ms  "
            f"server {number(result.server_cpu_us_per_delivery)} us/delivery"
            + (f"  CLIENT SATURATED: {'; '.join(saturated)}" if saturated else "")
            + (f"  LOAD NOT OFFERED: {'; '.join(offered)}" if offered else ""))
        return result

    def _profile(self, label: str, seconds: float) -> list[subprocess.Popen[bytes]]:
        """With --profile DIR: py-spy samples each worker for the step (collapsed stacks, one file each)."""
        if not self.args.profile:
            return []
        out = Path(self.args.profile)
        out.mkdir(parents=True, exist_ok=True)
        spy = Path(sys.executable).parent / "py-spy"
        procs = []
        for worker in self.target.workers():
            name = f"{self.target.name}-{label.replace(' ', '-').replace('/', '')}-{worker.pid}.txt"
            procs.append(subprocess.Popen(
                [str(spy), "record", "--pid", str(worker.pid), "--duration", str(max(1, int(seconds))),
                 "--rate", "250", "--nonblocking", "--format", "raw", "--output", str(out / name)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
        return procs

    # --- the scenarios -------------------------------------------------------------------------

    async def idle(self) -> IdleResult:
        n = self.args.connections
        warmup = min(self.args.idle_warmup, n)
        if warmup:
            # What the first connections leave behind for good (lazy imports, caches, the channel's
            # structures) is no connection's cost and cannot be given back: opened and closed first.
            await self.connect(warmup)
            await self.close_all()
            await self._sockets_closed()
        await asyncio.sleep(1.0)
        before = self.target.rss()
        conn = await self.connect(n)
        await asyncio.sleep(self.args.settle)
        connected = self.target.rss()
        measured = len(self.target.workers())
        established, _ = self.target.sockets()
        started = time.monotonic()
        await self.close_all()
        await self._sockets_closed()
        closed_in = time.monotonic() - started
        await asyncio.sleep(self.args.settle)
        after = self.target.rss()
        grown = connected - before
        result = IdleResult(
            connections=n,
            connected=conn.ok,
            failed=conn.failed,
            connect_seconds=conn.seconds,
            established_on_server=established,
            server_workers_measured=measured,
            rss_before_mb=round(before / 1e6, 2),
            rss_connected_mb=round(connected / 1e6, 2),
            rss_after_close_mb=round(after / 1e6, 2),
            kb_per_connection=round(grown / max(1, conn.ok) / 1024, 2) if measured else None,
            given_back_fraction=round((connected - after) / grown, 3) if measured and grown > 0 else None,
            close_seconds=round(closed_in, 2),
            settle_s=self.args.settle,
            warmup=warmup,
        )
        log(f"{self.tag} idle:\n" + idle_table(result))
        return result

    async def _sockets_closed(self, limit: float = 30.0) -> None:
        deadline = time.monotonic() + limit
        while self.target.sockets()[0] and time.monotonic() < deadline:  # noqa: ASYNC110 - polls the kernel
            await asyncio.sleep(0.2)

    async def fanout(self) -> FanoutResult:
        conn = await self.connect(self.args.subscribers)
        await self.warm()
        steps = []
        best: float | None = None
        for rate in self.args.rates:
            step = await self.step(f"fanout {rate:g}/s", rate, self.args.duration, self.args.payload)
            steps.append(step)
            fraction = step.delivered_fraction or 0.0
            good = fraction >= 0.999 and step.latency_ms.p99 < 200
            step.passed = good and not step.load_not_offered
            if step.load_not_offered:
                log(f"{self.tag} refusing {rate:g}/s and above: {'; '.join(step.load_not_offered)}, "
                    "so this tool cannot claim that rate")
                break
            if not good:
                if step.client_saturated:
                    log(f"{self.tag} {rate:g}/s failed with the load client saturated "
                        f"({'; '.join(step.client_saturated)}): the limit may be the client's, not the server's")
                if self.args.all_rates:
                    continue  # measured for comparison; the highest passing rate stays the one below it
                break
            if all(s.passed for s in steps):
                best = rate
        await self.close_all()
        return FanoutResult(subscribers=conn.ok, connect_failed=conn.failed, steps=steps, highest_rate_passing=best)

    async def slow(self) -> SlowResult:
        n = self.args.subscribers
        stall = round(n * self.args.slow_fraction)
        conn = await self.connect(n, stall=stall)
        await self.warm()
        rss0 = self.target.rss()
        samples: list[SlowSample] = []
        started = time.monotonic()

        def sample() -> None:
            established, queued = self.target.sockets()
            row = SlowSample(t=round(time.monotonic() - started, 1), rss_mb=round(self.target.rss() / 1e6, 2),
                             established=established, send_queue_mb=round(queued / 1e6, 2))
            samples.append(row)
            log(f"{self.tag} slow sample: {row.t} s  RSS {row.rss_mb} MB  established {row.established}  "
                f"send queues {row.send_queue_mb} MB")

        sample()
        await self.clients.stall(on=True)

        async def sampler() -> None:
            while time.monotonic() - started < self.args.slow_duration:
                await asyncio.sleep(min(self.args.sample_every, self.args.slow_duration - (time.monotonic() - started)))
                sample()

        step = await self.step("slow", self.args.slow_rate, self.args.slow_duration, self.args.slow_payload,
                               during=sampler)
        sample()
        server_counters = await asyncio.to_thread(self.target.counters)
        await self.clients.stall(on=False)
        outcomes: Counter[str] = Counter()
        received = 0
        for o in await self.clients.outcomes(wait=10.0):
            outcomes.update(o.outcomes)
            received += o.received
        peak = max(s.rss_mb for s in samples)
        await self.close_all()
        result = SlowResult(
            subscribers=conn.ok,
            stalled=stall,
            fast=step,
            samples=samples,
            rss_before_mb=round(rss0 / 1e6, 2),
            rss_growth_mb=round(peak - rss0 / 1e6, 2),
            send_queue_peak_mb=max(s.send_queue_mb for s in samples),
            stalled_outcomes=dict(outcomes),
            stalled_frames_received=received,
            server_counters=server_counters,
        )
        log(f"{self.tag} slow: stalled clients {dict(outcomes)}; RSS growth {result.rss_growth_mb} MB")
        return result

    async def redis_restart(self) -> RestartResult | Skipped:
        if self.redis is None:
            log(f"{self.tag} redis-restart skipped: it needs the private Redis this tool starts (no --url)")
            return Skipped("needs the tool's private Redis")
        redis = self.redis
        n, rate = self.args.restart_subscribers, self.args.restart_rate
        conn = await self.connect(n)
        await self.warm()
        before = sum(s.open for s in await self.clients.progress())
        times: dict[str, float] = {}

        async def outage() -> None:
            await asyncio.sleep(2.0)
            times["down"] = time.monotonic()
            await asyncio.to_thread(redis.stop)
            await asyncio.sleep(self.args.outage)
            await asyncio.to_thread(redis.start)
            times["back"] = time.monotonic()
            log(f"{self.tag} Redis down {times['back'] - times['down']:.2f} s (stop, {self.args.outage:g} s, start)")

        step = await self.step("redis-restart", rate, 6.0, self.args.payload, during=outage, per_seq=True)
        assert step.per_seq is not None
        published, counts, firsts, fast = step.per_seq.published, step.per_seq.counts, step.per_seq.firsts, \
            step.per_seq.fast
        after = sum(s.open for s in await self.clients.progress())
        back = times["back"]
        seqs = range(published.lo, published.hi)
        after_back = [i for i, seq in enumerate(seqs) if published.sent_at[seq] >= back]
        firsts_after = [firsts[i] for i in after_back if firsts[i] > 0]
        full = next((i for i in after_back if counts[i] >= fast * 0.999), None)
        ok = [i for i, seq in enumerate(seqs) if seq not in published.failed]
        lost_frames = sum(1 for i in ok if counts[i] < fast)
        result = RestartResult(
            subscribers=conn.ok,
            rate=rate,
            connections_before=before,
            connections_after=after,
            redis_down_s=round(back - times["down"], 3),
            resume_s=round(min(firsts_after) - back, 3) if firsts_after else None,
            resume_all_s=round(published.sent_at[seqs[full]] - back, 3) if full is not None else None,
            published_ok=len(ok),
            publish_failed_while_down=len(published.failed),
            published_without_receivers=len(published.no_receivers),
            frames_lost=lost_frames,
            deliveries_lost=sum(fast - counts[i] for i in ok),
            step=step,
        )
        await self.close_all()
        log(f"{self.tag} redis-restart: resume {result.resume_s} s; frames lost {lost_frames}")
        return result

    async def publish_rate(self) -> PublishRateResult:
        """Publications per second each way (the function, plain PUBLISH), flat out, one after the other."""
        n = self.args.publish_subscribers
        if n:
            await self.connect(n)
            await self.warm()
        ways = [via for via in VIA if via == "publish" or self.target.settings is not None]
        result = PublishRateResult(subscribers=n, payload_bytes=self.args.payload, history_size=self._history_size(),
                                   ways=[await self._flat_out(via) for via in ways])
        if n:
            await self.close_all()
        return result

    def _history_size(self) -> int:
        return self.target.settings.history_size if self.target.settings is not None else 0

    def _redis_cpu(self) -> float | None:
        if self.redis is None or self.redis.process is None:
            return None
        with contextlib.suppress(psutil.Error):
            times = self.target.proc(self.redis.process.pid).cpu_times()
            return float(times.user + times.system)
        return None

    async def _flat_out(self, via: str) -> PublishRate:
        concurrency, seconds, size = self.args.publish_concurrency, self.args.publish_seconds, self.args.payload
        publishers = [Publisher(self.target, via=via) for _ in range(concurrency)]
        counts = [0] * concurrency
        failed = [0] * concurrency

        async def loop(index: int, until: float) -> None:
            publisher = publishers[index]
            while time.monotonic() < until:
                seq = self.seq
                self.seq += 1
                try:
                    await publisher.send(seq, size)
                except (RedisError, OSError, TimeoutError, PublishError):
                    failed[index] += 1
                    continue
                counts[index] += 1

        try:
            # Connections made and the function loaded before the clock starts.
            await asyncio.gather(*(loop(i, time.monotonic() + 0.5) for i in range(concurrency)))
            counts[:] = [0] * concurrency
            failed[:] = [0] * concurrency
            cpu0, own0 = self._redis_cpu(), time.process_time()
            started = time.monotonic()
            await asyncio.gather(*(loop(i, started + seconds) for i in range(concurrency)))
            wall = time.monotonic() - started
            cpu1, own1 = self._redis_cpu(), time.process_time()
        finally:
            for publisher in publishers:
                await publisher.close()
        done = sum(counts)
        result = PublishRate(
            via=via, concurrency=concurrency, seconds=round(wall, 2), published=done, failed=sum(failed),
            per_s=round(done / wall, 1),
            redis_cpu_us_per_publication=round((cpu1 - cpu0) / done * 1e6, 2)
            if cpu0 is not None and cpu1 is not None and done else None,
            redis_cores=round((cpu1 - cpu0) / wall, 2) if cpu0 is not None and cpu1 is not None else None,
            publisher_cores=round((own1 - own0) / wall, 2),
        )
        log(f"{self.tag} publish-rate via {via}: {result.per_s:.0f}/s with {concurrency} publishers "
            f"(Redis {number(result.redis_cpu_us_per_publication)} us per publication, {result.redis_cores} cores; "
            f"the publishing process {result.publisher_cores} cores)")
        return result

    async def recover(self) -> RecoverResult | Skipped:
        t = self.target
        if t.settings is None or t.publish_via != "function":
            log(f"{self.tag} recover skipped: it needs offsets, published through the function")
            return Skipped("needs the publish function (offsets)")
        if t.master is None:
            log(f"{self.tag} recover skipped: restarting the workers needs the gunicorn master (--server-pid)")
            return Skipped("needs the gunicorn master's PID")
        args = self.args
        n, rate, jitter = args.recover_clients, args.recover_rate, args.recover_jitter
        metrics0 = await asyncio.to_thread(t.metrics)
        parts = split(n, len(self.clients.pipes))
        started = time.monotonic()
        replies = await self.clients.sessions([
            {"host": t.host, "port": t.port, "path": "/ws?channels=", "channel": CHANNEL, "n": k,
             "rate": args.connect_rate / len(parts), "jitter": jitter, "timeout": 15.0}
            for k in parts
        ])
        subscribed = ConnectReply.combined(replies)
        ok, failed = subscribed.ok, subscribed.failed
        log(f"{self.tag} recover: {ok}/{n} clients subscribed in {time.monotonic() - started:.1f} s"
            + (f"; failed: {failed}" if failed else ""))
        before = await self.clients.recover_state()
        workers_before = sorted(p.pid for p in t.workers())
        await self.clients.session_mark()
        publisher = Publisher(t, self.seq)
        stop = asyncio.Event()
        publishing = asyncio.create_task(publisher.run(rate, 1 << 30, args.payload, stop))
        pending = ok
        all_at: float | None = None
        hup: float | None = None
        queue_peak = 0
        try:
            await asyncio.sleep(args.recover_before)
            hup = time.monotonic()
            t.reload()
            log(f"{self.tag} recover: SIGHUP to the gunicorn master {t.master}: every worker is replaced")
            deadline, shown = hup + args.recover_timeout, hup
            while time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                queue_peak = max(queue_peak, t.accept_queue())
                states = await self.clients.recover_state()
                closed = sum(s.closed_since_mark for s in states)
                pending = sum(s.pending for s in states) + ok - closed
                if time.monotonic() - shown >= 1.0:
                    shown = time.monotonic()
                    log(f"{self.tag} recover {shown - hup:4.1f} s: closed {closed}/{ok}, open "
                        f"{sum(s.open for s in states)}, waiting for their ack {pending}, in the listen queue "
                        f"{t.accept_queue()}")
                if pending == 0:
                    all_at = max(s.last_ack for s in states)
                    break
            await asyncio.sleep(args.recover_after)
        finally:
            stop.set()
            published = await publishing
            self.seq = publisher.seq
            await publisher.close()
        top = published.top
        drain_until = time.monotonic() + 10
        while True:
            states = await self.clients.recover_state(top)
            if sum(s.behind for s in states) == 0 or time.monotonic() > drain_until:
                break
            await asyncio.sleep(0.2)
        # The workers copy their counters to /metrics periodically: wait until it shows every
        # subscription with since that the clients had answered (or a few sync periods).
        answered = sum(s.recovered + s.reloads for s in states)
        metrics1 = await asyncio.to_thread(t.metrics)
        metrics_until = time.monotonic() + 10
        while metrics0 is not None and metrics1 is not None and time.monotonic() < metrics_until:
            shown = sum(v - metrics0.get(k, 0.0) for k, v in metrics1.items()
                        if k.startswith("wsbroadcast_recoveries_total"))
            if shown >= answered:
                break
            await asyncio.sleep(0.5)
            metrics1 = await asyncio.to_thread(t.metrics)
        workers_after = sorted(p.pid for p in t.workers())
        await self.close_all()
        result = self._recover_result(ok, dict(failed), before, states, metrics0, metrics1, published, pending,
                                      workers_before, workers_after, None if all_at is None else all_at - hup, hup)
        result.listen_queue_peak = queue_peak
        log(f"{self.tag} recover: frames lost {result.frames_lost}, duplicates {result.duplicates}, recovered "
            f"{result.recovered_true} (not: {result.recovered_false}), ack after reconnect "
            f"p99/max {result.recover_ms.p99 if result.recover_ms else 'n/a'}/"
            f"{result.recover_ms.max if result.recover_ms else 'n/a'} ms, all recovered "
            f"{number(result.all_recovered_s, ' s')} after the SIGHUP, history reads {number(result.history_reads)}; "
            f"handshakes p50/p99/max {result.handshake_ms} ms, reopened {result.first_reopened_s}-"
            f"{result.last_reopened_s} s after the SIGHUP")
        return result

    def _recover_result(
        self, ok: int, failed: dict[str, int], before: list[RecoverState], states: list[RecoverState],
        metrics0: dict[str, float] | None, metrics1: dict[str, float] | None, published: Any, pending: int,
        workers_before: list[int], workers_after: list[int], all_recovered: float | None, hup: float | None,
    ) -> RecoverResult:
        def total(name: str) -> int:
            return sum(getattr(s, name) for s in states)

        def merged(name: str, of: list[RecoverState]) -> dict[str, int]:
            out: Counter[str] = Counter()
            for s in of:
                out.update(getattr(s, name))
            return dict(out)

        def delta(prefix: str) -> dict[str, float] | None:
            if metrics0 is None or metrics1 is None:
                return None
            return {key: round(value - metrics0.get(key, 0.0), 3) for key, value in metrics1.items()
                    if key.startswith(prefix)}

        delays = sorted(d for s in states for d in s.ack_delays)
        latency = _quantiles_ms(delays)
        handshakes = [h for s in states for h in s.handshakes]
        waits = _quantiles_ms(sorted(opened - attempted for _, attempted, opened in handshakes))
        reopened = sorted(opened for _, _, opened in handshakes)
        reads = delta("wsbroadcast_history_reads_total")
        recoveries = delta("wsbroadcast_recoveries_total")
        gaps = delta("wsbroadcast_gaps_sent_total")
        result = RecoverResult(
            clients=ok,
            connect_failed=failed,
            rate=self.args.recover_rate,
            history_size=self._history_size(),
            jitter_s=self.args.recover_jitter,
            workers_before=workers_before,
            workers_after=workers_after,
            clients_per_worker_before=merged("workers", before),
            clients_per_worker_after=merged("workers", states),
            closes=merged("closes", states),
            reconnects=total("reconnects"),
            reconnect_failures=merged("connect_failures", states),
            recovered_true=total("recovered"),
            recovered_false=total("reloads"),
            not_recovered_in_time=pending,
            published=published.hi - published.lo,
            publish_failed=len(published.failed),
            top_offset=published.top,
            frames_checked=total("frames"),
            frames_lost=total("lost") + total("behind"),
            duplicates=total("dups"),
            gaps=total("gaps"),
            gap_offsets=total("gap_offsets"),
            reload_offsets=total("reload_offsets"),
            unchecked_frames=total("unknown"),
            error_frames=total("errors"),
            behind_at_end=total("behind"),
            recover_ms=latency,
            recover_ms_mean=round(sum(delays) / len(delays) * 1000, 1) if delays else None,
            handshake_ms=waits,
            first_reopened_s=round(reopened[0] - hup, 3) if reopened and hup is not None else None,
            last_reopened_s=round(reopened[-1] - hup, 3) if reopened and hup is not None else None,
            listen_queue_peak=0,
            all_recovered_s=round(all_recovered, 3) if all_recovered is not None else None,
            history_reads=sum(reads.values()) if reads is not None else None,
            server_recoveries=recoveries,
            server_gaps_sent=sum(gaps.values()) if gaps is not None else None,
            publisher_behind_ms=round(published.max_behind * 1000, 1),
        )
        result.passed = (result.frames_lost == 0 and result.duplicates == 0 and pending == 0
                         and latency is not None and latency.max <= 2000)
        return result
