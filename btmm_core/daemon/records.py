"""The records a host publishes and how a peer is read back from them, sans-I/O.

DNS UPDATE (RFC 2136) messages with an update lease (RFC 9664, EDNS0 option 2) are built here;
the driver signs them with TSIG (RFC 8945) and sends them. Names (docs/architecture.md
section 6), in zone Z:

- ``<host>.Z``  AAAA (the ULA) and TXT (``btmm=1``, ``pk=<base64 X25519 key>``, model, version,
  with SSO its ``sshca`` and ``sshbind``)
- ``_autotunnel._udp.<host>.Z``  SRV 0 0 <external port> ``AutoTunnel-XX-...-XX.Z``
- ``AutoTunnel-XX-...-XX.Z``  A (the external IPv4 address)
- ``_autotunnel._udp.Z``  PTR ``<host>.Z``: one per host, a DNS-SD style browse list (RFC 6763
  section 4) so that a single long-lived query (RFC 8764) sees hosts come and go.
- ``_btmm-path._udp.<host>.Z``  SRV <kind> 0 <port> ``c<i>-<hash>.<host>.Z``: one per endpoint
  candidate (``reach.candidates``), the SRV priority (RFC 2782) being the ``CandidateKind``;
  ``c<i>-<hash>.<host>.Z``  A (or AAAA) its address. The label's hash changes with the
  candidate, so the SRV RRset changes whenever any candidate does and one long-lived query on
  it sees every change (docs/architecture.md section 6 has the reasons for this layout).

What the registry (or another device of the account) says about a peer is checked before it is
used (``peer_host_label``, ``verify_peer``): only names ``<label>.Z`` are followed, and the AAAA
must be the address bound to the TXT key (``keyex.keys.ula_of``), which the handshake then
proves. So a record can neither point a host name outside the zone nor route an address that the
peer's key does not own. A peer's candidates are read only from names inside its own subtree
``<host>.Z`` (which only its device key may write: registry/authority.py), at most
``MAX_CANDIDATES`` of them; anything else is refused with a reason (``CandidateRead``), never
an exception. The daemon keeps them on its peer object, shows them in ``btmm status`` and
hands them to the peer's path manager, which connects only to one that answers a probe.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.update

from btmm_core.daemon.identity import HostIdentity
from btmm_core.dataplane.api import Endpoint
from btmm_core.dns.edns import UpdateLeaseOption
from btmm_core.errors import ConfigError, PeerRefused
from btmm_core.keyex.keys import decode_public, ula_of
from btmm_core.reach.candidates import (
    MAX_CANDIDATES,
    Candidate,
    CandidateKind,
    bound,
    is_usable_address,
)

TTL = 60
BROWSE_LABELS = ("_autotunnel", "_udp")
#: the candidate SRV's service and protocol labels (RFC 6335 service name, RFC 2782 form)
CANDIDATE_LABELS = ("_btmm-path", "_udp")
_KIND_VALUES = frozenset(int(k) for k in CandidateKind)
#: a host label (RFC 1123 section 2.1): letters, digits and inner hyphens, at most 63
_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Publication:
    """What this host says about itself; equal values mean nothing to republish."""

    host: str
    ula: ipaddress.IPv6Address
    autotunnel: str
    public_key: str
    #: None (both): no endpoint others can reach (no port mapping); no SRV or A is published,
    #: so peers wait for this host's handshake instead of sending theirs into the void
    external_address: ipaddress.IPv4Address | None
    external_port: int | None
    model: str = "linux"
    version: str = ""
    #: endpoint candidates, most preferred first (``reach.candidates.gather``)
    candidates: tuple[Candidate, ...] = ()
    #: this device's SSH CA and the tag binding it to the account (base64; empty: no SSO;
    #: docs/architecture.md section 12)
    ssh_ca: str = ""
    ssh_bind: str = ""


def browse_name(zone: dns.name.Name) -> dns.name.Name:
    return dns.name.Name(BROWSE_LABELS).concatenate(zone)


def host_name(host: str, zone: dns.name.Name) -> dns.name.Name:
    return dns.name.from_text(host, origin=zone)


def srv_name(host: str, zone: dns.name.Name) -> dns.name.Name:
    return dns.name.Name(BROWSE_LABELS).concatenate(host_name(host, zone))


def target_name(ident: HostIdentity | str, zone: dns.name.Name) -> dns.name.Name:
    label = ident if isinstance(ident, str) else ident.autotunnel_label()
    return dns.name.from_text(label, origin=zone)


def candidate_srv_name(host: str, zone: dns.name.Name) -> dns.name.Name:
    return dns.name.Name(CANDIDATE_LABELS).concatenate(host_name(host, zone))


def candidate_target(host: str, zone: dns.name.Name, index: int, cand: Candidate) -> dns.name.Name:
    """``c<index>-<hash>.<host>.Z``: the index keeps the publisher's order within a kind
    readable, the hash (of kind, address and port) makes the name, and so the SRV RRset,
    change whenever the candidate does."""
    ep = cand.endpoint
    digest = hashlib.sha256(f"{int(cand.kind)} {ep.host} {ep.port}".encode()).hexdigest()[:8]
    return dns.name.Name((f"c{index}-{digest}",)).concatenate(host_name(host, zone))


def _candidate_rrsets(
    pub: Publication, zone: dns.name.Name
) -> tuple[dns.rrset.RRset | None, list[dns.rrset.RRset]]:
    """The candidate SRV RRset (None without candidates) and one address RRset per target."""
    cands = pub.candidates[:MAX_CANDIDATES]
    if not cands:
        return None, []
    srv = dns.rrset.RRset(candidate_srv_name(pub.host, zone), dns.rdataclass.IN,
                          dns.rdatatype.SRV)
    addresses = []
    for i, cand in enumerate(cands, 1):
        target = candidate_target(pub.host, zone, i, cand)
        srv.add(dns.rdata.from_text("IN", "SRV",
                                    f"{int(cand.kind)} 0 {cand.endpoint.port} {target}"), TTL)
        family = ipaddress.ip_address(cand.endpoint.host).version
        addresses.append(dns.rrset.from_text(target, TTL, "IN", "A" if family == 4 else "AAAA",
                                             cand.endpoint.host))
    return srv, addresses


def _rrsets(pub: Publication, zone: dns.name.Name) -> list[dns.rrset.RRset]:
    h = host_name(pub.host, zone)
    target = target_name(pub.autotunnel, zone)
    txt = " ".join(
        f'"{s}"'
        for s in ("btmm=1", f"pk={pub.public_key}", f"model={pub.model}", f"sw={pub.version}",
                  *((f"sshca={pub.ssh_ca}", f"sshbind={pub.ssh_bind}") if pub.ssh_ca else ()))
    )
    out = [
        dns.rrset.from_text(h, TTL, "IN", "AAAA", str(pub.ula)),
        dns.rrset.from_text(h, TTL, "IN", "TXT", txt),
        dns.rrset.from_text(browse_name(zone), TTL, "IN", "PTR", h.to_text()),
    ]
    if pub.external_address is not None and pub.external_port is not None:
        out += [
            dns.rrset.from_text(srv_name(pub.host, zone), TTL, "IN", "SRV",
                                f"0 0 {pub.external_port} {target}"),
            dns.rrset.from_text(target, TTL, "IN", "A", str(pub.external_address)),
        ]
    return out


def left_candidate_targets(
    srv: dns.rrset.RRset | None, host: str, zone: dns.name.Name
) -> tuple[dns.name.Name, ...]:
    """The address names a candidate SRV RRset found in the zone points at, kept to the
    host's own subtree: what an earlier run of this host left (read before its first
    publish, so that a crashed run's addresses go at once instead of with their lease)."""
    if srv is None or srv.rdtype != dns.rdatatype.SRV:
        return ()
    own = host_name(host, zone)
    return tuple(sorted({r.target for r in srv if _one_below(r.target, own)}))


