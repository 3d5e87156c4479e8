"""Test hosts in network namespaces: a LAN of hosts on one bridge, made and removed by the test.

Each host is a network namespace joined by a veth pair to a bridge that lives in a namespace of
its own (the LAN's switch), so nothing is added to the machine's namespace: no interface, address
or route, and neither the machine's networks nor another run's LAN can collide with the subnet.

Work happens *on* a host through its threads. Linux keeps the network and UTS namespaces per
thread: a thread that joined a host's namespace (``setns``) and took its own hostname creates its
sockets there, and a process it starts inherits both, as under ``ip netns exec`` but with no
wrapper in between (the PID is the program's own). So ``host.call(service.start)`` starts a
service on that host, and ``host.call(socket.create_connection, ...)`` connects from it.

Needs root and iproute2's ``ip``; ``require_namespaces`` says in one line what is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import itertools
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor, Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

PREFIX = "wsbhost-"  # every namespace of ours; the creator's PID follows
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
IP_TIMEOUT = 10.0  # for one ip command, which never waits on the network
THREADS_PER_HOST = 4  # a long task (a publisher) must leave a host room for calls

_libc = ctypes.CDLL(None, use_errno=True)
_sequence = itertools.count()


class NamespacesUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no ``ip``, or the kernel refused)."""


def require_namespaces() -> None:
    """Raise NamespacesUnavailable, with one line saying why, unless this process can make a LAN."""
    if os.geteuid() != 0:
        raise NamespacesUnavailable(f"network namespaces need root (euid {os.geteuid()}); run the test as root")
    if shutil.which("ip") is None:
        raise NamespacesUnavailable("network namespaces need iproute2's ip command, which is not on PATH")


def _ip(*args: str) -> str:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NamespacesUnavailable(f"ip {' '.join(args)}: {exc}") from None
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        raise NamespacesUnavailable(f"ip {' '.join(args)}: {reason}")
    return done.stdout


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _join(netns: str, hostname: str) -> None:
    """Move the calling thread into ``netns`` and a UTS namespace of its own named ``hostname``."""
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"setns {netns}")
    finally:
        os.close(fd)
    _check(_libc.unshare(CLONE_NEWUTS), "unshare(CLONE_NEWUTS)")
    socket.sethostname(hostname)


def unused_subnet() -> ipaddress.IPv4Network:
    """The first /24 of 10.213.0.0/16 that the machine's namespace neither addresses nor routes.

    Our LAN is private to its namespaces and could not collide anyway; a subnet the machine does
    not use keeps what a person reads in a failure (addresses in logs) unambiguous.
    """
    used = []
    for line in _ip("-4", "-o", "addr", "show").splitlines() + _ip("-4", "route", "show").splitlines():
        for word in line.split():
            with contextlib.suppress(ValueError):
                used.append(ipaddress.ip_network(word, strict=False))
    for n in range(256):
        subnet = ipaddress.IPv4Network(f"10.213.{n}.0/24")
        if not any(subnet.overlaps(net) for net in used if isinstance(net, ipaddress.IPv4Network)):
            return subnet
    raise NamespacesUnavailable("every /24 of 10.213.0.0/16 is in use on this machine")


def remove_stale() -> list[str]:
    """Remove our namespaces whose creator's process is gone (a run killed before its teardown)."""
    removed = []
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        pid = name[len(PREFIX):].split("-")[0]
        if name.startswith(PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(NamespacesUnavailable):
                _ip("netns", "delete", name)
                removed.append(name)
    return removed


class Host:
    """One host: a network namespace with ``address`` on the LAN, and threads that work on it."""

    def __init__(self, name: str, netns: str, address: str, switch_port: str) -> None:
        self.name = name
        self.netns = netns
        self.address = address
        self.hostname = f"host-{name}"
        self.switch_port = switch_port  # the LAN's end of the host's link: what ``Lan.cut`` takes down
        self.join_error: BaseException | None = None
        self._executor = ThreadPoolExecutor(
            THREADS_PER_HOST, thread_name_prefix=f"host-{name}", initializer=self._join
        )

    def _join(self) -> None:
        try:
            _join(self.netns, self.hostname)
        except BaseException as exc:
            self.join_error = exc  # the executor only says that an initializer failed
            raise

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` in one of the host's threads."""
        return self._executor.submit(fn, *args)

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 60.0) -> T:
        """``fn(*args)`` on this host, waited for at most ``timeout`` seconds."""
        return self.submit(fn, *args).result(timeout)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on this host, awaited from an event loop."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    async def open(self, port: int, address: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
        """A TCP connection made from this host (hand it to an asyncio client with ``sock=``)."""
        return await self.run(socket.create_connection, (address, port), timeout)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class Lan:
    """Hosts named ``names`` on one bridge, addressed .1, .2, ... in ``subnet``; removed by ``remove``.

    ``create`` removes what it made when making the rest fails.
    """

    def __init__(self, names: Sequence[str], subnet: ipaddress.IPv4Network | None = None) -> None:
        self.names = list(names)
        self.subnet = subnet
        self.tag = f"{PREFIX}{os.getpid()}-{next(_sequence)}"
        self.switch = f"{self.tag}-lan"
        self.hosts: dict[str, Host] = {}
        self._made: list[str] = []

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def create(self) -> Lan:
        try:
            return self._create()
        except BaseException:
            self.remove()
            raise

    def _create(self) -> Lan:
        require_namespaces()
        remove_stale()
        subnet = self.subnet or unused_subnet()
        self.subnet = subnet
        addresses = subnet.hosts()
        self._add_netns(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for name in self.names:
            netns, port, address = f"{self.tag}-{name}", f"port-{name}", str(next(addresses))
            self._add_netns(netns)
            _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns)
            _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", netns, "addr", "add", f"{address}/{subnet.prefixlen}", "dev", "eth0")
            _ip("-n", netns, "link", "set", "eth0", "up")
            _ip("-n", netns, "link", "set", "lo", "up")
            host = self.hosts[name] = Host(name, netns, address, port)
            try:
                named = host.call(socket.gethostname, timeout=IP_TIMEOUT)
            except BrokenExecutor:
                raise NamespacesUnavailable(f"a thread cannot join {netns}: {host.join_error}") from None
            if named != host.hostname:
                raise NamespacesUnavailable(f"a thread in {netns} is named {named!r}, not {host.hostname!r}")
        return self

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    def cut(self, name: str) -> None:
        """Pull the host's cable: its switch port goes down, the host sees its link lose carrier."""
        _ip("-n", self.switch, "link", "set", self.hosts[name].switch_port, "down")

    def heal(self, name: str) -> None:
        _ip("-n", self.switch, "link", "set", self.hosts[name].switch_port, "up")

    def listed(self) -> list[str]:
        """This LAN's namespaces that the system still lists."""
        return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.startswith(f"{self.tag}-")]

    def remove(self) -> None:
        """Stop the hosts' threads and delete every namespace made (their links go with them)."""
        hosts, self.hosts = list(self.hosts.values()), {}
        made, self._made = self._made, []
        for host in hosts:
            host.close()
        failures = []
        for netns in reversed(made):
            try:
                _ip("netns", "delete", netns)
            except NamespacesUnavailable as exc:
                failures.append(str(exc))
        if failures:
            raise RuntimeError("; ".join(failures))
