"""``btmm serve --workers 2`` on one SQLite file, live on loopback: an update through one worker
is answered by the other and reaches an LLQ watcher held by the other; concurrent writers
through both lose no update (a compare-and-set counter); a worker killed during an update
storm loses nothing it acknowledged; a signed message replayed to the other worker is refused.

Which worker holds a TCP connection is read from /proc (``_owner_of_connection``), so every
check names the worker it went through."""

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
import dns.tsig
import dns.update
from registry_helpers import LiveRegistry, dnskey, free_port, state_dir
from test_registry_cluster import _owner_of_connection
from test_registry_live import account, udp

from btmm_core.aio import within
from btmm_core.dns.keyfile import read_key
from btmm_core.llq.client import Changes
from btmm_core.llq.driver import Watcher
from btmm_core.registry.storage import SqliteStorage

ZONE = "u0.members.example."


def _until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def workers(*args: str) -> Iterator[tuple[LiveRegistry, list[int]]]:
    """Two workers on SQLite; the registry and the pids (first: the parent)."""
    with state_dir("btmm-sqlite-workers-") as state:
        reg = LiveRegistry(state, free_port(), 0,
                           ("--tls-port", "0", "--workers", "2", "--log-level", "info", *args))
        for user in ("u0", "u1"):
            assert reg.cli("user", "add", user).returncode == 0
        try:
            reg.start()
            _until(lambda: reg.log().count("registry listening") == 2, 20, "two workers")
            m = re.search(r"pids=\[(\d+), (\d+)\]", reg.log())
            assert m is not None
            yield reg, [int(m.group(1)), int(m.group(2))]
        finally:
            if reg.proc is not None:
                reg.proc.kill()
                reg.proc.wait(timeout=5)


class Conn:
    """A TCP connection to the registry and the worker that holds it."""

    def __init__(self, reg: LiveRegistry, pids: list[int]) -> None:
        self.sock = socket.create_connection(("127.0.0.1", reg.port), timeout=5)
        self.reg = reg
        self.pids = pids
        self.owner: int | None = None

    def ask(self, msg: dns.message.Message) -> dns.message.Message:
        dns.query.send_tcp(self.sock, msg)
        keyring = None if msg.keyring is None else msg.keyring
        r, _ = dns.query.receive_tcp(self.sock, keyring=keyring, request_mac=msg.mac)
        if self.owner is None:  # answered: accepted by a worker by now
            self.owner = _owner_of_connection(self.reg.port, self.sock.getsockname()[1],
                                              self.pids)
        return r

    def close(self) -> None:
        self.sock.close()


def one_per_worker(reg: LiveRegistry, pids: list[int]) -> dict[int, Conn]:
    """A connection held by each worker (the kernel spreads them: 2**-39 to miss one in 40)."""
    found: dict[int, Conn] = {}
    spare = []
    for _ in range(40):
        c = Conn(reg, pids)
        c.ask(dns.message.make_query(ZONE, "SOA"))
        if c.owner in pids and c.owner not in found:
            found[c.owner] = c
        else:
            spare.append(c)
        if len(found) == 2:
            break
    for c in spare:
        c.close()
    assert set(found) == set(pids), "the kernel gave every connection to one worker"
    return found


def _update(key: dns.tsig.Key, name: str, addr: str, zone: str = ZONE) -> dns.update.UpdateMessage:
    u = dns.update.UpdateMessage(zone)
    u.add(name, 60, "AAAA", addr)
    u.use_tsig(key)
    return u


def _aaaa(conn: Conn, key: dns.tsig.Key, name: str, zone: str = ZONE) -> list[str]:
    q = dns.message.make_query(f"{name}.{zone}", "AAAA")
    q.use_tsig(key)
    return sorted(rd.to_text() for rs in conn.ask(q).answer for rd in rs)


