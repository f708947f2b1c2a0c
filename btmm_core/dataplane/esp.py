"""ESP codec of one security association, in pure Python (the twin of the Rust codec).

Standards: RFC 4303 (ESP; extended sequence numbers, Appendix A for inferring the high 32
bits), RFC 4106 (AES-GCM in ESP: keying material, nonce, AAD with ESN in §5), RFC 3948 (the
payload travels in UDP), RFC 6479 (replay window as a bitmap). The exact wire format and the
order of checks are fixed in ``btmm_core/dataplane/api.py``; both engines produce identical
bytes and make identical accept/refuse decisions.

The codec is sans-I/O: bytes in, bytes out, ``PacketDropped`` when a packet is refused.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from btmm_core.dataplane.api import (
    ESP_HEADER_LEN,
    ICV_LEN,
    IV_LEN,
    KEYMAT_LEN,
    NEXT_HEADER_IPV6,
    REPLAY_WINDOW,
    SEQ_MAX,
    DropReason,
)
from btmm_core.errors import PacketDropped, SaExhausted

#: the shortest payload that can carry a valid packet: header, IV, ICV and a 4-byte-aligned
#: plaintext holding at least the pad length and next header bytes
MIN_PAYLOAD = ESP_HEADER_LEN + IV_LEN + ICV_LEN + 4
_OVERHEAD = ESP_HEADER_LEN + IV_LEN + ICV_LEN
_U32 = 0xFFFFFFFF
_HDR = struct.Struct(">II")
_AAD = struct.Struct(">III")
_IV = struct.Struct(">Q")
# Padding bytes are 1, 2, ..., n (RFC 4303 §2.4); at most 3 are ever needed for 4-byte alignment.
_PAD = b"\x01\x02\x03"


def _split_keymat(keymat: bytes) -> tuple[AESGCM, bytes]:
    if len(keymat) != KEYMAT_LEN:
        raise ValueError(
            f"ESP keying material must be {KEYMAT_LEN} bytes (AES-256 key + 4-byte salt), "
            f"got {len(keymat)}"
        )
    return AESGCM(bytes(keymat[:32])), bytes(keymat[32:])


def _check_spi(spi: int) -> int:
    # SPI 0 is reserved (RFC 4303 §2.1) and, on our port, marks a control message.
    if not 0 < spi <= _U32:
        raise ValueError(f"SPI must be in 1..2**32-1, got {spi}")
    return spi


def infer_seq(top: int, seq_lo: int, window: int = REPLAY_WINDOW) -> int:
    """The full 64-bit sequence number of a packet carrying ``seq_lo``, given ``top``, the
    highest sequence number accepted so far (RFC 4303 Appendix A2.2).

    The result exceeds ``2**64 - 1`` when the packet would lie beyond the end of the sequence
    space; the caller refuses such a packet as a replay.
    """
    th, tl = top >> 32, top & _U32
    if tl >= window - 1:
        # The window lies inside one 2**32 block: a low number below it belongs to the next block.
        hi = th if seq_lo >= tl - window + 1 else th + 1
    else:
        # The window straddles a block boundary: a high number belongs to the previous block.
        hi = th - 1 if th > 0 and seq_lo >= (tl - window + 1) & _U32 else th
    return (hi << 32) | seq_lo


class ReplayWindow:
    """Anti-replay state: the highest accepted sequence number and which of the ``size``
    numbers ending there have been seen.

    Bit ``k`` of the bitmap stands for sequence number ``top - k``. RFC 6479 keeps the bitmap in
    a ring of machine words to avoid shifting; a Python int shifts cheaply enough and keeps the
    acceptance rule obvious, which is what this engine is for.
    """

    __slots__ = ("_bitmap", "_mask", "size", "top")

    def __init__(self, size: int = REPLAY_WINDOW) -> None:
        if size < 1:
            raise ValueError(f"replay window size must be positive, got {size}")
        self.size = size
        self.top = 0
        self._bitmap = 0
        self._mask = (1 << size) - 1

    def check(self, seq: int) -> bool:
        """True when ``seq`` may be accepted (new and not too old). Changes nothing."""
        if seq == 0 or seq > SEQ_MAX:
            return False
        if seq > self.top:
            return True
        behind = self.top - seq
        return behind < self.size and not (self._bitmap >> behind) & 1

    def update(self, seq: int) -> bool:
        """Mark ``seq`` seen (call only after the packet authenticated and ``check`` passed).
        Returns True when ``top`` advanced."""
        if seq > self.top:
            shift = seq - self.top
            self._bitmap = ((self._bitmap << shift) | 1) & self._mask if shift < self.size else 1
            self.top = seq
            return True
        self._bitmap |= 1 << (self.top - seq)
        return False


class EspTxSa:
    """The sending side of one SA: seals inner IPv6 packets into UDP payloads."""

    __slots__ = ("_aead", "_next_seq", "_salt", "spi")

    def __init__(self, spi: int, keymat: bytes, next_seq: int = 1) -> None:
        self.spi = _check_spi(spi)
        self._aead, self._salt = _split_keymat(keymat)
        # 2**64 is allowed: it stands for an SA that has already sent its last number.
        if not 0 < next_seq <= SEQ_MAX + 1:
            raise ValueError(f"next_seq must be in 1..2**64 (0 is never sent), got {next_seq}")
        self._next_seq = next_seq

    @property
    def next_seq(self) -> int:
        """The sequence number the next ``seal`` uses (``2**64`` once the SA is exhausted)."""
        return self._next_seq

    @property
    def exhausted(self) -> bool:
        return self._next_seq > SEQ_MAX

    def seal(self, inner: bytes) -> bytes:
        seq = self._next_seq
        if seq > SEQ_MAX:
            raise SaExhausted(
                f"transmit SA {self.spi:#010x} has sent its last sequence number",
                hint="install a new transmit SA (rekey) before sending more",
            )
        self._next_seq = seq + 1
        n = -(len(inner) + 2) % 4
        plaintext = b"".join((inner, _PAD[:n], bytes((n, NEXT_HEADER_IPV6))))
        iv = _IV.pack(seq)
        aad = _AAD.pack(self.spi, seq >> 32, seq & _U32)
        sealed = self._aead.encrypt(self._salt + iv, plaintext, aad)
        return b"".join((_HDR.pack(self.spi, seq & _U32), iv, sealed))


class EspRxSa:
    """The receiving side of one SA: opens UDP payloads, with its replay window."""

    __slots__ = ("_aead", "_salt", "spi", "window")

    def __init__(self, spi: int, keymat: bytes) -> None:
        self.spi = _check_spi(spi)
        self._aead, self._salt = _split_keymat(keymat)
        self.window = ReplayWindow()

    @property
    def top(self) -> int:
        """The highest sequence number accepted so far (0 before the first packet)."""
        return self.window.top

    def open(self, payload: bytes) -> bytes:
        """Authenticate and decrypt one UDP payload into the inner packet.

        Raises ``PacketDropped`` with the ``DropReason``; the replay window moves only once the
        ICV has checked out.
        """
        size = len(payload)
        if size < MIN_PAYLOAD or (size - _OVERHEAD) % 4:
            raise PacketDropped(
                DropReason.MALFORMED,
                f"ESP payload of {size} bytes cannot hold a packet "
                f"(need at least {MIN_PAYLOAD} bytes and 4-byte aligned ciphertext)",
            )
        spi, seq_lo = _HDR.unpack_from(payload)
        if spi != self.spi:
            raise PacketDropped(
                DropReason.UNKNOWN_SPI, f"SPI {spi:#010x} is not this SA's {self.spi:#010x}"
            )
        window = self.window
        # The sender's IV carries the full sequence number, but it is not authenticated as
        # such: the high half comes from our own window (RFC 4303 Appendix A).
        seq = infer_seq(window.top, seq_lo, window.size)
        if not window.check(seq):
            raise PacketDropped(
                DropReason.REPLAY,
                f"sequence number {seq} on SPI {spi:#010x} was already seen or is outside the "
                f"replay window (highest {window.top})",
            )
        aad = _AAD.pack(spi, seq >> 32, seq_lo)
        nonce = self._salt + payload[ESP_HEADER_LEN : ESP_HEADER_LEN + IV_LEN]
        try:
            plaintext = self._aead.decrypt(nonce, payload[ESP_HEADER_LEN + IV_LEN :], aad)
        except InvalidTag:
            raise PacketDropped(
                DropReason.AUTH, f"ICV check failed for sequence {seq} on SPI {spi:#010x}"
            ) from None
        window.update(seq)
        # The packet is authentic from here on, so the window has moved even if the trailer
        # below is broken: the sender will never reuse this sequence number.
        end = len(plaintext)
        pad_len, next_header = plaintext[end - 2], plaintext[end - 1]
        if pad_len + 2 > end:
            raise PacketDropped(
                DropReason.MALFORMED,
                f"pad length {pad_len} exceeds the {end}-byte plaintext (SPI {spi:#010x})",
            )
        inner_len = end - 2 - pad_len
        if plaintext[inner_len : end - 2] != bytes(range(1, pad_len + 1)):
            raise PacketDropped(
                DropReason.MALFORMED, f"padding is not 1, 2, .., {pad_len} (SPI {spi:#010x})"
            )
        if next_header != NEXT_HEADER_IPV6:
            raise PacketDropped(
                DropReason.MALFORMED,
                f"next header {next_header} is not IPv6 ({NEXT_HEADER_IPV6}) (SPI {spi:#010x})",
            )
        return plaintext[:inner_len]
