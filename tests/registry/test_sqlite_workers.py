"""Workers on one SQLite file (``btmm serve --workers N``), sans-I/O: two cores in this process,
each on its own connection to the file, as two workers would be. A commit in one reaches the
other's zones and observers (the ``changes`` table, poked through the notice socket); a group
is planned on the latest committed state; a stale single commit is refused and planned again;
the TSIG replay state shared by workers decides as one process's ``ReplayGuard`` does."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import dns.message
import dns.name
import dns.rcode
import dns.update
import pytest
from registry_helpers import NS, PARENT, make_core, parse, sign

from btmm_core.dns.edns import UpdateLeaseOption
from btmm_core.dns.tsig import ReplayGuard
from btmm_core.registry.handler import RegistryCore, Transport
from btmm_core.registry.model import Cause, ChangeSet, Entry, RecordKey, RecordRow, RRsetChange
from btmm_core.registry.replay import SharedReplayGuard
from btmm_core.registry.storage import SqliteStorage, delta_text, parse_delta
from btmm_core.registry.zones import ZoneConfig, ZoneStore

NOW = 1_800_000_000.0
BOB = "bob.members.example."


def _workers(path: Path, *, group: bool = True) -> tuple[RegistryCore, RegistryCore, dict]:  # type: ignore[type-arg]
    """Two workers on ``path``: ``a`` made the accounts, ``b`` opened the file after."""
    sa = SqliteStorage(path)
    sa.share(0, 2)
    a, accounts = make_core(sa)
    sb = SqliteStorage(path)
    sb.share(1, 2)
    b = RegistryCore(ZoneStore(sb, ZoneConfig(PARENT, NS, ("192.0.2.53",), 5300)), a.policy)
    a.group_commit = b.group_commit = group
    return a, b, accounts


def _add(name: str, address: str, *, absent: bool = False) -> dns.update.UpdateMessage:
    u = dns.update.UpdateMessage(BOB)
    if absent:
        u.absent(name)
    u.add(name, 60, "AAAA", address)
    u.use_edns(0, 0, 1232, options=[UpdateLeaseOption(3600)])
    return u


def _update(core: RegistryCore, msg: dns.update.UpdateMessage, key, t: float) -> int:  # type: ignore[no-untyped-def]
    """Send ``msg`` signed at ``t``; flush the group it opened; the answer's rcode."""
    wire = core.receive(sign(msg, key, int(t)), t, Transport.UDP, "peer")
    if wire is None:
        out = core.flush(t)
        assert len(out) == 1
        wire = out[0].wire
    return parse(wire).rcode()


def _aaaa(core: RegistryCore, name: str) -> list[str]:
    zone = core.store.zones[dns.name.from_text(BOB)]
    return sorted(rd.to_text() for rd, _ in zone.get(dns.name.from_text(name + "." + BOB), 28))


def test_a_commit_in_one_worker_reaches_the_others_zones_and_observers(tmp_path: Path) -> None:
    a, b, acc = _workers(tmp_path / "r.sqlite")
    events: list[RRsetChange] = []
    b.store.add_observer(events.append)
    key = acc["bob"].key
    assert _update(a, _add("laptop", "fd00::1"), key, NOW) == dns.rcode.NOERROR
    assert _aaaa(b, "laptop") == []  # not read yet
    # the poke is waiting on b's socket: take_notices reads the table at once
    assert b.store.sync_external() == 1
    assert _aaaa(b, "laptop") == ["fd00::1"]
    assert [(str(e.name), e.added[0].to_text(), e.cause) for e in events] == [
        ("laptop." + BOB, "fd00::1", Cause.UPDATE)
    ]
    assert b.store.zones[dns.name.from_text(BOB)].serial == a.store.zones[
        dns.name.from_text(BOB)].serial
    assert b.store.sync_external() == 0  # nothing new, nothing applied twice


def test_a_group_is_planned_on_what_another_worker_committed(tmp_path: Path) -> None:
    a, b, acc = _workers(tmp_path / "r.sqlite")
    key = acc["bob"].key
    assert _update(a, _add("x", "fd00::1"), key, NOW) == dns.rcode.NOERROR
    # b has not read the notice: its group catches up under the write lock before planning,
    # so "x must be absent" fails on a's record instead of overwriting it
    assert _update(b, _add("x", "fd00::2", absent=True), key, NOW + 1) == dns.rcode.YXDOMAIN
    assert _update(b, _add("y", "fd00::3"), key, NOW + 2) == dns.rcode.NOERROR
    a.store.sync_external()
    assert _aaaa(a, "x") == _aaaa(b, "x") == ["fd00::1"]
    assert _aaaa(a, "y") == _aaaa(b, "y") == ["fd00::3"]
    za, zb = (c.store.zones[dns.name.from_text(BOB)] for c in (a, b))
    assert za.serial == zb.serial


