"""The ``Storage`` contract on each backend (SQLite and PostgreSQL), then what only a database
shared by several servers does: schema migrations, stale zones, replays refused across
servers, notices, lease expiry exactly once, and a database that goes away and comes back."""

from __future__ import annotations

import time
from collections.abc import Callable

import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.update
import psycopg
import pytest
from registry_helpers import NS, PARENT, make_core, parse, sign

from bench.pgcluster import PgCluster
from btmm_core.dns.enrol import EnrolClient
from btmm_core.dns.tsig import TsigError
from btmm_core.registry.accounts import add_user, rotate_key
from btmm_core.registry.handler import RegistryCore, Transport
from btmm_core.registry.model import (
    Cause,
    ChangeSet,
    Entry,
    RecordKey,
    RecordRow,
    RRsetChange,
    SeenMac,
)
from btmm_core.registry.pgstorage import MIGRATIONS, PgStorage
from btmm_core.registry.storage import (
    SQLITE_SCHEMA,
    DatabaseUnavailable,
    Notices,
    Replayed,
    StaleZone,
    Storage,
    StorageError,
    ZoneBusy,
)
from btmm_core.registry.zones import ZoneConfig, ZoneStore

BOB = dns.name.from_text("bob.members.example.")
Open = Callable[[], Storage]


def _aaaa(text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.AAAA, text)


def _row(name: str, addr: str, expires: float | None = None) -> RecordRow:
    return RecordRow(
        BOB, dns.name.from_text(name, origin=BOB), dns.rdatatype.AAAA, _aaaa(addr),
        Entry(60, expires),
    )


def _store(storage: Storage) -> ZoneStore:
    return ZoneStore(storage, ZoneConfig(PARENT, NS, ("192.0.2.53",), 5300))


# -- the contract, on both backends ---------------------------------------------------------


def test_accounts_round_trip_and_bump_the_generation(open_db: Open) -> None:
    s = open_db()
    s.ensure_zone(PARENT, None)
    gen = s.generation()
    bob = add_user(s, "bob", PARENT, legacy=False)
    add_user(s, "alice", PARENT, legacy=True)
    assert s.generation() > gen
    assert [a.user for a in s.accounts()] == ["alice", "bob"]
    with pytest.raises(StorageError, match="already exists"):
        add_user(s, "bob", PARENT, legacy=False)
    other = open_db()  # another process on the same database sees it all
    alice = dns.name.from_text("alice.members.example.")
    assert {z.name for z in other.zone_rows()} == {PARENT, BOB, alice}
    assert other.domain() == PARENT
    new = rotate_key(other, "bob", PARENT, legacy=False)
    assert [a.key for a in s.accounts() if a.user == "bob"] == [new.key]
    assert new.key.secret != bob.key.secret
    removed = s.remove_account("alice")
    assert removed.user == "alice"
    with pytest.raises(StorageError, match="no user"):
        other.remove_account("alice")
    assert [a.user for a in other.accounts()] == ["bob"]


def test_records_leases_seen_macs_and_owners_survive_a_reopen(open_db: Open) -> None:
    s = open_db()
    s.ensure_zone(PARENT, None)
    add_user(s, "bob", PARENT, legacy=False)
    s.load()  # a server loads before it commits (it holds the zone's state)
    key = dns.name.from_text("bob.members.example.")
    claim = dns.name.from_text("AutoTunnel-1.bob.members.example.")
    s.commit(ChangeSet(
        BOB, 2,
        upserts=(_row("a", "fd00::1", 2e9), _row("a", "fd00::2"), _row("b", "fd00::3")),
        seen=(SeenMac(key, 1000, b"m1"),),
        claims=((claim, "laptop"),),
    ))
    s.commit(ChangeSet(
        BOB, 3,
        upserts=(_row("a", "fd00::1", 3e9),),  # a refreshed lease replaces the row
        deletes=(RecordKey(BOB, dns.name.from_text("b", origin=BOB), dns.rdatatype.AAAA,
                           _aaaa("fd00::3")),),
        seen=(SeenMac(key, 1001, b"m2"),),
    ))
    s.close()
    snap = open_db().load()
    assert {z.name: z.serial for z in snap.zones}[BOB] == 3
    assert sorted((r.name.to_text(), r.rdata.to_text(), r.entry.expires) for r in snap.records) == [
        ("a.bob.members.example.", "fd00::1", 3e9),
        ("a.bob.members.example.", "fd00::2", None),
    ]
    assert sorted(m.mac for m in snap.seen) == [b"m1", b"m2"]
    assert snap.owners == ((BOB, claim, "laptop"),)


