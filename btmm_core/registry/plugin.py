"""The seam through which features served beside the registry plug in (LLQ today, DNS Push
later) without the registry knowing them: the composition root (``btmm_core.serve``) calls
``RegistryCore.plug``, and the driver (``RegistryServer``) runs every plug-in it finds there.

A plug-in is a sans-I/O core like the registry's. It answers the requests that carry one of its
EDNS options (the core has verified their TSIG and signs and renders the answer), and it gets
the DNS responses clients send (QR set; LLQ event acknowledgements), every batch of committed
RRset changes, the end of TCP/TLS connections and its own timers. A plug-in may also take the
DSO messages (RFC 8490) of DNS-over-TLS connections and hear which TSIG key signed a request on
a connection (DNS Push). Whatever it sends on its own
comes back from the call that caused it, as ``Outgoing`` messages the driver delivers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import dns.message

    from btmm_core.dns.tsig import TsigKey
    from btmm_core.registry.handler import RequestContext, Transport
    from btmm_core.registry.model import RRsetChange


@dataclass(frozen=True)
class Outgoing:
    """A message the driver must send: to ``peer`` ("address#port") over ``transport`` (over
    TCP/TLS: on that open connection, or not at all)."""

    transport: Transport
    peer: str
    wire: bytes
    #: After ``wire`` (if any), forcibly abort the connection (RFC 8490 5.3: a DSO protocol
    #: error). Ignored over UDP.
    close: bool = False


def is_response(wire: bytes) -> bool:
    """Whether a message has QR set: not a request for the registry core but for the plug-ins."""
    return len(wire) >= 12 and bool(wire[2] & 0x80)


class Plugin(Protocol):
    #: The EDNS option codes whose requests ``receive`` answers.
    option_codes: tuple[int, ...]
    #: Whether DSO messages (RFC 8490, OPCODE 6) on DNS-over-TLS connections go to
    #: ``receive_message`` (DNS Push) instead of the registry core.
    dso: bool

    def receive(self, ctx: RequestContext) -> dns.message.Message | None:
        """Answer a request carrying one of ``option_codes``; None lets the core answer it."""
        ...

    def receive_response(
        self, wire: bytes, now: float, transport: Transport, peer: str
    ) -> list[Outgoing]:
        """A message with QR set from a client (unparsed, unverified)."""
        ...

    def receive_message(
        self, wire: bytes, now: float, transport: Transport, peer: str
    ) -> list[Outgoing]:
        """A DSO message (only for a plug-in with ``dso`` set; unparsed)."""
        ...

    def on_signed(self, transport: Transport, peer: str, key: TsigKey, now: float) -> None:
        """A request on a TCP/TLS connection carried a TSIG that verified with ``key`` (told
        before the request is answered): DNS Push binds the session to that key's user."""
        ...

    def on_changes(self, changes: Sequence[RRsetChange], now: float) -> list[Outgoing]:
        """RRset changes, after they are durable (updates, lease expiry, revoked devices)."""
        ...

    def connection_closed(self, transport: Transport, peer: str) -> int:
        """A TCP/TLS connection ended; returns how many things ended with it."""
        ...

    def holds_connection(self, transport: Transport, peer: str) -> bool:
        """Whether an idle TCP/TLS connection must stay open (it carries the plug-in's state)."""
        ...

    def next_deadline(self) -> float | None: ...

    def tick(self, now: float) -> list[Outgoing]: ...
