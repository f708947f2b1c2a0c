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

An invite token may change nothing (it only enrols one device: registry/enrolment.py).
Prerequisites are not restricted: they only read, and every key of the user may read the zone.
"""

from __future__ import annotations

from dataclasses import dataclass

import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype

from btmm_core.dns.names import TUNNEL_PREFIX
from btmm_core.dns.tsig import KeyRole, TsigKey
from btmm_core.registry.zones import Zone

BROWSE = dns.name.from_text("_autotunnel._udp", origin=None)


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
        if is_tunnel_name(zone.name, name):
            holder = zone.owners.get(name)
            if holder not in (None, device) and zone.stored_types(name):
                return Verdict(f"{name} holds records of device {holder}")
            if rr.deleting is None and holder != device:
                claims[name] = device
            continue
        return Verdict(f"{name} is not a name of device {device}")
    return Verdict(None, tuple(claims.items()))