def _one_below(name: dns.name.Name, own: dns.name.Name) -> bool:
    """``name`` is ``<label>.<own>``: where a host's candidate addresses live."""
    return len(name) == len(own) + 1 and name.is_subdomain(own)


def publish_update(
    zone: dns.name.Name, pub: Publication, previous: Publication | None, lease: int,
    left_targets: Sequence[dns.name.Name] = (),
) -> dns.update.UpdateMessage:
    """The UPDATE that makes the zone say ``pub``, with an update lease.

    Unchanged data is only re-added (the registry extends its lease without a new serial, so
    watchers see no churn); an RRset whose data changed is replaced in the same message.
    ``left_targets`` (``left_candidate_targets``): address names an earlier run published,
    deleted here unless the new candidates use them.
    """
    upd = dns.update.UpdateMessage(zone)
    _replace_candidates(upd, zone, pub, previous)
    keep = {r.name for r in _candidate_rrsets(pub, zone)[1]}
    own = host_name(pub.host, zone)
    for name in left_targets:
        if name not in keep and _one_below(name, own):
            upd.delete(name)
    old = {} if previous is None else {(r.name, r.rdtype): r for r in _rrsets(previous, zone)}
    new = _rrsets(pub, zone)
    for gone in old.keys() - {(r.name, r.rdtype) for r in new}:
        upd.delete(*gone)  # the endpoint records of a host that lost its mapping
    for rrset in new:
        before = old.get((rrset.name, rrset.rdtype))
        if before is not None and before != rrset:
            if rrset.rdtype == dns.rdatatype.PTR:
                upd.delete(before.name, before[0])  # the browse PTR set is shared with peers
            else:
                upd.delete(rrset.name, rrset.rdtype)
        upd.add(rrset.name, rrset)
    upd.use_edns(0, options=[UpdateLeaseOption(lease)])
    return upd


