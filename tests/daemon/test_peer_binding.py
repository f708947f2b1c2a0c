"""Issue 11, item 1: a peer's address is bound to its device key, and only hosts of the user's
zone are followed. The daemon's decisions, without I/O: its peer handling runs against a
registry that answers from a table, a model engine, and a route recorder."""

from __future__ import annotations

import asyncio
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
import structlog.testing

from btmm_core.daemon import host as daemon_host
from btmm_core.daemon.config import Config
from btmm_core.daemon.dnsclient import RRsets
from btmm_core.daemon.host import Daemon, NetState
from btmm_core.daemon.hosts import replace_block
from btmm_core.daemon.identity import HostIdentity
from btmm_core.daemon.naming import Names
from btmm_core.daemon.ondemand import OnDemand, OnDemandConfig
from btmm_core.daemon.pathset import PathSet
from btmm_core.daemon.records import PeerRecords, peer_host_label, verify_peer
from btmm_core.dataplane.api import Endpoint
from btmm_core.errors import PeerRefused
from btmm_core.keyex.driver import KeyExchangeDriver
from btmm_core.keyex.keys import StaticKey, ula_of
from btmm_core.keyex.noise import Handshaker
from btmm_core.keyex.session import KeyExchange
from btmm_core.llq.client import Changes, Record

ZONE = dns.name.from_text("bob.members.example.")
ME, DESKTOP, NAS = StaticKey.generate(), StaticKey.generate(), StaticKey.generate()


def name(text: str) -> dns.name.Name:
    return dns.name.from_text(text, origin=ZONE)


def records(host: str, key: StaticKey, ula: ipaddress.IPv6Address | None = None) -> PeerRecords:
    return PeerRecords(host, name(host), ula or ula_of(key.public), key.public_b64, None)


# --- the pure decisions ---------------------------------------------------------------------


def test_verify_peer_accepts_only_the_address_bound_to_the_key() -> None:
    assert verify_peer(records("desktop", DESKTOP), ZONE) == DESKTOP.public
    for ula in (ipaddress.IPv6Address("2001:db8::53"), ula_of(NAS.public),
                ipaddress.IPv6Address("fd00::1")):
        with pytest.raises(PeerRefused, match="its key's address"):
            verify_peer(records("desktop", DESKTOP, ula), ZONE)
    outside = PeerRecords("github", dns.name.from_text("github.com."), ula_of(DESKTOP.public),
                          DESKTOP.public_b64, None)
    with pytest.raises(PeerRefused, match="not a host name"):
        verify_peer(outside, ZONE)
    with pytest.raises(PeerRefused, match="unusable key"):
        verify_peer(PeerRecords("x", name("x"), ula_of(DESKTOP.public), "KEY=", None), ZONE)


@pytest.mark.parametrize("text,ok", [
    ("desktop.bob.members.example.", True),
    ("Desktop.BOB.members.example.", True),
    ("github.com.", False),
    ("bob.members.example.", False),  # the apex
    ("a.desktop.bob.members.example.", False),  # deeper
    ("_autotunnel._udp.bob.members.example.", False),
    ("desktop.alice.members.example.", False),  # another user's zone
    ("bad\\032name.bob.members.example.", False),  # a space in the label
    ("evil\\010name.bob.members.example.", False),  # a newline: hosts-file injection
])
def test_only_host_labels_of_the_zone_are_followed(text: str, ok: bool) -> None:
    assert (peer_host_label(dns.name.from_text(text), ZONE) is not None) == ok


def test_hosts_block_keeps_only_hosts_of_the_zone() -> None:
    ula = ula_of(DESKTOP.public)
    text = replace_block("", {"desktop.bob.members.example.": ula, "github.com.": ula,
                              "x.desktop.bob.members.example.": ula},
                         zone="bob.members.example.")
    assert "desktop.bob.members.example\n" in text
    assert "github" not in text and "x.desktop" not in text


