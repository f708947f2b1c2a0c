"""The EDNS0 Update Lease option, registered with dnspython.

EDNS(0) is RFC 6891. The option is RFC 9664 (An EDNS(0) Option to Negotiate Leases on DNS
Updates; draft-ietf-dnssd-update-lease before publication), section 4: option code 2,
either 4 bytes (LEASE, seconds) or 8 bytes (LEASE then KEY-LEASE, seconds). Any other length
is a format error, which dnspython turns into a parse failure (answered with FORMERR).
"""

from __future__ import annotations

import struct
from typing import Any

import dns.edns
import dns.exception
import dns.wire

UPDATE_LEASE_CODE = 2


class UpdateLeaseOption(dns.edns.Option):
    """Update Lease: ``lease`` seconds for the RRs of an update, ``key_lease`` for KEY RRs."""

    def __init__(self, lease: int, key_lease: int | None = None) -> None:
        super().__init__(dns.edns.OptionType.make(UPDATE_LEASE_CODE))
        if not 0 <= lease <= 0xFFFFFFFF:
            raise ValueError(f"update lease {lease} does not fit in 32 bits")
        if key_lease is not None and not 0 <= key_lease <= 0xFFFFFFFF:
            raise ValueError(f"key lease {key_lease} does not fit in 32 bits")
        self.lease = lease
        self.key_lease = key_lease

    def to_wire(self, file: Any | None = None) -> bytes | None:
        if self.key_lease is None:
            data = struct.pack("!I", self.lease)
        else:
            data = struct.pack("!II", self.lease, self.key_lease)
        if file:
            file.write(data)
            return None
        return data

    def to_text(self) -> str:
        if self.key_lease is None:
            return f"UL {self.lease}"
        return f"UL {self.lease} {self.key_lease}"

    @classmethod
    def from_wire_parser(cls, otype: Any, parser: dns.wire.Parser) -> dns.edns.Option:
        data = parser.get_remaining()
        if len(data) == 4:
            (lease,) = struct.unpack("!I", data)
            return cls(lease)
        if len(data) == 8:
            lease, key_lease = struct.unpack("!II", data)
            return cls(lease, key_lease)
        raise dns.exception.FormError(  # type: ignore[no-untyped-call]
            f"update lease option has {len(data)} bytes; RFC 9664 allows only 4 or 8"
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, UpdateLeaseOption)
            and self.lease == other.lease
            and self.key_lease == other.key_lease
        )

    def __hash__(self) -> int:
        return hash((self.lease, self.key_lease))


dns.edns.register_type(UpdateLeaseOption, dns.edns.OptionType.make(UPDATE_LEASE_CODE))
