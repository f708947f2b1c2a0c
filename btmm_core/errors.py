"""The one error hierarchy of btmm.

Every error says what happened and, where there is one, what to do about it. Code that
catches errors from btmm catches ``BtmmError`` or one of its subclasses, never bare
``Exception``.
"""

from __future__ import annotations


class BtmmError(Exception):
    """Base of every error raised by btmm."""

    def __init__(self, what: str, *, hint: str | None = None) -> None:
        self.what = what
        self.hint = hint
        super().__init__(what if hint is None else f"{what} ({hint})")


class ConfigError(BtmmError):
    """A configuration value is missing, malformed or contradictory."""


class PermissionNeeded(BtmmError):
    """An operation needs privileges (CAP_NET_ADMIN, root) that the process lacks."""


class DataPlaneError(BtmmError):
    """The data plane engine could not do what it was asked."""


class EngineUnavailable(DataPlaneError):
    """The requested data plane engine cannot be loaded (for example: not built)."""


class TunError(DataPlaneError):
    """Opening or configuring the TUN device failed."""


class UnknownPeer(DataPlaneError):
    """The inner address names no configured peer."""


class SaExhausted(DataPlaneError):
    """A transmit SA used up its sequence space; a new SA must be installed (rekey)."""


class PacketDropped(DataPlaneError):
    """The ESP codec refused a packet; ``reason`` says why (a ``DropReason``)."""

    def __init__(self, reason: object, what: str) -> None:
        self.reason = reason
        super().__init__(what)


class PortMapError(BtmmError):
    """Asking the gateway for a port mapping (PCP, NAT-PMP, UPnP IGD) failed."""


class MalformedMessage(PortMapError):
    """A NAT-PMP, PCP or STUN datagram could not be parsed; it is ignored (or, for a STUN
    request, answered with an error). ``reason`` says why when the codec has a code for it
    (``stun.message.Fault``)."""

    def __init__(self, what: str, *, hint: str | None = None, reason: object = None) -> None:
        self.reason = reason
        super().__init__(what, hint=hint)


class MappingRefused(PortMapError):
    """The gateway answered, but refused the request; ``result`` is its result code."""

    def __init__(self, what: str, *, result: object = None, hint: str | None = None) -> None:
        self.result = result
        super().__init__(what, hint=hint)


class GatewayNotAnswering(PortMapError):
    """No mapping protocol answered on the gateway (no reply before the retries ran out)."""


class PeerRefused(BtmmError):
    """A peer's published records cannot be trusted (name outside our zone, address not bound
    to its key); it gets no route and no session."""


class DSOError(BtmmError):
    """A DNS Stateful Operations message (RFC 8490) is malformed or breaks the protocol.

    ``rcode`` is set when the fault is one a request is answered for (FORMERR for count fields
    that are not zero, RFC 8490 section 5.4); None means a fatal error: the connection is
    aborted (RFC 8490 section 5.3.1). ``msg_id`` is the message's ID when it could be read.
    """

    def __init__(
        self, what: str, *, hint: str | None = None, rcode: int | None = None, msg_id: int = 0
    ) -> None:
        self.rcode = rcode
        self.msg_id = msg_id
        super().__init__(what, hint=hint)


class RegistryError(BtmmError):
    """The host daemon's exchange with the registry failed."""


class RegistryUnreachable(RegistryError):
    """No answer from the registry (wrong address, firewall, server down)."""


class CredentialsRejected(RegistryError):
    """The registry refused our TSIG signature (BADSIG/BADKEY) or our right to the zone."""


class ClockSkew(RegistryError):
    """The registry refused our TSIG time (BADTIME): this host's clock is off.

    ``skew`` is how many seconds the registry's clock is ahead of ours (negative: behind), from
    the signed server time in the BADTIME answer; None when the answer did not say.
    """

    def __init__(self, what: str, *, hint: str | None = None, skew: float | None = None) -> None:
        self.skew = skew
        super().__init__(what, hint=hint)


class DaemonNotRunning(BtmmError):
    """No ``btmm up`` answers on its control socket: never started, stopped, or crashed."""


class ControlError(BtmmError):
    """``btmm up`` answered a control request with an error; ``code`` names it (the protocol's
    ``ErrorCode``, lower case: ``failed``, ``unknown_op``, ...)."""

    def __init__(self, what: str, *, hint: str | None = None, code: str = "failed") -> None:
        self.code = code
        super().__init__(what, hint=hint)


class TurnError(BtmmError):
    """A TURN relay (RFC 8656) could not be used: no credentials, the server refused them or
    the allocation, or it did not answer."""