def test_own_identity_is_derived_from_the_device_key() -> None:
    ident = HostIdentity.of_key(ME.public)
    assert ident.ula == ula_of(ME.public) and ident.ula.packed[0] == 0xFD
    assert ident.autotunnel_label() == "AutoTunnel-" + "-".join(
        f"{b:02X}" for b in ident.ula.packed[8:])


# --- the daemon's peer handling --------------------------------------------------------------


@dataclass
class ModelEngine:
    tun_name: str = "btmm-test"
    local_port: int = 4500
    peers: dict[str, Endpoint | None] = field(default_factory=dict)
    sent: list[tuple[Endpoint, bytes]] = field(default_factory=list)

    def send_control(self, destination: Endpoint, message: bytes) -> None:
        self.sent.append((destination, message))

    def add_peer(self, inner: str, endpoint: Endpoint | None = None) -> None:
        self.peers[inner] = endpoint

    def remove_peer(self, inner: str) -> None:
        self.peers.pop(inner, None)


class TableRegistry:
    """Answers queries from a table, as a registry (honest or not) would."""

    def __init__(self) -> None:
        self.table: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
        self.asked: list[dns.name.Name] = []
        self.server = ("192.0.2.53", 53)

    def publish(self, owner: dns.name.Name, key: StaticKey, ula: ipaddress.IPv6Address) -> None:
        self.table[(owner, dns.rdatatype.AAAA)] = dns.rrset.from_text(
            owner, 60, "IN", "AAAA", str(ula))
        self.table[(owner, dns.rdatatype.TXT)] = dns.rrset.from_text(
            owner, 60, "IN", "TXT", f'"btmm=1" "pk={key.public_b64}"')

    async def query(self, qname: dns.name.Name, rdtype: int) -> dns.rrset.RRset | None:
        self.asked.append(qname)
        return self.table.get((qname, rdtype))

    async def query_sets(self, qname: dns.name.Name, rdtype: int) -> RRsets:
        """ANY: every type at the name; an SRV: with its targets' addresses, whatever names
        they are (a dishonest registry's additional section is no more trusted than its
        answers)."""
        self.asked.append(qname)
        if rdtype == dns.rdatatype.ANY:
            return {k: v for k, v in self.table.items() if k[0] == qname}
        answer = self.table.get((qname, rdtype))
        if answer is None:
            return {}
        found = {(qname, rdtype): answer}
        if rdtype == dns.rdatatype.SRV:
            for rd in answer:
                for t in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    if (rr := self.table.get((rd.target, t))) is not None:
                        found[(rd.target, t)] = rr
        return found


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Daemon, list[str]]:
    routes: list[str] = []
    monkeypatch.setattr(daemon_host, "set_routes", lambda dev, inners: routes.extend(inners))
    d = Daemon.__new__(Daemon)  # no files, sockets or engine: only the peer handling
    d.cfg = Config(path=tmp_path / "btmm.toml", host="laptop", hosts_file=tmp_path / "hosts")
    d.zone = ZONE
    d.static = ME
    d.identity = HostIdentity.of_key(ME.public)
    d.peers = {}
    d._unknown_read_at = {}
    d._unknown_failed = set()
    d._reading = {}
    d.net = NetState()
    d.paths = PathSet(ME, bytes(32), os.urandom)
    d._paths_wake = asyncio.Event()
    d.ondemand = OnDemand(OnDemandConfig(idle_timeout=0.0, connect_timeout=15.0))  # always on
    d.kx = KeyExchange(Handshaker(ME, bytes(32), os.urandom))
    d.engine = ModelEngine()  # type: ignore[assignment]
    d.driver = KeyExchangeDriver(d.engine, d.kx)  # type: ignore[arg-type]
    d.registry = TableRegistry()  # type: ignore[assignment]
    d._watch_peer = lambda peer: None  # type: ignore[method-assign]
    d.names = Names(d.cfg, ZONE)  # not started: it only records the hosts it would answer
    d.sso = None  # [sso] is off
    d.relay = None  # no TURN relay offered
    return d, routes


