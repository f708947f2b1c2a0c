"""Interoperability with an independent ESP implementation: scapy's ``SecurityAssociation``
(scapy/layers/ipsec.py) in tunnel mode inside UDP (RFC 3948), AES-GCM with a 16-byte ICV
(RFC 4106), extended sequence numbers on.

How scapy builds the packet, and so what these tests compare:

* keying material: scapy splits ``crypt_key`` into key + the last 4 bytes as salt, as we do;
  nonce = salt | the 8-byte IV from the packet;
* IV: random by default; given ``iv=seq.to_bytes(8, "big")`` it uses ours, and then its UDP
  payload must be byte-identical to ours. With a random IV our codecs must still open it: the
  IV is only nonce material to the receiver, the sequence number comes from the header;
* AAD: with ``esn_en`` it is SPI | esn | seq, where ``esn`` is a fixed attribute of the SA.
  scapy does not infer the high half from a replay window: the test sets ``sa.esn`` to the high
  32 bits of each packet's sequence number, which is how it genuinely interoperates;
* padding: 1, 2, .. to 4-byte alignment (AES-GCM block size 1), next header 41 for IPv6.
"""

from __future__ import annotations

import pytest
import scapy.layers.ipsec as scapy_ipsec
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.packet import Packet, Raw

from btmm_core.dataplane import rx_codec, tx_codec
from btmm_core.dataplane.api import RxCodec

SPI = 0x0A0B0C0D
KEYMAT = bytes(range(0x40, 0x40 + 36))
OUTER = IP(src="192.0.2.1", dst="198.51.100.2")
NAT_T = UDP(sport=4500, dport=4500)


def scapy_sa() -> object:
    return scapy_ipsec.SecurityAssociation(  # type: ignore[no-untyped-call]
        scapy_ipsec.ESP,
        spi=SPI,
        crypt_algo="AES-GCM",
        crypt_key=KEYMAT,
        esn_en=True,
        esn=0,
        tunnel_header=OUTER,
        nat_t_header=NAT_T,
    )


def inner_packet(i: int) -> Packet:
    """IPv6 packets of varied lengths so that every padding length 0..3 occurs."""
    if i % 3 == 0:
        return IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest(
            id=7, seq=i, data=bytes(range(i % 64))
        )
    return IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=5000, dport=6000) / Raw(b"x" * i)


def scapy_seal(sa: object, seq: int, inner: Packet, *, our_iv: bool) -> bytes:
    """The UDP payload scapy produces for ``inner`` at sequence number ``seq``."""
    # scapy's ``seq_num``/``esn`` arguments fall back to the SA's values when 0, so set the
    # attributes instead of passing 0.
    sa.seq_num = seq & 0xFFFFFFFF  # type: ignore[attr-defined]
    sa.esn = seq >> 32  # type: ignore[attr-defined]
    iv = seq.to_bytes(8, "big") if our_iv else None
    outer = sa.encrypt(inner, iv=iv)  # type: ignore[attr-defined]
    return bytes(outer[UDP].payload)


def scapy_open(sa: object, seq: int, payload: bytes) -> bytes:
    sa.esn = seq >> 32  # type: ignore[attr-defined]
    outer = IP(bytes(OUTER / NAT_T / Raw(payload)))
    return bytes(sa.decrypt(outer))  # type: ignore[attr-defined]


# Sequence numbers walk across the 2**32 boundary in steps a receiver's inference follows.
SEQS = [1, 2, 3, 4, 5, 100, 2**31, 2**32 - 2, 2**32 - 1, 2**32, 2**32 + 1, 2**32 + 2]


@pytest.fixture
def rx(kind: str) -> RxCodec:
    return rx_codec(SPI, KEYMAT, kind=kind)


def test_scapy_seals_we_open_byte_identical(kind: str, rx: RxCodec) -> None:
    sa = scapy_sa()
    for i, seq in enumerate(SEQS):
        inner = inner_packet(i)
        theirs = scapy_seal(sa, seq, inner, our_iv=True)
        ours = tx_codec(SPI, KEYMAT, seq, kind=kind).seal(bytes(inner))
        assert theirs == ours, seq
        assert rx.open(theirs) == bytes(inner)
        assert rx.top == seq  # type: ignore[attr-defined]


def test_scapy_random_iv_we_open(kind: str, rx: RxCodec) -> None:
    sa = scapy_sa()
    for i, seq in enumerate(SEQS):
        inner = inner_packet(i + 1)
        theirs = scapy_seal(sa, seq, inner, our_iv=False)
        assert theirs[8:16] != seq.to_bytes(8, "big")  # (2**-64 chance of a false alarm)
        assert rx.open(theirs) == bytes(inner)


def test_we_seal_scapy_opens(kind: str) -> None:
    sa = scapy_sa()
    tx = tx_codec(SPI, KEYMAT, 2**32 - 20, kind=kind)
    for i in range(40):  # every padding length, across the 2**32 boundary
        seq = tx.next_seq
        inner = inner_packet(i)
        assert scapy_open(sa, seq, tx.seal(bytes(inner))) == bytes(inner)


def test_scapy_refuses_our_packet_under_wrong_high_half(kind: str) -> None:
    """The high half is really in our AAD: scapy told the wrong one refuses the packet."""
    sa = scapy_sa()
    payload = tx_codec(SPI, KEYMAT, 2**32 + 9, kind=kind).seal(bytes(inner_packet(2)))
    with pytest.raises(scapy_ipsec.IPSecIntegrityError):
        scapy_open(sa, 9, payload)
    assert scapy_open(sa, 2**32 + 9, payload) == bytes(inner_packet(2))
