"""Several real ``btmm serve`` processes on loopback sharing one PostgreSQL database: updates at
one visible at the others, LLQ events from B for updates at A, a replay to another server
refused, lease expiry once whichever server runs it (one killed at the time), SIGKILL during an
update storm, and the database restarted mid-storm."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.update
from registry_helpers import LiveRegistry, dnskey, free_port, state_dir
from test_registry_live import account, udp

from bench.pgcluster import PgCluster
from btmm_core.aio import within
from btmm_core.dns.edns import UpdateLeaseOption
from btmm_core.dns.keyfile import read_key
from btmm_core.llq.client import Changes
from btmm_core.llq.driver import Watcher
from btmm_core.registry.pgstorage import MIGRATIONS
from btmm_core.registry.storage import SQLITE_SCHEMA
from btmm_core.serve.config import StorageConfig

USERS = ("u0", "u1", "u2")
#: an account the storms never sign with: the replay rule refuses a message older than its
#: key's newest admitted one, so a test's own update with a storm's key could meet BADTIME
PROBE = "u9"


def _zone(user: str) -> str:
    return f"{user}.members.example."


@contextlib.contextmanager
def cluster(pg: PgCluster, n: int, *args: str) -> Iterator[list[LiveRegistry]]:
    """``n`` servers on one fresh database (and one state directory for the credentials)."""
    url = pg.create_database()
    with state_dir("btmm-cluster-") as state:
        regs = [
            LiveRegistry(
                state, 0, 0, ("--tls-port", "0", "--log-level", "warning", *args),
                database=url, name=f"server{i}",
            )
            for i in range(n)
        ]
        for user in (*USERS, PROBE):
            r = regs[0].cli("user", "add", user)
            assert r.returncode == 0, r.stderr
        try:
            for reg in regs:
                # a port taken just before it is bound: other processes on the machine take
                # ports too, so no list of ports is made ahead
                used = {r.port for r in regs}
                reg.port = next(p for p in iter(free_port, 0) if p not in used)
                reg.start()
            yield regs
        finally:
            for reg in regs:
                if reg.proc is not None:
                    reg.proc.kill()
                    reg.proc.wait(timeout=5)


def _update_msg(
    reg: LiveRegistry, user: str, name: str, addr: str, lease: int | None = None
) -> dns.message.Message:
    u = dns.update.UpdateMessage(_zone(user))
    u.add(name, 60, "AAAA", addr)
    if lease is not None:
        u.use_edns(0, 0, 1232, options=[UpdateLeaseOption(lease)])
    u.use_tsig(dnskey(account(reg, user)))
    return u


def _update(reg: LiveRegistry, user: str, name: str, addr: str = "fd00::1",
            lease: int | None = None) -> int:
    u = _update_msg(reg, user, name, addr, lease)
    return int(dns.query.tcp(u, "127.0.0.1", port=reg.port, timeout=5).rcode())


def _lookup(reg: LiveRegistry, user: str, name: str) -> list[str]:
    q = dns.message.make_query(f"{name}.{_zone(user)}", "AAAA")
    q.use_tsig(dnskey(account(reg, user)))
    r = dns.query.udp(q, "127.0.0.1", port=reg.port, timeout=3)
    return sorted(rd.to_text() for rs in r.answer for rd in rs)


def _serial(reg: LiveRegistry, user: str) -> int:
    q = dns.message.make_query(_zone(user), "SOA")
    r = dns.query.udp(q, "127.0.0.1", port=reg.port, timeout=3)
    return int(r.answer[0][0].serial)


def _until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def test_updates_at_one_server_are_answered_by_the_others_and_replays_refused(
    pg: PgCluster,
) -> None:
    with cluster(pg, 3) as (a, b, c):
        assert _update(a, "u0", "desk", "fd00::a") == dns.rcode.NOERROR
        for other in (b, c):
            _until(lambda o=other: _lookup(o, "u0", "desk") == ["fd00::a"], 10,  # type: ignore[misc]
                   "an update at A answered by the others")
            assert _serial(other, "u0") == _serial(a, "u0")
        # updates at B and C land in the one zone, in order, whoever holds stale state
        assert _update(b, "u0", "desk", "fd00::b") == dns.rcode.NOERROR
        assert _update(c, "u0", "lap", "fd00::c") == dns.rcode.NOERROR
        for reg in (a, b, c):
            _until(lambda r=reg: _lookup(r, "u0", "desk") == ["fd00::a", "fd00::b"]  # type: ignore[misc]
                   and _lookup(r, "u0", "lap") == ["fd00::c"], 10, "all three agree")
        # a signed UPDATE accepted by A, sent again to B (which never saw it): refused
        wire = _update_msg(a, "u1", "once", "fd00::1").to_wire()
        assert udp(a, wire).rcode() == dns.rcode.NOERROR
        for other in (b, c):
            out = udp(other, wire)
            assert out.rcode() == dns.rcode.NOTAUTH
            assert out.tsig is not None and int(out.tsig[0].error) == 18  # BADTIME
        assert "tsig replay seen by another server" in b.log()


def test_llq_events_from_b_for_updates_at_a(pg: PgCluster) -> None:
    with cluster(pg, 2) as (a, b):
        key = read_key(a.keyfile("u2"))
        name = dns.name.from_text(f"watched.{_zone('u2')}")

        async def main() -> tuple[list[float], list[float]]:
            lat, upper = [], []
            async with Watcher(("127.0.0.1", b.port), name, dns.rdatatype.AAAA, key=key) as w:
                # established once the first answer (the full set: empty) arrives
                for i in range(30):
                    t0 = time.monotonic()
                    rc = await asyncio.to_thread(_update, a, "u2", "watched", f"fd00::{i + 1:x}")
                    assert rc == dns.rcode.NOERROR
                    t1 = time.monotonic()
                    while True:
                        ev = await within(w.events.get(), 10)
                        if isinstance(ev, Changes) and any(
                            r.rdata.to_text() == f"fd00::{i + 1:x}" for r in ev.added
                        ):
                            break
                    # the commit happened between sending the update and its answer: the
                    # time from the answer is a lower bound, from the sending an upper one
                    t2 = time.monotonic()
                    lat.append(t2 - t1)
                    upper.append(t2 - t0)
            return lat, upper

        lat, upper = asyncio.run(main())
        assert len(lat) == 30
        for what, xs in (("answer at A", lat), ("update sent to A", upper)):
            q = statistics.quantiles(xs, n=100)
            print(f"{what} -> LLQ event from B: p50 {statistics.median(xs) * 1000:.1f} ms,"
                  f" p99 {q[98] * 1000:.1f} ms (n={len(xs)})")


def test_lease_expiry_happens_once_with_a_server_killed_at_the_time(pg: PgCluster) -> None:
    with cluster(pg, 2, "--lease-min", "1", "--lease-max", "60") as (a, b):
        before = {}
        leased = time.time()
        for user in USERS:
            u = dns.update.UpdateMessage(_zone(user))
            for i in range(10):
                u.add(f"h{i}", 60, "AAAA", f"fd00::{i + 1}")
            u.use_edns(0, 0, 1232, options=[UpdateLeaseOption(3)])
            u.use_tsig(dnskey(account(a, user)))
            assert dns.query.tcp(u, "127.0.0.1", port=a.port, timeout=5).rcode() == 0
            before[user] = _serial(a, user)
        _until(lambda: all(_serial(b, u) == before[u] for u in USERS), 10, "B caught up")
        while time.time() < leased + 3:  # the first zone's leases run out about now
            time.sleep(0.01)
        a.stop(signal.SIGKILL)  # A dies right when the leases run out; B must do it, once
        for user in USERS:
            _until(lambda u=user: _lookup(b, u, "h0") == [], 10, "expired at B")  # type: ignore[misc]
        a.start()
        for user in USERS:
            for reg in (a, b):
                assert all(_lookup(reg, user, f"h{i}") == [] for i in range(10))
                # one expiry commit per zone, whoever made it: the serial moved by one
                assert _serial(reg, user) == before[user] + 1, (user, reg.name)


def _storm(
    regs: list[LiveRegistry], seconds_until: Callable[[], bool]
) -> tuple[dict[str, list[str]], list[int], list[BaseException]]:
    """One client per user, each sending to the servers in turn until ``seconds_until()``."""
    acked: dict[str, list[str]] = {u: [] for u in USERS}
    rcodes: list[int] = []
    errors: list[BaseException] = []
    keys = {u: dnskey(account(regs[0], u)) for u in USERS}

    def client(user: str) -> None:
        try:
            i = 0
            while not seconds_until() and i < 5000:
                name = f"r{i}"
                reg = regs[i % len(regs)]
                i += 1
                u = dns.update.UpdateMessage(_zone(user))
                u.add(name, 60, "AAAA", "fd00::9")
                u.use_tsig(keys[user])
                with contextlib.suppress(OSError, dns.exception.DNSException, EOFError):
                    rc = int(dns.query.tcp(u, "127.0.0.1", port=reg.port, timeout=5).rcode())
                    rcodes.append(rc)
                    if rc == dns.rcode.NOERROR:
                        acked[user].append(name)
                        continue
                time.sleep(0.02)  # server or database down: back off a little
        except BaseException as e:  # surfaced by the main thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(u,)) for u in USERS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return acked, rcodes, errors


def _all_there(regs: list[LiveRegistry], acked: dict[str, list[str]]) -> None:
    total = sum(len(v) for v in acked.values())
    assert total > 20, f"only {total} updates were acknowledged; the test proved little"
    for reg in regs:
        for user, names in acked.items():
            for name in names:
                assert _lookup(reg, user, name) == ["fd00::9"], f"{reg.name} lost {name}.{user}"


def test_sigkill_of_one_server_in_a_storm_loses_nothing_acknowledged(pg: PgCluster) -> None:
    with cluster(pg, 2) as regs:
        a, b = regs
        stop = threading.Event()
        result: list[object] = []
        worker = threading.Thread(target=lambda: result.append(_storm(regs, stop.is_set)))
        worker.start()
        floor = {u: 0 for u in USERS}
        try:
            for _ in range(3):
                time.sleep(0.7)
                for u in USERS:
                    floor[u] = max(floor[u], _serial(b, u))
                a.stop(signal.SIGKILL)
                time.sleep(0.3)
                a.start()
                for u in USERS:
                    _until(lambda u=u: _serial(a, u) >= floor[u], 10, "serial never goes back")  # type: ignore[misc]
            time.sleep(0.5)
        finally:
            stop.set()
            worker.join(timeout=150)
        acked, _, errors = result[0]  # type: ignore[misc]
        assert not errors, errors
        print(f"acknowledged updates: {sum(len(v) for v in acked.values())} across 3 SIGKILLs")
        _until(lambda: all(_serial(a, u) == _serial(b, u) for u in USERS), 10, "both agree")
        _all_there(regs, acked)


def test_database_restart_mid_storm_servfail_then_recovery(pg: PgCluster) -> None:
    with cluster(pg, 2) as regs:
        a, b = regs
        stop = threading.Event()
        result: list[object] = []
        serials: dict[str, list[int]] = {u: [] for u in USERS}
        worker = threading.Thread(target=lambda: result.append(_storm(regs, stop.is_set)))
        worker.start()
        try:
            time.sleep(1.0)
            pg.stop("immediate")
            try:
                # deterministic: with the database down an UPDATE is SERVFAIL, never NOERROR;
                # queries are still answered from the committed state
                for reg in regs:
                    assert _update(reg, PROBE, "during") == dns.rcode.SERVFAIL
                    for u in USERS:
                        serials[u].append(_serial(reg, u))
            finally:
                pg.start()
            # both servers recover by themselves
            for reg in regs:
                _until(lambda r=reg: _update(r, PROBE, f"after-{r.name}") == 0, 20, "recovery")  # type: ignore[misc]
            time.sleep(1.0)
        finally:
            stop.set()
            worker.join(timeout=150)
        acked, rcodes, errors = result[0]  # type: ignore[misc]
        assert not errors, errors
        # the storm's own clients may or may not have hit the gap; none got NOERROR for
        # an update that was not stored (checked below for every acknowledged one)
        print(f"storm: {rcodes.count(0)} NOERROR, {rcodes.count(2)} SERVFAIL")
        _until(lambda: all(_serial(a, u) == _serial(b, u) for u in USERS), 10, "both agree")
        for u in USERS:
            now = _serial(a, u)
            assert all(now >= s for s in serials[u]), f"serial of {u} went back"
        _all_there(regs, acked)
        for reg in regs:
            assert _lookup(reg, PROBE, "during") == []
        assert "registry database unreachable" in a.log() + b.log()


def test_db_upgrade_reports_the_schema_version_on_both_backends(pg: PgCluster) -> None:
    with state_dir("btmm-dbup-") as state:
        for database, want in (
            (None, f"schema version {SQLITE_SCHEMA}"),
            (pg.create_database(), f"schema version {MIGRATIONS[-1][0]}"),
        ):
            reg = LiveRegistry(state, 0, 0, (), database=database)
            r = reg.cli("db", "upgrade")
            assert r.returncode == 0 and want in r.stdout, r.stderr
            if database is not None:
                assert database in r.stdout
        bad = LiveRegistry(state, 0, 0, (), database="postgresql://btmm@/nonexistent?host=/nope")
        r = bad.cli("db", "upgrade")
        assert r.returncode != 0 and "cannot connect to the registry database" in r.stderr
    # a password in the URL is never shown
    shown = StorageConfig(database="postgresql://btmm:s3cret@db.example/btmm").shown
    assert "s3cret" not in shown and shown.startswith("postgresql://btmm:***@db.example")


def _owner_of_connection(server_port: int, client_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the server end of a loopback TCP connection."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if (int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16)) == (
            server_port, client_port):
            inode = f[9]
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return pid
    return None


def test_workers_share_the_port_and_the_database(pg: PgCluster) -> None:
    url = pg.create_database()
    with state_dir("btmm-workers-") as state:
        reg = LiveRegistry(state, free_port(), 0, ("--tls-port", "0", "--workers", "2"),
                           database=url)
        assert reg.cli("user", "add", "u0").returncode == 0
        try:
            reg.start()
            _until(lambda: reg.log().count("registry listening") == 2, 20, "two workers")
            m = re.search(r"pids=\[(\d+), (\d+)\]", reg.log())
            assert m is not None and int(m.group(1)) == reg.proc.pid  # type: ignore[union-attr]
            pids = [int(m.group(1)), int(m.group(2))]
            key = dnskey(account(reg, "u0"))
            owners = []
            conns = []
            for i in range(40):
                s = socket.create_connection(("127.0.0.1", reg.port), timeout=5)
                conns.append(s)
                u = dns.update.UpdateMessage(_zone("u0"))
                u.add(f"w{i}", 60, "AAAA", "fd00::1")
                u.use_tsig(key)
                dns.query.send_tcp(s, u)
                r, _ = dns.query.receive_tcp(s, keyring={key.name: key}, request_mac=u.mac)
                assert r.rcode() == dns.rcode.NOERROR
                # answered, so accepted by a worker by now
                owners.append(_owner_of_connection(reg.port, s.getsockname()[1], pids))
            # the kernel spread the connections over both (all 40 on one: 2**-39)
            assert set(owners) == set(pids), owners

            def all_seen() -> bool:
                for s in conns:
                    q = dns.message.make_query(_zone("u0"), "SOA")
                    dns.query.send_tcp(s, q)
                    r, _ = dns.query.receive_tcp(s)
                    if int(r.answer[0][0].serial) != 41:
                        return False
                return True

            _until(all_seen, 10, "both workers answer the committed state")
            for s in conns:
                s.close()
            assert reg.stop(signal.SIGTERM) == 0
            for pid in pids[1:]:
                _until(lambda p=pid: not os.path.exists(f"/proc/{p}") or  # type: ignore[misc]
                       "zombie" in Path(f"/proc/{p}/status").read_text().lower(), 10,
                       "worker ended")
        finally:
            if reg.proc is not None:
                reg.proc.kill()
                reg.proc.wait(timeout=5)


def test_workers_are_at_least_one() -> None:
    # (SQLite takes --workers too now: tests/registry/test_registry_workers.py)
    with state_dir("btmm-workers-") as state:
        r = LiveRegistry(state, free_port(), 0, ()).cli("--workers", "0")
        assert r.returncode == 2 and "--workers 0: at least 1" in r.stderr


def test_workers_end_when_their_first_process_is_killed(pg: PgCluster) -> None:
    with state_dir("btmm-workers-") as state:
        reg = LiveRegistry(state, free_port(), 0, ("--tls-port", "0", "--workers", "2"),
                           database=pg.create_database())
        assert reg.cli("user", "add", "u0").returncode == 0
        try:
            reg.start()
            _until(lambda: "pids=[" in reg.log(), 20, "workers started")
            m = re.search(r"pids=\[(\d+), (\d+)\]", reg.log())
            assert m is not None
            worker = int(m.group(2))
            assert reg.stop(signal.SIGKILL) == -signal.SIGKILL
            # no worker is left serving alone (PR_SET_PDEATHSIG), nor as a zombie for long
            _until(lambda: not Path(f"/proc/{worker}").exists()
                   or "zombie" in Path(f"/proc/{worker}/status").read_text().lower(),
                   10, "the worker ended with its parent")
        finally:
            if reg.proc is not None:
                reg.proc.kill()
                reg.proc.wait(timeout=5)