def _replace_candidates(
    upd: dns.update.UpdateMessage, zone: dns.name.Name, pub: Publication,
    previous: Publication | None,
) -> None:
    """Delete the whole candidate SRV RRset and add the new one in the same UPDATE: RFC 2136
    section 3.4.2 applies the update section in order and the registry commits it as one
    transaction, so a reader sees the old set or the new one, never a mix. The first publish
    of a run replaces the set too, so nothing a crashed run left stays in it; its address
    names go too when the caller read them first (``left_targets``), else they expire with
    their lease. A refresh of an unchanged set
    only re-adds it (its leases move; no serial, no LLQ event). Address names the new set no
    longer uses are deleted."""
    srv, addresses = _candidate_rrsets(pub, zone)
    if previous is None or previous.candidates != pub.candidates:
        upd.delete(candidate_srv_name(pub.host, zone), dns.rdatatype.SRV)
        keep = {r.name for r in addresses}
        if previous is not None:
            for old in _candidate_rrsets(previous, zone)[1]:
                if old.name not in keep:  # a kept name holds the same data (its hash says so)
                    upd.delete(old.name)
    if srv is not None:
        upd.add(srv.name, srv)
    for rrset in addresses:
        upd.add(rrset.name, rrset)


def withdraw_update(zone: dns.name.Name, pub: Publication) -> dns.update.UpdateMessage:
    """The UPDATE that removes everything ``pub`` put in the zone (clean shutdown)."""
    upd = dns.update.UpdateMessage(zone)
    upd.delete(candidate_srv_name(pub.host, zone), dns.rdatatype.SRV)
    for rrset in _candidate_rrsets(pub, zone)[1]:
        upd.delete(rrset.name)
    for rrset in _rrsets(pub, zone):
        if rrset.rdtype == dns.rdatatype.PTR:
            upd.delete(rrset.name, rrset[0])
        else:
            upd.delete(rrset.name, rrset.rdtype)
    return upd


def granted_lease(response: dns.message.Message) -> int | None:
    for opt in response.options:
        if isinstance(opt, UpdateLeaseOption):
            return int(opt.lease)
    return None


