"""The registry's side of device enrolment (dns/enrol.py has the protocol), sans-I/O.

Installed by ``RegistryCore`` as the handler of the ``EnrolOption``: it runs after the TSIG
checks (key, MAC, time, replay) passed, and answers with a message the core signs with the
request's key. Rules:

- only an UPDATE for a user zone, signed with that zone's account key or one of its invite
  tokens (a device key cannot enrol devices: REFUSED);
- an invite enrols one device, once: it is deleted in the same transaction that stores the
  device key; an expired invite, an invite made for another device name, or an invite asking
  to replace a device is REFUSED;
- a device name already enrolled is YXDOMAIN unless the request says "replace" and is signed
  with the account key;
- nothing is stored before the answer is known to be NOERROR, and the request's MAC is stored
  with the key, so a replay after a restart is refused too.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import structlog
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from btmm_core.dns.enrol import find_option, server_side
from btmm_core.dns.names import device_name_problem
from btmm_core.dns.tsig import KeyRole, TsigKey
from btmm_core.registry.model import DeviceKey, SeenMac
from btmm_core.registry.storage import DatabaseUnavailable, StorageError

if TYPE_CHECKING:
    from btmm_core.registry.handler import RequestContext

log = structlog.get_logger("btmm.registry")


def _key_problem(key: TsigKey, device: str, replace: bool, now: float) -> str | None:
    """Why ``key`` may not enrol ``device`` (answered REFUSED), or None."""
    problem = device_name_problem(device)
    if problem is not None:
        return problem
    if key.role == KeyRole.DEVICE:
        return "a device key cannot enrol devices"
    if key.role == KeyRole.INVITE:
        if key.expires is not None and now > key.expires:
            return "the invite has expired"
        if key.device is not None and key.device != device:
            return f"the invite is for device {key.device}"
        if replace:
            return "only the account key may replace a device"
    return None


def handle_enrolment(ctx: RequestContext) -> dns.message.Message | None:
    request = ctx.request
    option = find_option(request)
    if option is None:
        return None
    response = dns.message.make_response(request)
    response.flags &= ~dns.flags.AA
    asked = option.text

    def refuse(rcode: dns.rcode.Rcode, why: str) -> dns.message.Message:
        log.warning("enrolment refused", peer=ctx.peer, device=asked, why=why,
                    key=None if ctx.key is None else str(ctx.key.name))
        response.set_rcode(rcode)
        return response

    if request.opcode() != dns.opcode.UPDATE or len(request.question) != 1:
        return refuse(dns.rcode.FORMERR, "not an UPDATE with one zone")
    q = request.question[0]
    zone = ctx.core.store.zones.get(q.name)
    if q.rdtype != dns.rdatatype.SOA or q.rdclass != dns.rdataclass.IN or zone is None:
        return refuse(dns.rcode.NOTAUTH, "no such zone")
    if request.sections[1] or request.sections[2]:
        return refuse(dns.rcode.FORMERR, "an enrolment carries no prerequisites or updates")
    if option.version != 1:
        return refuse(dns.rcode.FORMERR, f"enrolment version {option.version}")
    key = ctx.key
    if key is None or zone.user is None or key.zone != zone.name or request.tsig is None:
        return refuse(dns.rcode.REFUSED, "not signed with a key of this zone")
    device = option.text
    problem = _key_problem(key, device, option.replace, ctx.now)
    if problem is not None:
        return refuse(dns.rcode.REFUSED, problem)
    invite = key.name if key.role == KeyRole.INVITE else None
    enrolled = any(
        k.role == KeyRole.DEVICE and k.zone == zone.name and k.device == device
        for k in ctx.core.store.keys.values()
    )
    if enrolled and not option.replace:
        return refuse(dns.rcode.YXDOMAIN, "device enrolled already (join --replace)")
    rd = request.tsig[0]
    answer = server_side(
        X25519PrivateKey.generate(), option, zone=zone.name, request_mac=rd.mac
    )
    try:
        ctx.core.store.enrol(
            DeviceKey(zone.user, answer.key, time.time()),
            invite=invite,
            replace=option.replace,
            seen=SeenMac(key.name, rd.time_signed, rd.mac),
        )
    except DatabaseUnavailable as e:  # nothing was stored; the client may try again
        log.error("enrolment not stored", error=e.what)
        response.set_rcode(dns.rcode.SERVFAIL)
        return response
    except StorageError as e:
        return refuse(dns.rcode.YXDOMAIN, e.what)
    except Exception as e:  # sqlite3 errors: nothing was stored, say so
        log.error("enrolment not stored", error=repr(e))
        response.set_rcode(dns.rcode.SERVFAIL)
        return response
    log.info("device enrolled", zone=str(zone.name), device=device, peer=ctx.peer,
             by="invite" if invite is not None else "account key", replace=option.replace)
    response.use_edns(0, 0, ctx.core.policy.udp_payload, options=[answer.option])
    return response
