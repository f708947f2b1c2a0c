"""Build and always tear down private networks of Linux network namespaces.

Everything a lab creates lives inside namespaces it made itself, named with a per-lab random
prefix so that concurrent labs never collide. ``Lab`` is a context manager: on exit (also on
an exception or KeyboardInterrupt) it kills every process started in its namespaces and
deletes them; an ``atexit`` hook does the same if the interpreter exits with a lab open.

Address plan (house rule): the "internet" uses documentation ranges (192.0.2.0/24,
198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32); RFC 1918 only on a namespace's private LAN.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shlex
import signal
import subprocess
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from btmm_core.errors import BtmmError, PermissionNeeded

_open_labs: weakref.WeakSet[Lab] = weakref.WeakSet()


class LabError(BtmmError):
    """A lab step (namespace, link, address, process) failed."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


@dataclass
class Netns:
    """One network namespace of a lab."""

    name: str
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(
        self, cmd: Sequence[str] | str, *, check: bool = True, timeout: float = 60.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside the namespace."""
        argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        proc = subprocess.run(
            self.argv(argv), capture_output=True, text=True, timeout=timeout, check=False,
            input=input,
        )
        if check and proc.returncode != 0:
            raise LabError(
                f"in {self.name}: `{shlex.join(argv)}` exited {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
            )
        return proc

    def popen(self, cmd: Sequence[str] | str, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a long-running process inside the namespace; the lab kills it on exit."""
        argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        proc = subprocess.Popen(self.argv(argv), start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc


class Lab:
    """A set of namespaces joined by veth pairs, removed on exit whatever happens."""

    def __init__(self, prefix: str = "btmm") -> None:
        if os.geteuid() != 0:
            raise PermissionNeeded(
                "network namespaces need root", hint="run the lab or the tests as root"
            )
        self.prefix = f"{prefix}{secrets.token_hex(3)}"
        self.namespaces: dict[str, Netns] = {}
        self._closed = False
        self._cleanups: list[Callable[[], None]] = []

    def on_close(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the lab closes, after its processes and namespaces are gone."""
        self._cleanups.append(fn)

    def __enter__(self) -> Lab:
        _open_labs.add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ns(self, short: str) -> Netns:
        """Create a namespace (full name ``<prefix>-<short>``) with loopback up."""
        name = f"{self.prefix}-{short}"
        _ip("netns", "add", name)
        ns = Netns(name)
        self.namespaces[short] = ns
        ns.run(["ip", "link", "set", "lo", "up"])
        # No IPv6 duplicate address detection delays in a lab: addresses are usable at once.
        ns.run(["sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0"])
        ns.run(["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"])
        return ns

    def veth(self, a: Netns, a_if: str, b: Netns, b_if: str, mtu: int = 1500) -> None:
        """Join two namespaces with a veth pair and bring both ends up."""
        tmp = f"v{secrets.token_hex(4)}"
        _ip("link", "add", tmp, "mtu", str(mtu), "type", "veth", "peer", "name", f"{tmp}p",
            "mtu", str(mtu))
        _ip("link", "set", tmp, "netns", a.name)
        _ip("link", "set", f"{tmp}p", "netns", b.name)
        a.run(["ip", "link", "set", tmp, "name", a_if])
        b.run(["ip", "link", "set", f"{tmp}p", "name", b_if])
        a.run(["ip", "link", "set", a_if, "up"])
        b.run(["ip", "link", "set", b_if, "up"])

    def close(self) -> None:
        """Kill every process of the lab, then delete its namespaces. Idempotent."""
        if self._closed:
            return
        self._closed = True
        # every process asked at once, then waited for together: one after another, 100
        # daemons whose registry had gone first each used up the grace (5 minutes in all)
        _terminate_all([proc for ns in self.namespaces.values() for proc in ns.procs])
        for ns in self.namespaces.values():
            # Anything else still running inside (children that escaped the session).
            pids = _ip("netns", "pids", ns.name, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for ns in self.namespaces.values():
            _ip("netns", "del", ns.name, check=False)
        _open_labs.discard(self)
        for fn in self._cleanups:
            with contextlib.suppress(OSError, BtmmError):  # one failure must not skip the rest
                fn()


def _terminate(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    _terminate_all([proc], grace)


def _terminate_all(procs: list[subprocess.Popen[Any]], grace: float = 3.0) -> None:
    """SIGTERM to each process group, ``grace`` seconds for all of them, then SIGKILL."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in running) and time.monotonic() < deadline:
        time.sleep(0.05)
    for proc in running:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    for proc in running:
        # A process stuck in the kernel may outlive SIGKILL for a while; the namespaces must
        # be deleted all the same (the kernel frees each one when its last process is gone).
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


@atexit.register
def _close_open_labs() -> None:
    for lab in list(_open_labs):
        lab.close()