def browse(*targets: str) -> Changes:
    ptr = dns.name.from_text("_autotunnel._udp", origin=ZONE)
    return Changes(tuple(
        Record(ptr, dns.rdatatype.PTR,
               dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.PTR, t), 60)
        for t in targets), (), True)


@pytest.mark.parametrize("claim", ["2001:db8::53", "nas", "fd00::1"])
def test_peer_publishing_an_address_not_bound_to_its_key_gets_no_route(
    daemon: tuple[Daemon, list[str]], claim: str
) -> None:
    d, routes = daemon
    reg: TableRegistry = d.registry  # type: ignore[assignment]
    ula = ula_of(NAS.public) if claim == "nas" else ipaddress.IPv6Address(claim)
    reg.publish(name("desktop"), DESKTOP, ula)
    asyncio.run(d._on_browse(browse("desktop.bob.members.example.")))
    assert d.peers == {} and routes == [] and d.kx.sessions == {}
    assert d.engine.peers == {}  # type: ignore[attr-defined]
    assert "desktop" not in (d.cfg.hosts_file.read_text()  # type: ignore[union-attr]
                             if d.cfg.hosts_file.exists() else "")  # type: ignore[union-attr]
    # once it publishes the address its key owns, it is routed
    reg.publish(name("desktop"), DESKTOP, ula_of(DESKTOP.public))
    asyncio.run(d._resolve(name("desktop")))
    assert routes == [str(ula_of(DESKTOP.public))]
    assert list(d.kx.by_inner) == [str(ula_of(DESKTOP.public))]


def test_browse_target_outside_the_zone_is_never_followed(
    daemon: tuple[Daemon, list[str]]
) -> None:
    d, routes = daemon
    reg: TableRegistry = d.registry  # type: ignore[assignment]
    # records that would verify, published (by a malicious registry) under foreign names
    for owner in ("github.com.", "www.desktop.bob.members.example."):
        reg.publish(dns.name.from_text(owner), DESKTOP, ula_of(DESKTOP.public))
    reg.publish(name("nas"), NAS, ula_of(NAS.public))
    asyncio.run(d._on_browse(browse("github.com.", "www.desktop.bob.members.example.",
                                    "nas.bob.members.example.")))
    assert [n.to_text() for n in d.peers] == ["nas.bob.members.example."]
    assert routes == [str(ula_of(NAS.public))]
    assert {n.to_text() for n in reg.asked} <= {"nas.bob.members.example.",
                                                "_autotunnel._udp.nas.bob.members.example.",
                                                "_btmm-path._udp.nas.bob.members.example."}
    hosts = d.cfg.hosts_file.read_text()  # type: ignore[union-attr]
    assert "nas.bob.members.example" in hosts and "github" not in hosts
    assert "www.desktop" not in hosts
    # the stub is given the same hosts as the hosts block
    assert {n.to_text() for n in d.names.hosts} == {"laptop.bob.members.example.",
                                                    "nas.bob.members.example."}


def test_upgrade_from_a_stored_ula_says_which_address_replaced_which(tmp_path: Path) -> None:
    d = Daemon.__new__(Daemon)
    d.cfg = Config(path=tmp_path / "btmm.toml", host="laptop", state_dir=tmp_path,
                   interface_id="eui64")
    d.static = ME
    d.cfg.identity_file.write_text('{"ula": "fd12:3456:789a:1:5054:ff:fe12:3456"}\n')
    with structlog.testing.capture_logs() as logs:
        ident = d._identity()
    assert ident.ula == ula_of(ME.public)
    assert not d.cfg.identity_file.exists()
    moved = [e for e in logs if "derived from its device key" in e["event"]]
    assert len(moved) == 1 and moved[0]["old"] == "fd12:3456:789a:1:5054:ff:fe12:3456"
    assert moved[0]["new"] == str(ula_of(ME.public))
    assert [e for e in logs if "interface_id is no longer used" in e["event"]]
    with structlog.testing.capture_logs() as logs:
        d.cfg = Config(path=tmp_path / "btmm.toml", host="laptop", state_dir=tmp_path)
        assert d._identity() == ident
    assert logs == []  # once only


