"""Arbitrary bytes never crash the handshake endpoint or change its state: they are refused
and counted, or (only for well-formed, authentic messages) accepted."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from kx_helpers import A_ADDR, WALL0, key, pair

from btmm_core.keyex.noise import (
    CONFIRM_LEN,
    COOKIE_REPLY_LEN,
    INITIATION_LEN,
    LABEL_MAC1,
    RESPONSE_LEN,
    HandshakeConfig,
    Refused,
    blake2s,
    mac16,
)

LENGTHS = [INITIATION_LEN, RESPONSE_LEN, COOKIE_REPLY_LEN, CONFIRM_LEN]


def _state(h: object) -> object:
    return (
        {p: (r.greatest_timestamp, r.cookie) for p, r in h.peers.items()},  # type: ignore[attr-defined]
        sorted(h.pending),
        sorted(h.awaiting),
        sorted(h.unacked),  # type: ignore[attr-defined]
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_are_refused(data: bytes) -> None:
    ha, hb = pair(config=HandshakeConfig(source_burst=10_000, load_threshold=10_000))
    ha.initiate(key("b").public, 0x1111, now=0, wall=WALL0)  # something to answer to
    before = (_state(ha), _state(hb))
    total = sum(ha.refused.values()) + sum(hb.refused.values())
    for h in (ha, hb):
        assert isinstance(h.receive(data, A_ADDR, now=0, wall=WALL0), Refused)
    assert (_state(ha), _state(hb)) == before
    assert sum(ha.refused.values()) + sum(hb.refused.values()) == total + 2


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([1, 2, 3, 4, 5]),
    st.sampled_from(LENGTHS),
    st.binary(min_size=400, max_size=400),
    st.booleans(),
)
def test_typed_messages_with_valid_mac1_are_refused(
    kind: int, length: int, filler: bytes, known_receiver: bool
) -> None:
    """Past the mac1 filter (the sender knows our public key) and aimed at a live SPI, random
    contents still cost at most the DH and are refused without state."""
    ha, hb = pair(config=HandshakeConfig(source_burst=10_000, load_threshold=10_000))
    ha.initiate(key("b").public, 0x1111, now=0, wall=WALL0)
    receiver = (0x1111).to_bytes(4, "little") if known_receiver else filler[:4]
    body = bytes([kind, 0, 0, 0]) + receiver + filler[: length - 40]
    for h, pub in ((ha, key("a").public), (hb, key("b").public)):
        msg = body + mac16(blake2s(LABEL_MAC1, pub), body) + bytes(16)
        before = _state(h)
        out = h.receive(msg[:length] if len(msg) > length else msg, A_ADDR, now=0, wall=WALL0)
        assert isinstance(out, Refused), out
        assert _state(h) == before
