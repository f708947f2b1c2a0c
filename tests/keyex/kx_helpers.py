"""Shared fixtures for the key-exchange tests: deterministic keys and randomness."""

from __future__ import annotations

import hashlib

from btmm_core.dataplane.api import Endpoint
from btmm_core.keyex.keys import StaticKey, derive_psk
from btmm_core.keyex.noise import HandshakeConfig, Handshaker

SECRET = b"correct horse battery staple, account 1"
PSK = derive_psk(SECRET)
A_ADDR = Endpoint("192.0.2.1", 4500)
B_ADDR = Endpoint("198.51.100.2", 4500)
WALL0 = 1_800_000_000.0


def key(name: str) -> StaticKey:
    return StaticKey.from_private(hashlib.sha256(b"static " + name.encode()).digest())


class CountingRandom:
    """Deterministic randomness: SHA-256 of a label and a counter."""

    def __init__(self, label: str) -> None:
        self.label = label.encode()
        self.n = 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            self.n += 1
            out += hashlib.sha256(self.label + self.n.to_bytes(8, "big")).digest()
        return out[:n]


def pair(
    psk_a: bytes = PSK, psk_b: bytes = PSK, config: HandshakeConfig | None = None
) -> tuple[Handshaker, Handshaker]:
    a, b = key("a"), key("b")
    ha = Handshaker(a, psk_a, CountingRandom("a"), config)
    hb = Handshaker(b, psk_b, CountingRandom("b"), config)
    ha.add_peer(b.public)
    hb.add_peer(a.public)
    return ha, hb
