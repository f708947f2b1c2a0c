"""The LLQ EDNS0 option (RFC 8764 section 3.2; EDNS(0): RFC 6891), registered with dnspython
for option code 1.

Eighteen bytes: LLQ-VERSION (16 bits), LLQ-OPCODE (16), LLQ-ERROR (16), LLQ-ID (64),
LLQ-LEASE (32). An option of any other length is kept, marked malformed, instead of failing the
whole message: RFC 8764 section 3.2 wants a badly formed LLQ answered with LLQ-ERROR FORMAT-ERR
inside a NOERROR message, so that a client can tell "this server does not speak LLQ" (FORMERR)
from "my LLQ was wrong".
"""

from __future__ import annotations

import enum
import struct
from typing import Any

import dns.edns
import dns.wire

LLQ_CODE = 1
LLQ_VERSION = 1
LLQ_LENGTH = 18
_FORMAT = "!HHHQI"

#: TTL that marks a removed record in an event (RFC 8764 section 6.1).
REMOVED_TTL = 0xFFFFFFFF


class LLQOpcode(enum.IntEnum):
    SETUP = 1
    REFRESH = 2
    EVENT = 3


class LLQError(enum.IntEnum):
    NO_ERROR = 0
    SERV_FULL = 1
    STATIC = 2
    FORMAT_ERR = 3
    NO_SUCH_LLQ = 4
    BAD_VERS = 5
    UNKNOWN_ERR = 6


class LLQOption(dns.edns.Option):
    """One LLQ option. ``raw`` is set (and the fields are zero) when the data was not 18 bytes."""

    def __init__(
        self,
        opcode: int,
        error: int = LLQError.NO_ERROR,
        llq_id: int = 0,
        lease: int = 0,
        version: int = LLQ_VERSION,
        *,
        raw: bytes | None = None,
    ) -> None:
        super().__init__(dns.edns.OptionType.make(LLQ_CODE))
        for field, value, bits in (
            ("version", version, 16),
            ("opcode", opcode, 16),
            ("error", error, 16),
            ("id", llq_id, 64),
            ("lease", lease, 32),
        ):
            if not 0 <= value < (1 << bits):
                raise ValueError(f"LLQ {field} {value} does not fit in {bits} bits")
        self.version = version
        self.opcode = opcode
        self.error = error
        self.llq_id = llq_id
        self.lease = lease
        self.raw = raw

    @property
    def malformed(self) -> bool:
        return self.raw is not None

    def data(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return struct.pack(_FORMAT, self.version, self.opcode, self.error, self.llq_id, self.lease)

    def to_wire(self, file: Any | None = None) -> bytes | None:
        data = self.data()
        if file:
            file.write(data)
            return None
        return data

    def to_text(self) -> str:
        if self.raw is not None:
            return f"LLQ malformed {self.raw.hex()}"
        try:
            op = LLQOpcode(self.opcode).name
        except ValueError:
            op = str(self.opcode)
        try:
            err = LLQError(self.error).name
        except ValueError:
            err = str(self.error)
        return f"LLQ v{self.version} {op} {err} id={self.llq_id:016x} lease={self.lease}"

    @classmethod
    def from_wire_parser(cls, otype: Any, parser: dns.wire.Parser) -> dns.edns.Option:
        data = parser.get_remaining()
        if len(data) != LLQ_LENGTH:
            return cls(0, raw=bytes(data))
        version, opcode, error, llq_id, lease = struct.unpack(_FORMAT, data)
        return cls(opcode, error, llq_id, lease, version)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LLQOption) and self.data() == other.data()

    def __hash__(self) -> int:
        return hash(self.data())

    def __repr__(self) -> str:
        return f"<{self.to_text()}>"


def find_llq(options: Any) -> list[LLQOption]:
    """The LLQ options among a message's EDNS options."""
    return [o for o in options if isinstance(o, LLQOption)]


def kdig_hex(option: LLQOption) -> str:
    """The option data as ``kdig +ednsopt=1:<hex>`` takes it."""
    return option.data().hex()


dns.edns.register_type(LLQOption, dns.edns.OptionType.make(LLQ_CODE))
