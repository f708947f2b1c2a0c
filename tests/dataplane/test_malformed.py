"""Malformed and hostile input to both codecs: every refusal is a ``PacketDropped`` with the
reason fixed by the order of checks in api.py (length, SPI, replay, ICV, trailer), never
another exception, and a refused packet leaves the SA able to open the next valid one."""

from __future__ import annotations

import pytest
from codec_helpers import KEYMAT, drop_reason, seal_by_hand, top
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from btmm_core.dataplane import rx_codec, tx_codec
from btmm_core.dataplane.api import DropReason, RxCodec

SPI = 0x00C0FFEE


def seal_plaintext(seq: int, plaintext: bytes, spi: int = SPI) -> bytes:
    return seal_by_hand(seq, plaintext, spi)


@pytest.fixture
def rx(kind: str) -> RxCodec:
    return rx_codec(SPI, KEYMAT, kind=kind)


def test_every_truncation(kind: str, rx: RxCodec) -> None:
    tx = tx_codec(SPI, KEYMAT, kind=kind)
    inner = bytes(range(100))
    first, second = tx.seal(inner), tx.seal(inner)
    for n in range(len(first)):
        want = DropReason.MALFORMED if n < 36 or (n - 32) % 4 else DropReason.AUTH
        assert drop_reason(rx, first[:n]) is want, n
    # Trailing bytes are not ignored either: they shift the ICV.
    for extra in (b"\0" * 4, b"\xff" * 16):
        assert drop_reason(rx, first + extra) is DropReason.AUTH
    assert top(rx) == 0
    assert rx.open(second) == inner
    assert rx.open(first) == inner


def test_every_single_bit_flip_of_header_iv_and_icv(rx: RxCodec) -> None:
    good = seal_plaintext(1, b"\x60" + bytes(37) + b"\x00\x29")
    flips = [*range(0, 16), *range(len(good) - 16, len(good))]
    for i in flips:
        for bit in (0, 7):
            bad = bytearray(good)
            bad[i] ^= 1 << bit
            if i < 4:
                want = DropReason.UNKNOWN_SPI
            elif bad[4:8] == bytes(4):
                want = DropReason.REPLAY  # the low half became 0: sequence number 0
            else:
                want = DropReason.AUTH
            assert drop_reason(rx, bytes(bad)) is want, (i, bit)
    assert top(rx) == 0
    assert drop_reason(rx, good) is None


def test_ciphertext_bit_flips(rx: RxCodec) -> None:
    good = seal_plaintext(3, bytes(62) + b"\x00\x29")
    for i in range(16, len(good) - 16):
        bad = bytearray(good)
        bad[i] ^= 0x80
        assert drop_reason(rx, bytes(bad)) is DropReason.AUTH, i
    assert drop_reason(rx, good) is None


@pytest.mark.parametrize(
    ("plaintext", "why"),
    [
        (b"\x00\x00\x02\x29", "padding bytes 0, 0 instead of 1, 2"),
        (b"\x02\x01\x02\x29", "padding bytes 2, 1 out of order"),
        (b"abc\x01\x01\x03\x03\x29", "pad length 3 but padding 1, 1, 3"),
        (b"\x00\x00\x03\x29", "pad length 3 needs 5 bytes of plaintext"),
        (b"abcd\x00\x00\xfe\x29", "pad length 254"),
        (b"ab\xff\x29", "pad length 255"),
        (b"ab\x00\x04", "next header 4 (IPv4)"),
        (b"ab\x00\x3b", "next header 59 (no next header)"),
        (b"ab\x00\x00", "next header 0"),
        (b"a\x01\x01\x2a", "next header 42"),
    ],
)
def test_bad_trailer(rx: RxCodec, plaintext: bytes, why: str) -> None:
    """An authentic packet with a broken trailer is MALFORMED. The ICV passed, so the window has
    recorded its sequence number (the sender will never use it again); nothing else changed."""
    assert drop_reason(rx, seal_plaintext(5, plaintext)) is DropReason.MALFORMED, why
    assert top(rx) == 5
    assert drop_reason(rx, seal_plaintext(5, b"ab\x00\x29")) is DropReason.REPLAY
    assert rx.open(seal_plaintext(4, b"ab\x00\x29")) == b"ab"
    assert rx.open(seal_plaintext(6, b"abcd\x01\x02\x02\x29")) == b"abcd"