def test_a_peers_candidates_are_kept_and_foreign_targets_never_asked(
    daemon: tuple[Daemon, list[str]]
) -> None:
    d, _ = daemon
    reg: TableRegistry = d.registry  # type: ignore[assignment]
    reg.publish(name("nas"), NAS, ula_of(NAS.public))
    cand_srv = name("_btmm-path._udp.nas")
    reg.table[(cand_srv, dns.rdatatype.SRV)] = dns.rrset.from_text_list(
        cand_srv, 60, "IN", "SRV", [f"1 0 4500 c1-a.nas.{ZONE}", f"3 0 61000 c2-b.nas.{ZONE}",
                                    f"1 0 4500 c1-x.desktop.{ZONE}"])
    for owner, addr in (("c1-a.nas", "192.168.1.10"), ("c2-b.nas", "203.0.113.2"),
                        ("c1-x.desktop", "198.51.100.66")):
        reg.table[(name(owner), dns.rdatatype.A)] = dns.rrset.from_text(
            name(owner), 60, "IN", "A", addr)
    with structlog.testing.capture_logs() as logs:
        asyncio.run(d._on_browse(browse("nas.bob.members.example.")))
    rec = d.peers[name("nas")].records
    assert [(c.kind.name, c.endpoint.host, c.endpoint.port) for c in rec.candidates] == [
        ("LAN", "192.168.1.10", 4500), ("MAPPED", "203.0.113.2", 61000)]
    assert len(rec.candidates_refused) == 1 and "outside" in rec.candidates_refused[0]
    assert name("c1-x.desktop") not in reg.asked
    # three exchanges: the addresses came with the SRV (the foreign one too, unused)
    assert reg.asked == [name("nas"), name("_autotunnel._udp.nas"), cand_srv]
    assert [e for e in logs if e["event"] == "peer's candidate records refused"]
    # a new set replaces the old one on the next read (an LLQ event or the periodic one)
    reg.table[(cand_srv, dns.rdatatype.SRV)] = dns.rrset.from_text(
        cand_srv, 60, "IN", "SRV", f"3 0 61000 c2-b.nas.{ZONE}")
    asyncio.run(d._resolve(name("nas")))
    rec = d.peers[name("nas")].records
    assert [c.endpoint.host for c in rec.candidates] == ["203.0.113.2"]
    assert rec.candidates_refused == ()


class SlowRegistry(TableRegistry):
    """A table whose answers take a turn of the event loop each, so reads overlap."""

    async def query(self, qname: dns.name.Name, rdtype: int) -> dns.rrset.RRset | None:
        await asyncio.sleep(0)
        return await super().query(qname, rdtype)

    async def query_sets(self, qname: dns.name.Name, rdtype: int) -> RRsets:
        await asyncio.sleep(0)
        return await super().query_sets(qname, rdtype)


def _with_slow_registry(daemon: tuple[Daemon, list[str]]) -> tuple[Daemon, SlowRegistry]:
    """The daemon, reading from a slow table where the desktop published its records."""
    d, _ = daemon
    reg = SlowRegistry()
    reg.publish(name("desktop"), DESKTOP, ula_of(DESKTOP.public))
    d.registry = reg  # type: ignore[assignment]
    return d, reg


def test_reads_of_one_host_asked_together_are_shared(
    daemon: tuple[Daemon, list[str]]
) -> None:
    """Three events of one update (and the round) asking at once: the running read, and one
    more after it for all who came meanwhile; never one read each."""
    d, reg = _with_slow_registry(daemon)

    async def main() -> None:
        first = asyncio.create_task(d._resolve(name("desktop")))
        for _ in range(100):  # until the read is under way (a few turns of the loop)
            if reg.asked:
                break
            await asyncio.sleep(0)
        assert reg.asked
        await asyncio.gather(first, *(d._resolve(name("desktop")) for _ in range(3)))

    asyncio.run(main())
    own = [q for q in reg.asked if q == name("desktop")]
    assert len(own) == 2  # ANY at the host's own name, once in each of two reads
    assert list(d.peers) == [name("desktop")] and d._reading == {}
    # alone, a read is one read
    reg.asked.clear()
    asyncio.run(d._resolve(name("desktop")))
    assert [q for q in reg.asked if q == name("desktop")] == [name("desktop")]


