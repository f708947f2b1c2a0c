"""Asking the gateway for a UDP mapping: the thin asyncio driver over ``pcp`` and ``natpmp``.

Order (issue 5): PCP first; NAT-PMP when the gateway answers PCP with an unsupported version;
UPnP IGD when neither answers. One request at a time per gateway (a lock), every exchange
bounded by its retry schedule. Every answer's epoch goes through an ``EpochTracker``; a loss of
state is remembered in ``state_lost`` for the renewal (``renewal.MappingRenewal``) to act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from btmm_core.aio import within
from btmm_core.errors import GatewayNotAnswering, MappingRefused, PortMapError
from btmm_core.portmap import natpmp, pcp
from btmm_core.portmap.diagnosis import Attempt, Outcome
from btmm_core.portmap.epoch import EpochRule, EpochTracker
from btmm_core.portmap.retry import (
    NATPMP_SCHEDULE,
    PCP_SCHEDULE,
    Exchange,
    ExchangeState,
    RetrySchedule,
)

T = TypeVar("T")

PROTOCOLS = ("pcp", "natpmp", "upnp")
DEFAULT_LIFETIME = 7200


@dataclass(frozen=True)
class Mapping:
    """An inbound UDP mapping the gateway granted."""

    protocol: str
    gateway: str
    internal_address: str
    internal_port: int
    external_address: ipaddress.IPv4Address | ipaddress.IPv6Address
    external_port: int
    lifetime: int
    obtained_at: float
    epoch: int | None = None

    def remaining(self, now: float) -> float:
        return max(0.0, self.obtained_at + self.lifetime - now)

    def renew_at(self) -> float:
        """Half the lifetime (RFC 6886 §3.3, RFC 6887 §11.2.1)."""
        return self.obtained_at + self.lifetime / 2


def default_gateway() -> str | None:
    """The IPv4 default gateway from the kernel's routing table, or None."""
    try:
        with open("/proc/net/route") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "00000000" and parts[2] != "00000000":
            return str(ipaddress.IPv4Address(int(parts[2], 16).to_bytes(4, "little")))
    return None


