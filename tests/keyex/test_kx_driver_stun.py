"""The key-exchange driver and STUN messages from the engine (issue 13, part "enginestun").

Both engines hand STUN messages that arrive on their socket to Python as ``StunPacket``
events, in the same queue as control messages. The driver drains that queue: a STUN message
must neither reach the handshake nor stop the handling of the events beside it; it goes to
``on_stun`` when one is set.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from btmm_core.dataplane.api import (
    ControlPacket,
    Endpoint,
    EngineEvent,
    PeerInfo,
    PeerRoamed,
    StunPacket,
)
from btmm_core.keyex.driver import KeyExchangeDriver
from btmm_core.keyex.keys import StaticKey, ula_of
from btmm_core.keyex.noise import Handshaker
from btmm_core.keyex.session import KeyExchange

SERVER = Endpoint("192.0.2.3", 3478)
PEER = Endpoint("192.0.2.2", 4500)
PEER_KEY = StaticKey.generate()
PEER_INNER = str(ula_of(PEER_KEY.public))
STUN_ANSWER = bytes.fromhex("0101000c2112a442") + bytes(12) + bytes(12)


@dataclass
class QueueEngine:
    """Just what the driver reads: a queue of events behind an eventfd."""

    queued: list[EngineEvent] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    fd: int = field(default_factory=lambda: os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))

    def peers(self) -> Sequence[PeerInfo]:
        return []

    def add_peer(self, inner: str, endpoint: Endpoint | None = None) -> None:
        self.added.append(inner)

    def fileno(self) -> int:
        return self.fd

    def drain(self, limit: int = 256) -> Sequence[EngineEvent]:
        out, self.queued = self.queued[:limit], self.queued[limit:]
        return out


def _run(on_stun: list[StunPacket] | None) -> tuple[KeyExchange, KeyExchangeDriver]:
    kx = KeyExchange(Handshaker(StaticKey.generate(), bytes(32), os.urandom))
    kx.add_peer(PEER_KEY.public, PEER_INNER, None)
    engine = QueueEngine()
    engine.queued = [
        StunPacket(SERVER, STUN_ANSWER),
        ControlPacket(PEER, b"\x01\0\0\0 not a handshake message"),
        PeerRoamed(PEER_INNER, None, PEER),
    ]

    async def go() -> KeyExchangeDriver:
        driver = KeyExchangeDriver(
            engine,  # type: ignore[arg-type]
            kx,
            on_stun=None if on_stun is None else on_stun.append,
        )
        driver.start()
        try:
            driver._on_readable()
        finally:
            driver.close()
            os.close(engine.fd)
        return driver

    return kx, asyncio.run(go())


def test_stun_goes_to_on_stun_and_the_other_events_still_count() -> None:
    got: list[StunPacket] = []
    kx, driver = _run(got)
    assert got == [StunPacket(SERVER, STUN_ANSWER)]
    # The control message behind it reached the handshake (and was refused there) and the
    # roam behind that moved the peer.
    assert len(kx.refusals) == 1
    assert kx.by_inner[PEER_INNER].endpoint == PEER
    assert driver.errors == 0


def test_stun_without_on_stun_is_ignored() -> None:
    kx, driver = _run(None)
    assert len(kx.refusals) == 1
    assert kx.by_inner[PEER_INNER].endpoint == PEER
    assert driver.errors == 0