def test_trailer_accepts_exactly_the_valid_forms(rx: RxCodec) -> None:
    """Padding that is longer than needed but correctly formed is still valid ESP (RFC 4303
    §2.4 allows up to 255 bytes); we never send it, but we must not choke on it."""
    assert rx.open(seal_plaintext(1, b"ab\x01\x02\x03\x04\x04\x29")) == b"ab"
    assert rx.open(seal_plaintext(2, b"\x01\x02\x02\x29")) == b""


@pytest.mark.parametrize("spi", [0, 1, SPI - 1, SPI + 1, 0xFFFFFFFF])
def test_unknown_spi(rx: RxCodec, spi: int) -> None:
    assert drop_reason(rx, seal_plaintext(1, b"ab\x00\x29", spi=spi)) is DropReason.UNKNOWN_SPI
    assert top(rx) == 0
    assert rx.open(seal_plaintext(1, b"ab\x00\x29")) == b"ab"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff",  # NAT keepalive: the engine handles it before the codec
        b"\x00\x00\x00\x00",  # bare non-ESP marker
        b"\x00\x00\x00\x00" + b"hello, control plane" + bytes(20),  # control message
        SPI.to_bytes(4, "big"),
        SPI.to_bytes(4, "big") + bytes(31),
        SPI.to_bytes(4, "big") + bytes(33),
        SPI.to_bytes(4, "big") + bytes(34),
        SPI.to_bytes(4, "big") + bytes(35),
    ],
)
def test_short_or_foreign_payloads(rx: RxCodec, payload: bytes) -> None:
    """Length first, then SPI: anything too short is MALFORMED whatever it says."""
    got = drop_reason(rx, payload)
    if len(payload) < 36 or (len(payload) - 32) % 4:
        assert got is DropReason.MALFORMED
    else:
        assert got is DropReason.UNKNOWN_SPI
    assert rx.open(seal_plaintext(1, b"ab\x00\x29")) == b"ab"


def test_oversize(kind: str, rx: RxCodec) -> None:
    """Payloads bigger than any UDP datagram: garbage fails the ICV, and the codec itself has
    no size limit (the engine's buffers bound what reaches it)."""
    for size in (65536, 100_000):
        size -= (size - 32) % 4
        garbage = SPI.to_bytes(4, "big") + (7).to_bytes(4, "big") + bytes(size - 8)
        assert drop_reason(rx, garbage) is DropReason.AUTH
    tx = tx_codec(SPI, KEYMAT, kind=kind)
    big = bytes(70_000)
    assert rx.open(tx.seal(big)) == big


def test_zero_sequence_number_refused(rx: RxCodec) -> None:
    """Sequence number 0 is never sent; even an authentic packet carrying it is a REPLAY."""
    assert drop_reason(rx, seal_plaintext(0, b"ab\x00\x29")) is DropReason.REPLAY
    assert top(rx) == 0


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.binary(min_size=28, max_size=200).map(lambda b: SPI.to_bytes(4, "big") + b),
    )
)
def test_random_bytes_only_ever_drop(kind: str, payload: bytes) -> None:
    rx = rx_codec(SPI, KEYMAT, kind=kind)
    got = drop_reason(rx, payload)
    if len(payload) < 36 or (len(payload) - 32) % 4:
        assert got is DropReason.MALFORMED
    elif payload[:4] != SPI.to_bytes(4, "big"):
        assert got is DropReason.UNKNOWN_SPI
    elif payload[4:8] == bytes(4):
        assert got is DropReason.REPLAY  # infers sequence number 0
    else:
        assert got is DropReason.AUTH
    assert top(rx) == 0
    assert rx.open(seal_plaintext(1, b"ab\x00\x29")) == b"ab"
