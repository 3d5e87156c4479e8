"""The figures for a reader: a summary per target, a Markdown table side by side; fractions as percentages."""

from __future__ import annotations

from collections.abc import Iterator

from scripts.load.results import IdleResult, RecoverResult, RestartResult, StepResult, TargetResult


def number(value: float | int | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}{unit}" if abs(value) < 1000 else f"{value:.0f}{unit}"
    return f"{value}{unit}"


def percent(fraction: float | None) -> str:
    """0.999 -> '99.9%'; never rounds a shortfall up to 100%."""
    if fraction is None:
        return "n/a"
    text = f"{fraction * 100:.1f}"
    if text == "100.0" and fraction < 1:
        text = f"{fraction * 100:.4f}".rstrip("0")
    return f"{text}%"


def _table(rows: list[tuple[str, str]], indent: str = "  ") -> str:
    width = max((len(key) for key, _ in rows), default=0)
    return "\n".join(f"{indent}{key.ljust(width)}  {value}" for key, value in rows)


def idle_table(idle: IdleResult) -> str:
    measured = "" if idle.server_workers_measured else " (no worker process measured)"
    rows = [
        ("connections", f"{idle.connected} of {idle.connections} in {idle.connect_seconds} s"
         + (f", failed {idle.failed}" if idle.failed else "")),
        ("established on the server", str(idle.established_on_server)),
        ("workers' RSS before", f"{idle.rss_before_mb} MB{measured}"
         + (f" (after {idle.warmup} connections opened and closed)" if idle.warmup else "")),
        ("workers' RSS connected", f"{idle.rss_connected_mb} MB"),
        ("per connection", f"{number(idle.kb_per_connection)} KB"),
        ("closed in", f"{idle.close_seconds} s"),
        (f"RSS {idle.settle_s:g} s after close", f"{idle.rss_after_close_mb} MB"),
        ("given back", percent(idle.given_back_fraction)),
    ]
    return _table(rows, "    ")


def _step_tag(step: StepResult) -> str:
    tag = " (CLIENT SATURATED)" if step.client_saturated else ""
    tag += " (LOAD NOT OFFERED)" if step.load_not_offered else ""
    if step.machine_saturated:
        tag += f" (MACHINE SATURATED; other processes {step.other_processes_cores} cores)"
    return tag


def _rows(result: TargetResult) -> Iterator[tuple[str, str]]:
    fanout = result.fanout
    if fanout:
        for step in fanout.steps:
            lat = step.latency_ms
            yield (f"fanout {step.rate:g}/s x {step.subscribers} subs",
                   f"{number(step.server_cpu_us_per_delivery)} us/delivery, delivered "
                   f"{percent(step.delivered_fraction)}, p50/p99/max {lat.p50}/{lat.p99}/{lat.max} ms, "
                   f"{step.deliveries_per_s / 1000:.1f}k deliveries/s, dup {step.duplicates}, "
                   f"reordered {step.reordered}{_step_tag(step)}")
        yield ("highest rate >= 99.9% and p99 < 200 ms", number(fanout.highest_rate_passing, " msg/s"))
    idle = result.idle
    if idle:
        yield (f"idle RSS per connection ({idle.connected})", f"{number(idle.kb_per_connection)} KB "
               f"(workers {idle.rss_before_mb} -> {idle.rss_connected_mb} MB)")
        yield ("memory given back after close", f"{percent(idle.given_back_fraction)} "
               f"(-> {idle.rss_after_close_mb} MB after {idle.settle_s} s)")
    slow = result.slow
    if slow:
        fast = slow.fast
        yield (f"slow: {slow.stalled} stalled of {slow.subscribers}",
               f"stalled {slow.stalled_outcomes}, RSS growth {slow.rss_growth_mb} MB, "
               f"send queue peak {slow.send_queue_peak_mb} MB")
        yield ("slow: fast clients", f"delivered {percent(fast.delivered_fraction)}, p99 {fast.latency_ms.p99} ms"
               + (" (CLIENT SATURATED)" if fast.client_saturated else ""))
    restart = result.redis_restart
    if isinstance(restart, RestartResult):
        yield ("redis restart", f"resume {number(restart.resume_s, ' s')} "
               f"(all clients {number(restart.resume_all_s, ' s')}), "
               f"frames lost {restart.frames_lost} of {restart.published_ok}, connections "
               f"{restart.connections_before} -> {restart.connections_after}")
    rate = result.publish_rate
    if rate:
        for way in rate.ways:
            yield (f"publish-rate via {way.via}", f"{way.per_s:.0f}/s ({way.concurrency} publishers, "
                   f"{rate.subscribers} subscribers, Redis {number(way.redis_cpu_us_per_publication)} us each, "
                   f"publishing process {way.publisher_cores} cores)")
    recover = result.recover
    if isinstance(recover, RecoverResult):
        yield (f"recover: {recover.clients} clients, workers restarted", _recover_text(recover))


