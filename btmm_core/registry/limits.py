"""Bounds on the work one signed UPDATE may cause, and who counts as one client, sans-I/O
(issue 11 items 5 and 8).

RFC 2136 section 3 leaves resource limits to the server. An UPDATE over TCP may carry up to
64 KB, about 3,000 RRs; one key may send them back to back. Both are bounded before any
planning: ``UpdateLimits.max_rrs`` per message (prerequisite and update sections together), and
a token bucket of RRs changed per key (``KeyBudget``), refilled at ``key_rate`` per second up to
``key_burst``. Time is passed in as ``now``.

Limits per client count an IPv6 client per /64 (``client_prefix``): one host usually holds a
whole /64 and can pick any address in it.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

import dns.name


@dataclass(frozen=True)
class UpdateLimits:
    """Per-message and per-key bounds on UPDATE work; a rate of 0 turns the key budget off."""

    max_rrs: int = 500
    key_rate: float = 200.0
    key_burst: int = 2000

    def __post_init__(self) -> None:
        if self.max_rrs < 1:
            raise ValueError(f"at most {self.max_rrs} RRs per update: it must be at least 1")
        if self.key_rate < 0:
            raise ValueError(f"key rate {self.key_rate} RRs/s: it must be 0 (off) or more")
        if self.key_rate and self.key_burst < self.max_rrs:
            raise ValueError(
                f"key burst {self.key_burst} RRs is below the per-update limit {self.max_rrs}:"
                " the largest allowed update could never pass"
            )


def update_too_big(wire: bytes, limits: UpdateLimits) -> str | None:
    """Why an UPDATE is refused from its header alone (PRCOUNT + UPCOUNT), or None.

    Checked before the message is parsed; no client of ours sends more than a few dozen RRs
    at once.
    """
    if len(wire) < 12:
        return None
    (prcount, upcount) = struct.unpack("!HH", wire[6:10])
    if prcount + upcount > limits.max_rrs:
        return f"{prcount + upcount} RRs in one update, the limit is {limits.max_rrs}"
    return None


class KeyBudget:
    """A token bucket of RRs per TSIG key: ``take`` spends ``cost`` tokens or refuses."""

    #: Buckets kept before full (idle) ones are forgotten; a full bucket is the default state.
    MAX_TRACKED = 4096

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: dict[dns.name.Name, tuple[float, float]] = {}

    def level(self, key: dns.name.Name, now: float) -> float:
        """Tokens ``key`` has at ``now``."""
        tokens, then = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - then) * self.rate)

    def take(self, key: dns.name.Name, cost: int, now: float) -> bool:
        if not self.rate:
            return True
        tokens = self.level(key, now)
        if cost > tokens:
            return False
        if len(self._buckets) >= self.MAX_TRACKED and key not in self._buckets:
            self._forget_full(now)
        self._buckets[key] = (tokens - cost, now)
        return True

    def _forget_full(self, now: float) -> None:
        for k in [k for k in self._buckets if self.level(k, now) >= self.burst]:
            del self._buckets[k]


def client_prefix(address: str) -> str:
    """The unit per-client limits count: an IPv4 address, or an IPv6 address's /64.

    An IPv4-mapped IPv6 address counts as its IPv4 address; a zone index (``%eth0``) is
    ignored. Anything that is not an IP address is returned as it is.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
