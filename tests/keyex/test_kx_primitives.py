"""Known-answer tests of the primitives the handshake is built from."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from btmm_core.keyex.noise import blake2s, hmac_blake2s, mac16, public_of, tai64n, x25519

H = bytes.fromhex


def test_x25519_rfc7748_section_5_2() -> None:
    assert x25519(
        H("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4"),
        H("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c"),
    ) == H("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552")
    # the RFC's u-coordinate has its top bit set: X25519 must mask it (section 5)
    assert x25519(
        H("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d"),
        H("e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493"),
    ) == H("95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957")


def test_x25519_rfc7748_section_6_1() -> None:
    a = H("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    b = H("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    a_pub = H("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    b_pub = H("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = H("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert public_of(a) == a_pub
    assert public_of(b) == b_pub
    assert x25519(a, b_pub) == shared == x25519(b, a_pub)


def test_blake2s_rfc7693_appendix_b() -> None:
    assert blake2s(b"abc") == H("508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982")
    assert blake2s(b"") == H("69217a3079908094e11121d042354a7c1f55b6482ca1a51e1b250dfd1ed0eef9")


def test_keyed_blake2s_official_kat() -> None:
    # blake2s-kat.txt, key 00..1f, empty input (the keyed mode under mac1/mac2)
    k = bytes(range(32))
    assert hashlib.blake2s(b"", key=k).digest() == H(
        "48a8997da407876b3d79c0d92325ad3b89cbb754d86ab71aee047ad345fd2c49"
    )
    # mac16 is keyed BLAKE2s with a 16-byte output: a different parameter block, so it is
    # not a truncation of the 32-byte digest
    assert len(mac16(k, b"")) == 16
    assert mac16(k, b"") != hashlib.blake2s(b"", key=k).digest()[:16]


def test_hmac_blake2s_is_rfc2104_over_blake2s() -> None:
    # RFC 2104 written out with BLAKE2s (block 64 bytes), against our helper
    key, msg = b"k" * 10, b"message"
    k0 = key.ljust(64, b"\x00")
    inner = hashlib.blake2s(bytes(x ^ 0x36 for x in k0) + msg).digest()
    outer = hashlib.blake2s(bytes(x ^ 0x5C for x in k0) + inner).digest()
    assert hmac_blake2s(key, msg) == outer


def test_hkdf_sha256_rfc5869_case_1() -> None:
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=42,
        salt=H("000102030405060708090a0b0c"),
        info=H("f0f1f2f3f4f5f6f7f8f9"),
    ).derive(b"\x0b" * 22)
    assert okm == H(
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_tai64n_layout() -> None:
    stamp = tai64n(1.5)
    assert stamp == (2**62 + 1).to_bytes(8, "big") + (500_000_000).to_bytes(4, "big")
    assert tai64n(2.0) > tai64n(1.999999)