@dataclass(frozen=True)
class PeerRecords:
    """A peer as its records describe it."""

    host: str
    name: dns.name.Name
    ula: ipaddress.IPv6Address
    public_key: str
    endpoint: tuple[str, int] | None
    model: str = ""
    version: str = ""
    #: the peer's endpoint candidates, most preferred first; nothing connects to them yet
    candidates: tuple[Candidate, ...] = ()
    #: why candidate records of the peer were not used (empty: all were)
    candidates_refused: tuple[str, ...] = ()
    #: the peer's SSH CA and binding tag as published (unchecked; ``sso.certs.check_binding``)
    ssh_ca: str = ""
    ssh_bind: str = ""


def parse_txt(strings: list[bytes]) -> dict[str, str]:
    out: dict[str, str] = {}
    for s in strings:
        key, sep, value = s.decode("utf-8", "replace").partition("=")
        if sep:
            out[key] = value
    return out


def peer_from_answers(
    name: dns.name.Name,
    zone: dns.name.Name,
    aaaa: dns.rrset.RRset | None,
    txt: dns.rrset.RRset | None,
    srv: dns.rrset.RRset | None,
    a: dns.rrset.RRset | None,
    candidates: CandidateRead | None = None,
) -> PeerRecords | None:
    """The peer behind ``name``, or None while its records are incomplete (not yet published,
    or partly expired): a peer without an address or a key cannot be trusted or reached."""
    if aaaa is None or txt is None or not len(aaaa) or not len(txt):
        return None
    info: dict[str, str] = {}
    for rd in txt:
        info.update(parse_txt(list(rd.strings)))
    if info.get("btmm") != "1" or "pk" not in info:
        return None
    endpoint = None
    if srv is not None and len(srv) and a is not None and len(a):
        endpoint = (a[0].address, int(srv[0].port))
    return PeerRecords(
        host=name.relativize(zone).to_text(),
        name=name,
        ula=ipaddress.IPv6Address(aaaa[0].address),
        public_key=info["pk"],
        endpoint=endpoint,
        model=info.get("model", ""),
        version=info.get("sw", ""),
        candidates=() if candidates is None else candidates.candidates,
        candidates_refused=() if candidates is None else candidates.refused,
        ssh_ca=info.get("sshca", ""),
        ssh_bind=info.get("sshbind", ""),
    )


@dataclass(frozen=True)
class CandidateRef:
    """One candidate SRV record of a peer that passed the checks: what to look up next."""

    kind: CandidateKind
    port: int
    target: dns.name.Name


@dataclass(frozen=True)
class CandidateRead:
    """A peer's candidates as read from its records, and why any record was not used."""

    candidates: tuple[Candidate, ...] = ()
    refused: tuple[str, ...] = field(default=())


def srv_fingerprint(srv: dns.rrset.RRset | None) -> frozenset[str] | None:
    """What identifies a candidate SRV RRset's content (None: no such RRset), to tell whether
    it changed since the last read: its records' texts; the TTL does not count."""
    if srv is None or not len(srv):
        return None
    return frozenset(rd.to_text() for rd in srv)


def candidate_refs(
    peer: dns.name.Name, srv: dns.rrset.RRset | None
) -> tuple[list[CandidateRef], list[str]]:
    """The candidate SRV records of ``peer`` worth following, and why the others are not.

    A target must be a name one label below the peer's own ``<host>.Z``, which only that
    peer's device key may write; a priority that is no ``CandidateKind`` (a newer btmm's kind)
    and a port 0 are skipped; at most ``MAX_CANDIDATES`` are followed, most preferred first
    (the SRV priority, then the target name: the publisher numbers them in its order).
    """
    if srv is None:
        return [], []
    refs: list[CandidateRef] = []
    refused: list[str] = []
    seen: set[dns.name.Name] = set()
    for rd in sorted(srv, key=lambda r: (r.priority, r.target.to_text())):
        target: dns.name.Name = rd.target
        if len(target) != len(peer) + 1 or not target.is_subdomain(peer):
            refused.append(f"target {target} is outside {peer}")
        elif rd.priority not in _KIND_VALUES:
            refused.append(f"unknown kind {rd.priority} at {target}")
        elif not 0 < rd.port < 65536:
            refused.append(f"port {rd.port} at {target}")
        elif target in seen:
            refused.append(f"target {target} named twice")
        elif len(refs) >= MAX_CANDIDATES:
            refused.append(f"more than {MAX_CANDIDATES} candidates: {target} ignored")
        else:
            seen.add(target)
            refs.append(CandidateRef(CandidateKind(rd.priority), int(rd.port), target))
    return refs, refused