def test_a_read_outlives_the_caller_that_started_it(
    daemon: tuple[Daemon, list[str]]
) -> None:
    """A watcher task cancelled while its read runs (its peer was dropped) leaves the read
    to those who still wait on it."""
    d, _ = _with_slow_registry(daemon)

    async def main() -> None:
        first = asyncio.create_task(d._resolve(name("desktop")))
        await asyncio.sleep(0)
        second = asyncio.create_task(d._resolve(name("desktop")))
        await asyncio.sleep(0)
        first.cancel()
        await second
        assert first.cancelled()

    asyncio.run(main())
    assert list(d.peers) == [name("desktop")] and d._reading == {}


class TerseRegistry(TableRegistry):
    """Sends no additional records (a response too big for them, or another server)."""

    async def query_sets(self, qname: dns.name.Name, rdtype: int) -> RRsets:
        found = await super().query_sets(qname, rdtype)
        return {k: v for k, v in found.items() if k[0] == qname}


def test_without_the_addresses_in_the_answer_each_target_is_asked(
    daemon: tuple[Daemon, list[str]]
) -> None:
    d, _ = daemon
    reg = TerseRegistry()
    d.registry = reg  # type: ignore[assignment]
    reg.publish(name("nas"), NAS, ula_of(NAS.public))
    cand_srv = name("_btmm-path._udp.nas")
    reg.table[(cand_srv, dns.rdatatype.SRV)] = dns.rrset.from_text_list(
        cand_srv, 60, "IN", "SRV", [f"1 0 4500 c1-a.nas.{ZONE}", f"3 0 61000 c2-b.nas.{ZONE}"])
    for owner, addr in (("c1-a.nas", "192.168.1.10"), ("c2-b.nas", "203.0.113.2")):
        reg.table[(name(owner), dns.rdatatype.A)] = dns.rrset.from_text(
            name(owner), 60, "IN", "A", addr)
    asyncio.run(d._resolve(name("nas")))
    rec = d.peers[name("nas")].records
    assert [c.endpoint.host for c in rec.candidates] == ["192.168.1.10", "203.0.113.2"]
    assert reg.asked[3:] == [name("c1-a.nas"), name("c2-b.nas")]


class CountingRegistry(TableRegistry):
    """Each answer takes a while, as over a network: counts the queries in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = 0
        self.most_in_flight = 0

    async def query_sets(self, qname: dns.name.Name, rdtype: int) -> RRsets:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.005)
            return await super().query_sets(qname, rdtype)
        finally:
            self.in_flight -= 1


def test_a_long_browse_list_is_read_a_few_hosts_at_a_time(
    daemon: tuple[Daemon, list[str]]
) -> None:
    """A device joining an account reads every host on the browse list: several at once
    (one after another, 99 of them took 11 s), never more than ``READS_AT_ONCE``."""
    d, routes = daemon
    reg = CountingRegistry()
    d.registry = reg  # type: ignore[assignment]
    keys = {f"h{i}": StaticKey.generate() for i in range(20)}
    for host, key in keys.items():
        reg.publish(name(host), key, ula_of(key.public))
    asyncio.run(d._on_browse(browse(*(f"{h}.bob.members.example." for h in keys))))
    assert sorted(str(n) for n in d.peers) == sorted(f"{h}.bob.members.example." for h in keys)
    assert sorted(routes) == sorted(str(ula_of(k.public)) for k in keys.values())
    assert 1 < reg.most_in_flight <= daemon_host.READS_AT_ONCE