def test_the_handler_commits_and_a_restarted_server_answers_the_same(open_db: Open) -> None:
    core, accounts = make_core(open_db())
    now = time.time()
    u = dns.update.UpdateMessage(BOB)
    u.add("desk", 60, "AAAA", "fd00::7")
    wire = sign(u, accounts["bob"].key, int(now))
    assert parse(core.receive(wire, now, Transport.UDP, "t")).rcode() == dns.rcode.NOERROR
    serial = core.store.zones[BOB].serial
    core.store.storage.close()
    again = RegistryCore(_store(open_db()))
    assert again.store.zones[BOB].serial == serial
    assert again.store.zones[BOB].get(dns.name.from_text("desk", origin=BOB), 28)
    # the same signed message once more: the restarted server remembers its MAC
    out = parse(again.receive(wire, now + 1, Transport.UDP, "t"))
    assert out.rcode() == dns.rcode.NOTAUTH and out.tsig is not None
    assert out.tsig[0].error == TsigError.BADTIME


def test_schema_version_is_the_newest(open_db: Open) -> None:
    s = open_db()
    want = MIGRATIONS[-1][0] if isinstance(s, PgStorage) else SQLITE_SCHEMA
    assert s.schema_version() == want


# -- PostgreSQL only: one database, several servers ------------------------------------------


def _two_servers(pg: PgCluster) -> tuple[RegistryCore, RegistryCore, dict[str, object], str]:
    url = pg.create_database()
    a, accounts = make_core(PgStorage(url, notices=True))
    b = RegistryCore(_store(PgStorage(url, notices=True)))
    return a, b, accounts, url  # type: ignore[return-value]


def _update(core: RegistryCore, key: object, now: float, name: str, addr: str) -> bytes:
    u = dns.update.UpdateMessage(BOB)
    u.add(name, 60, "AAAA", addr)
    return sign(u, key, int(now))  # type: ignore[arg-type]


def test_migrations_keep_data_and_a_newer_schema_is_refused(pg: PgCluster) -> None:
    url = pg.create_database()
    with psycopg.connect(url, autocommit=True) as conn:  # a database made by version 1
        conn.execute("CREATE TABLE btmm_schema (version integer NOT NULL)")
        conn.execute("INSERT INTO btmm_schema VALUES (1)")
        conn.execute(MIGRATIONS[0][2].encode())
        conn.execute("INSERT INTO zones (name, serial, username) VALUES ('members.example.', 7,"
                     " NULL)")
    with pytest.raises(StorageError, match="db upgrade"):
        PgStorage(url, upgrade=False)
    s = PgStorage(url)
    assert s.schema_version() == MIGRATIONS[-1][0]
    assert [(z.name, z.serial) for z in s.zone_rows()] == [(PARENT, 7)]
    assert s.upgrade() == []  # nothing left to do
    s.close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE btmm_schema SET version = 999")
    with pytest.raises(StorageError, match="newer than this btmm"):
        PgStorage(url)


