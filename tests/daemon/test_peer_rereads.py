"""The daemon's periodic round over its peers (``Daemon._resolver``): the zone's serial, and
only when it moved since the last round that checked everything, one signed query of each
peer's candidate SRV; a full read only when that changed, when the peer publishes none, or once
``reread_interval`` has passed (in a round that saw the serial move); a refused key stops the
round. Sans-I/O around a scripted
registry: no sockets, only the event loop's timers (``resolve_interval`` of 10 ms)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import dns.name
import dns.rdata
import dns.rdatatype
import dns.rrset
import pytest

from btmm_core.aio import within
from btmm_core.daemon.config import Config
from btmm_core.daemon.dnsclient import RRsets
from btmm_core.daemon.host import Daemon, Peer
from btmm_core.daemon.records import (
    PeerRecords,
    browse_name,
    candidate_srv_name,
    srv_fingerprint,
)
from btmm_core.errors import CredentialsRejected, RegistryError

ZONE = dns.name.from_text("bob.members.example")
PEER = dns.name.from_text("laptop", origin=ZONE)
CAND = candidate_srv_name("laptop", ZONE)


def _srv(*ports: int) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(CAND, 1, dns.rdatatype.SRV)
    for i, port in enumerate(ports, 1):
        rrset.add(dns.rdata.from_text("IN", "SRV", f"3 0 {port} c{i}-0000000{i}.laptop.{ZONE}"))
    return rrset


BROWSE = browse_name(ZONE)


def _browse(*hosts: str) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(BROWSE, 1, dns.rdatatype.PTR)
    for host in hosts:
        rrset.add(dns.rdata.from_text("IN", "PTR", f"{host}.{ZONE}"))
    return rrset


class ScriptedRegistry:
    """Answers the zone's SOA with ``serial``, the candidate SRV with ``answer()``, the browse
    list with ``listed``; every other name has no records, or ``failing`` names raise
    RegistryError (counted in ``failures``, as the real client does)."""

    def __init__(self, answer: Callable[[], dns.rrset.RRset | None],
                 listed: dns.rrset.RRset | None = None) -> None:
        self.answer = answer
        self.listed = listed if listed is not None else _browse("desktop", "laptop")
        self.serial = 1
        self.failing: set[dns.name.Name] = set()
        self.failures = 0
        self.asked: list[tuple[dns.name.Name, int]] = []

    async def query(self, name: dns.name.Name, rdtype: int) -> dns.rrset.RRset | None:
        self.asked.append((name, rdtype))
        if name in self.failing:
            self.failures += 1
            raise RegistryError("no answer from the registry", hint="it is busy")
        if name == ZONE and rdtype == dns.rdatatype.SOA:
            return dns.rrset.from_text(ZONE, 1, "IN", "SOA",
                                       f"ns.example. hostmaster.example. {self.serial} 1 1 1 1")
        if name == BROWSE:
            return self.listed
        return self.answer() if name == CAND else None

    def changed(self) -> None:
        """Something in the zone changed: its serial moves."""
        self.serial += 1

    def rounds(self) -> int:
        """Rounds begun: each asks the serial first."""
        return self.asked.count((ZONE, dns.rdatatype.SOA))

    async def query_sets(self, name: dns.name.Name, rdtype: int) -> RRsets:
        found = await self.query(name, rdtype)
        return {} if found is None else {(name, rdtype): found}

    def reads_of(self, name: dns.name.Name) -> int:
        """Full reads of the host: each begins with ANY at its name."""
        return self.asked.count((name, dns.rdatatype.ANY))


def _daemon(registry: ScriptedRegistry, peer: Peer, reread: float) -> tuple[Daemon, list[Any]]:
    daemon = Daemon.__new__(Daemon)  # only what the round uses: no keys, sockets or engine
    daemon.cfg = Config(path=Path("/nonexistent"), host="desktop", resolve_interval=0.01,
                        reread_interval=reread)
    daemon.zone = ZONE
    daemon.registry = cast(Any, registry)
    daemon.sso = None
    daemon.peers = {PEER: peer}
    daemon._unknown_read_at = {}
    daemon._unknown_failed = set()
    daemon._listed = None
    daemon._checked_serial = None
    daemon._rng = random.Random(0)
    daemon._reading = {}
    full_reads: list[Any] = []

    async def resolve(name: dns.name.Name) -> None:
        full_reads.append(name)
        loop = asyncio.get_running_loop()
        peer.read_at, peer.candidate_srv = loop.time(), srv_fingerprint(registry.answer())

    daemon._resolve = resolve  # type: ignore[method-assign]
    return daemon, full_reads


def _peer(srv: dns.rrset.RRset | None, read_at: float) -> Peer:
    records = cast(PeerRecords, type("Records", (), {"host": "laptop"})())
    return Peer(records, added_at=0.0, read_at=read_at, candidate_srv=srv_fingerprint(srv))


async def _rounds(daemon: Daemon, until: Callable[[], bool]) -> None:
    task = asyncio.create_task(daemon._resolver())
    try:
        for _ in range(500):  # 5 s at most
            if until():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the round never got there")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_an_unchanged_zone_costs_one_query_a_round() -> None:
    """The first round checks each peer's candidate SRV and the browse list; while the
    serial stays, the rounds after it ask the serial only, however many peers there are."""
    async def main() -> None:
        registry = ScriptedRegistry(lambda: _srv(4500, 4501))
        now = asyncio.get_running_loop().time()
        daemon, full = _daemon(registry, _peer(_srv(4500, 4501), now), reread=3600)
        await _rounds(daemon, lambda: registry.rounds() >= 5)
        first, rest = registry.asked[:3], registry.asked[3:]
        assert first == [(ZONE, dns.rdatatype.SOA), (BROWSE, dns.rdatatype.PTR),
                         (CAND, dns.rdatatype.SRV)]
        assert set(rest) == {(ZONE, dns.rdatatype.SOA)}
        assert full == []

    asyncio.run(main())


def test_a_changed_or_vanished_candidate_srv_reads_the_peer_again() -> None:
    async def main() -> None:
        answers: list[dns.rrset.RRset | None] = [_srv(4500)]
        registry = ScriptedRegistry(lambda: answers[-1])
        now = asyncio.get_running_loop().time()
        daemon, full = _daemon(registry, _peer(_srv(4500), now), reread=3600)
        answers.append(_srv(4500, 21454))  # the NAT gave a new reflexive port
        registry.changed()
        await _rounds(daemon, lambda: len(full) == 1)
        checks = registry.asked.count((CAND, dns.rdatatype.SRV))
        registry.changed()  # another host's change: the peer's SRV is the same
        rounds = registry.rounds()
        await _rounds(daemon, lambda: registry.rounds() >= rounds + 3)
        assert registry.asked.count((CAND, dns.rdatatype.SRV)) == checks + 1
        assert len(full) == 1  # the same again: no more full reads
        answers.append(None)  # the peer's records expired (the full read drops it)
        registry.changed()
        await _rounds(daemon, lambda: len(full) == 2)

    asyncio.run(main())


def test_a_round_with_a_failed_exchange_checks_again_at_the_same_serial() -> None:
    """A check that got no answer may have missed a change: the next round checks every peer
    again though the serial did not move, until one round gets through."""
    async def main() -> None:
        registry = ScriptedRegistry(lambda: _srv(4500))
        registry.failing.add(CAND)
        now = asyncio.get_running_loop().time()
        daemon, full = _daemon(registry, _peer(_srv(4500), now), reread=3600)
        await _rounds(daemon, lambda: registry.asked.count((CAND, dns.rdatatype.SRV)) >= 3)
        assert registry.serial == 1 and daemon._checked_serial is None
        registry.failing.clear()
        await _rounds(daemon, lambda: daemon._checked_serial == 1)
        checks = registry.asked.count((CAND, dns.rdatatype.SRV))
        rounds = registry.rounds()
        await _rounds(daemon, lambda: registry.rounds() >= rounds + 3)
        assert registry.asked.count((CAND, dns.rdatatype.SRV)) == checks
        assert full == []

    asyncio.run(main())


def test_a_full_read_comes_at_the_reread_interval_and_for_a_peer_without_candidates() -> None:
    async def main() -> None:
        registry = ScriptedRegistry(lambda: _srv(4500))
        loop = asyncio.get_running_loop()
        peer = _peer(_srv(4500), loop.time() - 10)
        daemon, full = _daemon(registry, peer, reread=5)
        await _rounds(daemon, lambda: len(full) == 1)  # 10 s since the last: due
        # due again, but the zone did not change: nothing in it can be new
        peer.read_at = loop.time() - 10
        await _rounds(daemon, lambda: registry.rounds() >= 6)
        assert len(full) == 1
        registry.changed()
        await _rounds(daemon, lambda: len(full) == 2)
        legacy = ScriptedRegistry(lambda: None)
        daemon, full = _daemon(legacy, _peer(None, loop.time()), reread=3600)
        await _rounds(daemon, lambda: len(full) == 1)
        legacy.changed()
        await _rounds(daemon, lambda: len(full) >= 2)
        # nothing to compare: a round after a change of the zone reads it all
        assert (CAND, dns.rdatatype.SRV) not in legacy.asked

    asyncio.run(main())


def test_a_refused_key_stops_the_round() -> None:
    def refused() -> dns.rrset.RRset | None:
        raise CredentialsRejected("BADKEY", hint="run btmm join again")

    async def main() -> None:
        registry = ScriptedRegistry(refused)
        daemon, _ = _daemon(registry, _peer(_srv(4500), asyncio.get_running_loop().time()),
                            reread=3600)
        with pytest.raises(CredentialsRejected):
            await within(daemon._resolver(), 5)

    asyncio.run(main())


def test_a_listed_host_that_is_no_peer_is_read_again_after_a_failed_read_only() -> None:
    """A host on the browse list whose first read failed (the registry busy at start-up)
    is read again the next round, whatever the LLQ said; one read and refused (here: no
    records) waits for ``reread_interval``."""
    nas = dns.name.from_text("nas", origin=ZONE)
    phone = dns.name.from_text("phone", origin=ZONE)

    async def main() -> None:
        registry = ScriptedRegistry(lambda: _srv(4500), _browse("desktop", "laptop", "nas",
                                                                 "phone"))
        registry.failing.add(nas)
        loop = asyncio.get_running_loop()
        daemon, _ = _daemon(registry, _peer(_srv(4500), loop.time()), reread=3600)
        daemon._resolve = Daemon._resolve.__get__(daemon)  # type: ignore[method-assign]
        await _rounds(daemon, lambda: registry.reads_of(nas) >= 3)
        assert registry.reads_of(phone) == 1  # read once, came to nothing: not every round
        assert registry.reads_of(PEER) == 0  # a peer: its candidate SRV only
        registry.failing.clear()
        await _rounds(daemon, lambda: registry.reads_of(nas) >= 4)
        asked = len(registry.asked)
        await _rounds(daemon, lambda: len(registry.asked) >= asked + 6)
        assert registry.reads_of(nas) == 4 and registry.reads_of(phone) == 1

    asyncio.run(main())