def test_interleaved_writers_lose_no_update(tmp_path: Path) -> None:
    for group in (True, False):  # without group commit: a stale commit is planned again
        a, b, acc = _workers(tmp_path / f"r{group}.sqlite", group=group)
        key = acc["bob"].key
        t = NOW
        for i in range(40):
            t += 1
            core = (a, b)[i % 2]
            assert _update(core, _add(f"n{i}", f"fd00::{i + 1:x}"), key, t) == dns.rcode.NOERROR
        for core in (a, b):
            core.store.sync_external()
            for i in range(40):
                assert _aaaa(core, f"n{i}") == [f"fd00::{i + 1:x}"], (group, i)
        fresh = SqliteStorage(tmp_path / f"r{group}.sqlite").load()
        assert sum(1 for r in fresh.records if r.rdtype == 28) == 40


def test_expiry_deletes_once_whichever_worker_runs_it(tmp_path: Path) -> None:
    a, b, acc = _workers(tmp_path / "r.sqlite")
    key = acc["bob"].key
    u = _add("lease", "fd00::9")
    u.use_edns(0, 0, 1232, options=[UpdateLeaseOption(1)])  # clamped to lease_min 1800
    assert _update(a, u, key, NOW) == dns.rcode.NOERROR
    b.store.sync_external()
    later = NOW + 7201
    serial = a.store.zones[dns.name.from_text(BOB)].serial
    assert a.tick(later) == 1
    # b has not heard: its own expiry finds the zone moved, reloads it, deletes nothing twice
    assert b.tick(later) == 0
    b.store.sync_external()
    for core in (a, b):
        zone = core.store.zones[dns.name.from_text(BOB)]
        assert _aaaa(core, "lease") == [] and zone.serial == serial + 1


def test_a_worker_too_far_behind_reloads_everything(tmp_path: Path) -> None:
    a, b, acc = _workers(tmp_path / "r.sqlite")
    key = acc["bob"].key
    assert _update(a, _add("p", "fd00::1"), key, NOW) == dns.rcode.NOERROR
    # the rows b never read are pruned (as after 20,000 changes)
    a.store.storage._db.execute("DELETE FROM changes")  # type: ignore[attr-defined]
    assert _update(a, _add("q", "fd00::2"), key, NOW + 1) == dns.rcode.NOERROR
    b.store.sync_external()
    assert _aaaa(b, "p") == ["fd00::1"] and _aaaa(b, "q") == ["fd00::2"]


def test_a_stranger_poking_the_notice_socket_changes_nothing(tmp_path: Path) -> None:
    _a, b, _ = _workers(tmp_path / "r.sqlite")
    storage = b.store.storage
    assert isinstance(storage, SqliteStorage)
    before = b.store.version
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        # b's own address: worker 0's with the index replaced (only the last "-0": the file's
        # hash before it may begin with a 0 too)
        own = storage._peers[0].rsplit(b"-", 1)[0] + b"-1"
        s.sendto(b"\xff" * 60, own)
    assert b.store.sync_external() == 0 and b.store.version == before


def test_change_codec_round_trip() -> None:
    zone = dns.name.from_text(BOB)
    rd = dns.rdata.from_text(1, 28, "fd00::1")
    change = ChangeSet(
        zone, 7,
        upserts=(RecordRow(zone, dns.name.from_text("a." + BOB), 28, rd, Entry(60, NOW)),),
        deletes=(RecordKey(zone, dns.name.from_text("b." + BOB), 28, rd),),
        cause=Cause.EXPIRY,
        claims=((dns.name.from_text("a." + BOB), "laptop"),),
    )
    z, version, back = parse_delta(delta_text(change, 5))
    assert (z, version) == (zone, 5) and back is not None
    assert (back.serial, back.upserts, back.deletes, back.cause, back.claims) == (
        7, change.upserts, change.deletes, Cause.EXPIRY, change.claims)
    # too long for the limit: zone and version only, the receiver reloads the zone
    assert parse_delta(delta_text(change, 5, max_len=20))[2] is None


