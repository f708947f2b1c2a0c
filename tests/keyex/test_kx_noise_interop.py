"""Interop and known-answer tests of the handshake against an independent Noise implementation
(the ``noiseprotocol`` package): same keys, same PSK, same ephemerals => same bytes, same
handshake hash, same transport keys."""

from __future__ import annotations

import struct
import warnings

from kx_helpers import A_ADDR, B_ADDR, PSK, WALL0, key, pair

# the independent implementation (PyPI noiseprotocol, a dev dependency): a missing package
# fails these tests rather than skipping them
from noise.connection import Keypair, NoiseConnection  # type: ignore[import-untyped]

from btmm_core.keyex.noise import (
    INFO_I2R,
    INFO_R2I,
    LABEL_MAC1,
    PROLOGUE,
    PROTOCOL_NAME,
    HandshakeComplete,
    MessageType,
    PeerInitiation,
    blake2s,
    esp_hkdf,
    mac16,
    tai64n,
)


def _noise(initiator: bool, static_priv: bytes, remote_pub: bytes, ephemeral: bytes) -> object:
    conn = NoiseConnection.from_name(PROTOCOL_NAME)
    if initiator:
        conn.set_as_initiator()
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote_pub)
    else:
        conn.set_as_responder()
    conn.set_keypair_from_private_bytes(Keypair.STATIC, static_priv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns that a preset ephemeral is for testing
        conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral)
        conn.set_psks(psk=PSK)
        conn.set_prologue(PROLOGUE)
        conn.start_handshake()
    return conn


def test_our_initiator_against_their_responder() -> None:
    a, b = key("a"), key("b")
    ha, _ = pair()
    msg1 = ha.initiate(b.public, 0x1001, now=0.0, wall=WALL0)
    ephemeral = ha.pending[0x1001].ephemeral
    # their initiator with the same ephemeral writes byte-identical Noise message 1
    theirs_i = _noise(True, a.private, b.public, ephemeral)
    payload1 = tai64n(WALL0) + struct.pack(">I", 0x1001)
    assert bytes(theirs_i.write_message(payload1)) == msg1[8:-32]

    resp_e = bytes(range(100, 132))
    theirs = _noise(False, b.private, b"", resp_e)
    assert bytes(theirs.read_message(msg1[8:-32])) == payload1
    assert theirs.noise_protocol.handshake_state.rs.public_bytes == a.public
    noise2 = bytes(theirs.write_message(struct.pack(">II", 0x2002, 0x1001)))
    assert theirs.handshake_finished
    body = bytes([MessageType.RESPONSE, 0, 0, 0]) + struct.pack("<II", 0x2002, 0x1001) + noise2
    msg2 = body + mac16(blake2s(LABEL_MAC1, a.public), body) + bytes(16)

    out = ha.receive(msg2, B_ADDR, now=0.1, wall=WALL0)
    assert isinstance(out, HandshakeComplete), out
    h = theirs.get_handshake_hash()
    c1 = theirs.noise_protocol.cipher_state_decrypt.k  # initiator -> responder
    c2 = theirs.noise_protocol.cipher_state_encrypt.k
    assert out.keys.handshake_hash == h
    assert out.keys.tx_keymat == esp_hkdf(c1, h, INFO_I2R, 36)
    assert out.keys.rx_keymat == esp_hkdf(c2, h, INFO_R2I, 36)
    assert (out.keys.rx_spi, out.keys.tx_spi) == (0x1001, 0x2002)


def test_their_initiator_against_our_responder() -> None:
    a, b = key("a"), key("b")
    _, hb = pair()
    theirs = _noise(True, a.private, b.public, bytes(range(1, 33)))
    payload1 = tai64n(WALL0) + struct.pack(">I", 0x3003)
    noise1 = bytes(theirs.write_message(payload1))
    body = bytes([MessageType.INITIATION, 0, 0, 0]) + struct.pack("<I", 0x3003) + noise1
    msg1 = body + mac16(blake2s(LABEL_MAC1, b.public), body) + bytes(16)

    init = hb.receive(msg1, A_ADDR, now=0.0, wall=WALL0)
    assert isinstance(init, PeerInitiation), init
    assert init.peer == a.public and init.remote_spi == 0x3003
    msg2, keys = hb.respond(init, 0x4004, now=0.0)
    assert bytes(theirs.read_message(msg2[12:-32])) == struct.pack(">II", 0x4004, 0x3003)
    assert theirs.handshake_finished
    h = theirs.get_handshake_hash()
    c1 = theirs.noise_protocol.cipher_state_encrypt.k
    c2 = theirs.noise_protocol.cipher_state_decrypt.k
    assert keys.handshake_hash == h
    assert keys.rx_keymat == esp_hkdf(c1, h, INFO_I2R, 36)
    assert keys.tx_keymat == esp_hkdf(c2, h, INFO_R2I, 36)


def test_wrong_prologue_is_not_interoperable() -> None:
    """The KAT can fail: a different prologue gives a different message 1."""
    a, b = key("a"), key("b")
    ha, _ = pair()
    msg1 = ha.initiate(b.public, 0x1001, now=0.0, wall=WALL0)
    conn = NoiseConnection.from_name(PROTOCOL_NAME)
    conn.set_as_initiator()
    conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, b.public)
    conn.set_keypair_from_private_bytes(Keypair.STATIC, a.private)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ha.pending[0x1001].ephemeral)
        conn.set_psks(psk=PSK)
        conn.set_prologue(b"some other protocol")
        conn.start_handshake()
    theirs = bytes(conn.write_message(tai64n(WALL0) + struct.pack(">I", 0x1001)))
    assert theirs[:32] == msg1[8:40]  # same ephemeral
    assert theirs != msg1[8:-32]