def test_a_change_by_another_server_makes_the_zone_stale_then_replans(pg: PgCluster) -> None:
    a, b, accounts, _ = _two_servers(pg)
    key = accounts["bob"].key  # type: ignore[attr-defined]
    now = time.time()
    assert parse(a.receive(_update(a, key, now, "x", "fd00::1"), now, Transport.UDP, "t")
                 ).rcode() == dns.rcode.NOERROR
    # b has not heard of it yet; its commit finds the zone stale, reloads it, plans again
    assert BOB in b.store.zones and not b.store.zones[BOB].rrsets
    out = parse(b.receive(_update(b, key, now + 1, "y", "fd00::2"), now + 1, Transport.UDP, "t"))
    assert out.rcode() == dns.rcode.NOERROR
    zone = b.store.zones[BOB]
    assert {n.to_text() for n, _ in zone.rrsets} == {f"x.{BOB}", f"y.{BOB}"}
    assert zone.serial == a.store.zones[BOB].serial + 1
    # a storage-level stale commit stores nothing
    with pytest.raises(StaleZone):
        a.store.storage.commit(ChangeSet(BOB, 99, upserts=(_row("z", "fd00::9"),)))
    assert b.store.storage.load_zone(BOB).row.serial == zone.serial  # type: ignore[union-attr]


def test_an_update_replayed_to_another_server_is_refused(pg: PgCluster) -> None:
    a, b, accounts, _ = _two_servers(pg)
    now = time.time()
    wire = _update(a, accounts["bob"].key, now, "x", "fd00::1")  # type: ignore[attr-defined]
    assert parse(a.receive(wire, now, Transport.UDP, "t")).rcode() == dns.rcode.NOERROR
    out = parse(b.receive(wire, now + 1, Transport.UDP, "t"))
    assert out.rcode() == dns.rcode.NOTAUTH
    assert out.tsig is not None and out.tsig[0].error == TsigError.BADTIME
    # and an older Time Signed of the same key, fresh MAC, is refused too
    older = _update(a, accounts["bob"].key, now - 5, "y", "fd00::2")  # type: ignore[attr-defined]
    out = parse(b.receive(older, now + 1, Transport.UDP, "t"))
    assert out.rcode() == dns.rcode.NOTAUTH and out.tsig[0].error == TsigError.BADTIME
    with pytest.raises(Replayed):
        b.store.storage.commit(ChangeSet(BOB, b.store.zones[BOB].serial, seen=(
            SeenMac(accounts["bob"].key.name, int(now), b"x" * 32),  # type: ignore[attr-defined]
            SeenMac(accounts["bob"].key.name, int(now), b"x" * 32),  # type: ignore[attr-defined]
        )))


def test_notices_bring_other_servers_changes_to_observers(pg: PgCluster) -> None:
    a, b, accounts, _ = _two_servers(pg)
    events: list[RRsetChange] = []
    b.store.add_observer(events.append)
    assert b.store.sync_external() == 0  # listening since it opened: nothing yet
    now = time.time()
    wire = _update(a, accounts["bob"].key, now, "x", "fd00::1")  # type: ignore[attr-defined]
    assert parse(a.receive(wire, now, Transport.UDP, "t")).rcode() == dns.rcode.NOERROR
    deadline = time.monotonic() + 10
    while not events and time.monotonic() < deadline:
        b.store.sync_external()
        time.sleep(0.01)
    assert [(e.name.to_text(), [r.to_text() for r in e.added]) for e in events] == [
        (f"x.{BOB}", ["fd00::1"])]
    assert b.store.zones[BOB].serial == a.store.zones[BOB].serial
    # a's own notices are not news to a
    a_events: list[RRsetChange] = []
    a.store.add_observer(a_events.append)
    assert a.store.sync_external() == 0 and a_events == []


def test_lease_expiry_happens_once_whichever_server_runs_it(pg: PgCluster) -> None:
    a, b, _, url = _two_servers(pg)
    now = time.time()
    a.store.commit(ChangeSet(BOB, 2, upserts=tuple(
        _row(f"h{i}", f"fd00::{i + 1}", now + 1) for i in range(20))))
    b.store.sync_external()
    b.store.resync()
    # a third server holds the zone row while both try: expiry does not wait, it tries later
    with psycopg.connect(url) as holder:
        holder.execute("SELECT 1 FROM zones WHERE name=%s FOR UPDATE", (BOB.to_text(),))
        assert a.store.expire(now + 2) == [] and b.store.expire(now + 2) == []
        with pytest.raises(ZoneBusy):
            b.store.storage.commit(ChangeSet(
                BOB, 3, deletes=(RecordKey(BOB, _row("h0", "fd00::1").name, 28,
                                           _aaaa("fd00::1")),), cause=Cause.EXPIRY))
        holder.rollback()
    expired: list[RRsetChange] = []
    a.store.add_observer(expired.append)
    b.store.add_observer(expired.append)
    later = now + 3
    a_events = a.store.expire(later)
    b_events = b.store.expire(later)  # stale: reloads, finds nothing left to expire
    assert len(a_events) == 20 and b_events == []
    assert b.store.expire(later) == [] and not b.store.zones[BOB].rrsets
    state = a.store.storage.load_zone(BOB)
    assert state is not None and state.records == () and state.row.serial == 3  # one bump


