"""A private Redis Cluster on free loopback ports: masters with one replica each, stopped by PID.

Used by the cluster tests and ``scripts/loadtest --cluster``. ``redis-cli --cluster create`` says
``cluster_state:ok`` before the replicas are linked, so ``start`` also waits for every replica's
``master_link_status:up``: a failover before that would promote a replica holding nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

from scripts.redis_server import _tail, free_port, redis_binary, terminate

# How long a silent master stays master: short, so a failover test takes seconds, not the
# default 15 s; long enough that a busy machine does not fail healthy masters over.
NODE_TIMEOUT_MS = 2000


def redis_cli() -> str:
    found = shutil.which("redis-cli")
    if found is None:
        raise RuntimeError("no redis-cli on PATH (it creates the cluster): install redis-tools")
    return found


@dataclass
class Node:
    port: int
    bus_port: int
    dir: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class PrivateCluster:
    """``masters`` masters and as many replicas, each a redis-server in a directory of its own."""

    def __init__(self, masters: int = 3, replicas: int = 1) -> None:
        self.masters = masters
        self.replicas = replicas
        self.nodes: list[Node] = []

    @property
    def url(self) -> str:
        """Any node does: the service and redis-py discover the rest."""
        return self.nodes[0].url

    def start(self, timeout: float = 30.0) -> None:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        for _ in range(self.masters * (1 + self.replicas)):
            node = Node(free_port(), free_port(), tempfile.mkdtemp(prefix="wsbroadcast-cluster-"))
            self.nodes.append(node)
            self._spawn(node)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            self._wait(lambda n=node: self.cli(n.port, "PING", check=False) == "PONG", deadline, f"{node.port} up")
        create = subprocess.run(
            [redis_cli(), "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout[-500:]} {create.stderr[-500:]}")
        self.wait_healthy(deadline - time.monotonic())

    def _spawn(self, node: Node) -> None:
        args = [
            redis_binary(), "--port", str(node.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", node.dir, "--protected-mode", "yes", "--loglevel", "warning",
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            # Its own free port: the default (port + 10000) does not exist above 55535.
            "--cluster-port", str(node.bus_port),
        ]
        with open(os.path.join(node.dir, "redis.log"), "ab") as log:
            node.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every live node sees cluster_state:ok, and every live replica's link to its master is up."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if not node.alive():
                continue
            self._wait(lambda n=node: "cluster_state:ok" in self.cli(n.port, "CLUSTER", "INFO", check=False),
                       deadline, f"cluster_state:ok on {node.port}")
            if "role:slave" in self.cli(node.port, "INFO", "replication", check=False):
                self._wait(lambda n=node: "master_link_status:up" in self.cli(n.port, "INFO", "replication",
                                                                              check=False),
                           deadline, f"the replica on {node.port} linked to its master")

    def _wait(self, condition: object, deadline: float, what: str) -> None:
        assert callable(condition)
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.process is not None and node.process.poll() is not None:
                    raise RuntimeError(f"redis-server {node.port} exited: {_tail(os.path.join(node.dir, 'redis.log'))}")
            if condition():
                return
            time.sleep(0.05)
        raise RuntimeError(f"the cluster is not ready: timed out waiting for {what}")

    def cli(self, port: int, *args: str, check: bool = True) -> str:
        done = subprocess.run([redis_cli(), "-p", str(port), *args], capture_output=True, text=True, timeout=10,
                              stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise RuntimeError(f"redis-cli -p {port} {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout.strip()

    def roles(self) -> dict[int, str]:
        """Each live node's port and role (``master`` or ``slave``)."""
        out: dict[int, str] = {}
        for node in self.nodes:
            if node.alive():
                info = self.cli(node.port, "INFO", "replication", check=False)
                out[node.port] = "master" if "role:master" in info else "slave"
        return out

    def master_ports(self) -> list[int]:
        return [port for port, role in self.roles().items() if role == "master"]

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def kill(self, port: int) -> None:
        """SIGKILL one node (a crash: nothing flushed, no goodbye to the cluster)."""
        node = self.node(port)
        assert node.process is not None
        os.kill(node.process.pid, signal.SIGKILL)
        node.process.wait(10)

    def stop(self) -> None:
        nodes, self.nodes = self.nodes, []
        for node in nodes:
            try:
                if node.process is not None:
                    terminate(node.process, 10)
            finally:
                shutil.rmtree(node.dir, ignore_errors=True)

    def __enter__(self) -> PrivateCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