def test_an_update_through_one_worker_is_seen_by_the_other_and_its_llq_watcher() -> None:
    with workers() as (reg, pids):
        key = dnskey(account(reg, "u0"))
        conns = one_per_worker(reg, pids)
        a, b = conns[pids[0]], conns[pids[1]]
        assert a.ask(_update(key, "desk", "fd00::a")).rcode() == dns.rcode.NOERROR
        _until(lambda: _aaaa(b, key, "desk") == ["fd00::a"], 10, "the other worker answers it")
        assert b.ask(_update(key, "desk", "fd00::b")).rcode() == dns.rcode.NOERROR
        _until(lambda: _aaaa(a, key, "desk") == ["fd00::a", "fd00::b"], 10, "and back")
        # over UDP from many source ports (both workers get some; UPDATEs are forwarded to
        # the first worker, which answers from the shared port)
        for i in range(12):
            r = udp(reg, _update(key, f"u{i}", "fd00::c").to_wire())
            assert r.rcode() == dns.rcode.NOERROR
        for c in (a, b):
            _until(lambda c=c: all(_aaaa(c, key, f"u{i}") == ["fd00::c"]  # type: ignore[misc]
                                   for i in range(12)), 10, "UDP updates seen by both")

        tkey = read_key(reg.keyfile("u0"))
        name = dns.name.from_text(f"watched.{ZONE}")

        async def watch() -> tuple[int, list[float]]:
            async with Watcher(("127.0.0.1", reg.port), name, dns.rdatatype.AAAA, key=tkey,
                               transport="tcp") as w:
                await within(w.events.get(), 10)  # the full (empty) set first
                port = w.local_address[1]
                found: list[int | None] = []
                for _ in range(100):
                    found.append(_owner_of_connection(reg.port, port, pids))
                    if found[-1] is not None:
                        break
                    await asyncio.sleep(0.05)
                holder = found[-1]
                assert holder in pids, (port, found, Path("/proc/net/tcp").read_text())
                other = conns[pids[1] if holder == pids[0] else pids[0]]
                lat = []
                for i in range(20):
                    addr = f"fd00::{i + 1:x}"
                    r = await asyncio.to_thread(other.ask, _update(key, "watched", addr))
                    assert r.rcode() == dns.rcode.NOERROR
                    t1 = time.monotonic()
                    while True:
                        ev = await within(w.events.get(), 10)
                        if isinstance(ev, Changes) and any(
                            x.rdata.to_text() == addr for x in ev.added
                        ):
                            break
                    lat.append(time.monotonic() - t1)
                return holder, lat

        holder, lat = asyncio.run(watch())
        q = statistics.quantiles(lat, n=100)
        print(f"answer at one worker -> LLQ event from worker {holder}: p50"
              f" {statistics.median(lat) * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms (n={len(lat)})")
        for c in conns.values():
            c.close()


def test_concurrent_writers_through_both_workers_lose_no_update() -> None:
    """A counter kept by compare-and-set: each writer reads the TXT, then sends "prerequisite:
    it is v; delete v; add v+1". Two NOERROR for the same v would be a lost update."""
    with workers() as (reg, pids):
        key = dnskey(account(reg, "u0"))
        conns = one_per_worker(reg, pids)
        init = dns.update.UpdateMessage(ZONE)
        init.add("counter", 60, "TXT", '"0"')
        init.use_tsig(key)
        assert conns[pids[0]].ask(init).rcode() == dns.rcode.NOERROR
        won: list[int] = []
        errors: list[BaseException] = []
        stop = time.monotonic() + 6

        def writer(conn: Conn) -> None:
            try:
                while time.monotonic() < stop and len(won) < 200:
                    q = dns.message.make_query(f"counter.{ZONE}", "TXT")
                    q.use_tsig(key)
                    try:
                        ans = conn.ask(q).answer
                    except dns.tsig.PeerBadTime:
                        continue  # as below
                    if not ans:
                        continue
                    v = int(ans[0][0].strings[0])
                    u = dns.update.UpdateMessage(ZONE)
                    u.present("counter", "TXT", f'"{v}"')
                    u.delete("counter", "TXT", f'"{v}"')
                    u.add("counter", 60, "TXT", f'"{v + 1}"')
                    u.use_tsig(key)
                    try:
                        rc = conn.ask(u).rcode()
                    except dns.tsig.PeerBadTime:
                        # both writers sign with one key: one signed in the second before
                        # the newest the registry accepted for it (its replay rule); retry
                        continue
                    if rc == dns.rcode.NOERROR:
                        won.append(v)
                    else:
                        assert rc == dns.rcode.NXRRSET, dns.rcode.to_text(rc)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(c,)) for c in conns.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert len(won) > 20, f"only {len(won)} updates won; the test proved little"
        assert sorted(won) == list(range(len(won))), "two writers won the same value"
        def counter(c: Conn) -> list[int]:
            # a new message each time: the same one sent again within its second carries the
            # same MAC, which the registry refuses as a replay (BADTIME)
            q = dns.message.make_query(f"counter.{ZONE}", "TXT")
            q.use_tsig(key)
            return [int(rd.strings[0]) for rs in c.ask(q).answer for rd in rs]

        for c in conns.values():
            _until(lambda c=c: counter(c) == [len(won)], 10, "both agree")  # type: ignore[misc]
            c.close()


