"""Load test: ``scripts/loadtest [SCENARIO ...]`` (installed: ``wsbroadcast-loadtest``).

Scenarios: ``idle`` (RSS per idle connection, memory given back after close), ``fanout``
(deliveries/s, loss, latency and server CPU per delivery at each publish rate), ``slow`` (10% of
the clients stop reading while 2 KB frames flow), ``redis-restart`` (Redis down for 1 s mid-stream),
``publish-rate`` (publications per second through the publish function and through plain PUBLISH),
``recover`` (every worker restarted under a steady publisher: the clients reconnect with ``since``
their last offset; frames lost, time to recover, history reads). ``channels``, run alone: many
channels with a few subscribers each, on one Redis and on a Redis Cluster (``REDIS_CLUSTER=1``)
started side by side: deliveries/s and each redis-server's CPU (``scripts/load/channels.py``).

``scripts/loadtest breakdown [--connections N]`` is a tool of its own (``scripts/load/breakdown.py``):
where each byte of an idle connection goes, by allocation site and object type, on one traced worker.

wsbroadcast is published to through its Redis function ``wsb_publish`` (offsets and history, as
apps publish), or with ``--publish-via publish`` by plain PUBLISH of ready frames (no offsets);
the broadcaster and node baselines always by PUBLISH (they forward the frame as published).
``--compare-env KEY=VALUE`` runs the same scenarios against a second wsbroadcast with that setting
too (e.g. HISTORY_SIZE=0), side by side.

By default it starts what it measures, which needs a clone of the repository: a private Redis and
the service from the Procfile's web line (or, ``--target broadcaster``, the encode/broadcaster
baseline ``benchmarks/broadcaster_app.py`` from its own environment ``.venv-baseline``, created on
first use; ``--target node``, a Node ``ws`` cluster, ``benchmarks/node_ws``, its ``node_modules``
installed by ``npm ci`` on first use), 2 workers on a free loopback port. ``--target
wsbroadcast,node`` measures each in turn in one run. ``--url`` drives a running service instead, from
anywhere: it publishes through ``--redis-url`` and finds the workers from their heartbeats there
(their CPU and memory are measured when they run on this host).

Clients are several processes (``--clients``), each one uvloop event loop holding raw WebSocket
connections. A step whose publisher fell behind its schedule never counts as a pass; a saturated
client is reported (see ``scripts/load/scenarios.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from scripts.load import channels, report
from scripts.load.publisher import VIA
from scripts.load.rawclient import Clients, raise_fd_limit
from scripts.load.results import TargetResult, to_json
from scripts.load.scenarios import Run, log
from scripts.load.targets import (
    Target,
    attach,
    ensure_baseline_venv,
    ensure_node_modules,
    start_broadcaster,
    start_node,
    start_wsbroadcast,
)
from scripts.redis_server import PrivateRedis
from scripts.service_process import ROOT, ServiceError, procfile_web
from service.config import Settings, SettingsError

SCENARIOS = ("idle", "fanout", "slow", "redis-restart", "publish-rate", "recover")
# Run only when named (it starts its own brokers: one Redis, then a Redis Cluster).
ALONE = ("channels",)
INSTALLED = "wsbroadcast-loadtest"
TARGETS = ("wsbroadcast", "broadcaster", "node")


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help; options whose help says what unset means show none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, [], argparse.SUPPRESS) or action.nargs == "*":
            return action.help
        return super()._get_help_string(action)


def _prog() -> str:
    return INSTALLED if Path(sys.argv[0]).name == INSTALLED else "scripts/loadtest"


def _targets(parser: argparse.ArgumentParser, value: str) -> list[str]:
    named = {"both": ["wsbroadcast", "broadcaster"], "all": list(TARGETS)}.get(value)
    if named is not None:
        return named
    names = [name for name in value.split(",") if name]
    wrong = [name for name in names if name not in TARGETS]
    if wrong or not names or len(set(names)) < len(names):
        parser.error(f"--target {value!r}: expected any of {', '.join(TARGETS)} (comma-separated, each once), "
                     "both or all")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=_prog(), description=__doc__, formatter_class=_Help)
    add = parser.add_argument
    add("scenarios", nargs="*", metavar="SCENARIO", help=f"any of {', '.join(SCENARIOS)} (none: all)")
    add("--target", default="wsbroadcast", metavar="NAME[,NAME]",
        help=f"what to start and measure, each in turn: {', '.join(TARGETS)} or several of them "
             "(wsbroadcast,node); both: wsbroadcast,broadcaster; all: the three")
    add("--url", help="drive a running service (ws://127.0.0.1:8000) instead of starting one")
    add("--redis-url", help="with --url: the Redis it uses (unset: $REDIS_URL)")
    add("--redis-prefix", default=os.environ.get("REDIS_PREFIX", "broadcast:"),
        help="with --url: its REDIS_PREFIX")
    add("--server-pid", type=int, help="with --url: the gunicorn master (unset: the workers come from heartbeats)")
    add("--workers", type=int, default=2, help="workers of the service it starts")
    add("--env", action="append", default=[], metavar="KEY=VALUE",
        help="a setting for the service it starts (repeatable), e.g. SEND_BUFFER_BYTES=65536; with --url, "
             "its HISTORY_* settings, which the publish function is called with")
    add("--compare-env", action="append", default=[], metavar="KEY=VALUE",
        help="also run a wsbroadcast with these settings added (repeatable), e.g. HISTORY_SIZE=0")
    add("--publish-via", choices=VIA, default="function",
        help="how wsbroadcast is published to: its Redis function (offsets) or plain PUBLISH")
    add("--clients", type=int, default=max(2, os.cpu_count() or 2), help="client processes")
    add("--connections", type=int, default=5000, help="idle: connections")
    add("--connect-rate", type=float, default=1000.0, help="connections opened per second")
    add("--settle", type=float, default=3.0, help="idle: seconds before each RSS reading")
    add("--idle-warmup", type=int, default=50,
        help="idle: connections opened and closed before the first RSS reading (first-use costs are no "
             "connection's)")
    add("--subscribers", type=int, default=2000, help="fanout, slow: subscribers")
    add("--rates", default="20,50,100,200", help="fanout: msg/s steps")
    add("--duration", type=float, default=10.0, help="fanout: seconds per step")
    add("--all-rates", action="store_true",
        help="fanout: measure every rate even after one failed (to compare services; the highest passing "
             "rate still counts only the steps below the first failure)")
    add("--payload", type=int, default=200, help="bytes of data per frame")
    add("--slow-fraction", type=float, default=0.10, help="slow: share of the subscribers that stop reading")
    add("--slow-rate", type=float, default=20.0, help="slow: msg/s")
    add("--slow-payload", type=int, default=2048, help="slow: bytes of data per frame")
    add("--slow-duration", type=float, default=60.0, help="slow: seconds")
    add("--sample-every", type=float, default=5.0, help="slow: seconds between samples")
    add("--restart-subscribers", type=int, default=200, help="redis-restart: subscribers")
    add("--restart-rate", type=float, default=100.0, help="redis-restart: msg/s")
    add("--outage", type=float, default=1.0, help="redis-restart: seconds Redis stays down")
    add("--publish-subscribers", type=int, default=0, help="publish-rate: subscribers (0: the workers get none)")
    add("--publish-concurrency", type=int, default=4, help="publish-rate: publishers, each one after the other")
    add("--publish-seconds", type=float, default=5.0, help="publish-rate: seconds per way of publishing")
    add("--recover-clients", type=int, default=2000, help="recover: clients")
    add("--recover-rate", type=float, default=50.0, help="recover: msg/s")
    add("--recover-jitter", type=float, default=1.0, help="recover: each client reconnects after 0 to this many s")
    add("--recover-before", type=float, default=2.0, help="recover: s of publishing before the restart")
    add("--recover-after", type=float, default=2.0, help="recover: s of publishing after every client recovered")
    add("--recover-timeout", type=float, default=30.0, help="recover: s after the restart to wait for every client")
    add("--profile", metavar="DIR",
        help="py-spy every worker during each step into DIR (inflates server CPU: not for figures)")
    channels.add_arguments(add)
    add("--json", metavar="PATH", help="write every figure as JSON ('-' for stdout)")
    args = parser.parse_args(argv)
    try:
        args.rates = [float(r) for r in args.rates.split(",") if r]
    except ValueError:
        parser.error(f"--rates {args.rates!r}: expected numbers separated by commas, e.g. 20,50")
    args.targets = _targets(parser, args.target)
    unknown = set(args.scenarios) - set(SCENARIOS) - set(ALONE)
    if unknown:
        parser.error(f"unknown scenario {sorted(unknown)[0]!r}; expected any of {', '.join(SCENARIOS + ALONE)}")
    if set(args.scenarios) & set(ALONE) and (len(args.scenarios) > 1 or args.url or args.target != "wsbroadcast"):
        parser.error("channels runs alone, on the brokers it starts (no other scenario, no --url, no --target)")
    if args.scenarios == ["channels"]:
        return args
    args.scenarios = [s for s in SCENARIOS if s in args.scenarios] if args.scenarios else list(SCENARIOS)
    if args.url and args.target != "wsbroadcast":
        parser.error("--url drives one running service; --target applies only to services this tool starts")
    if args.url and not (args.redis_url or os.environ.get("REDIS_URL")):
        parser.error("--url needs --redis-url (or REDIS_URL) to publish through")
    for option, items in (("--env", args.env), ("--compare-env", args.compare_env)):
        bad = [item for item in items if "=" not in item]
        if bad:
            parser.error(f"{option} {bad[0]!r}: expected KEY=VALUE")
        try:
            Settings.from_env(dict(item.split("=", 1) for item in [*args.env, *items]))
        except SettingsError as exc:
            parser.error(f"{option}: {exc}")
    if args.compare_env and (args.url or args.target != "wsbroadcast"):
        parser.error("--compare-env starts a second wsbroadcast: only with --target wsbroadcast, without --url")
    return args


def _describe_workers(target: Target, attached: bool) -> None:
    workers = sorted(p.pid for p in target.workers())
    if workers or not attached:
        log(f"[{target.name}] server on {target.host}:{target.port}, workers {workers}"
            + (f", log {target.log_path}" if target.log_path else ""))
        return
    beats = target.heartbeats()
    if beats:
        hosts = sorted({beat["worker"]["host"] for beat in beats})
        log(f"[{target.name}] {len(beats)} workers have heartbeats, on {', '.join(hosts)}, not on this host "
            f"({socket.gethostname()}): server CPU and RSS are not measured (n/a)")
    else:
        log(f"[{target.name}] no worker heartbeats under {target.heartbeat_prefix!r}worker:* in {target.redis_url}: "
            "server CPU and RSS are not measured (n/a); pass the service's --redis-prefix, or --server-pid")


async def _measure(args: argparse.Namespace) -> dict[str, TargetResult]:
    clients = Clients(args.clients)
    redis: PrivateRedis | None = None
    results: dict[str, TargetResult] = {}
    try:
        names = list(args.targets)
        if not args.url:
            redis = PrivateRedis()
            await asyncio.to_thread(redis.start)
            if "broadcaster" in names:
                await asyncio.to_thread(ensure_baseline_venv)
            if "node" in names:
                await asyncio.to_thread(ensure_node_modules)
        extra_env = dict(item.split("=", 1) for item in args.env)
        variants = {"wsbroadcast": extra_env}
        if args.compare_env:
            added = dict(item.split("=", 1) for item in args.compare_env)
            variants = {"wsbroadcast": extra_env,
                        "wsbroadcast " + " ".join(f"{k}={v}" for k, v in added.items()): {**extra_env, **added}}
            names = list(variants)
        for name in names:
            if args.url:
                target = attach(args.url, args.redis_url or os.environ["REDIS_URL"], args.redis_prefix,
                                args.server_pid, extra_env, args.publish_via)
            else:
                assert redis is not None
                if name in variants:
                    # Each its own prefix: a channel's offsets and history start afresh for each.
                    prefix = "bench:" if name == "wsbroadcast" else f"bench{list(variants).index(name)}:"
                    target = await asyncio.to_thread(start_wsbroadcast, redis.url, args.workers, variants[name],
                                                     args.publish_via, name, prefix)
                elif name == "node":
                    target = await asyncio.to_thread(start_node, redis.url, args.workers)
                else:
                    target = await asyncio.to_thread(start_broadcaster, redis.url, args.workers)
            _describe_workers(target, attached=bool(args.url))
            run = Run(args, clients, target, None if args.url else redis)
            result = TargetResult(target=name, port=target.port)
            try:
                for scenario in args.scenarios:
                    setattr(result, scenario.replace("-", "_"), await getattr(run, scenario.replace("-", "_"))())
            finally:
                results[name] = result
                await asyncio.to_thread(target.stop)
            # Kept only when something went wrong (the error names it).
            if target.log_path is not None:
                target.log_path.unlink(missing_ok=True)
    finally:
        clients.stop()
        if redis is not None:
            await asyncio.to_thread(redis.stop)
    return results


def _git_state() -> dict[str, Any]:
    """The commit measured, and the files that differed from it (a figure belongs to a tree)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(), "modified": dirty}


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["breakdown"]:
        # One worker in-process, traced: its own options (scripts/load/breakdown.py).
        from scripts.load import breakdown

        return breakdown.main(words[1:])
    args = parse_args(argv)
    if not args.url:
        try:
            procfile_web()
        except ServiceError as exc:
            print(f"{_prog()}: {exc}", file=sys.stderr)
            return 2
    limit = raise_fd_limit()
    needed = max(args.connections, args.subscribers, args.recover_clients) + 100
    if limit < needed:
        print(f"{_prog()}: the fd limit is {limit}; {needed} are needed (raise it: ulimit -Hn)", file=sys.stderr)
        return 2
    started = time.time()
    load = os.getloadavg()
    try:
        if args.scenarios == ["channels"]:
            by_broker = asyncio.run(channels.run(args))
            print(channels.table(by_broker))
            _write_json(args, argv, started, load, [r.__dict__ for r in by_broker])
            return 0
        results = asyncio.run(_measure(args))
    except KeyboardInterrupt:
        return 130
    except (ServiceError, RuntimeError) as exc:
        print(f"{_prog()}: {exc}", file=sys.stderr)
        return 1
    print(report.summary(results))
    print("\n" + report.table(results))
    _write_json(args, argv, started, load, to_json(results))
    return 0


def _write_json(
    args: argparse.Namespace, argv: list[str] | None, started: float, load: tuple[float, ...], results: Any
) -> None:
    """With --json: every figure, with the commit, the command and the machine's load at the start."""
    if not args.json:
        return
    document = {
        "git": _git_state(),
        "command": " ".join([_prog(), *(argv if argv is not None else sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "load_average_at_start": [round(x, 2) for x in load],
        "cpus": os.cpu_count(),
        "results": results,
    }
    text = orjson.dumps(document, option=orjson.OPT_INDENT_2).decode()
    if args.json == "-":
        print(text)
    else:
        Path(args.json).write_text(text + "\n")
