"""Helpers of the codec tests (test_malformed, test_replay): ESP packets sealed by hand with
AES-GCM, independently of both codecs, and what a codec made of one."""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from btmm_core.dataplane.api import NEXT_HEADER_IPV6, DropReason, RxCodec
from btmm_core.errors import PacketDropped

#: a fixed keying material (AES-256 key + salt) so that failures are reproducible
KEYMAT = bytes(range(0x40, 0x40 + 36))
_AEAD = AESGCM(KEYMAT[:32])


def esp_plaintext(inner: bytes) -> bytes:
    """``inner`` with a valid ESP trailer: padding 1, 2, .. to 4 bytes, its length, next
    header IPv6."""
    n = -(len(inner) + 2) % 4
    return inner + bytes(range(1, n + 1)) + bytes([n, NEXT_HEADER_IPV6])


def seal_by_hand(seq: int, plaintext: bytes, spi: int, *, forge: bool = False) -> bytes:
    """An authentic packet of SA ``spi`` (keyed with ``KEYMAT``) with sequence number ``seq``
    around an arbitrary plaintext (trailer included); ``forge`` flips a bit of the ICV."""
    lo = seq % 2**32
    aad = spi.to_bytes(4, "big") + (seq >> 32).to_bytes(4, "big") + lo.to_bytes(4, "big")
    iv = seq.to_bytes(8, "big")
    body = _AEAD.encrypt(KEYMAT[32:] + iv, plaintext, aad)
    if forge:
        body = body[:-1] + bytes([body[-1] ^ 1])
    return spi.to_bytes(4, "big") + lo.to_bytes(4, "big") + iv + body


def drop_reason(rx: RxCodec, payload: bytes) -> DropReason | None:
    """None when the codec accepted the packet, else why it dropped it."""
    try:
        rx.open(payload)
    except PacketDropped as exc:
        assert isinstance(exc.reason, int), exc.reason  # a DropReason value
        return DropReason(exc.reason)
    return None


def top(rx: RxCodec) -> int:
    """The highest sequence number the codec accepted (both codecs have ``top``)."""
    return int(rx.top)  # type: ignore[attr-defined]