def test_schema_upgrade_keeps_data_of_version_1(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    s = SqliteStorage(path)
    s.ensure_zone(PARENT, None)
    s._db.execute("DROP TABLE changes")
    s._db.execute("ALTER TABLE zones DROP COLUMN version")
    s._db.execute("PRAGMA user_version = 1")
    s.close()
    again = SqliteStorage(path)
    assert again.schema_version() == 2
    assert [z.name for z in again.load().zones] == [PARENT]


# ---- replay state shared by workers ------------------------------------------------------------


def test_shared_replay_guard_decides_as_replay_guard() -> None:
    rng = random.Random(17)
    shared = SharedReplayGuard.create(300)
    plain = ReplayGuard.empty(300)
    keys = [dns.name.from_text(f"k{i}.members.example.") for i in range(5)]
    sent: list[tuple[dns.name.Name, int, bytes]] = []
    t0 = 1_800_000_000
    for step in range(6000):
        if sent and rng.random() < 0.3:
            key, t, mac = rng.choice(sent)  # a replay, maybe of an old message
        else:
            key = rng.choice(keys)
            t = t0 + step // 50 - rng.randrange(3)  # mostly forward, sometimes a bit older
            mac = rng.randbytes(32)
            sent.append((key, t, mac))
        assert shared.admit(key, t, mac) == plain.admit(key, t, mac), step
    assert shared.full == 0
    shared.close()


def test_shared_replay_guard_is_shared_with_a_forked_worker() -> None:
    guard = SharedReplayGuard.create(300)
    key = dns.name.from_text("bob.members.example.")
    mac = os.urandom(32)
    pid = os.fork()
    if pid == 0:  # the other worker accepts the message first
        os._exit(0 if guard.admit(key, 1000, mac) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not guard.admit(key, 1000, mac)  # the replay, to this worker
    assert not guard.admit(key, 999, os.urandom(32))  # older than the newest it accepted
    assert guard.admit(key, 1000, os.urandom(32))  # another message of the same second
    guard.close()


def test_a_replay_to_the_other_worker_is_badtime(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    guard = SharedReplayGuard.create(300)
    sa = SqliteStorage(path)
    sa.share(0, 2)
    a, acc = make_core(sa)
    a.replay = guard
    sb = SqliteStorage(path)
    sb.share(1, 2)
    b = RegistryCore(ZoneStore(sb, ZoneConfig(PARENT, NS, ("192.0.2.53",), 5300)), None, guard)
    a.group_commit = b.group_commit = True
    key = acc["bob"].key
    q = dns.message.make_query("laptop." + BOB, "AAAA")
    wire = sign(q, key, int(NOW))
    assert parse(a.receive(wire, NOW, Transport.UDP, "p")).rcode() == dns.rcode.NXDOMAIN
    again = parse(b.receive(wire, NOW, Transport.UDP, "q"))
    assert again.rcode() == dns.rcode.NOTAUTH and again.tsig[0].error == 18  # type: ignore[index]
    u = sign(_add("z", "fd00::1"), key, int(NOW) + 1)
    assert a.receive(u, NOW + 1, Transport.UDP, "p") is None
    assert parse(a.flush(NOW + 1)[0].wire).rcode() == dns.rcode.NOERROR
    out = b.receive(u, NOW + 1, Transport.UDP, "q")
    assert out is not None and parse(out).tsig[0].error == 18  # type: ignore[index]


@pytest.mark.parametrize("count", [2, 3])
def test_workers_of_another_file_are_not_poked(tmp_path: Path, count: int) -> None:
    a = SqliteStorage(tmp_path / "one.sqlite")
    a.share(0, count)
    b = SqliteStorage(tmp_path / "two.sqlite")
    b.share(0, count)  # same index, other file: its own socket name
    assert a._peers != b._peers
    a.close()
    b.close()


def test_forwarded_updates_are_framed_whole_however_the_stream_cuts_them() -> None:
    from btmm_core.registry.server import Forwarding

    got: list[tuple[bytes, tuple[str, int]]] = []

    class Writer:
        def answer_forwarded(self, data: bytes, addr: tuple[str, int]) -> None:
            got.append((data, addr))

    messages = [(bytes([i]) * (12 + i * 37), (f"192.0.2.{i}", 1000 + i)) for i in range(20)]
    messages.append((b"\x01" * 40, ("2001:db8::1", 53)))
    stream = b"".join(Forwarding.frame(m, a) for m, a in messages)
    rng = random.Random(5)
    fwd = Forwarding(Writer())  # type: ignore[arg-type]
    p = 0
    while p < len(stream):
        n = rng.randrange(1, 60)
        fwd.data_received(stream[p : p + n])
        p += n
    assert got == messages


@pytest.mark.parametrize("writes_pid", [True, False])
def test_a_worker_killed_holding_the_replay_lock_does_not_stop_the_others(
    writes_pid: bool,
) -> None:
    import signal
    import struct
    import time

    guard = SharedReplayGuard.create(300)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker that takes the lock and is killed inside the step
        guard._lock.acquire()
        if writes_pid:
            struct.pack_into("<q", guard._mem, 0, os.getpid())
        os.write(ready_w, b"1")
        time.sleep(60)
        os._exit(0)
    assert os.read(ready_r, 1) == b"1"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    key = dns.name.from_text("bob.members.example.")
    started = time.monotonic()
    assert guard.admit(key, 1000, os.urandom(32))
    waited = time.monotonic() - started
    assert guard.recovered == 1
    assert waited < (2.0 if writes_pid else 4.0)
    assert guard.admit(key, 1000, os.urandom(32))  # and the lock works as before
    guard.close()
