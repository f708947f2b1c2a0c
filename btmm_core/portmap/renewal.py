"""Keep one inbound UDP mapping alive and say when its public address or port changes.

The asyncio driver around ``PortMapClient``: map, renew at half the lifetime, listen for the
gateway's announcements on 224.0.0.1:5350 (NAT-PMP address announcements, RFC 6886 §3.2.1; PCP
ANNOUNCE, RFC 6887 §14.1.3), and when an answer or an announcement shows that the gateway lost
its state (epoch rules) re-create the mapping after a random delay of up to 5 s (so that a whole
LAN does not hit a rebooted gateway at once). Every change is put on ``events`` for the daemon
to republish its records; the mapping is deleted on ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import socket
import struct
import time
from dataclasses import dataclass

from btmm_core.aio import within
from btmm_core.errors import PortMapError
from btmm_core.portmap import natpmp, pcp
from btmm_core.portmap.client import DEFAULT_LIFETIME, Mapping, MapResult, PortMapClient
from btmm_core.portmap.diagnosis import Diagnosis, diagnose_failure

REBOOT_DELAY_MAX = 5.0
RETRY_MIN = 5.0
RETRY_MAX = 300.0


class EventKind(enum.Enum):
    MAPPED = "mapped"  # first mapping
    CHANGED = "changed"  # external address or port differs from before
    RENEWED = "renewed"  # same address and port, new lifetime
    RECREATED = "recreated"  # after the gateway lost its state (reboot, table cleared)
    FAILED = "failed"  # no mapping; ``diagnosis`` says why
    DELETED = "deleted"


@dataclass(frozen=True)
class MappingEvent:
    kind: EventKind
    mapping: Mapping | None
    reason: str = ""
    diagnosis: Diagnosis | None = None


class _AnnounceProto(asyncio.DatagramProtocol):
    def __init__(self, renewal: MappingRenewal) -> None:
        self.renewal = renewal

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.renewal._on_announcement(data, addr[0])


def _announcement_socket(local_address: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    with contextlib.suppress(AttributeError, OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0", natpmp.ANNOUNCE_PORT))
    mreq = struct.pack("4s4s", socket.inet_aton(natpmp.ANNOUNCE_GROUP),
                       socket.inet_aton(local_address))
    with contextlib.suppress(OSError):  # all-hosts membership is implicit on Linux
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    s.setblocking(False)
    return s


class MappingRenewal:
    """Maps ``internal_port`` on the gateway and keeps it mapped until ``stop``."""

    def __init__(
        self,
        client: PortMapClient,
        internal_port: int,
        *,
        lifetime: int = DEFAULT_LIFETIME,
        reboot_delay_max: float = REBOOT_DELAY_MAX,
        listen_announcements: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.internal_port = internal_port
        self.lifetime = lifetime
        self.reboot_delay_max = reboot_delay_max
        self.listen_announcements = listen_announcements
        self.rng = rng or random.Random()
        self.events: asyncio.Queue[MappingEvent] = asyncio.Queue()
        self.mapping: Mapping | None = None
        self._wake = asyncio.Event()
        self._lost_reason: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        if self._task is not None:
            raise PortMapError("the port mapping renewal is already running")
        if self.listen_announcements:
            loop = asyncio.get_running_loop()
            sock = _announcement_socket(self.client.local_address)
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: _AnnounceProto(self), sock=sock)
        self._task = asyncio.create_task(self._run(), name="portmap")

    async def stop(self, delete: bool = True) -> None:
        """Stop renewing and (by default) delete the mapping on the gateway."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if delete and self.mapping is not None:
            mapping, self.mapping = self.mapping, None
            try:
                await within(self.client.delete(mapping), 10.0)
                self.events.put_nowait(MappingEvent(EventKind.DELETED, mapping))
            except (PortMapError, TimeoutError, OSError) as exc:
                self.events.put_nowait(MappingEvent(
                    EventKind.DELETED, mapping, f"delete failed ({exc}); it expires by itself"))
        await self.client.close()

    # --- announcements and lost state ----------------------------------------------------

    def _on_announcement(self, data: bytes, source: str) -> None:
        if source != self.client.gateway:
            return  # RFC 6886 §3.2.1: only the configured gateway's announcements count
        now = time.monotonic()
        ann_pcp = pcp.decode_announce(data)
        if ann_pcp is not None:
            # A server sends an unsolicited ANNOUNCE when it (re)starts or lost its state
            # (RFC 6887 §14.1.3), so every one from our gateway re-requests the mapping: the epoch
            # alone can miss a quick restart (a small new epoch within the drift tolerance), and
            # a MAP for a mapping that still exists only refreshes it.
            self.client.observe_epoch("pcp", ann_pcp.epoch, now)
            self._lost(f"PCP ANNOUNCE from {source} with epoch {ann_pcp.epoch}")
            return
        ann = natpmp.decode_announcement(data)
        if ann is None:
            return
        lost = self.client.observe_epoch("natpmp", ann.epoch, now)
        changed = self.mapping is not None and ann.address != self.mapping.external_address
        if lost:
            self._lost(f"NAT-PMP announcement from {source} with epoch {ann.epoch}")
        elif changed:
            self._lost(f"NAT-PMP announcement: external address now {ann.address}")

    def _lost(self, reason: str) -> None:
        if self._lost_reason is None:
            self._lost_reason = reason
        self._wake.set()

    # --- the loop ------------------------------------------------------------------------

    async def _sleep_until(self, when: float) -> None:
        self._wake.clear()
        if self._lost_reason is not None or self.client.state_lost:
            return
        with contextlib.suppress(TimeoutError):
            await within(self._wake.wait(), max(0.0, when - time.monotonic()))

    async def _run(self) -> None:
        failures = 0
        while True:
            reason = self._lost_reason
            if reason is None and self.client.state_lost:
                reason = "an answer's epoch shows the gateway lost its mappings"
            recreate = reason is not None and self.mapping is not None
            if recreate:
                await asyncio.sleep(self.rng.uniform(0.0, self.reboot_delay_max))
            self._lost_reason = None
            self.client.state_lost = False
            previous = self.mapping
            error = ""
            result: MapResult | None = None
            try:
                result = await self.client.map_udp(
                    self.internal_port, lifetime=self.lifetime, previous=previous)
            except (OSError, PortMapError) as exc:
                error = str(exc)
            if result is not None and result.mapping is not None:
                failures = 0
                new = result.mapping
                self.mapping = new
                lost_now, self.client.state_lost = self.client.state_lost, False
                if lost_now and not recreate:
                    # The renewal's own answer showed a reset: this very request rebuilt the
                    # mapping, so report it as re-created.
                    recreate, reason = True, "the renewal's epoch shows the gateway lost state"
                self._emit(previous, new, recreate, reason or "")
                await self._sleep_until(new.renew_at())
                continue
            failures += 1
            diagnosis = diagnose_failure(result.attempts) if result is not None else None
            self.events.put_nowait(MappingEvent(
                EventKind.FAILED, previous,
                diagnosis.text if diagnosis else f"mapping failed: {error}", diagnosis))
            delay = min(RETRY_MAX, RETRY_MIN * 2 ** min(failures - 1, 6))
            # An old mapping that outlives the retry delay is kept (and retried before it ends).
            if previous is None or previous.remaining(time.monotonic()) <= delay:
                self.mapping = None
            await self._sleep_until(time.monotonic() + delay)

    def _emit(self, previous: Mapping | None, new: Mapping, recreate: bool, reason: str) -> None:
        if previous is None:
            kind = EventKind.MAPPED
        elif (previous.external_address, previous.external_port) != (
            new.external_address, new.external_port
        ):
            kind = EventKind.CHANGED
        elif recreate:
            kind = EventKind.RECREATED
        else:
            kind = EventKind.RENEWED
        self.events.put_nowait(MappingEvent(kind, new, reason))
