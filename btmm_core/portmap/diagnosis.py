"""What netcheck concludes, in words, sans-I/O.

The client records what each protocol did (``Attempt``); ``diagnose`` turns the attempts and the
host's own address into one ``Diagnosis``: mapped, no NAT, double NAT, no mapping protocol on the
gateway, or mapping refused.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from btmm_core.portmap.addresses import AddressKind, classify


class Outcome(enum.Enum):
    MAPPED = "mapped"
    UNSUPPORTED = "unsupported version"  # PCP answered with NAT-PMP or UNSUPP_VERSION
    NO_ANSWER = "no answer"
    REFUSED = "refused"
    NOT_TRIED = "not tried"


@dataclass(frozen=True)
class Attempt:
    protocol: str
    outcome: Outcome
    detail: str = ""


class Verdict(enum.Enum):
    MAPPED = "mapped"
    NO_NAT = "no NAT"
    DOUBLE_NAT = "double NAT"
    NO_PROTOCOL = "gateway without a mapping protocol"
    REFUSED = "mapping refused"
    NO_GATEWAY = "no default gateway"


@dataclass(frozen=True)
class Diagnosis:
    verdict: Verdict
    text: str


def diagnose_host(local_address: str | None, gateway: str | None) -> Diagnosis | None:
    """Before asking anyone: is there a gateway, and is the host itself public?"""
    if gateway is None:
        return Diagnosis(Verdict.NO_GATEWAY, "this host has no IPv4 default route, so there is "
                         "no gateway to ask; check the network connection")
    if local_address is not None and classify(local_address) is AddressKind.PUBLIC:
        return Diagnosis(Verdict.NO_NAT, f"no NAT: this host has the public address "
                         f"{local_address}; peers reach it directly (a firewall may still "
                         f"block them)")
    return None


def diagnose_external(external: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Diagnosis | None:
    """The gateway's external address is itself private or shared: another NAT is outside."""
    if isinstance(external, ipaddress.IPv6Address):
        return None
    kind = classify(external)
    if kind in (AddressKind.PRIVATE, AddressKind.SHARED):
        return Diagnosis(Verdict.DOUBLE_NAT, f"double NAT: the gateway's external address "
                         f"{external} is {kind.value}, so another NAT sits between it and the "
                         f"internet; a mapping on this gateway alone cannot be reached from "
                         f"outside (ask the outer router or ISP for a port forward, or use "
                         f"a relay)")
    return None


def diagnose_failure(attempts: list[Attempt]) -> Diagnosis:
    """No mapping was made: say why, from what each protocol did."""
    refused = [a for a in attempts if a.outcome is Outcome.REFUSED]
    if refused:
        a = refused[0]
        return Diagnosis(Verdict.REFUSED, f"mapping refused: the gateway answered {a.protocol} "
                         f"with {a.detail}; enable port mapping (NAT-PMP/PCP or UPnP) on the "
                         f"router or forward the port by hand")
    tried = ", ".join(f"{a.protocol}: {a.outcome.value}" + (f" ({a.detail})" if a.detail else "")
                      for a in attempts if a.outcome is not Outcome.NOT_TRIED)
    return Diagnosis(Verdict.NO_PROTOCOL, f"the gateway offers no mapping protocol ({tried}); "
                     f"enable NAT-PMP/PCP or UPnP IGD on the router, or forward the UDP port by "
                     f"hand")