def _recover_text(recover: RecoverResult) -> str:
    lat = recover.recover_ms
    delays = f"{lat.p99}/{lat.max} ms" if lat is not None else "n/a"
    return (f"frames lost {recover.frames_lost} (dup {recover.duplicates}; announced: gap {recover.gap_offsets}, "
            f"recovered:false {recover.reload_offsets}), recovered {recover.recovered_true}/"
            f"{recover.recovered_true + recover.recovered_false}, ack after reconnect p99/max {delays}, "
            f"all recovered {number(recover.all_recovered_s, ' s')} after SIGHUP, "
            f"history reads {number(recover.history_reads)}"
            + (f", NOT RECOVERED {recover.not_recovered_in_time}" if recover.not_recovered_in_time else ""))


def _step_at(result: TargetResult, rate: float) -> StepResult | None:
    steps = result.fanout.steps if result.fanout else []
    return next((step for step in steps if step.rate == rate), None)


def _issue_rows(result: TargetResult) -> dict[str, str]:
    """The README's table, one cell per figure, for one target."""
    cells: dict[str, str] = {}
    for rate in (20.0, 50.0):
        step = _step_at(result, rate)
        if step is not None:
            flag = " (client saturated)" if step.client_saturated else ""
            cells[f"server CPU per delivery, {step.subscribers} subs x {rate:g} msg/s"] = (
                f"{number(step.server_cpu_us_per_delivery)} us{flag}")
    step = _step_at(result, 20.0)
    if step is not None:
        cells["p99 latency at 20 msg/s"] = f"{step.latency_ms.p99} ms (p50 {step.latency_ms.p50})"
    fanout = result.fanout
    if fanout:
        last = fanout.steps[-1] if fanout.steps else None
        why = ""
        if last is not None and not last.passed:
            why = f" ({last.rate:g} msg/s: delivered {percent(last.delivered_fraction)}, p99 {last.latency_ms.p99} ms"
            if last.load_not_offered:
                why = f" ({last.rate:g} msg/s: load not offered"
            elif last.client_saturated:
                why += ", client saturated"
            if last.machine_saturated:
                why += f", machine {last.machine_cpu_percent:.0f}% busy"
            why += ")"
        cells["highest rate with >= 99.9% delivered and p99 < 200 ms"] = (
            number(fanout.highest_rate_passing, " msg/s") + why)
    idle = result.idle
    if idle:
        cells[f"RSS per idle connection ({idle.connected})"] = f"{number(idle.kb_per_connection)} KB"
        cells["memory given back after close"] = percent(idle.given_back_fraction)
    slow = result.slow
    if slow:
        fast = slow.fast
        counters = slow.server_counters or {}
        closed = f", server slow_closed {counters['slow_closed']}" if "slow_closed" in counters else ""
        cells["slow clients: stalled ones"] = f"{slow.stalled_outcomes}{closed}"
        cells["slow clients: RSS growth"] = (f"{slow.rss_growth_mb} MB (kernel send queue peak "
                                             f"{slow.send_queue_peak_mb} MB)")
        cells["slow clients: fast ones"] = (f"{percent(fast.delivered_fraction)} delivered, p99 "
                                            f"{fast.latency_ms.p99} ms")
    restart = result.redis_restart
    if isinstance(restart, RestartResult):
        cells["Redis restart: deliveries resume after Redis is back"] = (
            number(restart.resume_s, " s") if restart.resume_s is not None else "never")
        cells["Redis restart: frames lost"] = f"{restart.frames_lost} of {restart.published_ok} published"
    flat = result.publish_rate
    if flat:
        for way in flat.ways:
            cells[f"publications/s via {way.via} ({way.concurrency} publishers)"] = (
                f"{way.per_s:.0f} (Redis {number(way.redis_cpu_us_per_publication)} us each)")
    recover = result.recover
    if isinstance(recover, RecoverResult):
        cells[f"recover, {recover.clients} clients x {recover.rate:g} msg/s: frames lost"] = (
            f"{recover.frames_lost} (announced: {recover.gap_offsets + recover.reload_offsets})")
        if recover.recover_ms is not None:
            cells["recover: ack after reconnect, p99 / max"] = f"{recover.recover_ms.p99} / {recover.recover_ms.max} ms"
        cells["recover: all recovered after the restart"] = number(recover.all_recovered_s, " s")
        cells["recover: history reads"] = number(recover.history_reads)
    return cells


def table(results: dict[str, TargetResult]) -> str:
    """The figures side by side, as a Markdown table."""
    names = list(results)
    cells = {name: _issue_rows(result) for name, result in results.items()}
    rows = list(dict.fromkeys(row for name in names for row in cells[name]))
    lines = ["| figure | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    lines += [f"| {row} | " + " | ".join(cells[name].get(row, "") for name in names) + " |" for row in rows]
    return "\n".join(lines)


def summary(results: dict[str, TargetResult]) -> str:
    return "\n".join(f"\n== {name}\n{_table(list(_rows(result)))}" for name, result in results.items())
