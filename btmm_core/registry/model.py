"""Data shared by the registry's zone store, update logic and storage backends.

Records are kept per RR (name, type, rdata) because update leases (RFC 9664) are per RR: an
update that re-adds an RR refreshes that RR's lease and nothing else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import dns.name
import dns.rdata

from btmm_core.dns.tsig import TsigKey


class Cause(enum.IntEnum):
    """Why an RRset changed: observers (LLQ) may treat the two differently."""

    UPDATE = 1
    EXPIRY = 2


@dataclass(frozen=True)
class Entry:
    """One stored RR's TTL and lease deadline (absolute, seconds since the epoch; None: none)."""

    ttl: int
    expires: float | None


@dataclass(frozen=True)
class RecordRow:
    zone: dns.name.Name
    name: dns.name.Name
    rdtype: int
    rdata: dns.rdata.Rdata
    entry: Entry


@dataclass(frozen=True)
class RecordKey:
    zone: dns.name.Name
    name: dns.name.Name
    rdtype: int
    rdata: dns.rdata.Rdata


@dataclass(frozen=True)
class SeenMac:
    """A TSIG MAC accepted on an update, kept durable so a replay after restart fails too."""

    key: dns.name.Name
    time_signed: int
    mac: bytes


@dataclass(frozen=True)
class ChangeSet:
    """Everything one committed transaction does to one zone, applied atomically."""

    zone: dns.name.Name
    serial: int
    upserts: tuple[RecordRow, ...] = ()
    deletes: tuple[RecordKey, ...] = ()
    seen: tuple[SeenMac, ...] = ()
    cause: Cause = Cause.UPDATE
    #: owner names that a device's update put records at, outside its own subtree (the
    #: ``AutoTunnel-...`` name of its A record): (name, device). See registry/authority.py.
    claims: tuple[tuple[dns.name.Name, str], ...] = ()


@dataclass(frozen=True)
class RRsetChange:
    """Observer event for one RRset after a durable commit.

    ``after`` is the RRset's new content (empty when it vanished); ``added`` and ``removed``
    list the RRs that came and went. A TTL-only change has both empty and ``after`` set.
    """

    zone: dns.name.Name
    name: dns.name.Name
    rdtype: int
    added: tuple[dns.rdata.Rdata, ...]
    removed: tuple[dns.rdata.Rdata, ...]
    after: tuple[tuple[dns.rdata.Rdata, int], ...]
    serial: int
    cause: Cause


@dataclass(frozen=True)
class ZoneRow:
    name: dns.name.Name
    serial: int
    user: str | None


@dataclass(frozen=True)
class Account:
    user: str
    zone: dns.name.Name
    key: TsigKey
    created: float


@dataclass(frozen=True)
class DeviceKey:
    """A device key or an invite token of one account, as stored and listed."""

    user: str
    key: TsigKey
    created: float

    @property
    def device(self) -> str | None:
        return self.key.device


@dataclass(frozen=True)
class Snapshot:
    """What a backend loads at start: the whole durable state."""

    zones: tuple[ZoneRow, ...]
    keys: tuple[TsigKey, ...]
    records: tuple[RecordRow, ...]
    seen: tuple[SeenMac, ...]
    #: (zone, owner name, device): names outside a device's subtree that it holds
    owners: tuple[tuple[dns.name.Name, dns.name.Name, str], ...] = ()
