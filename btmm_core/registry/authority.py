"""Who may change what in a user zone: the rules for device keys, sans-I/O.

RFC 2136 section 3.3 leaves the permission check to the server ("the requestor is permitted to
update the RRs"). The account key (``btmm serve user add``) may change every name of its zone.
A device key (``btmm join``) may change only what is its own:

- ``<device>.<zone>`` and every name below it (its AAAA, TXT and ``_autotunnel._udp`` SRV);
- in the shared browse list ``_autotunnel._udp.<zone>``: add or delete the one PTR whose target
  is ``<device>.<zone>``; never another PTR, never the whole RRset or name;
- a tunnel-endpoint name ``AutoTunnel-...`` one label below the zone (the target of its SRV),
  unless another device holds that name and records are still there. The name alone does not
  say whose it is, so the registry remembers which device first put records there (a *claim*,
  stored with the change); the claim lapses when the name is empty.

DNS-SD (RFC 6763; the records of ``names/dnssd.py``), so that a device can publish its services:

- its own service instances ``<device>._<service>._tcp|_udp.<zone>`` (anything at them);
- at a service type ``_<service>._tcp|_udp.<zone>``: add or delete the one PTR whose target
  is its own instance there; never another PTR, never the whole RRset or name;
- the shared ``_services._dns-sd._udp.<zone>`` PTRs naming a service type of the zone, and the
  browse-domain PTRs ``b``/``db``/``lb._dns-sd._udp.<zone>`` naming the zone: add only (a
  device cannot take another's entry away; unrefreshed ones expire with their lease).

An invite token may change nothing (it only enrols one device: registry/enrolment.py).
Prerequisites are not restricted: they only read, and every key of the user may read the zone.
"""

from __future__ import annotations

from dataclasses import dataclass

import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from btmm_core.dns.names import TUNNEL_PREFIX
from btmm_core.dns.tsig import KeyRole, TsigKey
from btmm_core.registry.zones import Zone

BROWSE = dns.name.from_text("_autotunnel._udp", origin=None)
DNSSD_UDP = dns.name.from_text("_dns-sd._udp", origin=None)
SERVICES = dns.name.from_text("_services", origin=None).concatenate(DNSSD_UDP)
#: service types that are btmm's own (the browse list above): not DNS-SD services
_OWN_TYPES = frozenset({b"_autotunnel", b"_btmm-path", b"_dns-sd"})


@dataclass(frozen=True)
class Verdict:
    """``refused`` says why the update is refused (None: allowed); ``claims`` are the names the
    device takes by this update (stored with the change set)."""

    refused: str | None
    claims: tuple[tuple[dns.name.Name, str], ...] = ()


def is_tunnel_name(zone: dns.name.Name, name: dns.name.Name) -> bool:
    if len(name) != len(zone) + 1 or not name.is_subdomain(zone):
        return False
    label: bytes = name[0]
    return label.decode("ascii", "replace").lower().startswith(TUNNEL_PREFIX)


def check_update(zone: Zone, key: TsigKey, request: dns.message.Message) -> Verdict:
    """May ``key`` make the update section of ``request`` in ``zone``?

    Call after the TSIG checks and the zone match, before planning the update.
    """
    if key.role == KeyRole.ACCOUNT:
        return Verdict(None)
    if key.role != KeyRole.DEVICE or key.device is None:
        return Verdict("an invite token only enrols a device; it cannot update")
    device = key.device
    own = dns.name.from_text(device, origin=zone.name)
    browse = BROWSE.concatenate(zone.name)
    claims: dict[dns.name.Name, str] = {}
    for rr in request.sections[2]:
        name = rr.name
        if name.is_subdomain(own):
            continue
        if name == browse:
            if rr.rdtype != dns.rdatatype.PTR or rr.deleting == dns.rdataclass.ANY:
                return Verdict(
                    f"device {device} may only add or delete its own PTR at {browse}"
                )
            for rd in rr:
                target = getattr(rd, "target", None)
                if target != own:
                    return Verdict(f"device {device} may not touch the browse entry {target}")
            continue
        refused = _dnssd_refusal(zone.name, device, rr)
        if refused is None:
            continue
        if refused:
            return Verdict(refused)
        if is_tunnel_name(zone.name, name):
            holder = zone.owners.get(name)
            if holder not in (None, device) and zone.stored_types(name):
                return Verdict(f"{name} holds records of device {holder}")
            if rr.deleting is None and holder != device:
                claims[name] = device
            continue
        return Verdict(f"{name} is not a name of device {device}")
    return Verdict(None, tuple(claims.items()))


def service_type_of(zone: dns.name.Name, name: dns.name.Name) -> bool:
    """Whether ``name`` is ``_<service>._tcp|_udp.<zone>`` (not one of btmm's own)."""
    if len(name) != len(zone) + 2 or not name.is_subdomain(zone):
        return False
    service, proto = (label.lower() for label in name.labels[:2])
    return proto in (b"_tcp", b"_udp") and service.startswith(b"_") and service not in _OWN_TYPES


def _dnssd_refusal(zone: dns.name.Name, device: str, rr: dns.rrset.RRset) -> str | None:
    """For an update RR at a DNS-SD name: None (allowed) or why it is refused; "" when the name
    is no DNS-SD name (the other rules decide)."""
    name = rr.name
    if len(name) == len(zone) + 3 and service_type_of(zone, name.parent()):
        if name.labels[0].lower() == device.encode():
            return None
        return f"{name} is another device's service instance"
    targets = [getattr(rd, "target", None) for rd in rr]
    if service_type_of(zone, name):
        own = dns.name.Name((device.encode(),)).concatenate(name)
        if rr.rdtype != dns.rdatatype.PTR or rr.deleting == dns.rdataclass.ANY or any(
            t != own for t in targets
        ):
            return f"device {device} may only add or delete its own PTR ({own}) at {name}"
        return None
    dnssd = DNSSD_UDP.concatenate(zone)
    if name.parent() == dnssd and name.labels[0].lower() in (b"_services", b"b", b"db", b"lb"):
        services = name == SERVICES.concatenate(zone)
        if rr.rdtype != dns.rdatatype.PTR or rr.deleting is not None or any(
            t is None or (not service_type_of(zone, t) if services else t != zone)
            for t in targets
        ):
            return f"device {device} may only add PTRs at {name}"
        return None
    return ""
