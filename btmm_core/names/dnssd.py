"""Wide-area DNS-SD records for a host's services, sans-I/O (RFC 6763).

``[services]`` in btmm.toml (``ssh = 22``, or ``smb = { port = 445, txt = { path = "/" } }``,
``proto = "udp"`` for a UDP service) becomes, in the user's zone:

===============================================  =====  ===========================================
name                                             type   data
===============================================  =====  ===========================================
``_ssh._tcp.<zone>``                             PTR    ``<host>._ssh._tcp.<zone>`` (section 4.1)
``<host>._ssh._tcp.<zone>``                      SRV    ``0 0 22 <host>.<zone>`` (section 5)
``<host>._ssh._tcp.<zone>``                      TXT    the keys, or one empty string (section 6.1)
``_services._dns-sd._udp.<zone>``                PTR    ``_ssh._tcp.<zone>`` (section 9)
``b._dns-sd._udp.<zone>``, ``lb._dns-sd._udp``   PTR    ``<zone>`` (section 11: browse domains)
===============================================  =====  ===========================================

The instance name is the host's name, which only this device's key may use there
(``registry/authority.py``). The last four rows are shared by every host of the zone: a
withdrawal deletes the host's own instance and its PTR, never a shared record; those expire
with their lease when no host refreshes them any more.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.SRV
import dns.rrset
import dns.update

from btmm_core.dns.edns import UpdateLeaseOption
from btmm_core.errors import ConfigError

#: RFC 6335 section 5.1: 1-15 letters, digits and hyphens, a letter somewhere, no hyphen at
#: either end or two in a row.
_SERVICE = re.compile(r"^(?!-)(?!.*--)[a-z0-9-]{1,15}(?<!-)$")
SERVICES = dns.name.from_text("_services._dns-sd._udp", origin=None)
BROWSE_DOMAIN_LABELS = ("b", "lb")
TTL = 60


@dataclass(frozen=True)
class ServiceSpec:
    """One service of this host: ``_<name>._<proto>`` on ``port`` with TXT ``key=value``s."""

    name: str
    proto: str
    port: int
    txt: tuple[tuple[str, str], ...] = ()

    @property
    def type_label(self) -> str:
        return f"_{self.name}._{self.proto}"

    def type_name(self, zone: dns.name.Name) -> dns.name.Name:
        return dns.name.from_text(self.type_label, origin=zone)

    def instance(self, host: str, zone: dns.name.Name) -> dns.name.Name:
        return dns.name.Name((host.encode(),)).concatenate(self.type_name(zone))


def parse_services(table: Mapping[str, Any]) -> tuple[ServiceSpec, ...]:
    """The ``[services]`` table; ConfigError names the entry that is wrong."""
    out = []
    for name, value in table.items():
        where = f"[services] {name}"
        if not _SERVICE.match(name) or not any(c.isalpha() for c in name):
            raise ConfigError(f"{where}: not a service name (RFC 6335: e.g. ssh, smb, http)")
        if isinstance(value, int) and not isinstance(value, bool):
            value = {"port": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: give a port (ssh = 22) or a table with port")
        unknown = set(value) - {"port", "proto", "txt"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}",
                              hint="known: port, proto, txt")
        port, proto, txt = value.get("port"), value.get("proto", "tcp"), value.get("txt", {})
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ConfigError(f"{where}: port {port!r} is not 1..65535")
        if proto not in ("tcp", "udp"):
            raise ConfigError(f'{where}: proto {proto!r}: use "tcp" or "udp"')
        if not isinstance(txt, dict):
            raise ConfigError(f"{where}: txt must be a table of key = \"value\"")
        pairs = []
        for k, v in txt.items():
            item = f"{k}={v}"
            # RFC 6763 section 6.4/6.1: printable ASCII keys without '=', each string <= 255
            if not k or "=" in k or not k.isascii() or not k.isprintable() \
                    or len(item.encode()) > 255:
                raise ConfigError(f"{where}: TXT key {k!r} is not usable (RFC 6763 6.4)")
            pairs.append((str(k), str(v)))
        out.append(ServiceSpec(name, proto, port, tuple(pairs)))
    return tuple(sorted(out, key=lambda s: (s.proto, s.name)))


def _txt_strings(spec: ServiceSpec) -> list[bytes]:
    return [f"{k}={v}".encode() for k, v in spec.txt] or [b""]


def service_rrsets(zone: dns.name.Name, host: str,
                   services: tuple[ServiceSpec, ...]) -> list[dns.rrset.RRset]:
    """Every RRset this host publishes for ``services``, shared ones included."""
    target = dns.name.from_text(host, origin=zone)
    out: list[dns.rrset.RRset] = []
    types: list[dns.name.Name] = []
    for spec in services:
        inst = spec.instance(host, zone)
        out.append(_rrset(spec.type_name(zone), dns.rdtypes.ANY.PTR.PTR(  # type: ignore[no-untyped-call]
            dns.rdataclass.IN, dns.rdatatype.PTR, inst)))
        out.append(_rrset(inst, dns.rdtypes.IN.SRV.SRV(  # type: ignore[no-untyped-call]
            dns.rdataclass.IN, dns.rdatatype.SRV, 0, 0, spec.port, target)))
        out.append(_rrset(inst, dns.rdtypes.ANY.TXT.TXT(
            dns.rdataclass.IN, dns.rdatatype.TXT, _txt_strings(spec))))
        types.append(spec.type_name(zone))
    if services:
        for t in types:
            out.append(_rrset(SERVICES.concatenate(zone), dns.rdtypes.ANY.PTR.PTR(  # type: ignore[no-untyped-call]
                dns.rdataclass.IN, dns.rdatatype.PTR, t)))
        for label in BROWSE_DOMAIN_LABELS:
            name = dns.name.from_text(f"{label}._dns-sd._udp", origin=zone)
            out.append(_rrset(name, dns.rdtypes.ANY.PTR.PTR(  # type: ignore[no-untyped-call]
                dns.rdataclass.IN, dns.rdatatype.PTR, zone)))
    return out


def _rrset(name: dns.name.Name, rd: dns.rdata.Rdata) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(name, dns.rdataclass.IN, rd.rdtype)
    rrset.add(rd, TTL)
    return rrset


def publish_update(zone: dns.name.Name, host: str, services: tuple[ServiceSpec, ...],
                   previous: tuple[ServiceSpec, ...] | None, lease: int
                   ) -> dns.update.UpdateMessage:
    """The UPDATE that publishes ``services`` with a lease. Services gone since ``previous``
    are withdrawn in the same message, a changed instance has its SRV and TXT replaced (so
    does every instance when ``previous`` is None), and an unchanged one is only re-added (its
    lease moves; no serial, no LLQ event)."""
    upd = dns.update.UpdateMessage(zone)
    old = {(s.name, s.proto): s for s in previous or ()}
    new = {(s.name, s.proto): s for s in services}
    for key, spec in old.items():
        if key not in new:
            _withdraw_one(upd, zone, host, spec)
        elif new[key] != spec:
            upd.delete(spec.instance(host, zone))
    if previous is None:
        # the first publication of a run replaces each instance: an SRV or TXT that a crashed
        # run left (another port, other keys) must not stay beside the new one
        for spec in services:
            upd.delete(spec.instance(host, zone))
    for rrset in service_rrsets(zone, host, services):
        upd.add(rrset.name, rrset)
    upd.use_edns(0, options=[UpdateLeaseOption(lease)])
    return upd


def _withdraw_one(upd: dns.update.UpdateMessage, zone: dns.name.Name, host: str,
                  spec: ServiceSpec) -> None:
    inst = spec.instance(host, zone)
    upd.delete(inst)
    upd.delete(spec.type_name(zone), dns.rdtypes.ANY.PTR.PTR(  # type: ignore[no-untyped-call]
        dns.rdataclass.IN, dns.rdatatype.PTR, inst))


def withdraw_update(zone: dns.name.Name, host: str,
                    services: tuple[ServiceSpec, ...]) -> dns.update.UpdateMessage:
    """The UPDATE that removes this host's instances (clean shutdown); shared records stay."""
    upd = dns.update.UpdateMessage(zone)
    for spec in services:
        _withdraw_one(upd, zone, host, spec)
    return upd


