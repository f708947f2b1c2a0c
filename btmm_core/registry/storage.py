"""Durable storage for the registry behind one interface, with the SQLite (WAL) backend.

``Storage.commit`` returns only once the change set is durable: the server answers NOERROR to
an update after that and not before (docs/architecture.md decision 4). PostgreSQL, shared by
several servers, sits behind the same class in ``pgstorage.py`` (``open_storage`` picks one by
the ``--database`` given). The memory backend is for unit tests and is not durable.

A backend shared by several servers says so through the hooks below, which the others leave at
their defaults: ``commit`` raises ``StaleZone`` when another server changed the zone since this
one loaded it (the caller reloads it with ``load_zone`` and plans again), ``ZoneBusy`` when a
lease expiry finds the zone being written by another server, and ``Replayed`` when another
server accepted the same TSIG MAC already; ``take_notices`` says which zones other servers
changed, and ``listen_fileno`` is a descriptor that becomes readable when there are some.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sqlite3
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from btmm_core.dns.tsig import KeyRole, TsigKey
from btmm_core.errors import ConfigError
from btmm_core.registry.model import (
    Account,
    Cause,
    ChangeSet,
    DeviceKey,
    Entry,
    RecordKey,
    RecordRow,
    SeenMac,
    Snapshot,
    ZoneRow,
)
from btmm_core.sso import files as sso_files


class StorageError(ConfigError):
    """The registry's database cannot be used (missing, locked, corrupt, or a bad account)."""


class DatabaseUnavailable(StorageError):
    """The database server cannot be reached; nothing was stored. Retried by itself."""


class StaleZone(StorageError):
    """Another server changed the zone since this one loaded it: nothing was stored; reload the
    zone (``load_zone``) and plan the change again."""


class ZoneBusy(StorageError):
    """Another server holds the zone (a lease expiry does not wait for it): nothing was stored."""


class Replayed(StorageError):
    """Another server accepted this TSIG MAC already, or a newer Time Signed of its key."""


@dataclass(frozen=True)
class ZoneState:
    """One zone as stored: what ``load_zone`` returns."""

    row: ZoneRow
    records: tuple[RecordRow, ...]
    owners: tuple[tuple[dns.name.Name, str], ...]


@dataclass(frozen=True)
class Notices:
    """What other servers committed since the last ``take_notices``."""

    #: their changes, in commit order, each following the last state this server holds
    changes: tuple[ChangeSet, ...] = ()
    #: zones to reload whole (a change was too big for a notice, or one was missed)
    zones: frozenset[dns.name.Name] = frozenset()
    #: accounts, keys or devices changed: reload them
    accounts: bool = False
    #: notices may have been lost (the connection to the database dropped): reload everything
    resync: bool = False


class Storage(abc.ABC):
    """The registry's durable state: zones, keys, records with lease deadlines, seen MACs."""

    @abc.abstractmethod
    def load(self) -> Snapshot: ...

    #: Whether ``commit_group`` writes its change sets in one transaction (one fsync), so
    #: that the core may gather updates that arrive together (group commit). A database
    #: shared with other servers leaves it False: its commits may be refused one by one
    #: (``StaleZone``, ``Replayed``) and each is planned again on its own.
    groups_commits = False

    @abc.abstractmethod
    def commit(self, change: ChangeSet) -> None:
        """Apply ``change`` atomically; durable when this returns."""

    def commit_group(self, changes: Sequence[ChangeSet]) -> None:
        """Apply ``changes`` in order, all or none; durable when this returns. Only called
        when ``groups_commits`` is set."""
        raise NotImplementedError(f"{type(self).__name__} does not commit change sets together")

    @abc.abstractmethod
    def ensure_zone(self, zone: dns.name.Name, user: str | None) -> None: ...

    def zone_rows(self) -> tuple[ZoneRow, ...]:
        return self.load().zones

    def domain(self) -> dns.name.Name | None:
        """The parent domain this database serves: its zone without a user (the first
        ``btmm serve`` makes it), else the parent of its users' zones; None when it has none."""
        rows = self.zone_rows()
        parents = {z.name for z in rows if z.user is None}
        if not parents:
            parents = {z.name.parent() for z in rows}
        if len(parents) > 1:
            names = ", ".join(sorted(p.to_text() for p in parents))
            raise StorageError(
                f"the registry database holds zones of several domains ({names})",
                hint="use one database per domain",
            )
        return next(iter(parents), None)

    @abc.abstractmethod
    def add_account(self, account: Account) -> None: ...

    @abc.abstractmethod
    def remove_account(self, user: str) -> Account: ...

    @abc.abstractmethod
    def replace_key(self, user: str, key: TsigKey) -> None: ...

    @abc.abstractmethod
    def accounts(self) -> list[Account]: ...

    @abc.abstractmethod
    def generation(self) -> int:
        """A number that changes when another process changed the accounts."""

    # -- device keys and invite tokens (one key per device; registry/README.md) ----------

    @abc.abstractmethod
    def add_invite(self, invite: DeviceKey) -> None: ...

    @abc.abstractmethod
    def enrol_device(
        self, device: DeviceKey, *, invite: dns.name.Name | None, replace: bool, seen: SeenMac
    ) -> None:
        """Store ``device``'s key, spend ``invite`` (if any) and the request's MAC, atomically.

        Refused (StorageError) when the invite is gone or the device exists and not ``replace``.
        """

    @abc.abstractmethod
    def remove_device(self, user: str, device: str) -> DeviceKey:
        """Delete the device's key and every record it published (see registry/README.md)."""

    @abc.abstractmethod
    def devices(self, user: str) -> list[DeviceKey]:
        """The user's device keys and invite tokens, oldest first."""

    def close(self) -> None:
        return None

    def load_zone(self, zone: dns.name.Name) -> ZoneState | None:
        """One zone's serial, records and owners as stored now; None when it is gone."""
        snap = self.load()
        rows = [z for z in snap.zones if z.name == zone]
        if not rows:
            return None
        return ZoneState(
            rows[0],
            tuple(r for r in snap.records if r.zone == zone),
            tuple((n, d) for z, n, d in snap.owners if z == zone),
        )

    def take_notices(self) -> Notices:
        """Zones other servers changed since the last call (a backend of one server: none)."""
        return Notices()

    def listen_fileno(self) -> int | None:
        """A descriptor that becomes readable when ``take_notices`` has something; None: none
        (or none now: the driver asks again on its next timer pass)."""
        return None

    def schema_version(self) -> int:
        """The version of the schema the database is at (after the upgrades applied at open)."""
        return 1

    def begin_group(self) -> Notices | None:
        """Before the first update of a group is planned: take the database's write lock and
        say what other processes committed meanwhile, so that the group is planned on the
        latest state (SQLite shared by workers). None: this backend needs no such step."""
        return None

    def end_group(self) -> None:
        """Let go of a group begun by ``begin_group`` that staged nothing (a no-op if none)."""
        return None