def address_types(kind: CandidateKind) -> tuple[int, int]:
    """Which address type to look up first at a candidate's target, and which next if the
    first is empty: the layout allows either family for every kind (family-neutral), but
    only the IPV6 kind is expected to be an AAAA, so one query usually suffices."""
    if kind == CandidateKind.IPV6:
        return dns.rdatatype.AAAA, dns.rdatatype.A
    return dns.rdatatype.A, dns.rdatatype.AAAA


def read_candidates(
    refs: Sequence[CandidateRef],
    addresses: Mapping[dns.name.Name, Sequence[dns.rrset.RRset | None]],
    refused: Sequence[str] = (),
) -> CandidateRead:
    """Candidates from ``refs`` (``candidate_refs``) and the address RRsets found at their
    targets. A target needs exactly one usable address (``is_usable_address``: never a
    loopback, link-local, multicast or unspecified one), of IPv6 for the IPV6 kind; the
    same endpoint twice keeps its more preferred kind (``reach.candidates.bound``)."""
    why = list(refused)
    found: list[Candidate] = []
    for ref in refs:
        addrs: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        for rrset in addresses.get(ref.target, ()):
            if rrset is None or rrset.name != ref.target or rrset.rdtype not in (
                dns.rdatatype.A, dns.rdatatype.AAAA
            ):
                continue
            addrs.extend(ipaddress.ip_address(rd.address) for rd in rrset)
        if len(addrs) != 1:
            why.append(f"{len(addrs)} addresses at {ref.target}, one expected")
            continue
        (addr,) = addrs
        if not is_usable_address(addr):
            why.append(f"unusable address {addr} at {ref.target}")
        elif ref.kind == CandidateKind.IPV6 and addr.version != 6:
            why.append(f"an IPV6 candidate with the IPv4 address {addr} at {ref.target}")
        else:
            found.append(Candidate(ref.kind, Endpoint(str(addr), ref.port)))
    kept = bound(found)
    if len(kept) < len(found):
        why.append(f"{len(found) - len(kept)} duplicate or surplus candidates ignored")
    return CandidateRead(kept, tuple(why))


def peer_host_label(name: dns.name.Name, zone: dns.name.Name) -> str | None:
    """The host label if ``name`` is exactly ``<label>.<zone>`` with a plain host label, else
    None: names outside the zone, deeper inside it, or with odd bytes are never followed."""
    if len(name) != len(zone) + 1 or not name.is_subdomain(zone):
        return None
    label = name.labels[0].decode("ascii", "replace")
    return label.lower() if _HOST_LABEL.match(label) else None


def verify_peer(rec: PeerRecords, zone: dns.name.Name) -> bytes:
    """The public key of a peer whose records may be trusted; ``PeerRefused`` otherwise.

    The name must be a host of ``zone`` and the AAAA the address bound to the TXT key: then
    the handshake, which proves the key, also proves the address.
    """
    if peer_host_label(rec.name, zone) is None:
        raise PeerRefused(f"{rec.name} is not a host name in {zone}", hint="ignored")
    try:
        public = decode_public(rec.public_key)
    except ConfigError as err:
        raise PeerRefused(f"{rec.host} publishes an unusable key: {err.what}") from err
    bound = ula_of(public)
    if rec.ula != bound:
        raise PeerRefused(
            f"{rec.host} publishes address {rec.ula}, but its key's address is {bound}",
            hint="no route is installed; if the peer runs an older btmm (random addresses), "
            "upgrade it; otherwise something wrote false records for it",
        )
    return public
