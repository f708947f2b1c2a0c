"""Deterministic keys and randomness for the reach tests."""

from __future__ import annotations

import hashlib

from btmm_core.keyex.keys import StaticKey, derive_psk

SECRET = b"correct horse battery staple, account 1"
PSK = derive_psk(SECRET)
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
