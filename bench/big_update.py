"""How long one maximal signed UPDATE (as many RRs as fit in a 64 KB TCP message) holds the
registry's core, sans-I/O, on SQLite in a temporary directory (issue 11 item 5).

    python3 -m bench.big_update [--reps 3]
    python3 -m bench.big_update --live [--source DIR]

``--live`` starts ``btmm serve`` (from ``--source``, default this checkout: point it at an
older checkout to compare) on loopback, sends the maximal UPDATE over TCP while another
client asks a UDP query every 10 ms, and reports how long the update took and the slowest
query answer seen meanwhile.

Two shapes: distinct owner names (one A record each) and one RRset with thousands of RRs, and
the largest update the default limits accept (``UpdateLimits.max_rrs`` names), which is planned
and committed. The figure is the wall time of ``RegistryCore.handle`` for that message; while
it runs, the single-threaded server answers nobody else.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.tsig
import dns.update

from bench import REPO
from bench.serve import free_port, serving
from btmm_core.registry.accounts import add_user
from btmm_core.registry.handler import RegistryCore, Transport
from btmm_core.registry.limits import UpdateLimits
from btmm_core.registry.storage import SqliteStorage
from btmm_core.registry.zones import ZoneConfig, ZoneStore

PARENT = dns.name.from_text("members.example.")
NS = dns.name.from_text("ns.members.example.")


def _build(zone: dns.name.Name, shape: str, n: int) -> dns.update.UpdateMessage:
    u = dns.update.UpdateMessage(zone)
    for i in range(n):
        owner = f"h{i}" if shape == "names" else "many"
        u.add(owner, 300, "A", f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}")
    return u


def maximal(zone: dns.name.Name, shape: str, limit: int = 65535) -> dns.update.UpdateMessage:
    """The most RRs whose signed message still fits in ``limit`` bytes (binary search)."""
    lo, hi = 1, 8000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        # a TSIG RR with an hmac-sha256 MAC adds about 100 bytes
        try:
            fits = len(_build(zone, shape, mid).to_wire()) + 110 <= limit
        except dns.exception.TooBig:
            fits = False
        if fits:
            lo = mid
        else:
            hi = mid - 1
    return _build(zone, shape, lo)


def run_once(shape: str, count: int | None) -> tuple[float, int, str]:
    state = Path(tempfile.mkdtemp(prefix="btmm-bigupd-"))
    try:
        storage = SqliteStorage(state / "registry.sqlite")
        storage.ensure_zone(PARENT, None)
        account = add_user(storage, "bob", PARENT, legacy=False)
        core = RegistryCore(ZoneStore(storage, ZoneConfig(PARENT, NS, ("192.0.2.53",), 53)))
        u = maximal(account.zone, shape) if count is None else _build(account.zone, shape, count)
        rrs = sum(max(len(rs), 1) for rs in u.update)
        keyring = {account.key.name: dns.tsig.Key(account.key.name, account.key.secret)}
        u.use_tsig(keyring, account.key.name)
        now = time.time()
        wire = u.to_wire()
        t0 = time.perf_counter()
        out = core.handle(wire, now, Transport.TCP, "bench")
        took = time.perf_counter() - t0
        assert out is not None
        rcode = dns.rcode.to_text(dns.message.from_wire(out, keyring=False).rcode())
        storage.close()
        return took, rrs, f"{rcode} ({len(wire)} bytes)"
    finally:
        shutil.rmtree(state, ignore_errors=True)


def live(source: Path) -> None:
    state = Path(tempfile.mkdtemp(prefix="btmm-bigupd-live-"))
    env = dict(
        os.environ,
        PYTHONPATH=str(source),
        BTMM_REGISTRY_DOMAIN=PARENT.to_text(),
        BTMM_REGISTRY_STATE=str(state),
    )
    port = free_port()
    zone = dns.name.from_text("bob", origin=PARENT)
    options = ["--log-level", "warning"]
    try:
        # cwd: python -m puts it first on sys.path, before --source
        with serving(env, port, options, state / "server.log", zone.to_text(), cwd=state):
            text = (state / "credentials" / "bob.key").read_text()
            secret = base64.b64decode(text.split('secret "')[1].split('"')[0])
            rrs, rcode, took, slowest = time_update(port, zone, secret)
        print(
            f"live ({source}): {rrs} RRs -> {rcode} in {took * 1000:.1f} ms;"
            f" slowest query meanwhile {slowest * 1000:.1f} ms"
        )
    finally:
        shutil.rmtree(state, ignore_errors=True)


def time_update(port: int, zone: dns.name.Name, secret: bytes) -> tuple[int, str, float, float]:
    """Send the maximal UPDATE over TCP while asking a UDP query every 10 ms: its RR count,
    rcode and seconds, and the slowest query answer seen meanwhile."""
    u = maximal(zone, "names")
    keyring = {zone: dns.tsig.Key(zone, secret)}
    u.use_tsig(keyring, zone)
    wire = u.to_wire()  # rendered before the clock starts
    result: dict[str, float | str] = {}

    def send() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            t0 = time.perf_counter()
            dns.query.send_tcp(sock, wire)
            r, _ = dns.query.receive_tcp(sock, keyring=keyring, request_mac=u.mac)
            result["update"] = time.perf_counter() - t0
            result["rcode"] = dns.rcode.to_text(r.rcode())

    q = dns.message.make_query(zone, "SOA")
    worker = threading.Thread(target=send)
    worker.start()
    slowest = 0.0
    while worker.is_alive():
        t0 = time.perf_counter()
        dns.query.udp(q, "127.0.0.1", port=port, timeout=120)
        slowest = max(slowest, time.perf_counter() - t0)
        time.sleep(0.01)
    worker.join()
    return len(u.update), str(result["rcode"]), float(result["update"]), slowest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--live", action="store_true")
    ap.add_argument("--source", type=Path, default=REPO)
    args = ap.parse_args()
    if args.live:
        live(args.source)
        return
    allowed = UpdateLimits().max_rrs
    for shape, count in (("names", None), ("one-rrset", None), ("names", allowed)):
        runs = [run_once(shape, count) for _ in range(args.reps)]
        med = statistics.median(r[0] for r in runs)
        print(f"{shape:10s} {runs[0][1]} RRs -> {runs[0][2]}: median {med * 1000:.1f} ms")


if __name__ == "__main__":
    main()