def test_a_killed_worker_loses_nothing_it_acknowledged() -> None:
    zone = "u1.members.example."
    with workers() as (reg, pids):
        key = dnskey(account(reg, "u1"))
        conns = one_per_worker(reg, pids)
        acked: list[str] = []
        ended: dict[str, str] = {}
        stop = threading.Event()

        def storm(conn: Conn, tag: str) -> None:
            i = 0
            while not stop.is_set() and i < 3000:
                i += 1
                try:
                    answer = conn.ask(_update(key, f"{tag}{i}", "fd00::9", zone))
                except dns.tsig.PeerBadTime:
                    # both storms sign with one key: the other's message, signed a second
                    # later, was admitted first, and ours is older than the key's newest
                    # time (the registry's replay rule, as a real client would meet it)
                    continue
                except (OSError, dns.exception.DNSException, EOFError) as err:
                    ended[tag] = f"{type(err).__name__}: {err}"
                    return  # its worker is gone
                if answer.rcode() != dns.rcode.NOERROR:
                    ended[tag] = dns.rcode.to_text(answer.rcode())
                    return
                acked.append(f"{tag}{i}")

        threads = [threading.Thread(target=storm, args=(conns[pid], f"w{n}-"))
                   for n, pid in enumerate(pids)]
        for t in threads:
            t.start()
        _until(lambda: sum(a.startswith("w1-") for a in acked) > 30, 30,
               "updates acknowledged by the second worker")
        assert reg.proc is not None and pids[1] != reg.proc.pid
        os.kill(pids[1], signal.SIGKILL)  # the second worker dies mid-storm
        before = sum(a.startswith("w0-") for a in acked)
        try:
            _until(lambda: sum(a.startswith("w0-") for a in acked) > before + 50, 30,
                   "the surviving worker goes on")
        except AssertionError as err:
            raise AssertionError(f"{err}; the storms ended with {ended}") from None
        stop.set()
        for t in threads:
            t.join(timeout=30)
        survivor = conns[pids[0]]
        for name in acked:
            assert _aaaa(survivor, key, name, zone) == ["fd00::9"], name
        stored = SqliteStorage(reg.state / "registry.sqlite").load()
        names = {r.name.labels[0].decode() for r in stored.records if r.rdtype == 28}
        assert set(acked) <= names
        # the survivor still refuses a replay (its replay state outlived the other worker)
        wire = _update(key, "once", "fd00::1", zone).to_wire()
        assert udp(reg, wire).rcode() == dns.rcode.NOERROR
        again = udp(reg, wire)
        assert again.rcode() == dns.rcode.NOTAUTH
        assert again.tsig is not None and int(again.tsig[0].error) == 18
        survivor.close()


def test_a_replay_to_the_other_worker_is_refused() -> None:
    with workers() as (reg, pids):
        key = dnskey(account(reg, "u0"))
        conns = one_per_worker(reg, pids)
        a, b = conns[pids[0]], conns[pids[1]]
        for msg in (dns.message.make_query(f"x.{ZONE}", "AAAA"),
                    _update(key, "replayed", "fd00::1")):
            if msg.keyring is None:
                msg.use_tsig(key)
            wire = msg.to_wire()
            first = dns.message.from_wire(_raw(a, wire), keyring=False)
            assert first.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
            again = dns.message.from_wire(_raw(b, wire), keyring=False)
            assert again.rcode() == dns.rcode.NOTAUTH, again
            assert again.tsig is not None and int(again.tsig[0].error) == 18  # BADTIME
        for c in conns.values():
            c.close()


def _raw(conn: Conn, wire: bytes) -> bytes:
    conn.sock.sendall(len(wire).to_bytes(2, "big") + wire)
    head = b""
    while len(head) < 2:
        head += conn.sock.recv(2 - len(head))
    size = int.from_bytes(head, "big")
    body = b""
    while len(body) < size:
        body += conn.sock.recv(size - len(body))
    return body
