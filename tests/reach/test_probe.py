"""Probe wire format, keys and the request replay rule (reach/probe.py), and that the key
exchange never hands a probe to the handshake."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reach_keys import PSK, WALL0, CountingRandom, key

from btmm_core.dataplane.api import Endpoint
from btmm_core.errors import ConfigError, MalformedMessage
from btmm_core.keyex.keys import derive_psk
from btmm_core.keyex.noise import Handshaker, MessageType, is_path_message
from btmm_core.keyex.session import KeyExchange
from btmm_core.reach.probe import (
    GuardConfig,
    ProbeDrop,
    ProbeKeys,
    ProbeReply,
    ProbeRequest,
    RequestGuard,
    decode_endpoint,
    encode_endpoint,
    key_id,
    parse_probe,
    peek_sender,
)

A, B, C = key("a"), key("b"), key("c")
V4 = Endpoint("198.51.100.7", 40123)
V6 = Endpoint("2001:db8::1", 4500)
TXID = bytes(range(12))


def keys_ab() -> tuple[ProbeKeys, ProbeKeys]:
    return ProbeKeys.derive(A, B.public, PSK), ProbeKeys.derive(B, A.public, PSK)


def request(
    k: ProbeKeys, txid: bytes = TXID, wall: float = WALL0, dest: Endpoint = V4
) -> ProbeRequest:
    return ProbeRequest(k.own_id, txid, int(wall * 1000), dest).sealed(k.mac_key)


# --- keys -----------------------------------------------------------------------------------


def test_both_peers_derive_the_same_key_and_swapped_ids() -> None:
    ka, kb = keys_ab()
    assert ka.mac_key == kb.mac_key
    assert (
        (ka.own_id, ka.peer_id) == (kb.peer_id, kb.own_id) == (key_id(A.public), key_id(B.public))
    )


def test_key_needs_the_account_psk_and_the_device_key() -> None:
    ka, _ = keys_ab()
    other_account = ProbeKeys.derive(A, B.public, derive_psk(b"another account's secret!!"))
    third_device = ProbeKeys.derive(C, B.public, PSK)
    assert len({ka.mac_key, other_account.mac_key, third_device.mac_key}) == 3


def test_refused_keys() -> None:
    with pytest.raises(ConfigError):
        ProbeKeys.derive(A, A.public, PSK)
    with pytest.raises(ConfigError):
        ProbeKeys.derive(A, bytes(32), PSK)  # low-order point: all-zero shared secret
    with pytest.raises(ConfigError):
        ProbeKeys.derive(A, B.public, b"short")


# --- wire format ----------------------------------------------------------------------------


@pytest.mark.parametrize("dest", [V4, V6])
def test_round_trip(dest: Endpoint) -> None:
    ka, kb = keys_ab()
    req = request(ka, dest=dest)
    wire = req.to_bytes()
    assert wire[:4] == bytes([MessageType.PATH_PROBE, 0, 0, 0])
    assert parse_probe(wire) == req and req.verify(kb.mac_key)
    rep = ProbeReply(kb.own_id, TXID, dest).sealed(kb.mac_key)
    assert parse_probe(rep.to_bytes()) == rep and rep.verify(ka.mac_key)
    assert len(rep.to_bytes()) < len(wire)  # never an amplifier
    assert peek_sender(wire) == ka.own_id and peek_sender(rep.to_bytes()) == kb.own_id


def test_sizes_of_an_ipv4_path() -> None:
    ka, kb = keys_ab()
    assert len(request(ka).to_bytes()) == 55
    assert len(ProbeReply(kb.own_id, TXID, V4).sealed(kb.mac_key).to_bytes()) == 47


def test_observed_endpoint_is_xored() -> None:
    _, kb = keys_ab()
    wire = ProbeReply(kb.own_id, TXID, V4).sealed(kb.mac_key).to_bytes()
    assert bytes([198, 51, 100, 7]) not in wire and (40123).to_bytes(2, "big") not in wire


def test_every_truncation_and_extension_is_malformed() -> None:
    ka, kb = keys_ab()
    for wire in (
        request(ka).to_bytes(),
        request(ka, dest=V6).to_bytes(),
        ProbeReply(kb.own_id, TXID, V6).sealed(kb.mac_key).to_bytes(),
    ):
        for n in range(len(wire)):
            with pytest.raises(MalformedMessage):
                parse_probe(wire[:n])
        with pytest.raises(MalformedMessage):
            parse_probe(wire + b"\0")


def test_bad_headers_and_endpoints() -> None:
    ka, _ = keys_ab()
    wire = bytearray(request(ka).to_bytes())
    for i, value in ((0, 5), (0, 8), (1, 1), (3, 1)):
        bad = bytearray(wire)
        bad[i] = value
        with pytest.raises(MalformedMessage):
            parse_probe(bytes(bad))
    family_at = 4 + 8 + 12 + 8
    bad = bytearray(wire)
    bad[family_at] = 5
    with pytest.raises(MalformedMessage):
        parse_probe(bytes(bad))
    bad = bytearray(wire)
    bad[family_at] = 6  # an IPv6 family on an IPv4-sized address
    with pytest.raises(MalformedMessage):
        parse_probe(bytes(bad))
    with pytest.raises(MalformedMessage):
        decode_endpoint(bytes([4, 0, 0, 1, 2, 3, 4]))  # port 0
    with pytest.raises(ValueError):
        encode_endpoint(Endpoint("192.0.2.1", 0))
    assert peek_sender(b"\x06\0\0") is None and peek_sender(b"\x01\0\0\0" + bytes(8)) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_parse_raises_only_malformed(data: bytes) -> None:
    with contextlib.suppress(MalformedMessage):
        parse_probe(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=54), st.integers(min_value=1, max_value=255))
def test_any_altered_byte_fails_verification(index: int, flip: int) -> None:
    ka, kb = keys_ab()
    wire = bytearray(request(ka).to_bytes())
    wire[index] ^= flip
    try:
        msg = parse_probe(bytes(wire))
    except MalformedMessage:
        return
    assert not msg.verify(kb.mac_key)


# --- the replay rule ------------------------------------------------------------------------


def test_guard_answers_once() -> None:
    ka, kb = keys_ab()
    guard = RequestGuard(kb)
    req = request(ka)
    assert guard.check(req, now=0.0, wall=WALL0) is None
    assert guard.check(req, now=1.0, wall=WALL0 + 1) == ProbeDrop.REPLAY
    assert guard.check(request(ka, txid=bytes(12)), now=1.0, wall=WALL0 + 1) is None


def test_guard_refusals() -> None:
    ka, kb = keys_ab()
    guard = RequestGuard(kb, GuardConfig(max_age=60, max_future=5))
    forged = ProbeRequest(ka.own_id, TXID, int(WALL0 * 1000), V4, bytes(16))
    assert guard.check(forged, 0.0, WALL0) == ProbeDrop.BAD_MAC
    other = ProbeKeys.derive(A, B.public, derive_psk(b"another account's secret!!"))
    assert guard.check(request(other), 0.0, WALL0) == ProbeDrop.BAD_MAC
    third = ProbeKeys.derive(C, B.public, PSK)
    assert guard.check(request(third), 0.0, WALL0) == ProbeDrop.UNKNOWN_SENDER
    # our own request reflected back to us: our id is never the peer's
    assert guard.check(request(kb), 0.0, WALL0) == ProbeDrop.UNKNOWN_SENDER
    assert guard.check(request(ka, wall=WALL0 - 61), 0.0, WALL0) == ProbeDrop.STALE
    assert guard.check(request(ka, wall=WALL0 + 6), 0.0, WALL0) == ProbeDrop.STALE
    assert len(guard) == 0  # refusals leave no state


def test_guard_memory_is_bounded_and_forgets_in_time() -> None:
    ka, kb = keys_ab()
    guard = RequestGuard(kb, GuardConfig(max_age=60, max_future=5, memory=3))
    rnd = CountingRandom("txids")
    for _ in range(3):
        assert guard.check(request(ka, txid=rnd(12)), 0.0, WALL0) is None
    assert guard.check(request(ka, txid=rnd(12)), 1.0, WALL0 + 1) == ProbeDrop.BUSY
    old = request(ka, txid=rnd(12), wall=WALL0 + 64)
    assert guard.check(old, 65.0, WALL0 + 65) == ProbeDrop.BUSY
    assert guard.check(old, 65.5, WALL0 + 65.5) is None  # the first three are forgotten
    assert len(guard) == 1


def test_a_replay_after_the_memory_is_stale() -> None:
    ka, kb = keys_ab()
    cfg = GuardConfig(max_age=60, max_future=5)
    guard = RequestGuard(kb, cfg)
    req = request(ka, wall=WALL0 + 5)  # the sender's clock runs 5 s ahead
    assert guard.check(req, 0.0, WALL0) is None
    later = cfg.max_age + cfg.max_future
    assert guard.check(req, later, WALL0 + later) == ProbeDrop.REPLAY
    assert guard.check(req, later + 0.001, WALL0 + later + 0.001) == ProbeDrop.STALE


# --- the key exchange leaves probes alone ---------------------------------------------------


def test_key_exchange_ignores_probes() -> None:
    ka, _kb = keys_ab()
    hs = Handshaker(B, PSK, CountingRandom("b"))
    kx = KeyExchange(hs)
    for wire in (
        request(ka).to_bytes(),
        ProbeReply(ka.own_id, TXID, V4).sealed(ka.mac_key).to_bytes(),
    ):
        assert is_path_message(wire)
        before = dict(hs.refused)
        assert kx.receive(wire, V4, 0.0, WALL0) == []
        assert hs.refused == before and kx.refusals == []
    assert not is_path_message(b"\x06\x00\x00\x01")
    assert not is_path_message(b"\x04\x00\x00\x00" + bytes(20))
    # anything else still goes to the handshake and is refused there
    assert kx.receive(b"\x08\0\0\0", V4, 0.0, WALL0) == [] and sum(hs.refused.values()) == 1