def open_storage(database: str | Path, *, server: bool = False) -> Storage:
    """The backend for ``--database``: a ``postgresql://`` URL, or else a SQLite file.

    ``server``: this process serves (it must hear of other servers' commits)."""
    text = str(database)
    if text.startswith(("postgresql://", "postgres://")):
        # imported here: psycopg is needed only by those who use PostgreSQL
        from btmm_core.registry.pgstorage import PgStorage

        return PgStorage(text, notices=server)
    return SqliteStorage(Path(text))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS zones (
    name TEXT PRIMARY KEY, serial INTEGER NOT NULL, user TEXT UNIQUE
);
CREATE TABLE IF NOT EXISTS keys (
    name TEXT PRIMARY KEY, user TEXT NOT NULL UNIQUE, zone TEXT NOT NULL,
    algorithm TEXT NOT NULL, secret BLOB NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    zone TEXT NOT NULL, name TEXT NOT NULL, rdtype INTEGER NOT NULL, rkey BLOB NOT NULL,
    rdata BLOB NOT NULL, ttl INTEGER NOT NULL, expires REAL,
    PRIMARY KEY (zone, name, rdtype, rkey)
);
CREATE TABLE IF NOT EXISTS tsig_seen (
    key TEXT NOT NULL, mac BLOB NOT NULL, time_signed INTEGER NOT NULL, PRIMARY KEY (key, mac)
);
CREATE INDEX IF NOT EXISTS tsig_seen_time ON tsig_seen (key, time_signed);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS device_keys (
    name TEXT PRIMARY KEY, user TEXT NOT NULL, zone TEXT NOT NULL, role INTEGER NOT NULL,
    device TEXT, algorithm TEXT NOT NULL, secret BLOB NOT NULL, created REAL NOT NULL,
    expires REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS device_keys_device ON device_keys (zone, device)
    WHERE role = 2;
CREATE TABLE IF NOT EXISTS owners (
    zone TEXT NOT NULL, name TEXT NOT NULL, device TEXT NOT NULL, PRIMARY KEY (zone, name)
);
"""


#: The schema ``SqliteStorage`` brings a database to (``PRAGMA user_version``).
SQLITE_SCHEMA = 2

_CHANGES = """
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, origin TEXT NOT NULL, zone TEXT NOT NULL,
    version INTEGER NOT NULL, delta TEXT NOT NULL
)
"""


def _next_serial(serial: int) -> int:
    s = (serial + 1) & 0xFFFFFFFF
    return s or 1


def device_records(
    rows: list[tuple[dns.name.Name, int, bytes]],
    zone: dns.name.Name,
    device: str,
    owned: set[dns.name.Name],
) -> list[tuple[dns.name.Name, int, bytes]]:
    """Which of a zone's (name, rdtype, rkey) rows a device published: everything at or below
    ``<device>.<zone>``, at the names it holds (``owned``), and its PTR in the browse list."""
    own = dns.name.from_text(device, origin=zone)
    browse = dns.name.from_text("_autotunnel._udp", origin=zone)
    ptr = dns.rdata.from_text(
        dns.rdataclass.IN, dns.rdatatype.PTR, own.to_text()
    ).to_digestable()
    return [
        (n, t, k)
        for n, t, k in rows
        if n.is_subdomain(own) or n in owned or (n == browse and t == dns.rdatatype.PTR
                                                 and k == ptr)
    ]


REVOKED_TTL = 60


def revocation_record(
    zone: dns.name.Name, device: str, txts: list[dns.rdata.Rdata], now: float
) -> tuple[dns.name.Name, dns.rdata.Rdata] | None:
    """The permanent TXT at ``_btmm-revoked.<zone>`` that names the SSH CA a revoked device
    published (``sshca=`` in its TXT; docs/architecture.md section 12), or None when it
    published none. Hosts turn these into the KRL their sshd reads; a device key may not
    change the name (``registry/authority.py``), so only the account can undo a revocation."""
    for rd in txts:
        for s in getattr(rd, "strings", ()):
            key, sep, value = bytes(s).decode("ascii", "replace").partition("=")
            if sep and key == "sshca" and value:
                ca = sso_files.parse_revocation([f"sshca={value}".encode()])
                if isinstance(ca, str):
                    return None
                strings = sso_files.revocation_strings(device, ca.ca, int(now))
                rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT,
                                            " ".join(f'"{t}"' for t in strings))
                return dns.name.from_text(sso_files.REVOKED_LABEL, origin=zone), rdata
    return None


def _n(name: dns.name.Name) -> str:
    return name.to_text().lower()


def _create_private(path: Path) -> None:
    """Make sure only the owner can read the database: it holds every user's TSIG key.

    A directory btmm creates is 0700; a database file btmm creates is 0600 before SQLite opens
    it. SQLite creates the -wal and -shm files later with the database file's permissions, so
    they are 0600 too whatever the umask. An existing database (or -wal/-shm) open to group or
    others is refused rather than silently fixed: its keys may have been read already.
    """
    parent = path.parent
    if not parent.exists():
        parent.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(parent, 0o700)  # mkdir's mode is filtered by the umask
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        os.close(fd)
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            mode = stat.S_IMODE(os.stat(p).st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            raise StorageError(
                f"the registry database file {p} is open to other users (mode {mode:04o});"
                " it holds every user's key, so the registry will not use it",
                hint=f"chmod 600 {path} {path}-wal {path}-shm 2>/dev/null; then consider"
                " rotating every key (btmm serve user rotate-key NAME)",
            )


class SqliteStorage(Storage):
    """SQLite in WAL mode with synchronous=FULL: a commit is on disk when it returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._commits = 0
        #: told how long each committed zone transaction took, BEGIN to durable COMMIT, in
        #: seconds (``btmm serve --metrics``); measured here, where the I/O is
        self.commit_observer: Callable[[float], None] | None = None
        #: Workers (``share``): this process's mark on its rows of ``changes``, the zone
        #: versions it holds, the last row of ``changes`` it read, its notice socket.
        self.origin = os.urandom(6).hex()
        self._shared = False
        self._versions: dict[str, int] = {}
        self._last_seq = 0
        self._sock: socket.socket | None = None
        self._lock_fd: int | None = None
        self._peers: list[bytes] = []
        self._in_group = False
        self._next_poll = 0.0
        self._changes_written = 0
        try:
            _create_private(path)
            self._db = sqlite3.connect(str(path), timeout=10.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('accounts_gen', 0)")
            self._upgrade()
        except (sqlite3.Error, OSError) as e:
            raise StorageError(
                f"cannot open the registry database {path}: {e}",
                hint="check the path given with --db and its permissions",
            ) from e

    def _upgrade(self) -> None:
        """Bring the schema to ``SQLITE_SCHEMA``, each step in one write transaction (workers
        opening the file at once take turns; the second finds the work done)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version < 2:
                # 2: zone versions and the changes table, for workers sharing the file
                columns = {r[1] for r in db.execute("PRAGMA table_info(zones)")}
                if "version" not in columns:
                    db.execute("ALTER TABLE zones ADD COLUMN version INTEGER NOT NULL DEFAULT 0")
                db.execute(_CHANGES)
            db.execute(f"PRAGMA user_version = {SQLITE_SCHEMA}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        self._db.close()

    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    # -- several worker processes on one file ---------------------------------------------

    def share(self, index: int, count: int) -> None:
        """Serve as worker ``index`` of ``count`` processes on this file (``--workers``).

        From now on every commit checks the zone versions (``StaleZone``), records its change
        in the ``changes`` table, and pokes the other workers through a unix datagram socket
        (abstract namespace, named after the file and the worker's index); a poke, or a
        second without one, makes ``take_notices`` read the table. A poke carries nothing:
        anyone on the machine may send one, and all it does is make us read the table.
        """
        tag = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:24]

        def address(i: int) -> bytes:
            return b"\0btmm-registry-%s-%d" % (tag.encode(), i)

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(address(index))
        except OSError as e:
            sock.close()
            raise StorageError(
                f"worker {index} of the registry on {self.path} cannot bind its notice socket:"
                f" {e}",
                hint="is another btmm serve --workers running on this database?",
            ) from e
        sock.setblocking(False)
        self._sock = sock
        lock = Path(f"{self.path}-writer")
        self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._peers = [address(i) for i in range(count) if i != index]
        self._shared = True
        self._last_seq = int(
            self._db.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]
        )

    def listen_fileno(self) -> int | None:
        return None if self._sock is None else self._sock.fileno()

    def begin_group(self) -> Notices | None:
        if not self._shared:
            return None
        if self._in_group:
            return Notices()
        self._begin_write()
        self._in_group = True
        try:
            return self._read_changes()
        except BaseException:
            self.end_group()
            raise

    def end_group(self) -> None:
        if self._in_group:
            self._in_group = False
            try:
                self._db.execute("ROLLBACK")
            finally:
                self._end_write()

    def _begin_write(self) -> None:
        """BEGIN IMMEDIATE, workers first taking turns on a lock file (``lockf``): a worker
        waiting for another's commit wakes the moment it ends, where SQLite's busy handler
        would sleep up to 100 ms between tries. The kernel drops the lock of a dead worker."""
        if self._lock_fd is not None:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX)
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._end_write()
            raise

    def _end_write(self) -> None:
        if self._lock_fd is not None:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_UN)

    def take_notices(self) -> Notices:
        if self._sock is None:
            return Notices()
        poked = False
        while True:
            try:
                self._sock.recv(64)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            poked = True
        now = time.monotonic()
        if self._in_group or (not poked and now < self._next_poll):
            # in a group we hold the write lock: nothing can have committed since we read
            return Notices()
        self._next_poll = now + 1.0
        return self._read_changes()

    def _read_changes(self) -> Notices:
        """The other workers' changes committed after the last one read (``_last_seq``)."""
        rows = self._db.execute(
            "SELECT seq, origin, zone, version, delta FROM changes WHERE seq > ? ORDER BY seq",
            (self._last_seq,),
        ).fetchall()
        if not rows:
            return Notices()
        gap = rows[0][0] != self._last_seq + 1
        self._last_seq = int(rows[-1][0])
        if gap:  # rows we never read were pruned: we are too far behind, reload everything
            return Notices(resync=True)
        zones: set[dns.name.Name] = set()
        changes: list[ChangeSet] = []
        for _, origin, z, _, text in rows:
            if origin == self.origin:
                continue
            zone, version, change = parse_delta(text)
            known = self._versions.get(z)
            if zone in zones or known is None or version > known + 1 or change is None:
                zones.add(zone)  # a gap, or no delta: reload the zone whole
            elif version == known + 1:
                changes.append(change)
                self._versions[z] = version
            # else: older than what a reload already brought
        return Notices(tuple(changes), frozenset(zones))

    def _poke(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for peer in self._peers:
            # a worker that is gone, or one whose queue is full (it will read the table)
            with contextlib.suppress(OSError):
                sock.sendto(b"\1", peer)

    def load_zone(self, zone: dns.name.Name) -> ZoneState | None:
        db = self._db
        z = _n(zone)
        own = not db.in_transaction
        if own:
            db.execute("BEGIN")  # one snapshot for the zone row and its records
        try:
            row = db.execute(
                "SELECT serial, user, version FROM zones WHERE name=?", (z,)
            ).fetchone()
            if row is None:
                self._versions.pop(z, None)
                return None
            records = []
            for n, t, rd, ttl, exp in db.execute(
                "SELECT name, rdtype, rdata, ttl, expires FROM records WHERE zone=?", (z,)
            ):
                rdata = dns.rdata.from_wire(dns.rdataclass.IN, t, bytes(rd), 0, len(rd))
                records.append(
                    RecordRow(zone, dns.name.from_text(n), t, rdata, Entry(ttl, exp))
                )
            owners = tuple(
                (dns.name.from_text(n), str(d))
                for n, d in db.execute("SELECT name, device FROM owners WHERE zone=?", (z,))
            )
        finally:
            if own:
                db.execute("COMMIT")
        self._versions[z] = int(row[2])
        return ZoneState(ZoneRow(zone, int(row[0]), row[1]), tuple(records), owners)

    def load(self) -> Snapshot:
        db = self._db
        own = not db.in_transaction
        if own:
            db.execute("BEGIN")  # one snapshot: the rows, the versions and the last change
        try:
            return self._load()
        finally:
            if own:
                db.execute("COMMIT")

    def _load(self) -> Snapshot:
        db = self._db
        rows = db.execute("SELECT name, serial, user, version FROM zones").fetchall()
        self._versions = {str(n): int(v) for n, _, _, v in rows}
        if self._shared:
            self._last_seq = int(
                db.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]
            )
        zones = tuple(ZoneRow(dns.name.from_text(n), s, u) for n, s, u, _ in rows)
        keys = tuple(
            TsigKey(
                dns.name.from_text(n),
                dns.name.from_text(a),
                bytes(sec),
                dns.name.from_text(z),
            )
            for n, a, sec, z in db.execute("SELECT name, algorithm, secret, zone FROM keys")
        ) + tuple(
            d.key for d in self._device_keys("SELECT * FROM device_keys", ())
        )
        records = []
        for z, n, t, rd, ttl, exp in db.execute(
            "SELECT zone, name, rdtype, rdata, ttl, expires FROM records"
        ):
            rdata = dns.rdata.from_wire(dns.rdataclass.IN, t, bytes(rd), 0, len(rd))
            records.append(
                RecordRow(dns.name.from_text(z), dns.name.from_text(n), t, rdata, Entry(ttl, exp))
            )
        seen = tuple(
            SeenMac(dns.name.from_text(k), t, bytes(m))
            for k, m, t in db.execute("SELECT key, mac, time_signed FROM tsig_seen")
        )
        owners = tuple(
            (dns.name.from_text(z), dns.name.from_text(n), d)
            for z, n, d in db.execute("SELECT zone, name, device FROM owners")
        )
        return Snapshot(zones, keys, tuple(records), seen, owners)

    groups_commits = True

    def commit(self, change: ChangeSet) -> None:
        self.commit_group((change,))

    def commit_group(self, changes: Sequence[ChangeSet]) -> None:
        """One transaction, hence one fsync of the WAL, for all of ``changes``.

        Shared by workers: in the transaction ``begin_group`` opened, or else in a new one
        where a zone whose version moved since this process loaded it is ``StaleZone``
        (nothing stored); each change that changed something goes into ``changes`` too, and
        the other workers are poked after the commit."""
        db = self._db
        started = time.perf_counter()
        if not self._in_group:
            self._begin_write()
        self._in_group = False
        versions = dict(self._versions)
        try:
            for change in changes:
                self._write(change)
            db.execute("COMMIT")
        except BaseException:
            self._versions = versions
            db.execute("ROLLBACK")
            raise
        finally:
            self._end_write()
        if self.commit_observer is not None:
            self.commit_observer(time.perf_counter() - started)
        if self._shared:
            self._poke()

    def _write(self, change: ChangeSet) -> None:
        db = self._db
        z = _n(change.zone)
        changed = bool(change.upserts or change.deletes or change.claims)
        if self._shared:
            row = db.execute("SELECT version FROM zones WHERE name=?", (z,)).fetchone()
            known = self._versions.get(z)
            if row is None or int(row[0]) != known:
                raise StaleZone(f"zone {change.zone} changed in another worker")
            if changed:
                self._versions[z] = known + 1
                db.execute(
                    "INSERT INTO changes (origin, zone, version, delta) VALUES (?,?,?,?)",
                    (self.origin, z, known + 1, delta_text(change, known + 1)),
                )
                self._changes_written += 1
                if self._changes_written % 512 == 0:
                    # kept for workers that fall behind; one further behind reloads all
                    db.execute("DELETE FROM changes WHERE seq < last_insert_rowid() - 20000")
        db.execute(
            "UPDATE zones SET serial=?, version=version+? WHERE name=?",
            (change.serial, 1 if changed else 0, z),
        )
        for d in change.deletes:
            db.execute(
                "DELETE FROM records WHERE zone=? AND name=? AND rdtype=? AND rkey=?",
                (z, _n(d.name), d.rdtype, d.rdata.to_digestable()),
            )
        for u in change.upserts:
            db.execute(
                "INSERT OR REPLACE INTO records VALUES (?,?,?,?,?,?,?)",
                (
                    z,
                    _n(u.name),
                    u.rdtype,
                    u.rdata.to_digestable(),
                    u.rdata.to_wire(),
                    u.entry.ttl,
                    u.entry.expires,
                ),
            )
        for s in change.seen:
            db.execute(
                "INSERT OR REPLACE INTO tsig_seen VALUES (?,?,?)",
                (_n(s.key), s.mac, s.time_signed),
            )
            self._commits += 1
            if self._commits % 256 == 0:
                # Older MACs fail the time check anyway; keep the table small.
                db.execute(
                    "DELETE FROM tsig_seen WHERE key=? AND time_signed < ?",
                    (_n(s.key), s.time_signed - 900),
                )
        for name, device in change.claims:
            db.execute("INSERT OR REPLACE INTO owners VALUES (?,?,?)", (z, _n(name), device))

    def _bump_generation(self) -> None:
        self._db.execute("UPDATE meta SET v = v + 1 WHERE k='accounts_gen'")

    def ensure_zone(self, zone: dns.name.Name, user: str | None) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO zones (name, serial, user) VALUES (?, 1, ?)", (_n(zone), user)
        )

    def zone_rows(self) -> tuple[ZoneRow, ...]:
        rows = self._db.execute("SELECT name, serial, user FROM zones")
        return tuple(ZoneRow(dns.name.from_text(n), s, u) for n, s, u in rows)

    def add_account(self, account: Account) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT 1 FROM keys WHERE user=?", (account.user,)).fetchone():
                raise StorageError(
                    f"user {account.user!r} already exists",
                    hint="use 'btmm serve user rotate-key' for a new key",
                )
            if db.execute("SELECT 1 FROM zones WHERE name=?", (_n(account.zone),)).fetchone():
                raise StorageError(f"zone {account.zone} already exists")
            db.execute(
                "INSERT INTO zones (name, serial, user) VALUES (?, 1, ?)",
                (_n(account.zone), account.user),
            )
            db.execute(
                "INSERT INTO keys VALUES (?,?,?,?,?,?)",
                (
                    _n(account.key.name),
                    account.user,
                    _n(account.zone),
                    _n(account.key.algorithm),
                    account.key.secret,
                    account.created,
                ),
            )
            self._bump_generation()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def remove_account(self, user: str) -> Account:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            found = [a for a in self.accounts() if a.user == user]
            if not found:
                raise StorageError(f"no user {user!r}", hint="see 'btmm serve user list'")
            z = _n(found[0].zone)
            db.execute("DELETE FROM keys WHERE user=?", (user,))
            db.execute("DELETE FROM zones WHERE name=?", (z,))
            db.execute("DELETE FROM records WHERE zone=?", (z,))
            db.execute("DELETE FROM device_keys WHERE zone=?", (z,))
            db.execute("DELETE FROM owners WHERE zone=?", (z,))
            self._bump_generation()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return found[0]

    def replace_key(self, user: str, key: TsigKey) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            cur = db.execute(
                "UPDATE keys SET name=?, algorithm=?, secret=?, created=? WHERE user=?",
                (_n(key.name), _n(key.algorithm), key.secret, time.time(), user),
            )
            if cur.rowcount != 1:
                raise StorageError(f"no user {user!r}", hint="see 'btmm serve user list'")
            self._bump_generation()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def accounts(self) -> list[Account]:
        rows = self._db.execute(
            "SELECT user, zone, name, algorithm, secret, created FROM keys ORDER BY user"
        )
        return [
            Account(
                u,
                dns.name.from_text(z),
                TsigKey(
                    dns.name.from_text(n), dns.name.from_text(a), bytes(s), dns.name.from_text(z)
                ),
                c,
            )
            for u, z, n, a, s, c in rows
        ]

    def generation(self) -> int:
        row = self._db.execute("SELECT v FROM meta WHERE k='accounts_gen'").fetchone()
        return int(row[0])

    def _device_keys(self, sql: str, args: tuple[object, ...]) -> list[DeviceKey]:
        out = []
        for name, user, zone, role, device, alg, secret, created, expires in self._db.execute(
            sql, args
        ):
            z = dns.name.from_text(zone)
            key = TsigKey(
                dns.name.from_text(name),
                dns.name.from_text(alg),
                bytes(secret),
                z,
                KeyRole(role),
                device,
                expires,
            )
            out.append(DeviceKey(user, key, created))
        return out

    def _insert_device_key(self, d: DeviceKey) -> None:
        k = d.key
        self._db.execute(
            "INSERT OR REPLACE INTO device_keys VALUES (?,?,?,?,?,?,?,?,?)",
            (
                _n(k.name), d.user, _n(k.zone), int(k.role), k.device, _n(k.algorithm),
                k.secret, d.created, k.expires,
            ),
        )

    def add_invite(self, invite: DeviceKey) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            # expired invites are deleted whenever a new one is made (refused before that)
            db.execute(
                "DELETE FROM device_keys WHERE role=? AND expires < ?",
                (int(KeyRole.INVITE), invite.created),
            )
            self._insert_device_key(invite)
            self._bump_generation()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def enrol_device(
        self, device: DeviceKey, *, invite: dns.name.Name | None, replace: bool, seen: SeenMac
    ) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if invite is not None:
                cur = db.execute(
                    "DELETE FROM device_keys WHERE name=? AND role=?",
                    (_n(invite), int(KeyRole.INVITE)),
                )
                if cur.rowcount != 1:
                    raise StorageError("the invite was used already or withdrawn")
            old = db.execute(
                "SELECT name FROM device_keys WHERE zone=? AND device=? AND role=?",
                (_n(device.key.zone), device.device, int(KeyRole.DEVICE)),
            ).fetchall()
            if old and not replace:
                raise StorageError(f"device {device.device!r} is enrolled already")
            for (name,) in old:
                db.execute("DELETE FROM device_keys WHERE name=?", (name,))
            self._insert_device_key(device)
            db.execute(
                "INSERT OR REPLACE INTO tsig_seen VALUES (?,?,?)",
                (_n(seen.key), seen.mac, seen.time_signed),
            )
            self._bump_generation()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def remove_device(self, user: str, device: str) -> DeviceKey:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            found = self._device_keys(
                "SELECT * FROM device_keys WHERE user=? AND device=? AND role=?",
                (user, device, int(KeyRole.DEVICE)),
            )
            if not found:
                raise StorageError(
                    f"user {user!r} has no device {device!r}",
                    hint=f"see 'btmm serve user devices {user}'",
                )
            entry = found[0]
            zone = entry.key.zone
            z = _n(zone)
            owned = {
                dns.name.from_text(n)
                for (n,) in db.execute(
                    "SELECT name FROM owners WHERE zone=? AND device=?", (z, device)
                )
            }
            rows = [
                (dns.name.from_text(n), t, bytes(k))
                for n, t, k in db.execute(
                    "SELECT name, rdtype, rkey FROM records WHERE zone=?", (z,)
                )
            ]
            gone = device_records(rows, zone, device, owned)
            own = dns.name.from_text(device, origin=zone)
            txts = [
                dns.rdata.from_wire(dns.rdataclass.IN, dns.rdatatype.TXT, bytes(w), 0, len(w))
                for (w,) in db.execute(
                    "SELECT rdata FROM records WHERE zone=? AND name=? AND rdtype=?",
                    (z, _n(own), int(dns.rdatatype.TXT)),
                )
            ]
            revoked = revocation_record(zone, device, txts, time.time())
            for n, t, k in gone:
                db.execute(
                    "DELETE FROM records WHERE zone=? AND name=? AND rdtype=? AND rkey=?",
                    (z, _n(n), t, k),
                )
            if revoked is not None:
                rname, rdata = revoked
                db.execute(
                    "INSERT OR REPLACE INTO records VALUES (?,?,?,?,?,?,?)",
                    (z, _n(rname), int(dns.rdatatype.TXT), rdata.to_digestable(),
                     rdata.to_wire(), REVOKED_TTL, None),
                )
            if gone or revoked is not None:
                (serial,) = db.execute("SELECT serial FROM zones WHERE name=?", (z,)).fetchone()
                db.execute(
                    "UPDATE zones SET serial=?, version=version+1 WHERE name=?",
                    (_next_serial(int(serial)), z),
                )
            db.execute("DELETE FROM owners WHERE zone=? AND device=?", (z, device))
            db.execute("DELETE FROM device_keys WHERE name=?", (_n(entry.key.name),))
            self._bump_generation()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return entry

    def devices(self, user: str) -> list[DeviceKey]:
        return self._device_keys(
            "SELECT * FROM device_keys WHERE user=? ORDER BY created, name", (user,)
        )


class MemoryStorage(Storage):
    """Not durable: for sans-I/O unit tests of the handler only."""

    def __init__(self) -> None:
        self.zones: dict[dns.name.Name, ZoneRow] = {}
        self.records: dict[tuple[dns.name.Name, dns.name.Name, int, bytes], RecordRow] = {}
        self.seen: dict[tuple[dns.name.Name, bytes], SeenMac] = {}
        self._accounts: dict[str, Account] = {}
        self._devices: dict[dns.name.Name, DeviceKey] = {}
        self.owners: dict[tuple[dns.name.Name, dns.name.Name], str] = {}
        self._gen = 0
        #: transactions committed: one per ``commit`` or ``commit_group``
        self.commits = 0

    def load(self) -> Snapshot:
        return Snapshot(
            tuple(self.zones.values()),
            tuple(a.key for a in self._accounts.values())
            + tuple(d.key for d in self._devices.values()),
            tuple(self.records.values()),
            tuple(self.seen.values()),
            tuple((z, n, d) for (z, n), d in self.owners.items()),
        )

    groups_commits = True

    def commit_group(self, changes: Sequence[ChangeSet]) -> None:
        for change in changes:
            self._write(change)
        self.commits += 1

    def commit(self, change: ChangeSet) -> None:
        self.commit_group((change,))

    def _write(self, change: ChangeSet) -> None:
        old = self.zones[change.zone]
        self.zones[change.zone] = ZoneRow(old.name, change.serial, old.user)
        for d in change.deletes:
            self.records.pop((d.zone, d.name, d.rdtype, d.rdata.to_digestable()), None)
        for u in change.upserts:
            self.records[(u.zone, u.name, u.rdtype, u.rdata.to_digestable())] = u
        for s in change.seen:
            self.seen[(s.key, s.mac)] = s
        for name, device in change.claims:
            self.owners[(change.zone, name)] = device

    def ensure_zone(self, zone: dns.name.Name, user: str | None) -> None:
        self.zones.setdefault(zone, ZoneRow(zone, 1, user))

    def add_account(self, account: Account) -> None:
        if account.user in self._accounts:
            raise StorageError(f"user {account.user!r} already exists")
        self._accounts[account.user] = account
        self.zones[account.zone] = ZoneRow(account.zone, 1, account.user)
        self._gen += 1

    def remove_account(self, user: str) -> Account:
        if user not in self._accounts:
            raise StorageError(f"no user {user!r}")
        account = self._accounts.pop(user)
        self.zones.pop(account.zone, None)
        for k in [k for k in self.records if k[0] == account.zone]:
            del self.records[k]
        for n in [n for n, d in self._devices.items() if d.key.zone == account.zone]:
            del self._devices[n]
        for o in [o for o in self.owners if o[0] == account.zone]:
            del self.owners[o]
        self._gen += 1
        return account

    def replace_key(self, user: str, key: TsigKey) -> None:
        old = self._accounts[user]
        self._accounts[user] = Account(user, old.zone, key, old.created)
        self._gen += 1

    def accounts(self) -> list[Account]:
        return sorted(self._accounts.values(), key=lambda a: a.user)

    def generation(self) -> int:
        return self._gen

    def add_invite(self, invite: DeviceKey) -> None:
        for n in [
            n
            for n, d in self._devices.items()
            if d.key.role == KeyRole.INVITE
            and d.key.expires is not None
            and d.key.expires < invite.created
        ]:
            del self._devices[n]
        self._devices[invite.key.name] = invite
        self._gen += 1

    def enrol_device(
        self, device: DeviceKey, *, invite: dns.name.Name | None, replace: bool, seen: SeenMac
    ) -> None:
        if invite is not None:
            used = self._devices.get(invite)
            if used is None or used.key.role != KeyRole.INVITE:
                raise StorageError("the invite was used already or withdrawn")
        old = [
            n
            for n, d in self._devices.items()
            if d.key.zone == device.key.zone
            and d.key.role == KeyRole.DEVICE
            and d.device == device.device
        ]
        if old and not replace:
            raise StorageError(f"device {device.device!r} is enrolled already")
        if invite is not None:
            del self._devices[invite]
        for n in old:
            del self._devices[n]
        self._devices[device.key.name] = device
        self.seen[(seen.key, seen.mac)] = seen
        self._gen += 1

    def remove_device(self, user: str, device: str) -> DeviceKey:
        found = [
            d
            for d in self._devices.values()
            if d.user == user and d.device == device and d.key.role == KeyRole.DEVICE
        ]
        if not found:
            raise StorageError(f"user {user!r} has no device {device!r}")
        entry = found[0]
        zone = entry.key.zone
        owned = {n for (z, n), d in self.owners.items() if z == zone and d == device}
        rows = [(k[1], k[2], k[3]) for k in self.records if k[0] == zone]
        gone = device_records(rows, zone, device, owned)
        own = dns.name.from_text(device, origin=zone)
        txts = [r.rdata for (z, n, t, _), r in self.records.items()
                if z == zone and n == own and t == dns.rdatatype.TXT]
        revoked = revocation_record(zone, device, txts, time.time())
        for n, t, k in gone:
            del self.records[(zone, n, t, k)]
        if revoked is not None:
            rname, rdata = revoked
            self.records[(zone, rname, dns.rdatatype.TXT, rdata.to_digestable())] = RecordRow(
                zone, rname, dns.rdatatype.TXT, rdata, Entry(REVOKED_TTL, None))
        if gone or revoked is not None:
            old = self.zones[zone]
            self.zones[zone] = ZoneRow(zone, _next_serial(old.serial), old.user)
        for n in owned:
            del self.owners[(zone, n)]
        del self._devices[entry.key.name]
        self._gen += 1
        return entry

    def devices(self, user: str) -> list[DeviceKey]:
        return sorted(
            (d for d in self._devices.values() if d.user == user),
            key=lambda d: (d.created, d.key.name.to_text()),
        )


# ---- change notices: a committed change as text, for the other servers or workers --------

#: What a PostgreSQL notice carries at most (its limit is 8000 bytes); a bigger change is
#: announced without its rows, and the others reload the zone.
MAX_NOTICE = 7000


def delta_text(change: ChangeSet, version: int, max_len: int | None = None) -> str:
    """A committed change as a notice: JSON with the rows (rdata in wire form, base64); over
    ``max_len`` characters, only the zone and version (the receiver reloads the zone)."""
    delta: dict[str, Any] = {"z": change.zone.to_text(), "v": version}
    body = dict(
        delta,
        s=change.serial,
        c=int(change.cause),
        u=[
            [u.name.to_text(), u.rdtype, u.entry.ttl, u.entry.expires,
             _b64(u.rdata)]
            for u in change.upserts
        ],
        d=[
            [d.name.to_text(), d.rdtype, _b64(d.rdata)]
            for d in change.deletes
        ],
        o=[[n.to_text(), device] for n, device in change.claims],
    )
    text = json.dumps(body, separators=(",", ":"))
    if max_len is not None and len(text) > max_len:
        return json.dumps(delta, separators=(",", ":"))
    return text


def _b64(rdata: dns.rdata.Rdata) -> str:
    return base64.b64encode(rdata.to_wire() or b"").decode()


def _rdata(rdtype: int, b64: str) -> dns.rdata.Rdata:
    return rdata_wire(rdtype, base64.b64decode(b64))


def rdata_wire(rdtype: int, wire: bytes) -> dns.rdata.Rdata:
    return dns.rdata.from_wire(
        dns.rdataclass.IN, dns.rdatatype.RdataType.make(rdtype), wire, 0, len(wire)
    )


def parse_delta(text: str) -> tuple[dns.name.Name, int, ChangeSet | None]:
    """A notice's zone, version and change (None: the others must reload the zone)."""
    d = json.loads(text)
    zone = dns.name.from_text(d["z"])
    if "s" not in d:
        return zone, int(d["v"]), None
    change = ChangeSet(
        zone,
        int(d["s"]),
        upserts=tuple(
            RecordRow(zone, dns.name.from_text(n), t, _rdata(t, rd), Entry(ttl, exp))
            for n, t, ttl, exp, rd in d["u"]
        ),
        deletes=tuple(
            RecordKey(zone, dns.name.from_text(n), t, _rdata(t, rd)) for n, t, rd in d["d"]
        ),
        cause=Cause(d["c"]),
        claims=tuple((dns.name.from_text(n), str(dev)) for n, dev in d["o"]),
    )
    return zone, int(d["v"]), change
