"""A live ``btmm serve`` on loopback for the daemon's tests: one user (bob under
members.example), started on a port that is free for both UDP and TCP, and stopped afterwards."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rdatatype

from bench.serve import free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Reg:
    state: Path
    port: int
    env: dict[str, str]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "btmm_core", *args], env=self.env,
                              capture_output=True, text=True, timeout=60, check=check)

    @property
    def account(self) -> Path:
        """The account key file ``btmm serve user add bob`` wrote."""
        return self.state / "credentials" / "bob.key"


def _answering(proc: subprocess.Popen[bytes], port: int, log: Path) -> bool:
    """Wait (20 s at most) until the server answers; False if it exited because another
    process took the port between the check and its bind."""
    deadline = time.monotonic() + 20
    q = dns.message.make_query("members.example.", dns.rdatatype.SOA)
    while True:
        if proc.poll() is not None:
            text = log.read_text()
            if "address already in use" in text:
                return False
            raise AssertionError(text)
        try:
            dns.query.udp(q, "127.0.0.1", port=port, timeout=0.3)
            return True
        except (OSError, dns.exception.Timeout):
            assert time.monotonic() < deadline, "btmm serve did not answer in 20 s"
            time.sleep(0.1)


@contextlib.contextmanager
def live_registry(state: Path) -> Iterator[Reg]:
    env = {**os.environ, "BTMM_REGISTRY_DOMAIN": "members.example",
           "BTMM_REGISTRY_STATE": str(state), "PYTHONPATH": str(ROOT)}
    reg = Reg(state, 0, env)
    reg.cli("serve", "user", "add", "bob")
    for _ in range(3):
        reg.port = free_port()
        log = state / f"server-{reg.port}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "btmm_core", "serve", "--listen", "127.0.0.1", "--port",
                 str(reg.port), "--tls-port", "0", "--no-stun", "--event-loop", "asyncio"],
                env=env, stdout=out, stderr=out)
        try:
            if not _answering(proc, reg.port, log):
                continue
            yield reg
            return
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    raise AssertionError("btmm serve found its port taken three times in a row")