def test_a_lost_database_is_servfail_then_recovers(pg: PgCluster) -> None:
    url = pg.create_database()
    core, accounts = make_core(PgStorage(url, notices=True))
    key = accounts["bob"].key
    core.store.sync_external()
    now = time.time()
    ok = parse(core.receive(_update(core, key, now, "a", "fd00::1"), now, Transport.UDP, "t"))
    assert ok.rcode() == dns.rcode.NOERROR
    serial = core.store.zones[BOB].serial
    pg.stop("immediate")
    try:
        out = parse(core.receive(_update(core, key, now + 1, "b", "fd00::2"), now + 1,
                                 Transport.UDP, "t"))
        assert out.rcode() == dns.rcode.SERVFAIL
        enrol = sign(EnrolClient(BOB, "laptop").request(), key, int(now) + 1)
        assert parse(core.receive(enrol, now + 1, Transport.UDP, "t")).rcode() == (
            dns.rcode.SERVFAIL)
        with pytest.raises(DatabaseUnavailable):
            core.store.storage.generation()
        # queries are answered from the committed state meanwhile
        assert core.store.zones[BOB].serial == serial
    finally:
        pg.start()
    deadline = time.monotonic() + 15
    rcode = None
    t = now + 2
    while time.monotonic() < deadline:
        t += 1
        out = parse(core.receive(_update(core, key, t, "c", "fd00::3"), t, Transport.UDP, "t"))
        rcode = out.rcode()
        if rcode == dns.rcode.NOERROR:
            break
        time.sleep(0.1)
    assert rcode == dns.rcode.NOERROR
    core.store.sync_external()  # the reconnect asks for a full reload: nothing goes back
    assert core.store.zones[BOB].serial == serial + 1
    names = {n.to_text() for n, _ in core.store.zones[BOB].rrsets}
    assert names == {f"a.{BOB}", f"c.{BOB}"}


def test_notices_carry_the_change_and_a_big_one_or_a_gap_means_a_reload(pg: PgCluster) -> None:
    a, b, _, _ = _two_servers(pg)
    other = b.store.storage
    assert isinstance(other, PgStorage)

    def notices() -> Notices:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            n = other.take_notices()
            if n.changes or n.zones:
                return n
            time.sleep(0.01)
        raise AssertionError("no notice within 10 s")

    small = ChangeSet(BOB, 2, upserts=(_row("a", "fd00::1", 2e9),))
    a.store.commit(small)
    n = notices()
    assert n.zones == frozenset() and n.changes == (small,)
    b.store._apply(n.changes[0])
    # a change too big for a notice travels without its rows: the zone is reloaded
    txt = tuple(
        RecordRow(BOB, dns.name.from_text(f"t{i}", origin=BOB), dns.rdatatype.TXT,
                  dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, "x" * 200),
                  Entry(60, None))
        for i in range(40)
    )
    a.store.commit(ChangeSet(BOB, 3, upserts=txt))
    n = notices()
    assert n.changes == () and n.zones == frozenset({BOB})
    assert b.store.reload_zone(BOB) and b.store.zones[BOB].serial == 3
    # a notice that does not follow the version this server holds (one was missed)
    a.store.commit(ChangeSet(BOB, 4, upserts=(_row("b", "fd00::2"),)))
    a.store.commit(ChangeSet(BOB, 5, upserts=(_row("c", "fd00::3"),)))
    other._versions[BOB.to_text()] -= 1  # as if the first notice had been lost
    n = notices()
    assert n.changes == () and n.zones == frozenset({BOB})
