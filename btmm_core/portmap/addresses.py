"""Classifying IPv4 addresses for the NAT diagnoses, sans-I/O.

Private space is RFC 1918; shared space is RFC 6598 (100.64.0.0/10, carrier-grade NAT). A
gateway reporting an external address in either is itself behind another NAT (double NAT).

Python's ``ipaddress.is_private`` is not used on purpose: it also counts the documentation
ranges (RFC 5737) as private, and those are this project's lab "internet".
"""

from __future__ import annotations

import enum
import ipaddress

_PRIVATE = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12",
                                                    "192.168.0.0/16"))
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")
_LOCAL = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
))


class AddressKind(enum.Enum):
    PUBLIC = "public"
    PRIVATE = "private (RFC 1918)"
    SHARED = "shared, carrier-grade NAT (RFC 6598)"
    LOCAL = "not routable (loopback, link-local, multicast or reserved)"


def classify(address: ipaddress.IPv4Address | str) -> AddressKind:
    addr = ipaddress.IPv4Address(address)
    if any(addr in n for n in _PRIVATE):
        return AddressKind.PRIVATE
    if addr in _SHARED:
        return AddressKind.SHARED
    if any(addr in n for n in _LOCAL):
        return AddressKind.LOCAL
    return AddressKind.PUBLIC


def is_behind_nat(address: ipaddress.IPv4Address | str) -> bool:
    """True for an address that the internet cannot reach directly."""
    return classify(address) is not AddressKind.PUBLIC
