"""Helpers shared by the registry tests: a sans-I/O core on memory storage, request signing
with a chosen time/fudge/MAC length, and a live ``btmm serve`` subprocess on loopback."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.name
import dns.query
import dns.rdatatype
import dns.tsig

from bench.serve import free_port
from btmm_core.dns.tsig import (
    HMAC_MD5,
    HMAC_SHA256,
    TsigKey,
    compute_mac,
    tsig_rr,
)
from btmm_core.registry.accounts import add_user
from btmm_core.registry.handler import Policy, RegistryCore, Transport
from btmm_core.registry.model import Account
from btmm_core.registry.storage import MemoryStorage, Storage
from btmm_core.registry.zones import ZoneConfig, ZoneStore

PARENT = dns.name.from_text("members.example.")
NS = dns.name.from_text("ns.members.example.")
ROOT = Path(__file__).resolve().parents[2]


def make_core(
    storage: Storage | None = None,
    policy: Policy | None = None,
    port: int = 5300,
    public_browse: frozenset[str] = frozenset(),
) -> tuple[RegistryCore, dict[str, Account]]:
    storage = storage or MemoryStorage()
    storage.ensure_zone(PARENT, None)
    accounts = {}
    for user, legacy in (("bob", False), ("alice", False), ("carol", True)):
        accounts[user] = add_user(storage, user, PARENT, legacy=legacy)
    config = ZoneConfig(PARENT, NS, ("192.0.2.53",), port, public_browse=public_browse)
    store = ZoneStore(storage, config)
    return RegistryCore(store, policy or Policy()), accounts


def dnskey(account: Account) -> dns.tsig.Key:
    alg = "hmac-md5" if account.key.algorithm == HMAC_MD5 else "hmac-sha256"
    return dns.tsig.Key(account.key.name, account.key.secret, alg)


def sign(
    msg: dns.message.Message,
    key: TsigKey,
    time_signed: int,
    *,
    fudge: int = 300,
    mac_len: int | None = None,
    algorithm: dns.name.Name | None = None,
) -> bytes:
    """Sign a request as a client would, with everything chosen by the caller."""
    wire = msg.to_wire(max_size=65535)  # not the EDNS payload size: that bounds the answer
    alg = algorithm or key.algorithm
    signing = TsigKey(key.name, alg, key.secret, key.zone)
    mac = compute_mac(
        signing,
        wire,
        original_id=msg.id,
        time_signed=time_signed,
        fudge=fudge,
        error=0,
        other=b"",
        request_mac=None,
    )
    if mac_len is not None:
        mac = mac[:mac_len]
    rr = tsig_rr(
        key.name,
        alg,
        time_signed=time_signed,
        fudge=fudge,
        mac=mac,
        original_id=msg.id,
        error=0,
        other=b"",
    )
    (arcount,) = struct.unpack("!H", wire[10:12])
    return wire[:10] + struct.pack("!H", arcount + 1) + wire[12:] + rr


def parse(wire: bytes | None) -> dns.message.Message:
    """Parse a response without validating its TSIG (the tests check the TSIG fields)."""
    assert wire is not None
    return dns.message.from_wire(wire, keyring=False)


def tsig_error(msg: dns.message.Message) -> int:
    assert msg.tsig is not None, "response carries no TSIG RR"
    return int(msg.tsig[0].error)


def ask(
    core: RegistryCore, wire: bytes, now: float, transport: Transport = Transport.UDP
) -> dns.message.Message:
    return parse(core.receive(wire, now, transport, "test"))


@dataclass
class LiveRegistry:
    state: Path
    port: int
    tls_port: int
    args: tuple[str, ...]
    proc: subprocess.Popen[bytes] | None = None
    #: ``postgresql://...``: the shared database (several servers may share a state directory
    #: then, each with its own ``name`` for its log); None: SQLite in the state directory.
    database: str | None = None
    name: str = "server"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["BTMM_REGISTRY_DOMAIN"] = PARENT.to_text()
        env["BTMM_REGISTRY_STATE"] = str(self.state)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("BTMM_REGISTRY_DATABASE", None)
        if self.database is not None:
            env["BTMM_REGISTRY_DATABASE"] = self.database
        return env

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "btmm_core", "serve", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def keyfile(self, user: str) -> Path:
        return self.state / "credentials" / f"{user}.key"

    def start(self) -> None:
        log = open(self.state / f"{self.name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "btmm_core",
                "serve",
                "--port",
                str(self.port),
                "--tls-port",
                str(self.tls_port),
                # Off unless a test asks: the default port would be shared by parallel runs.
                *(() if "--stun-port" in self.args else ("--no-stun",)),
                *self.args,
            ],
            env=self.env,
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 20
        q = dns.message.make_query(PARENT, dns.rdatatype.SOA)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log()
                if "cannot listen on" in log:
                    raise PortTaken(log)
                raise RuntimeError(f"btmm serve exited: {log}")
            with contextlib.suppress(OSError, dns.exception.Timeout):
                dns.query.udp(q, "127.0.0.1", port=self.port, timeout=0.3)
                return
            time.sleep(0.1)
        raise RuntimeError(f"btmm serve did not answer in 20 s: {self.log()}")

    def log(self) -> str:
        return (self.state / f"{self.name}.log").read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired as e:
            self.proc.kill()
            self.proc.wait(timeout=5)
            raise RuntimeError(
                f"btmm serve did not exit within 15 s of signal {sig}; its log:\n{self.log()}"
            ) from e
        finally:
            self.proc = None


class PortTaken(RuntimeError):
    """``btmm serve`` could not bind its port: free_port's port was taken in between."""


@contextlib.contextmanager
def state_dir(prefix: str = "btmm-registry-") -> Iterator[Path]:
    """A state directory on tmpfs when there is one.

    The tests kill the server (SIGKILL), they do not cut power, so what they check does not
    depend on fsync reaching a disk; tmpfs keeps them fast on a machine with a busy disk.
    """
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def live_registry(
    state: Path,
    *args: str,
    users: tuple[tuple[str, bool], ...] = (("bob", False), ("alice", False), ("carol", True)),
    database: str | None = None,
) -> Iterator[LiveRegistry]:
    reg = LiveRegistry(state, free_port(), free_port(), args, database=database)
    for user, legacy in users:
        extra = ("--legacy-md5",) if legacy else ()
        r = reg.cli("user", "add", user, *extra)
        assert r.returncode == 0, r.stderr
    for attempt in range(5):
        # free_port closes its probe sockets before btmm serve binds: another process on the
        # machine may take the port in between; then try fresh ones
        try:
            reg.start()
            break
        except PortTaken:
            if attempt == 4:
                raise
            (reg.state / "server.log").unlink(missing_ok=True)
            reg.port, reg.tls_port = free_port(), free_port()
    try:
        yield reg
    finally:
        if reg.proc is not None:
            reg.proc.kill()
            reg.proc.wait(timeout=5)


__all__ = ["HMAC_MD5", "HMAC_SHA256", "free_port"]