def local_address_towards(gateway: str) -> str:
    """The source address the kernel uses to reach ``gateway`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((gateway, 9))
        return str(s.getsockname()[0])


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, tuple[str, int]], None]) -> None:
        self.on_datagram = on_datagram
        self.refused = False
        self.wake = asyncio.Event()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_datagram(data, addr)
        self.wake.set()

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable on the connected socket: nothing listens on the gateway.
        if isinstance(exc, ConnectionRefusedError):
            self.refused = True
            self.wake.set()


class NothingListening(GatewayNotAnswering):
    """The gateway answered with ICMP port unreachable: no server on that port."""


async def run_exchange(exchange: Exchange[T], local_address: str | None = None) -> T:
    """Send, retransmit on schedule, return the accepted answer.

    Raises ``NothingListening`` on ICMP port unreachable and ``GatewayNotAnswering`` once the
    schedule is exhausted.
    """
    loop = asyncio.get_running_loop()
    answer: list[T] = []

    def feed(data: bytes, addr: tuple[str, int]) -> None:
        got = exchange.receive(data, (addr[0], addr[1]))
        if got is not None:
            answer.append(got)

    proto = _Proto(feed)
    transport, _ = await loop.create_datagram_endpoint(
        lambda: proto, remote_addr=exchange.server,
        local_addr=(local_address, 0) if local_address else None,
    )
    try:
        transport.sendto(exchange.start(time.monotonic()))
        while exchange.state is ExchangeState.WAITING:
            deadline = exchange.next_deadline()
            assert deadline is not None
            delay = max(0.0, deadline - time.monotonic())
            proto.wake.clear()
            with contextlib.suppress(TimeoutError):
                await within(proto.wake.wait(), delay)
            if answer:
                return answer[0]
            if proto.refused:
                raise NothingListening(
                    f"nothing listens on {exchange.server[0]} port {exchange.server[1]} "
                    f"(ICMP port unreachable)")
            again = exchange.tick(time.monotonic())
            if again is not None:
                transport.sendto(again)
        if answer:
            return answer[0]
        raise GatewayNotAnswering(
            f"no answer from {exchange.server[0]}:{exchange.server[1]} after "
            f"{exchange.tries} tries", hint="is the gateway's NAT-PMP/PCP service enabled?")
    finally:
        transport.close()


@dataclass
class MapResult:
    mapping: Mapping | None
    attempts: list[Attempt] = field(default_factory=list)
    error: PortMapError | None = None


class PortMapClient:
    """One gateway, one lock, epoch tracking; ``map_udp`` tries the protocols in order."""

    def __init__(
        self,
        gateway: str,
        *,
        local_address: str | None = None,
        protocols: Sequence[str] = PROTOCOLS,
        pcp_schedule: RetrySchedule = PCP_SCHEDULE,
        natpmp_schedule: RetrySchedule = NATPMP_SCHEDULE,
        upnp_timeout: float = 3.0,
        rng: random.Random | None = None,
        port: int = pcp.SERVER_PORT,
    ) -> None:
        unknown = set(protocols) - set(PROTOCOLS)
        if unknown:
            raise PortMapError(f"unknown mapping protocol(s) {sorted(unknown)}",
                               hint=f"choose from {', '.join(PROTOCOLS)}")
        self.gateway = gateway
        self.port = port  # 5351 for both PCP and NAT-PMP; other values only for simulators
        self.local_address = local_address or local_address_towards(gateway)
        self.protocols = tuple(protocols)
        self.pcp_schedule = pcp_schedule
        self.natpmp_schedule = natpmp_schedule
        self.upnp_timeout = upnp_timeout
        self.rng = rng or random.Random()
        self.lock = asyncio.Lock()
        self.epoch = EpochTracker(EpochRule.PCP)
        self.state_lost = False
        self._nonces: dict[int, bytes] = {}
        self._upnp: object | None = None

    # --- epochs --------------------------------------------------------------------------

    def observe_epoch(self, protocol: str, epoch: int, now: float) -> bool:
        """Feed an answer's epoch; returns True (and sets ``state_lost``) on lost state."""
        rule = EpochRule.PCP if protocol == "pcp" else EpochRule.NATPMP
        lost = self.epoch.observe(epoch, now, rule)
        if lost:
            self.state_lost = True
        return lost

    # --- PCP -----------------------------------------------------------------------------

    def _nonce(self, internal_port: int) -> bytes:
        # The same nonce for the life of a mapping: renewals and deletes must carry it (§11.1).
        if internal_port not in self._nonces:
            self._nonces[internal_port] = os.urandom(pcp.NONCE_LEN)
        return self._nonces[internal_port]

    async def pcp_map(self, internal_port: int, external_port: int, lifetime: int,
                      external_address: str | None = None) -> pcp.Response | pcp.NatPmpOnly:
        req = pcp.map_request(
            nonce=self._nonce(internal_port),
            client_address=ipaddress.IPv4Address(self.local_address),
            internal_port=internal_port, suggested_external_port=external_port,
            lifetime=lifetime,
            suggested_external_address=ipaddress.IPv4Address(external_address or "0.0.0.0"),
        )
        ex: Exchange[pcp.Response | pcp.NatPmpOnly] = Exchange(
            req.encode(), (self.gateway, self.port), pcp.answer_parser(req),
                      self.pcp_schedule, self.rng.random)
        async with self.lock:
            resp = await run_exchange(ex, self.local_address)
        if isinstance(resp, pcp.Response):
            self.observe_epoch("pcp", resp.epoch, time.monotonic())
        return resp

    # --- NAT-PMP -------------------------------------------------------------------------

    async def natpmp_request(
        self, req: natpmp.PublicAddressRequest | natpmp.MapRequest
    ) -> natpmp.Response:
        ex: Exchange[natpmp.Response] = Exchange(
            req.encode(), (self.gateway, self.port), natpmp.answer_parser(req),
            self.natpmp_schedule)
        async with self.lock:
            resp = await run_exchange(ex, self.local_address)
        self.observe_epoch("natpmp", resp.epoch, time.monotonic())
        return resp

    async def natpmp_external_address(self) -> ipaddress.IPv4Address:
        resp = await self.natpmp_request(natpmp.PublicAddressRequest())
        if not isinstance(resp, natpmp.PublicAddressResponse):
            raise MappingRefused(
                f"NAT-PMP external address: {natpmp.result_text(resp.result)}",
                result=natpmp.ResultCode(resp.result) if resp.result in
                natpmp.ResultCode._value2member_map_ else resp.result)
        return resp.address

    # --- the whole thing -----------------------------------------------------------------

    async def map_udp(
        self, internal_port: int, *, lifetime: int = DEFAULT_LIFETIME,
        external_port: int | None = None, previous: Mapping | None = None,
    ) -> MapResult:
        """Create or renew a UDP mapping, trying the configured protocols in order.

        ``previous`` (a renewal) pins the protocol that worked and asks for the same external
        port and address again.
        """
        want_port = external_port if external_port is not None else internal_port
        if previous is not None:
            want_port = previous.external_port
        order = (previous.protocol,) if previous is not None else self.protocols
        result = MapResult(None)
        pcp_unsupported = False
        nobody_answered = True
        for proto in order:
            if proto == "natpmp" and "pcp" in order and not pcp_unsupported and previous is None:
                # Issue 5: NAT-PMP only after PCP said "unsupported version". If PCP got no
                # answer at all, NAT-PMP (same port) will not get one either.
                result.attempts.append(Attempt("natpmp", Outcome.NOT_TRIED,
                                               "PCP got no answer on the same port"))
                continue
            if proto == "upnp" and not nobody_answered:
                continue
            try:
                if proto == "pcp":
                    mapping = await self._map_pcp(internal_port, want_port, lifetime, previous)
                    if mapping is None:
                        pcp_unsupported = True
                        nobody_answered = False
                        result.attempts.append(Attempt("pcp", Outcome.UNSUPPORTED,
                                                       "the gateway speaks NAT-PMP only"))
                        continue
                elif proto == "natpmp":
                    mapping = await self._map_natpmp(internal_port, want_port, lifetime)
                else:
                    mapping = await self._map_upnp(internal_port, want_port, lifetime)
            except MappingRefused as exc:
                nobody_answered = False
                result.attempts.append(Attempt(proto, Outcome.REFUSED, exc.what))
                result.error = exc
                break
            except GatewayNotAnswering as exc:
                result.attempts.append(Attempt(proto, Outcome.NO_ANSWER, exc.what))
                result.error = exc
                continue
            result.attempts.append(Attempt(proto, Outcome.MAPPED))
            result.mapping = mapping
            result.error = None
            return result
        return result

    async def _map_pcp(self, internal_port: int, want_port: int, lifetime: int,
                       previous: Mapping | None) -> Mapping | None:
        ext = str(previous.external_address) if previous is not None else None
        resp = await self.pcp_map(internal_port, want_port, lifetime, ext)
        if isinstance(resp, pcp.NatPmpOnly) or resp.result == pcp.ResultCode.UNSUPP_VERSION:
            return None
        if resp.result != pcp.ResultCode.SUCCESS or resp.map is None:
            raise MappingRefused(f"PCP {pcp.result_text(resp.result)}", result=resp.result)
        return Mapping("pcp", self.gateway, self.local_address, internal_port,
                       resp.map.external_address, resp.map.external_port, resp.lifetime,
                       time.monotonic(), resp.epoch)

    async def _map_natpmp(self, internal_port: int, want_port: int,
                          lifetime: int) -> Mapping:
        address = await self.natpmp_external_address()
        resp = await self.natpmp_request(
            natpmp.MapRequest(natpmp.Opcode.MAP_UDP, internal_port, want_port, lifetime))
        if not isinstance(resp, natpmp.MapResponse):
            raise MappingRefused(f"NAT-PMP {natpmp.result_text(resp.result)}",
                                 result=resp.result)
        return Mapping("natpmp", self.gateway, self.local_address, internal_port, address,
                       resp.external_port, resp.lifetime, time.monotonic(), resp.epoch)

    async def _map_upnp(self, internal_port: int, want_port: int, lifetime: int) -> Mapping:
        from btmm_core.portmap.upnp import UpnpIgd  # imported late: aiohttp is heavy

        async with self.lock:
            if self._upnp is None:
                self._upnp = await UpnpIgd.discover(self.local_address, self.upnp_timeout,
                                                    self.gateway)
            igd = self._upnp
            assert isinstance(igd, UpnpIgd)
            address = await igd.external_address()
            port = await igd.add_udp_mapping(internal_port, want_port, self.local_address,
                                             lifetime)
        return Mapping("upnp", self.gateway, self.local_address, internal_port, address, port,
                       lifetime, time.monotonic(), None)

    async def delete(self, mapping: Mapping) -> None:
        """Remove a mapping (lifetime 0); errors are raised for the caller to log."""
        if mapping.protocol == "pcp":
            await self.pcp_map(mapping.internal_port, 0, 0)
        elif mapping.protocol == "natpmp":
            await self.natpmp_request(
                natpmp.MapRequest(natpmp.Opcode.MAP_UDP, mapping.internal_port, 0, 0))
        else:
            from btmm_core.portmap.upnp import UpnpIgd

            igd = self._upnp
            if isinstance(igd, UpnpIgd):
                async with self.lock:
                    await igd.delete_udp_mapping(mapping.external_port)
        self._nonces.pop(mapping.internal_port, None)

    async def close(self) -> None:
        from btmm_core.portmap.upnp import UpnpIgd

        if isinstance(self._upnp, UpnpIgd):
            await self._upnp.close()
            self._upnp = None

