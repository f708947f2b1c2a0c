"""Durable storage for the registry behind one interface, with the SQLite (WAL) backend.

``Storage.commit`` returns only once the change set is durable: the server answers NOERROR to
an update after that and not before (DESIGN.md decision 4). A clustered backend later fits
behind the same abstract class. The memory backend is for unit tests and is not durable.
"""

from __future__ import annotations

import abc
import os
import sqlite3
import stat
import time
from pathlib import Path

import dns.name
import dns.rdata
import dns.rdataclass

from btmm_core.errors import ConfigError
from btmm_core.registry.model import (
    Account,
    ChangeSet,
    Entry,
    RecordRow,
    SeenMac,
    Snapshot,
    ZoneRow,
)
from btmm_core.registry.tsig import TsigKey


class StorageError(ConfigError):
    """The registry's database cannot be used (missing, locked, corrupt, or a bad account)."""


class Storage(abc.ABC):
    """The registry's durable state: zones, keys, records with lease deadlines, seen MACs."""

    @abc.abstractmethod
    def load(self) -> Snapshot: ...

    @abc.abstractmethod
    def commit(self, change: ChangeSet) -> None:
        """Apply ``change`` atomically; durable when this returns."""

    @abc.abstractmethod
    def ensure_zone(self, zone: dns.name.Name, user: str | None) -> None: ...

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

    def close(self) -> None:
        return None


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
"""


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
        try:
            _create_private(path)
            self._db = sqlite3.connect(str(path), timeout=10.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('accounts_gen', 0)")
        except (sqlite3.Error, OSError) as e:
            raise StorageError(
                f"cannot open the registry database {path}: {e}",
                hint="check the path given with --db and its permissions",
            ) from e

    def close(self) -> None:
        self._db.close()

    def load(self) -> Snapshot:
        db = self._db
        zones = tuple(
            ZoneRow(dns.name.from_text(n), s, u)
            for n, s, u in db.execute("SELECT name, serial, user FROM zones")
        )
        keys = tuple(
            TsigKey(
                dns.name.from_text(n),
                dns.name.from_text(a),
                bytes(sec),
                dns.name.from_text(z),
            )
            for n, a, sec, z in db.execute("SELECT name, algorithm, secret, zone FROM keys")
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
        return Snapshot(zones, keys, tuple(records), seen)

    def commit(self, change: ChangeSet) -> None:
        db = self._db
        z = _n(change.zone)
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("UPDATE zones SET serial=? WHERE name=?", (change.serial, z))
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
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _bump_generation(self) -> None:
        self._db.execute("UPDATE meta SET v = v + 1 WHERE k='accounts_gen'")

    def ensure_zone(self, zone: dns.name.Name, user: str | None) -> None:
        self._db.execute("INSERT OR IGNORE INTO zones VALUES (?, 1, ?)", (_n(zone), user))

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
            db.execute("INSERT INTO zones VALUES (?, 1, ?)", (_n(account.zone), account.user))
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


class MemoryStorage(Storage):
    """Not durable: for sans-I/O unit tests of the handler only."""

    def __init__(self) -> None:
        self.zones: dict[dns.name.Name, ZoneRow] = {}
        self.records: dict[tuple[dns.name.Name, dns.name.Name, int, bytes], RecordRow] = {}
        self.seen: dict[tuple[dns.name.Name, bytes], SeenMac] = {}
        self._accounts: dict[str, Account] = {}
        self._gen = 0
        self.commits = 0

    def load(self) -> Snapshot:
        return Snapshot(
            tuple(self.zones.values()),
            tuple(a.key for a in self._accounts.values()),
            tuple(self.records.values()),
            tuple(self.seen.values()),
        )

    def commit(self, change: ChangeSet) -> None:
        old = self.zones[change.zone]
        self.zones[change.zone] = ZoneRow(old.name, change.serial, old.user)
        for d in change.deletes:
            self.records.pop((d.zone, d.name, d.rdtype, d.rdata.to_digestable()), None)
        for u in change.upserts:
            self.records[(u.zone, u.name, u.rdtype, u.rdata.to_digestable())] = u
        for s in change.seen:
            self.seen[(s.key, s.mac)] = s
        self.commits += 1

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
