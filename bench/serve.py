"""A ``btmm serve`` process on loopback with one user, for the registry, LLQ and big-UPDATE
benches; ``free_port`` is shared with the tests that start a live registry."""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import dns.exception
import dns.message
import dns.query

SERVE = (sys.executable, "-m", "btmm_core", "serve")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host`` (``btmm serve`` listens on both), below the
    kernel's ephemeral range: a port ``bind(0)`` handed out is one that any outgoing
    connection may take before the server binds it (a full run saw turnserver fail so)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(1000):
        port = random.randrange(20000, low)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                u.bind((host, port))
                t.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free for both UDP and TCP on {host} in 20000..{low}")


def free_ports(n: int) -> list[int]:
    """``n`` different free ports: ``free_port`` twice may give the same one back, since the
    port is released before it returns."""
    ports: list[int] = []
    for _ in range(50 * n):
        if len(ports) == n:
            break
        port = free_port()
        if port not in ports:
            ports.append(port)
    if len(ports) != n:
        raise RuntimeError(f"no {n} different free ports on 127.0.0.1")
    return ports


def add_user(env: Mapping[str, str], name: str = "bob", cwd: Path | None = None) -> None:
    """``btmm serve user add NAME`` in the state directory the environment names."""
    subprocess.run([*SERVE, "user", "add", name], env=env, cwd=cwd, check=True, capture_output=True)


def wait_answering(port: int, zone: str, timeout: float = 30.0) -> None:
    """Ask for the SOA of ``zone`` until a server on 127.0.0.1:``port`` answers."""
    query = dns.message.make_query(zone, "SOA")
    deadline = time.monotonic() + timeout
    while True:
        try:
            dns.query.udp(query, "127.0.0.1", port=port, timeout=0.5)
            return
        except (OSError, dns.exception.Timeout):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no server answered on port {port} in {timeout:.0f} s"
                ) from None
            time.sleep(0.1)


@contextlib.contextmanager
def serving(
    env: Mapping[str, str],
    port: int,
    options: Sequence[str],
    log: Path,
    zone: str,
    cwd: Path | None = None,
    users: Sequence[str] = ("bob",),
) -> Iterator[subprocess.Popen[bytes]]:
    """``users`` added, then ``btmm serve --port PORT --tls-port 0 OPTIONS`` answering for
    ``zone``, its output in ``log``; stopped (SIGTERM, then SIGKILL) on leaving."""
    for user in users:
        add_user(env, user, cwd=cwd)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*SERVE, "--port", str(port), "--tls-port", "0", "--no-stun", *options],
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=out,
        )
    try:
        wait_answering(port, zone)
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, and SIGKILL if it has not ended within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
