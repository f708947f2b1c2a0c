"""The records a host publishes and how a peer is read back from them, sans-I/O.

DNS UPDATE (RFC 2136) messages with an update lease (RFC 9664, EDNS0 option 2) are built here;
the driver signs them with TSIG (RFC 8945) and sends them. Names (docs/architecture.md
section 6), in zone Z:

- ``<host>.Z``  AAAA (the ULA) and TXT (``btmm=1``, ``pk=<base64 X25519 key>``, model, version)
- ``_autotunnel._udp.<host>.Z``  SRV 0 0 <external port> ``AutoTunnel-XX-...-XX.Z``
- ``AutoTunnel-XX-...-XX.Z``  A (the external IPv4 address)
- ``_autotunnel._udp.Z``  PTR ``<host>.Z``: one per host, a DNS-SD style browse list (RFC 6763
  section 4) so that a single long-lived query (RFC 8764) sees hosts come and go.

What the registry (or another device of the account) says about a peer is checked before it is
used (``peer_host_label``, ``verify_peer``): only names ``<label>.Z`` are followed, and the AAAA
must be the address bound to the TXT key (``keyex.keys.ula_of``), which the handshake then
proves. So a record can neither point a host name outside the zone nor route an address that the
peer's key does not own.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.update

from btmm_core.daemon.identity import HostIdentity
from btmm_core.dns.edns import UpdateLeaseOption
from btmm_core.errors import ConfigError, PeerRefused
from btmm_core.keyex.keys import decode_public, ula_of

TTL = 60
BROWSE_LABELS = ("_autotunnel", "_udp")
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


def browse_name(zone: dns.name.Name) -> dns.name.Name:
    return dns.name.Name(BROWSE_LABELS).concatenate(zone)


def host_name(host: str, zone: dns.name.Name) -> dns.name.Name:
    return dns.name.from_text(host, origin=zone)


def srv_name(host: str, zone: dns.name.Name) -> dns.name.Name:
    return dns.name.Name(BROWSE_LABELS).concatenate(host_name(host, zone))


def target_name(ident: HostIdentity | str, zone: dns.name.Name) -> dns.name.Name:
    label = ident if isinstance(ident, str) else ident.autotunnel_label()
    return dns.name.from_text(label, origin=zone)


def _rrsets(pub: Publication, zone: dns.name.Name) -> list[dns.rrset.RRset]:
    h = host_name(pub.host, zone)
    target = target_name(pub.autotunnel, zone)
    txt = " ".join(
        f'"{s}"'
        for s in ("btmm=1", f"pk={pub.public_key}", f"model={pub.model}", f"sw={pub.version}")
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


def publish_update(
    zone: dns.name.Name, pub: Publication, previous: Publication | None, lease: int
) -> dns.update.UpdateMessage:
    """The UPDATE that makes the zone say ``pub``, with an update lease.

    Unchanged data is only re-added (the registry extends its lease without a new serial, so
    watchers see no churn); an RRset whose data changed is replaced in the same message.
    """
    upd = dns.update.UpdateMessage(zone)
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


def withdraw_update(zone: dns.name.Name, pub: Publication) -> dns.update.UpdateMessage:
    """The UPDATE that removes everything ``pub`` put in the zone (clean shutdown)."""
    upd = dns.update.UpdateMessage(zone)
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
    )


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
