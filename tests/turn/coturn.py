"""The real TURN server for the tests: Debian's coturn (``turnserver``) in the foreground, with
its own command line (no config file, ``-n``), its database, pid file and log in a temporary
directory, on loopback (or inside a test namespace), with ``use-auth-secret``. The system's
coturn service is never used (scripts/setup keeps it from starting).

``Coturn.start`` waits until the server answers a STUN Binding request (a condition with a
deadline, never a fixed sleep); ``stop`` ends it by its own pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.serve import free_port
from btmm_core.stun.message import TransportAddress, binding_request, parse

REALM = "btmm.test"
TURNSERVER = shutil.which("turnserver") or "/usr/bin/turnserver"


@dataclass
class Coturn:
    workdir: Path
    secret: str
    host: str = "127.0.0.1"
    port: int = 0
    relay_ip: str | None = None
    netns: str | None = None
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> TransportAddress:
        return TransportAddress(self.host, self.port)

    @property
    def log(self) -> str:
        path = self.workdir / "turn.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def command(self) -> list[str]:
        relay = self.relay_ip or self.host
        cmd = [
            TURNSERVER, "-n", "--listening-ip", self.host, "--listening-port", str(self.port),
            "--relay-ip", relay, "--use-auth-secret", f"--static-auth-secret={self.secret}",
            "--realm", REALM, "--no-tls", "--no-dtls", "--no-cli", "--no-rfc5780",
            "--fingerprint", "--userdb", str(self.workdir / "turndb"),
            "--pidfile", str(self.workdir / "turnserver.pid"),
            "--log-file", str(self.workdir / "turn.log"), "--simple-log", "--no-stdout-log",
            "--min-port", "49152", "--max-port", "49999", "--allow-loopback-peers",
            "--no-multicast-peers", *self.extra,
        ]
        if self.netns is not None:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        return cmd

    def start(self, timeout: float = 15.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        chosen = not self.port and self.netns is None
        if not self.port:
            self.port = free_port(self.host) if chosen else 3478
        for attempt in range(3 if chosen else 1):
            (self.workdir / "turn.log").unlink(missing_ok=True)
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
            deadline = time.monotonic() + timeout
            while not self.answers():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"turnserver exited with {self.proc.returncode}:\n"
                                       f"{self.log[-3000:]}")
                if chosen and "errno=98" in self.log and attempt < 2:
                    break  # the port we chose was taken meanwhile: another one
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"turnserver did not answer within {timeout} s:\n"
                                       f"{self.log[-3000:]}")
            else:
                return
            self.stop()
            self.port = free_port(self.host)

    def answers(self) -> bool:
        """One Binding request with a short wait (called in a loop with a deadline)."""
        cmd_prefix = [] if self.netns is None else ["ip", "netns", "exec", self.netns]
        if cmd_prefix:
            probe = ("import socket,sys;s=socket.socket(2,2);s.settimeout(0.3);"
                     f"s.sendto(bytes.fromhex(sys.argv[1]),('{self.host}',{self.port}));"
                     "s.recvfrom(2048)")
            r = subprocess.run([*cmd_prefix, "python3", "-c", probe,
                                binding_request(os.urandom(12)).hex()],
                               capture_output=True, timeout=10)
            return r.returncode == 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.3)
            txid = os.urandom(12)
            s.sendto(binding_request(txid), (self.host, self.port))
            try:
                data, _ = s.recvfrom(2048)
            except OSError:
                return False
            return parse(data).transaction_id == txid

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
