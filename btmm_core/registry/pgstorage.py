"""The registry's storage on PostgreSQL, shared by several ``btmm serve`` processes.

psycopg 3, synchronous: the ``Storage`` interface is synchronous (the core commits inside
``RegistryCore.receive`` and answers after), as SQLite's is, so an asyncio driver would buy
nothing here but a second interface to keep in step; psycopg's binary build also prepares the
statements a server repeats. (asyncpg speaks only asyncio.)

One truth for N servers (docs/architecture.md section 5, "Several servers"):

- **Durable before answered.** A commit returns after PostgreSQL's COMMIT did, with
  ``synchronous_commit`` as the cluster has it (on, by default: the WAL is flushed).
- **One statement per commit.** ``btmm_commit`` (a PL/pgSQL function, schema version 3) does
  the checks below, writes the rows and sends the notice in one call, which in autocommit is
  one round trip and one transaction: a third of the time of a statement per step.
- **Optimistic per zone.** Each zone row has a ``version``, bumped by every commit that changes
  the zone. A commit locks the zone row (``SELECT ... FOR UPDATE``) and goes ahead only if the
  version is the one this server last loaded; otherwise it stores nothing and raises
  ``StaleZone``, the zone store reloads that one zone and the core plans the update again. So
  prerequisites are always judged on the committed state, and two servers never interleave
  inside one zone.
- **Lease expiry exactly once.** Expiry is a commit like any other (its deletes were computed
  from a zone state whose version it checks under the row lock), taken with ``FOR UPDATE SKIP
  LOCKED``: a server that finds the zone locked by another does not wait, it tries again a
  little later, by when the holder's change has reached it. Only one transaction can delete a
  row, so each expired record goes once, whichever server gets there first; a server killed
  mid-expiry rolls back and another does it. No leader, no advisory lock to lose with a session.
- **Fan-out by LISTEN/NOTIFY.** A commit that changed a zone sends ``NOTIFY btmm_changes``
  inside its transaction (so only committed changes are announced, in commit order) with its
  origin, the zone, its new version and the change itself (rows as JSON, rdata in wire form;
  a change over ``MAX_NOTICE`` bytes goes without its rows). Every server LISTENs on a second
  connection and applies another's change when it follows the version it holds, as it applies
  its own commits, then tells its observers (LLQ); on a gap, or without rows, it reloads that
  one zone. Logical decoding would carry the rows too, but needs a replication slot per
  server (which holds WAL back while a server is down) and ``wal_level=logical``. When the
  listening connection drops, notices may be lost, so the next ``take_notices`` says
  ``resync`` and the server reloads everything.
- **TSIG replay across servers.** Accepted MACs go into ``tsig_seen`` in the same transaction
  as the change they signed; a MAC already there, or a Time Signed older than the newest of its
  key, refuses the commit (``Replayed``): an UPDATE replayed to another server is refused.
- **Losing the database.** Any failure to reach it is ``DatabaseUnavailable``; nothing is
  stored and the core answers SERVFAIL. Reconnection is tried again at most every
  ``RETRY_INTERVAL`` seconds, on the next use.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import psycopg
import structlog
from psycopg.conninfo import conninfo_to_dict

from btmm_core.dns.tsig import KeyRole, TsigKey
from btmm_core.registry.model import (
    Account,
    Cause,
    ChangeSet,
    DeviceKey,
    Entry,
    RecordRow,
    SeenMac,
    Snapshot,
    ZoneRow,
)
from btmm_core.registry.storage import (
    MAX_NOTICE,
    REVOKED_TTL,
    DatabaseUnavailable,
    Notices,
    Replayed,
    StaleZone,
    Storage,
    StorageError,
    ZoneBusy,
    ZoneState,
    delta_text,
    device_records,
    parse_delta,
    rdata_wire,
    revocation_record,
)

log = structlog.get_logger("btmm.registry")

#: A row as psycopg returns it (the columns' Python types follow the schema above).
Row = tuple[Any, ...]

CHANNEL = "btmm_changes"
#: Seconds between two attempts to reach a database that went away.
RETRY_INTERVAL = 0.5
#: Any constant: the advisory lock that lets one server at a time apply migrations.
_MIGRATION_LOCK = 0x62746D6D

#: The schema, one step per version; a database is brought to the last one at open (and by
#: ``btmm serve db upgrade``). Steps are only ever appended: a released step never changes.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "zones, keys, records, seen MACs, device keys, owners",
        """
        CREATE TABLE zones (
            name text PRIMARY KEY, serial bigint NOT NULL, username text UNIQUE,
            version bigint NOT NULL DEFAULT 0
        );
        CREATE TABLE keys (
            name text PRIMARY KEY, username text NOT NULL UNIQUE, zone text NOT NULL,
            algorithm text NOT NULL, secret bytea NOT NULL, created double precision NOT NULL
        );
        CREATE TABLE records (
            zone text NOT NULL, name text NOT NULL, rdtype integer NOT NULL, rkey bytea NOT NULL,
            rdata bytea NOT NULL, ttl integer NOT NULL, expires double precision,
            PRIMARY KEY (zone, name, rdtype, rkey)
        );
        CREATE TABLE tsig_seen (
            key text NOT NULL, mac bytea NOT NULL, time_signed bigint NOT NULL,
            PRIMARY KEY (key, mac)
        );
        CREATE INDEX tsig_seen_time ON tsig_seen (key, time_signed);
        CREATE TABLE meta (k text PRIMARY KEY, v bigint NOT NULL);
        INSERT INTO meta VALUES ('accounts_gen', 0);
        CREATE TABLE device_keys (
            name text PRIMARY KEY, username text NOT NULL, zone text NOT NULL,
            role integer NOT NULL, device text, algorithm text NOT NULL, secret bytea NOT NULL,
            created double precision NOT NULL, expires double precision
        );
        CREATE UNIQUE INDEX device_keys_device ON device_keys (zone, device) WHERE role = 2;
        CREATE TABLE owners (
            zone text NOT NULL, name text NOT NULL, device text NOT NULL,
            PRIMARY KEY (zone, name)
        );
        """,
    ),
    (
        2,
        "records by zone (the reload of one zone after another server's notice)",
        "CREATE INDEX records_zone ON records (zone);",
    ),
    (
        3,
        "btmm_commit: one change set in one statement (one round trip, one implicit transaction)",
        """
        CREATE FUNCTION btmm_commit(
            p_zone text, p_known bigint, p_serial bigint, p_skip_locked boolean,
            p_seen_keys text[], p_seen_macs bytea[], p_seen_times bigint[], p_prune boolean,
            p_del_names text[], p_del_types integer[], p_del_keys bytea[],
            p_up_names text[], p_up_types integer[], p_up_keys bytea[], p_up_rdata bytea[],
            p_up_ttls integer[], p_up_expires double precision[],
            p_claim_names text[], p_claim_devices text[],
            p_channel text, p_notice text
        ) RETURNS bigint LANGUAGE plpgsql AS $$
        DECLARE
            v_version bigint;
            v_newest bigint;
        BEGIN
            IF p_skip_locked THEN
                SELECT version INTO v_version FROM zones WHERE name = p_zone
                    FOR UPDATE SKIP LOCKED;
                IF NOT FOUND THEN
                    RAISE EXCEPTION 'zone % is being written by another server', p_zone
                        USING ERRCODE = 'BTM02';
                END IF;
            ELSE
                SELECT version INTO v_version FROM zones WHERE name = p_zone FOR UPDATE;
                IF NOT FOUND THEN
                    RAISE EXCEPTION 'zone % is gone from the database', p_zone
                        USING ERRCODE = 'BTM01';
                END IF;
            END IF;
            FOR i IN 1 .. coalesce(array_length(p_seen_keys, 1), 0) LOOP
                SELECT max(time_signed) INTO v_newest FROM tsig_seen WHERE key = p_seen_keys[i];
                IF v_newest IS NOT NULL AND p_seen_times[i] < v_newest THEN
                    RAISE EXCEPTION 'a newer Time Signed of % was accepted already',
                        p_seen_keys[i] USING ERRCODE = 'BTM03';
                END IF;
                INSERT INTO tsig_seen VALUES (p_seen_keys[i], p_seen_macs[i], p_seen_times[i])
                    ON CONFLICT DO NOTHING;
                IF NOT FOUND THEN
                    RAISE EXCEPTION 'this MAC of % was accepted already', p_seen_keys[i]
                        USING ERRCODE = 'BTM03';
                END IF;
                IF p_prune THEN
                    DELETE FROM tsig_seen
                        WHERE key = p_seen_keys[i] AND time_signed < p_seen_times[i] - 900;
                END IF;
            END LOOP;
            IF v_version <> p_known THEN
                RAISE EXCEPTION 'zone % was changed by another server', p_zone
                    USING ERRCODE = 'BTM01';
            END IF;
            IF p_notice IS NULL THEN
                RETURN v_version;
            END IF;
            UPDATE zones SET serial = p_serial, version = version + 1 WHERE name = p_zone;
            DELETE FROM records r USING unnest(p_del_names, p_del_types, p_del_keys) AS d(n, t, k)
                WHERE r.zone = p_zone AND r.name = d.n AND r.rdtype = d.t AND r.rkey = d.k;
            INSERT INTO records
                SELECT p_zone, u.* FROM unnest(
                    p_up_names, p_up_types, p_up_keys, p_up_rdata, p_up_ttls, p_up_expires) AS u
                ON CONFLICT (zone, name, rdtype, rkey) DO UPDATE
                    SET rdata = EXCLUDED.rdata, ttl = EXCLUDED.ttl, expires = EXCLUDED.expires;
            INSERT INTO owners
                SELECT p_zone, c.* FROM unnest(p_claim_names, p_claim_devices) AS c
                ON CONFLICT (zone, name) DO UPDATE SET device = EXCLUDED.device;
            PERFORM pg_notify(p_channel, p_notice);
            RETURN v_version + 1;
        END
        $$;
        """,
    ),
)

#: SQLSTATEs that ``btmm_commit`` raises, and what they mean here.
_REFUSALS: dict[str, type[StorageError]] = {
    "BTM01": StaleZone,
    "BTM02": ZoneBusy,
    "BTM03": Replayed,
}


def _n(name: dns.name.Name) -> str:
    return name.to_text().lower()


def _record(z: str, n: str, t: int, rd: bytes, ttl: int, exp: float | None) -> RecordRow:
    rdata = dns.rdata.from_wire(dns.rdataclass.IN, dns.rdatatype.RdataType.make(t), rd, 0, len(rd))
    return RecordRow(dns.name.from_text(z), dns.name.from_text(n), t, rdata, Entry(ttl, exp))


def _device_key(row: Row) -> DeviceKey:
    name, user, zone, role, device, alg, secret, created, expires = row
    z = dns.name.from_text(str(zone))
    key = TsigKey(
        dns.name.from_text(str(name)),
        dns.name.from_text(str(alg)),
        bytes(secret),
        z,
        KeyRole(int(role)),
        None if device is None else str(device),
        None if expires is None else float(expires),
    )
    return DeviceKey(str(user), key, float(created))


_DEVICE_COLUMNS = "name, username, zone, role, device, algorithm, secret, created, expires"


class PgStorage(Storage):
    """PostgreSQL behind ``Storage``, for one or several servers on one database."""

    def __init__(self, url: str, *, upgrade: bool = True, notices: bool = False) -> None:
        """``notices``: listen for other servers' commits (a server does; ``btmm serve user``
        does not). Listening starts here, before anything is loaded, so that no commit falls
        between a load and the first notice."""
        self.url = url
        #: This process's name in the notices, so that it skips its own.
        self.origin = os.urandom(6).hex()
        self._db: psycopg.Connection[Row] | None = None
        self._listen: psycopg.Connection[Row] | None = None
        #: Broken listening connections, closed at the next ``take_notices`` (by then the
        #: driver no longer watches their descriptor).
        self._dead: list[psycopg.Connection[Row]] = []
        self._retry_at = 0.0
        self._listen_retry_at = 0.0
        self._notices = notices
        #: Whether a listening connection existed before: a new one means notices were lost.
        self._listened = False
        self._resync = False
        self._commits = 0
        #: The version of each zone (by its text) that this process's memory holds.
        self._versions: dict[str, int] = {}
        try:
            self._db = self._connect()
        except psycopg.Error as e:
            raise StorageError(
                f"cannot connect to the registry database: {_reason(e)}",
                hint="check the postgresql:// URL given with --database and that the server"
                " runs",
            ) from e
        if upgrade:
            self.upgrade()
        elif self.schema_version() != MIGRATIONS[-1][0]:
            raise StorageError(
                f"the registry database is at schema version {self.schema_version()}, this btmm"
                f" needs {MIGRATIONS[-1][0]}",
                hint="run 'btmm serve --database URL db upgrade'",
            )
        if notices:
            self._start_listening()

    # -- connections ---------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Row]:
        # The event loop waits for every statement, so none may wait long: a zone row held by
        # a stuck server or a database that stopped answering is an error (SERVFAIL), not a
        # hang. TCP keepalives notice a peer that vanished. What the URL says wins.
        params: dict[str, Any] = {
            "connect_timeout": 3,
            "options": "-c lock_timeout=2000 -c statement_timeout=5000",
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 3,
            "keepalives_count": 3,
        }
        params.update(conninfo_to_dict(self.url))
        return psycopg.connect(autocommit=True, **params)

    def _conn(self) -> psycopg.Connection[Row]:
        db = self._db
        if db is not None and not db.closed and not db.broken:
            return db
        now = time.monotonic()
        if now < self._retry_at:
            raise DatabaseUnavailable("the registry database is unreachable; retrying")
        if db is not None:
            with contextlib.suppress(Exception):
                db.close()
            self._db = None
        try:
            self._db = self._connect()
        except psycopg.Error as e:
            self._retry_at = now + RETRY_INTERVAL
            raise DatabaseUnavailable(
                f"the registry database is unreachable: {_reason(e)}"
            ) from e
        log.info("reconnected to the registry database")
        # What this process loaded may be older than the database now (a commit whose COMMIT
        # was cut off may have happened): reload everything.
        self._resync = True
        return self._db

    @contextlib.contextmanager
    def _tx(self, *, snapshot: bool = False) -> Iterator[psycopg.Cursor[Row]]:
        conn = self._conn()
        try:
            with conn.transaction(), conn.cursor() as cur:
                if snapshot:
                    cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                yield cur
        except psycopg.OperationalError as e:
            self._retry_at = time.monotonic() + RETRY_INTERVAL if conn.broken else 0.0
            raise DatabaseUnavailable(f"the registry database failed: {_reason(e)}") from e
        except psycopg.Error as e:
            raise StorageError(f"the registry database refused: {_reason(e)}") from e

    def close(self) -> None:
        for conn in (self._db, self._listen, *self._dead):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        self._db = self._listen = None
        self._dead = []

    # -- schema ----------------------------------------------------------------------------

    def schema_version(self) -> int:
        with self._tx() as cur:
            cur.execute("SELECT to_regclass('btmm_schema') IS NOT NULL")
            if not _one(cur)[0]:
                return 0
            row = cur.execute("SELECT version FROM btmm_schema").fetchone()
            return 0 if row is None else int(row[0])

    def upgrade(self) -> list[int]:
        """Apply the migrations the database lacks, in one transaction; returns their versions.

        Servers starting together take turns on an advisory lock, so each step runs once.
        """
        applied = []
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            cur.execute("CREATE TABLE IF NOT EXISTS btmm_schema (version integer NOT NULL)")
            row = cur.execute("SELECT version FROM btmm_schema").fetchone()
            have = 0 if row is None else int(row[0])
            if have > MIGRATIONS[-1][0]:
                raise StorageError(
                    f"the registry database is at schema version {have}, newer than this btmm"
                    f" knows ({MIGRATIONS[-1][0]})",
                    hint="run the newer btmm on it, or upgrade this one",
                )
            for version, _, sql in MIGRATIONS:
                if version > have:
                    cur.execute(sql.encode())
                    applied.append(version)
            if row is None:
                cur.execute("INSERT INTO btmm_schema VALUES (%s)", (MIGRATIONS[-1][0],))
            elif applied:
                cur.execute("UPDATE btmm_schema SET version = %s", (MIGRATIONS[-1][0],))
        if applied:
            log.info("registry database upgraded", versions=applied)
        return applied

    # -- zones and records -----------------------------------------------------------------

    def load(self) -> Snapshot:
        with self._tx(snapshot=True) as cur:
            zone_rows = cur.execute("SELECT name, serial, username, version FROM zones").fetchall()
            keys = cur.execute("SELECT name, algorithm, secret, zone FROM keys").fetchall()
            devices = cur.execute(f"SELECT {_DEVICE_COLUMNS} FROM device_keys").fetchall()
            records = cur.execute(
                "SELECT zone, name, rdtype, rdata, ttl, expires FROM records"
            ).fetchall()
            seen = cur.execute("SELECT key, mac, time_signed FROM tsig_seen").fetchall()
            owners = cur.execute("SELECT zone, name, device FROM owners").fetchall()
        self._versions = {str(r[0]): int(r[3]) for r in zone_rows}
        return Snapshot(
            tuple(
                ZoneRow(dns.name.from_text(str(n)), int(s), None if u is None else str(u))
                for n, s, u, _ in zone_rows
            ),
            tuple(
                TsigKey(
                    dns.name.from_text(str(n)),
                    dns.name.from_text(str(a)),
                    bytes(sec),
                    dns.name.from_text(str(z)),
                )
                for n, a, sec, z in keys
            )
            + tuple(_device_key(d).key for d in devices),
            tuple(_record(*r) for r in records),
            tuple(
                SeenMac(dns.name.from_text(str(k)), int(t), bytes(m))
                for k, m, t in seen
            ),
            tuple(
                (dns.name.from_text(str(z)), dns.name.from_text(str(n)), str(d))
                for z, n, d in owners
            ),
        )

    def load_zone(self, zone: dns.name.Name) -> ZoneState | None:
        z = _n(zone)
        with self._tx(snapshot=True) as cur:
            row = cur.execute(
                "SELECT serial, username, version FROM zones WHERE name=%s", (z,)
            ).fetchone()
            if row is None:
                self._versions.pop(z, None)
                return None
            records = cur.execute(
                "SELECT zone, name, rdtype, rdata, ttl, expires FROM records WHERE zone=%s", (z,)
            ).fetchall()
            owners = cur.execute("SELECT name, device FROM owners WHERE zone=%s", (z,)).fetchall()
        serial, user, version = row
        self._versions[z] = int(version)
        return ZoneState(
            ZoneRow(zone, int(serial), None if user is None else str(user)),
            tuple(_record(*r) for r in records),
            tuple((dns.name.from_text(str(n)), str(d)) for n, d in owners),
        )

    def commit(self, change: ChangeSet) -> None:
        """One call of ``btmm_commit`` (migration 3) in autocommit: the checks (zone version
        under the row lock, seen MACs, newest Time Signed), the rows and the notice go in one
        statement, one round trip and one implicit transaction.

        SKIP LOCKED only for expiry: an update must not be refused because another server is
        writing the zone; it waits its turn (a few ms, at most ``lock_timeout``).
        """
        z = _n(change.zone)
        known = self._versions.get(z)
        if known is None:
            raise StaleZone(f"zone {change.zone} is not loaded here yet")
        # one row per key (last wins), as the one INSERT ... ON CONFLICT needs
        ups = {
            (_n(u.name), u.rdtype, u.rdata.to_digestable()): u for u in change.upserts
        }
        dels = {(_n(d.name), d.rdtype, d.rdata.to_digestable()) for d in change.deletes}
        claims = {_n(name): device for name, device in change.claims}
        changed = bool(ups or dels or claims)
        self._commits += len(change.seen)
        params = (
            z,
            known,
            change.serial,
            change.cause == Cause.EXPIRY,
            [_n(x.key) for x in change.seen],
            [x.mac for x in change.seen],
            [x.time_signed for x in change.seen],
            self._commits % 256 < len(change.seen),  # now and then: keep tsig_seen small
            [k[0] for k in dels],
            [k[1] for k in dels],
            [k[2] for k in dels],
            [k[0] for k in ups],
            [k[1] for k in ups],
            [k[2] for k in ups],
            [u.rdata.to_wire() for u in ups.values()],
            [u.entry.ttl for u in ups.values()],
            [u.entry.expires for u in ups.values()],
            list(claims),
            list(claims.values()),
            CHANNEL,
            f"{self.origin} {delta_text(change, known + 1, MAX_NOTICE)}" if changed else None,
        )
        conn = self._conn()
        try:
            row = conn.execute(
                "SELECT btmm_commit(%s, %s, %s, %s, %s::text[], %s::bytea[], %s::bigint[], %s,"
                " %s::text[], %s::integer[], %s::bytea[], %s::text[], %s::integer[],"
                " %s::bytea[], %s::bytea[], %s::integer[], %s::double precision[],"
                " %s::text[], %s::text[], %s, %s)",
                params,
            ).fetchone()
        except psycopg.Error as e:
            refusal = _REFUSALS.get(e.sqlstate or "")
            if refusal is not None:
                raise refusal(_reason(e)) from None
            if isinstance(e, psycopg.OperationalError):
                self._retry_at = time.monotonic() + RETRY_INTERVAL if conn.broken else 0.0
                raise DatabaseUnavailable(f"the registry database failed: {_reason(e)}") from e
            raise StorageError(f"the registry database refused: {_reason(e)}") from e
        if row is not None:
            self._versions[z] = int(row[0])

    def ensure_zone(self, zone: dns.name.Name, user: str | None) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO zones (name, serial, username) VALUES (%s, 1, %s)"
                " ON CONFLICT DO NOTHING",
                (_n(zone), user),
            )

    def zone_rows(self) -> tuple[ZoneRow, ...]:
        with self._tx() as cur:
            rows = cur.execute("SELECT name, serial, username FROM zones").fetchall()
        return tuple(
            ZoneRow(dns.name.from_text(str(n)), int(s), None if u is None else str(u))
            for n, s, u in rows
        )

    # -- notices from other servers ----------------------------------------------------------

    def listen_fileno(self) -> int | None:
        conn = self._listen
        if conn is None or conn.closed or conn.broken:
            return None
        return int(conn.pgconn.socket)

    def take_notices(self) -> Notices:
        for dead in self._dead:
            with contextlib.suppress(Exception):
                dead.close()
        self._dead = []
        if self._notices and (
            self._listen is None or self._listen.closed or self._listen.broken
        ):
            self._start_listening()
        zones: set[dns.name.Name] = set()
        changes: list[ChangeSet] = []
        accounts = False
        conn = self._listen
        if conn is not None:
            pg = conn.pgconn
            try:
                pg.consume_input()
                while (notice := pg.notifies()) is not None:
                    origin, _, what = notice.extra.decode().partition(" ")
                    if origin == self.origin:
                        continue
                    if what == "*accounts":
                        accounts = True
                        continue
                    zone, version, change = parse_delta(what)
                    z = _n(zone)
                    known = self._versions.get(z)
                    if zone in zones or known is None or version > known + 1 or change is None:
                        zones.add(zone)  # a gap, or no delta: reload the zone whole
                    elif version == known + 1:
                        changes.append(change)
                        self._versions[z] = version
                    # else: older than what a reload already brought
            except psycopg.Error as e:
                log.warning("lost the registry database's notices", error=_reason(e))
                self._dead.append(conn)
                self._listen = None
                self._resync = True
        resync, self._resync = self._resync, False
        return Notices(tuple(changes), frozenset(zones), accounts, resync)

    def _start_listening(self) -> None:
        now = time.monotonic()
        if now < self._listen_retry_at:
            return
        if self._listen is not None:
            self._dead.append(self._listen)
            self._listen = None
        try:
            conn = self._connect()
            conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error:
            self._listen_retry_at = now + RETRY_INTERVAL
            return
        if self._listened:
            # it was listening before: what happened meanwhile is unknown
            self._resync = True
        self._listened = True
        self._listen = conn

    def _notify_accounts(self, cur: psycopg.Cursor[Row]) -> None:
        cur.execute("UPDATE meta SET v = v + 1 WHERE k='accounts_gen'")
        cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{self.origin} *accounts"))

    # -- accounts and devices ------------------------------------------------------------------

    def add_account(self, account: Account) -> None:
        with self._tx() as cur:
            cur.execute("LOCK TABLE keys IN SHARE ROW EXCLUSIVE MODE")
            if cur.execute("SELECT 1 FROM keys WHERE username=%s", (account.user,)).fetchone():
                raise StorageError(
                    f"user {account.user!r} already exists",
                    hint="use 'btmm serve user rotate-key' for a new key",
                )
            z = _n(account.zone)
            if cur.execute("SELECT 1 FROM zones WHERE name=%s", (z,)).fetchone():
                raise StorageError(f"zone {account.zone} already exists")
            cur.execute(
                "INSERT INTO zones (name, serial, username) VALUES (%s, 1, %s)", (z, account.user)
            )
            cur.execute(
                "INSERT INTO keys VALUES (%s,%s,%s,%s,%s,%s)",
                (
                    _n(account.key.name),
                    account.user,
                    z,
                    _n(account.key.algorithm),
                    account.key.secret,
                    account.created,
                ),
            )
            self._notify_accounts(cur)

    def remove_account(self, user: str) -> Account:
        with self._tx() as cur:
            found = self._accounts(cur, user)
            if not found:
                raise StorageError(f"no user {user!r}", hint="see 'btmm serve user list'")
            z = _n(found[0].zone)
            cur.execute("DELETE FROM keys WHERE username=%s", (user,))
            cur.execute("DELETE FROM zones WHERE name=%s", (z,))
            cur.execute("DELETE FROM records WHERE zone=%s", (z,))
            cur.execute("DELETE FROM device_keys WHERE zone=%s", (z,))
            cur.execute("DELETE FROM owners WHERE zone=%s", (z,))
            self._notify_accounts(cur)
        return found[0]

    def replace_key(self, user: str, key: TsigKey) -> None:
        with self._tx() as cur:
            cur.execute(
                "UPDATE keys SET name=%s, algorithm=%s, secret=%s, created=%s WHERE username=%s",
                (_n(key.name), _n(key.algorithm), key.secret, time.time(), user),
            )
            if cur.rowcount != 1:
                raise StorageError(f"no user {user!r}", hint="see 'btmm serve user list'")
            self._notify_accounts(cur)

    def accounts(self) -> list[Account]:
        with self._tx() as cur:
            return self._accounts(cur, None)

    @staticmethod
    def _accounts(cur: psycopg.Cursor[Row], user: str | None) -> list[Account]:
        sql = "SELECT username, zone, name, algorithm, secret, created FROM keys"
        rows = cur.execute(
            sql + (" WHERE username=%s" if user is not None else "") + " ORDER BY username",
            (user,) if user is not None else (),
        ).fetchall()
        return [
            Account(
                str(u),
                dns.name.from_text(str(z)),
                TsigKey(
                    dns.name.from_text(str(n)),
                    dns.name.from_text(str(a)),
                    bytes(s),
                    dns.name.from_text(str(z)),
                ),
                float(c),
            )
            for u, z, n, a, s, c in rows
        ]

    def generation(self) -> int:
        with self._tx() as cur:
            return int(_one(cur.execute("SELECT v FROM meta WHERE k='accounts_gen'"))[0])

    def _insert_device_key(self, cur: psycopg.Cursor[Row], d: DeviceKey) -> None:
        k = d.key
        cur.execute(
            f"INSERT INTO device_keys ({_DEVICE_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)"
            " ON CONFLICT (name) DO UPDATE SET username=EXCLUDED.username, zone=EXCLUDED.zone,"
            " role=EXCLUDED.role, device=EXCLUDED.device, algorithm=EXCLUDED.algorithm,"
            " secret=EXCLUDED.secret, created=EXCLUDED.created, expires=EXCLUDED.expires",
            (
                _n(k.name), d.user, _n(k.zone), int(k.role), k.device, _n(k.algorithm),
                k.secret, d.created, k.expires,
            ),
        )

    def add_invite(self, invite: DeviceKey) -> None:
        with self._tx() as cur:
            # expired invites are deleted whenever a new one is made (refused before that)
            cur.execute(
                "DELETE FROM device_keys WHERE role=%s AND expires < %s",
                (int(KeyRole.INVITE), invite.created),
            )
            self._insert_device_key(cur, invite)
            self._notify_accounts(cur)

    def enrol_device(
        self, device: DeviceKey, *, invite: dns.name.Name | None, replace: bool, seen: SeenMac
    ) -> None:
        with self._tx() as cur:
            # the zone row serialises enrolments of one zone across servers
            cur.execute("SELECT 1 FROM zones WHERE name=%s FOR UPDATE", (_n(device.key.zone),))
            if invite is not None:
                cur.execute(
                    "DELETE FROM device_keys WHERE name=%s AND role=%s",
                    (_n(invite), int(KeyRole.INVITE)),
                )
                if cur.rowcount != 1:
                    raise StorageError("the invite was used already or withdrawn")
            old = cur.execute(
                "SELECT name FROM device_keys WHERE zone=%s AND device=%s AND role=%s",
                (_n(device.key.zone), device.device, int(KeyRole.DEVICE)),
            ).fetchall()
            if old and not replace:
                raise StorageError(f"device {device.device!r} is enrolled already")
            for (name,) in old:
                cur.execute("DELETE FROM device_keys WHERE name=%s", (name,))
            self._insert_device_key(cur, device)
            cur.execute(
                "INSERT INTO tsig_seen VALUES (%s,%s,%s) ON CONFLICT DO NOTHING",
                (_n(seen.key), seen.mac, seen.time_signed),
            )
            if cur.rowcount != 1:
                raise Replayed(f"this MAC of {seen.key} was accepted already")
            self._notify_accounts(cur)

    def remove_device(self, user: str, device: str) -> DeviceKey:
        with self._tx() as cur:
            found = [
                _device_key(r)
                for r in cur.execute(
                    f"SELECT {_DEVICE_COLUMNS} FROM device_keys"
                    " WHERE username=%s AND device=%s AND role=%s",
                    (user, device, int(KeyRole.DEVICE)),
                ).fetchall()
            ]
            if not found:
                raise StorageError(
                    f"user {user!r} has no device {device!r}",
                    hint=f"see 'btmm serve user devices {user}'",
                )
            entry = found[0]
            zone = entry.key.zone
            z = _n(zone)
            row = cur.execute("SELECT serial FROM zones WHERE name=%s FOR UPDATE", (z,)).fetchone()
            owned = {
                dns.name.from_text(str(n))
                for (n,) in cur.execute(
                    "SELECT name FROM owners WHERE zone=%s AND device=%s", (z, device)
                ).fetchall()
            }
            rows = [
                (dns.name.from_text(str(n)), int(t), bytes(k))
                for n, t, k in cur.execute(
                    "SELECT name, rdtype, rkey FROM records WHERE zone=%s", (z,)
                ).fetchall()
            ]
            gone = device_records(rows, zone, device, owned)
            own = dns.name.from_text(device, origin=zone)
            txts = [
                rdata_wire(int(dns.rdatatype.TXT), bytes(w))
                for (w,) in cur.execute(
                    "SELECT rdata FROM records WHERE zone=%s AND name=%s AND rdtype=%s",
                    (z, _n(own), int(dns.rdatatype.TXT)),
                ).fetchall()
            ]
            revoked = revocation_record(zone, device, txts, time.time())
            if gone:
                cur.executemany(
                    "DELETE FROM records WHERE zone=%s AND name=%s AND rdtype=%s AND rkey=%s",
                    [(z, _n(n), t, k) for n, t, k in gone],
                )
            if revoked is not None:
                rname, rdata = revoked
                cur.execute(
                    "INSERT INTO records VALUES (%s,%s,%s,%s,%s,%s,%s)"
                    " ON CONFLICT (zone, name, rdtype, rkey) DO UPDATE SET"
                    " rdata=EXCLUDED.rdata, ttl=EXCLUDED.ttl, expires=EXCLUDED.expires",
                    (z, _n(rname), int(dns.rdatatype.TXT), rdata.to_digestable(),
                     rdata.to_wire(), REVOKED_TTL, None),
                )
            if (gone or revoked is not None) and row is not None:
                serial = (int(row[0]) + 1) & 0xFFFFFFFF or 1
                cur.execute(
                    "UPDATE zones SET serial=%s, version=version+1 WHERE name=%s", (serial, z)
                )
            cur.execute("DELETE FROM owners WHERE zone=%s AND device=%s", (z, device))
            cur.execute("DELETE FROM device_keys WHERE name=%s", (_n(entry.key.name),))
            self._notify_accounts(cur)
        return entry

    def devices(self, user: str) -> list[DeviceKey]:
        with self._tx() as cur:
            rows = cur.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM device_keys WHERE username=%s"
                " ORDER BY created, name",
                (user,),
            ).fetchall()
        return [_device_key(r) for r in rows]


def _one(cur: psycopg.Cursor[Row]) -> Row:
    row = cur.fetchone()
    if row is None:
        raise StorageError("the registry database returned no row where one was expected")
    return row


def _reason(e: BaseException) -> str:
    """The first line of a database error: libpq's messages run on with hints and context."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