def service_type(text: str, zone: dns.name.Name) -> dns.name.Name:
    """``ssh``, ``_ssh._tcp`` or ``_ssh._tcp.<zone>.`` as the service type's name in ``zone``."""
    t = text.rstrip(".")
    if not t.startswith("_"):
        t = f"_{t}._tcp"
    name = dns.name.from_text(t, origin=zone)
    if not name.is_subdomain(zone):
        raise ConfigError(f"{text} is not a service type of {zone}")
    return name


def instance_name(text: str, zone: dns.name.Name) -> dns.name.Name:
    """``laptop._ssh._tcp`` (relative to ``zone``) or an absolute instance name."""
    name = dns.name.from_text(text, origin=zone) if not text.endswith(".") \
        else dns.name.from_text(text)
    if not name.is_subdomain(zone) or len(name) < len(zone) + 3:
        raise ConfigError(f"{text} is not a service instance of {zone}",
                          hint="e.g. laptop._ssh._tcp")
    return name


def txt_text(strings: list[bytes]) -> str:
    """TXT strings for people: ``k=v`` joined by spaces, empty ones left out."""
    return " ".join(s.decode("utf-8", "replace") for s in strings if s)


def is_dnssd_name(name: dns.name.Name, zone: dns.name.Name) -> bool:
    """Whether ``name`` is where DNS-SD browsing looks in ``zone``: a service type
    ``_x._tcp|_udp``, a subtype ``_y._sub._x._tcp``, an instance ``<i>._x._tcp``, or a name
    under ``_dns-sd._udp`` (RFC 6763 sections 4, 7.1, 9, 11). btmm's own ``_autotunnel`` and
    ``_btmm-path`` records are not DNS-SD."""
    if not name.is_subdomain(zone) or name == zone:
        return False
    rel = [label.lower() for label in name.relativize(zone).labels]
    if len(rel) < 2 or len(rel) > 4 or rel[-1] not in (b"_tcp", b"_udp"):
        return False
    service = rel[-2]
    if not service.startswith(b"_") or service in (b"_autotunnel", b"_btmm-path"):
        return False
    return len(rel) < 4 or rel[1] == b"_sub"
