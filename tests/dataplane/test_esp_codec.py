"""The ESP codec of both engines against a reference built by hand in this file.

The reference (``reference_seal``) assembles the wire format of api.py from struct and
cryptography's AESGCM directly, without importing either engine, so a shared misreading of the
format in both engines would still show up against it.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from btmm_core.dataplane import KINDS, rx_codec, tx_codec
from btmm_core.dataplane.api import RxCodec, TxCodec
from btmm_core.errors import PacketDropped, SaExhausted

SEQ_MAX = 2**64 - 1
KEYMAT = bytes(range(0x40, 0x40 + 36))  # the same as the conftest's ``keymat`` fixture
CodecPair = Callable[..., tuple[TxCodec, RxCodec]]


def reference_plaintext(inner: bytes) -> bytes:
    n = 0
    while (len(inner) + n + 2) % 4:
        n += 1
    return inner + bytes(range(1, n + 1)) + bytes([n, 41])


def reference_seal(spi: int, keymat: bytes, seq: int, inner: bytes) -> bytes:
    key, salt = keymat[:32], keymat[32:]
    iv = seq.to_bytes(8, "big")
    aad = spi.to_bytes(4, "big") + (seq >> 32).to_bytes(4, "big") + (seq % 2**32).to_bytes(4, "big")
    sealed = AESGCM(key).encrypt(salt + iv, reference_plaintext(inner), aad)
    return spi.to_bytes(4, "big") + (seq % 2**32).to_bytes(4, "big") + iv + sealed


def inner_packet(size: int, tag: int = 0) -> bytes:
    """Distinct bytes of a given length (the codec does not look inside the inner packet)."""
    return bytes((i * 7 + tag) & 0xFF for i in range(size))


def test_reference_layout_by_hand() -> None:
    """Pin the reference itself to literal bytes, so that it cannot drift with the engines."""
    assert reference_plaintext(b"") == b"\x01\x02\x02\x29"
    assert reference_plaintext(b"a") == b"a\x01\x01\x29"
    assert reference_plaintext(b"ab") == b"ab\x00\x29"
    assert reference_plaintext(b"abc") == b"abc\x01\x02\x03\x03\x29"
    payload = reference_seal(0xA1B2C3D4, KEYMAT, 0x0000000500000006, b"ab")
    assert payload[:16] == bytes.fromhex("a1b2c3d4 00000006 0000000500000006")
    assert len(payload) == 8 + 8 + 4 + 16
    aad = bytes.fromhex("a1b2c3d4 00000005 00000006")
    nonce = KEYMAT[32:] + bytes.fromhex("0000000500000006")
    assert AESGCM(KEYMAT[:32]).decrypt(nonce, payload[16:], aad) == b"ab\x00\x29"


@pytest.mark.parametrize(
    ("spi", "seq", "size"),
    [
        (1, 1, 0),
        (0x1234, 1, 1),
        (0x1234, 2, 2),
        (0xDEADBEEF, 3, 3),
        (0xFFFFFFFF, 4, 40),
        (7, 2**32 - 1, 41),
        (7, 2**32, 1280),
        (7, 0x0123456789ABCDEF, 1420),
        (7, SEQ_MAX, 1500),
    ],
)
def test_known_answer(kind: str, spi: int, seq: int, size: int) -> None:
    inner = inner_packet(size)
    tx = tx_codec(spi, KEYMAT, seq, kind=kind)
    assert tx.next_seq == seq
    assert tx.seal(inner) == reference_seal(spi, KEYMAT, seq, inner)


def test_sequence_numbers_count_up_from_one(codec_pair: CodecPair) -> None:
    tx, _ = codec_pair()
    for seq in range(1, 6):
        assert tx.next_seq == seq
        assert tx.seal(b"x" * seq) == reference_seal(0x1234, KEYMAT, seq, b"x" * seq)
    assert tx.next_seq == 6


def test_round_trip_every_length(codec_pair: CodecPair) -> None:
    tx, rx = codec_pair()
    for size in range(1501):
        inner = inner_packet(size, size)
        payload = tx.seal(inner)
        assert len(payload) == 8 + 8 + len(reference_plaintext(inner)) + 16
        assert (len(payload) - 32) % 4 == 0
        assert rx.open(payload) == inner
    assert rx.top == 1501  # type: ignore[attr-defined]


def test_round_trip_large_inner(codec_pair: CodecPair) -> None:
    """The codec has no MTU of its own: it seals and opens anything a UDP datagram can hold."""
    tx, rx = codec_pair()
    for size in (9000, 65535 - 8 - 32 - 3):
        inner = inner_packet(size)
        assert rx.open(tx.seal(inner)) == inner


@pytest.mark.parametrize(("tx_kind", "rx_kind"), list(itertools.product(KINDS, KINDS)))
def test_cross_engine(tx_kind: str, rx_kind: str) -> None:
    tx = tx_codec(0xCAFE, KEYMAT, 2**32 - 3, kind=tx_kind)
    rx = rx_codec(0xCAFE, KEYMAT, kind=rx_kind)
    for i, size in enumerate((0, 1, 2, 3, 4, 40, 1279, 1280, 1420, 1500, 0, 77)):
        inner = inner_packet(size, i)
        payload = tx.seal(inner)
        assert payload == reference_seal(0xCAFE, KEYMAT, 2**32 - 3 + i, inner)
        assert rx.open(payload) == inner
    assert rx.top == 2**32 - 3 + 11  # type: ignore[attr-defined]


def test_engines_byte_identical() -> None:
    """Two SAs with the same parameters, one per engine, emit the same bytes packet by packet."""
    txs = [tx_codec(0x55AA, KEYMAT, 1000, kind=k) for k in KINDS]
    for size in range(0, 300, 7):
        inner = inner_packet(size, size)
        outputs = {t.seal(inner) for t in txs}
        assert len(outputs) == 1
    assert {t.next_seq for t in txs} == {1000 + len(range(0, 300, 7))}


def test_exhausted_at_end_of_sequence_space(kind: str) -> None:
    tx = tx_codec(9, KEYMAT, SEQ_MAX - 2, kind=kind)
    for seq in (SEQ_MAX - 2, SEQ_MAX - 1, SEQ_MAX):
        assert tx.seal(b"p") == reference_seal(9, KEYMAT, seq, b"p")
    for _ in range(3):
        with pytest.raises(SaExhausted):
            tx.seal(b"p")


def test_exhausted_single_last_packet(kind: str) -> None:
    tx = tx_codec(9, KEYMAT, SEQ_MAX, kind=kind)
    assert tx.seal(b"") == reference_seal(9, KEYMAT, SEQ_MAX, b"")
    assert tx.next_seq == 2**64
    with pytest.raises(SaExhausted):
        tx.seal(b"")
    assert tx.next_seq == 2**64


def test_already_exhausted_sa(kind: str) -> None:
    """next_seq = 2**64 describes an SA that has used up its space: it refuses at once."""
    tx = tx_codec(9, KEYMAT, 2**64, kind=kind)
    with pytest.raises(SaExhausted):
        tx.seal(b"x")


@pytest.mark.parametrize("next_seq", [0, 2**64 + 1])
def test_next_seq_range_checked(kind: str, next_seq: int) -> None:
    with pytest.raises(ValueError):
        tx_codec(9, KEYMAT, next_seq, kind=kind)


def test_spi_zero_refused(kind: str) -> None:
    """SPI 0 is reserved (RFC 4303 §2.1) and marks control messages on our port."""
    with pytest.raises(ValueError):
        tx_codec(0, KEYMAT, kind=kind)
    with pytest.raises(ValueError):
        rx_codec(0, KEYMAT, kind=kind)


@pytest.mark.parametrize("block", [0, 1, 5])
def test_esn_across_2_32_boundary(kind: str, block: int) -> None:
    """Only the low 32 bits travel in the header; the receiver infers the high half and
    authenticates it through the AAD."""
    start = (block << 32) + 2**32 - 2
    tx = tx_codec(0x1234, KEYMAT, start, kind=kind)
    rx = rx_codec(0x1234, KEYMAT, kind=kind)
    # The receiver learns the high half only by accepting packets: walk it up to just below
    # ``start`` through authentic packets that each stay within reach of the inference.
    _walk_receiver_to(rx, start - 1)
    for seq in range(start, start + 5):
        inner = inner_packet(seq % 97)
        payload = tx.seal(inner)
        assert payload[4:8] == (seq % 2**32).to_bytes(4, "big")
        assert rx.open(payload) == inner
        assert rx.top == seq  # type: ignore[attr-defined]


def _walk_receiver_to(rx: RxCodec, seq: int) -> None:
    step = 2**32 - 2 * 4096
    top = 0
    while top < seq:
        top = min(top + step, seq)
        assert rx.open(reference_seal(0x1234, KEYMAT, top, b"")) == b""
    assert rx.top == seq  # type: ignore[attr-defined]


def test_high_half_is_authenticated(codec_pair: CodecPair) -> None:
    """A packet sealed with seq 2**32 + 5 does not open at a receiver that infers 5: the ICV
    covers the high half that never travels."""
    _, rx = codec_pair()
    with pytest.raises(PacketDropped) as err:
        rx.open(reference_seal(0x1234, KEYMAT, 2**32 + 5, b"x"))
    assert err.value.reason == 2  # AUTH
    assert rx.top == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("size", [0, 35, 37, 64])
def test_keymat_length_checked(kind: str, size: int) -> None:
    with pytest.raises(ValueError):
        tx_codec(1, bytes(size), kind=kind)
    with pytest.raises(ValueError):
        rx_codec(1, bytes(size), kind=kind)


def test_reference_iv_is_sequence_number() -> None:
    payload = reference_seal(3, KEYMAT, 0x0102030405060708, b"")
    assert struct.unpack(">IIQ", payload[:16]) == (3, 0x05060708, 0x0102030405060708)
