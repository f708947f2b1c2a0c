"""The handshake between two endpoints, and every way it must refuse a message."""

from __future__ import annotations

import struct

import pytest
from kx_helpers import A_ADDR, B_ADDR, PSK, WALL0, CountingRandom, key, pair

from btmm_core.dataplane.api import Endpoint
from btmm_core.keyex.keys import derive_psk
from btmm_core.keyex.noise import (
    INITIATION_LEN,
    LABEL_MAC1,
    Confirm,
    ConfirmAcked,
    Confirmed,
    CookieReply,
    CookieStored,
    HandshakeComplete,
    HandshakeConfig,
    Handshaker,
    Initiation,
    MessageType,
    PeerInitiation,
    Refusal,
    Refused,
    Response,
    SendReply,
    blake2s,
    mac16,
)


def snapshot(h: Handshaker) -> object:
    return (
        {p: (r.greatest_timestamp, r.cookie, r.cookie_time) for p, r in h.peers.items()},
        sorted(h.pending),
        sorted(h.awaiting),
    )


def refused(h: Handshaker, out: object, reason: Refusal) -> None:
    assert isinstance(out, Refused), out
    assert out.reason == reason, out
    assert h.refused[reason.name.lower()] >= 1


def full(ha: Handshaker, hb: Handshaker, t: float = 0.0) -> tuple[HandshakeComplete, Confirmed]:
    b_pub = next(iter(ha.peers))
    m1 = ha.initiate(b_pub, 0x1111, now=t, wall=WALL0 + t)
    init = hb.receive(m1, A_ADDR, now=t, wall=WALL0 + t)
    assert isinstance(init, PeerInitiation), init
    m2, _ = hb.respond(init, 0x2222, now=t)
    done = ha.receive(m2, B_ADDR, now=t, wall=WALL0 + t)
    assert isinstance(done, HandshakeComplete), done
    conf = hb.receive(done.confirm, A_ADDR, now=t, wall=WALL0 + t)
    assert isinstance(conf, Confirmed), conf
    return done, conf


def test_handshake_gives_mirrored_keys() -> None:
    ha, hb = pair()
    done, conf = full(ha, hb)
    ka, kb = done.keys, conf.keys
    assert ka.initiator and not kb.initiator
    assert ka.peer == key("b").public and kb.peer == key("a").public
    assert (ka.rx_spi, ka.tx_spi) == (0x1111, 0x2222) == (kb.tx_spi, kb.rx_spi)
    assert ka.tx_keymat == kb.rx_keymat and ka.rx_keymat == kb.tx_keymat
    assert ka.tx_keymat != ka.rx_keymat and len(ka.tx_keymat) == 36
    assert ka.handshake_hash == kb.handshake_hash
    assert not ha.pending and not hb.awaiting
    assert sum(ha.refused.values()) == sum(hb.refused.values()) == 0


def test_two_handshakes_give_fresh_keys() -> None:
    ha, hb = pair()
    first, _ = full(ha, hb, 0.0)
    second, _ = full(ha, hb, 1.0)
    assert first.keys.tx_keymat != second.keys.tx_keymat


def test_responder_with_wrong_psk_is_refused_by_initiator() -> None:
    ha, hb = pair(psk_b=derive_psk(b"another account's secret!!"))
    m1 = ha.initiate(key("b").public, 0x1111, now=0, wall=WALL0)
    init = hb.receive(m1, A_ADDR, now=0, wall=WALL0)
    assert isinstance(init, PeerInitiation)  # IKpsk2: the PSK enters in message 2
    m2, _ = hb.respond(init, 0x2222, now=0)
    before = snapshot(ha)
    refused(ha, ha.receive(m2, B_ADDR, now=0, wall=WALL0), Refusal.DECRYPT_FAILED)
    assert snapshot(ha) == before  # the initiation stays open for the genuine answer


def test_initiator_with_wrong_psk_cannot_confirm() -> None:
    ha, hb = pair(psk_a=derive_psk(b"another account's secret!!"))
    m1 = ha.initiate(key("b").public, 0x1111, now=0, wall=WALL0)
    init = hb.receive(m1, A_ADDR, now=0, wall=WALL0)
    assert isinstance(init, PeerInitiation)
    m2, _ = hb.respond(init, 0x2222, now=0)
    refused(ha, ha.receive(m2, B_ADDR, now=0, wall=WALL0), Refusal.DECRYPT_FAILED)
    # the impostor never gets keys; a forged confirm does not verify
    forged = bytes([4, 0, 0, 0]) + struct.pack("<I", 0x2222) + bytes(16)
    before = snapshot(hb)
    refused(hb, hb.receive(forged, A_ADDR, now=0, wall=WALL0), Refusal.DECRYPT_FAILED)
    assert snapshot(hb) == before


def test_unknown_static_key_is_refused() -> None:
    _, hb = pair()
    mallory = Handshaker(key("mallory"), PSK, CountingRandom("m"))
    mallory.add_peer(key("b").public)  # knows b's public key and even the PSK
    m1 = mallory.initiate(key("b").public, 0x1111, now=0, wall=WALL0)
    before = snapshot(hb)
    refused(hb, hb.receive(m1, A_ADDR, now=0, wall=WALL0), Refusal.UNKNOWN_PEER)
    assert snapshot(hb) == before


def test_stranger_without_our_public_key_fails_mac1() -> None:
    ha, hb = pair()
    # a message built for someone else's key: mac1 does not match ours
    c = key("c")
    ha.add_peer(c.public)
    m1 = ha.initiate(c.public, 0x1111, now=0, wall=WALL0)
    before = snapshot(hb)
    refused(hb, hb.receive(m1, A_ADDR, now=0, wall=WALL0), Refusal.BAD_MAC1)
    assert snapshot(hb) == before


def test_replayed_initiation_is_refused() -> None:
    ha, hb = pair()
    m1 = ha.initiate(key("b").public, 0x1111, now=0, wall=WALL0)
    assert isinstance(hb.receive(m1, A_ADDR, now=0, wall=WALL0), PeerInitiation)
    before = snapshot(hb)
    refused(hb, hb.receive(m1, A_ADDR, now=1, wall=WALL0 + 1), Refusal.REPLAY)
    assert snapshot(hb) == before


def test_older_initiation_after_newer_is_refused() -> None:
    ha, hb = pair()
    old = ha.initiate(key("b").public, 0x1111, now=0, wall=WALL0)
    new = ha.initiate(key("b").public, 0x1112, now=1, wall=WALL0 + 1)
    assert isinstance(hb.receive(new, A_ADDR, now=1, wall=WALL0 + 1), PeerInitiation)
    refused(hb, hb.receive(old, A_ADDR, now=2, wall=WALL0 + 2), Refusal.REPLAY)


@pytest.mark.parametrize("offset", [-3600.0, +3600.0])
def test_stale_or_future_timestamp_is_refused(offset: float) -> None:
    ha, hb = pair()
    m1 = ha.initiate(key("b").public, 0x1111, now=0, wall=WALL0 + offset)
    before = snapshot(hb)
    refused(hb, hb.receive(m1, A_ADDR, now=0, wall=WALL0), Refusal.STALE)
    assert snapshot(hb) == before


def _remac(msg: bytes, receiver_pub: bytes) -> bytes:
    body = msg[:-32]
    return body + mac16(blake2s(LABEL_MAC1, receiver_pub), body) + msg[-16:]


def test_every_tampered_initiation_byte_is_refused() -> None:
    ha, hb = pair(config=HandshakeConfig(source_burst=1000, load_threshold=10_000))
    m1 = ha.initiate(key("b").public, 0x1111, now=0, wall=WALL0)
    before = snapshot(hb)
    for i in range(INITIATION_LEN - 16):  # mac2 is ignored when not under load
        bad = bytearray(m1)
        bad[i] ^= 0x01
        out = hb.receive(bytes(bad), A_ADDR, now=0, wall=WALL0)
        assert isinstance(out, Refused), (i, out)
        # with mac1 recomputed, the AEADs or the SPI binding catch the change
        if 4 <= i < INITIATION_LEN - 32:
            out = hb.receive(_remac(bytes(bad), key("b").public), A_ADDR, now=0, wall=WALL0)
            assert isinstance(out, Refused), (i, out)
            assert out.reason in (
                Refusal.DECRYPT_FAILED,
                Refusal.SPI_MISMATCH,
                Refusal.WEAK_KEY,
            ), (i, out)
    assert snapshot(hb) == before
    assert hb.refused["bad_mac1"] >= INITIATION_LEN - 16 - 4
    # and the genuine one still works afterwards
    assert isinstance(hb.receive(m1, A_ADDR, now=0, wall=WALL0), PeerInitiation)


def test_every_tampered_response_byte_is_refused() -> None:
    # forged responses are rate limited per source: a burst large enough for every byte
    ha, hb = pair(config=HandshakeConfig(source_burst=1000))
    m1 = ha.initiate(key("b").public, 0x1111, now=0, wall=WALL0)
    init = hb.receive(m1, A_ADDR, now=0, wall=WALL0)
    assert isinstance(init, PeerInitiation)
    m2, _ = hb.respond(init, 0x2222, now=0)
    before = snapshot(ha)
    for i in range(len(m2) - 16):
        bad = bytearray(m2)
        bad[i] ^= 0x80
        cands = [bytes(bad)]
        if i < len(m2) - 32:
            cands.append(_remac(bytes(bad), key("a").public))
        for cand in cands:
            out = ha.receive(cand, B_ADDR, now=0, wall=WALL0)
            assert isinstance(out, Refused), (i, out)
    assert snapshot(ha) == before
    assert isinstance(ha.receive(m2, B_ADDR, now=0, wall=WALL0), HandshakeComplete)


def test_tampered_confirm_is_refused() -> None:
    ha, hb = pair()
    m1 = ha.initiate(key("b").public, 0x1111, now=0, wall=WALL0)
    init = hb.receive(m1, A_ADDR, now=0, wall=WALL0)
    assert isinstance(init, PeerInitiation)
    m2, _ = hb.respond(init, 0x2222, now=0)
    done = ha.receive(m2, B_ADDR, now=0, wall=WALL0)
    assert isinstance(done, HandshakeComplete)
    for i in range(len(done.confirm)):
        bad = bytearray(done.confirm)
        bad[i] ^= 0x04
        assert isinstance(hb.receive(bytes(bad), A_ADDR, now=0, wall=WALL0), Refused), i
    first = hb.receive(done.confirm, A_ADDR, now=0, wall=WALL0)
    assert isinstance(first, Confirmed) and not first.repeated
    # a repeated confirm (our ack was lost) is acknowledged again, changing nothing
    again = hb.receive(done.confirm, A_ADDR, now=0, wall=WALL0)
    assert isinstance(again, Confirmed) and again.repeated and again.ack == first.ack
    # the ack: tampered ones are refused, the genuine one is accepted once
    for i in range(len(first.ack)):
        bad = bytearray(first.ack)
        bad[i] ^= 0x10
        assert isinstance(ha.receive(bytes(bad), B_ADDR, now=0, wall=WALL0), Refused), i
    acked = ha.receive(first.ack, B_ADDR, now=0, wall=WALL0)
    assert isinstance(acked, ConfirmAcked) and acked.rx_spi == 0x1111
    refused(ha, ha.receive(first.ack, B_ADDR, now=0, wall=WALL0), Refusal.UNKNOWN_RECEIVER)


def test_low_order_ephemeral_is_refused() -> None:
    _, hb = pair()
    body = bytes([1, 0, 0, 0]) + struct.pack("<I", 0x1111) + bytes(32) + bytes(80)
    msg = body + mac16(blake2s(LABEL_MAC1, key("b").public), body) + bytes(16)
    before = snapshot(hb)
    refused(hb, hb.receive(msg, A_ADDR, now=0, wall=WALL0), Refusal.WEAK_KEY)
    assert snapshot(hb) == before


@pytest.mark.parametrize(
    "msg", [b"", b"\x01", b"\x01\x00\x00\x01" + bytes(144), b"\x09\x00\x00\x00", bytes(200)]
)
def test_malformed_is_refused(msg: bytes) -> None:
    _, hb = pair()
    before = snapshot(hb)
    refused(hb, hb.receive(msg, A_ADDR, now=0, wall=WALL0), Refusal.MALFORMED)
    assert snapshot(hb) == before


def test_response_without_initiation_is_refused() -> None:
    ha, hb = pair()
    m1 = ha.initiate(key("b").public, 0x1111, now=0, wall=WALL0)
    init = hb.receive(m1, A_ADDR, now=0, wall=WALL0)
    assert isinstance(init, PeerInitiation)
    m2, _ = hb.respond(init, 0x2222, now=0)
    ha.cancel(0x1111)
    refused(ha, ha.receive(m2, B_ADDR, now=0, wall=WALL0), Refusal.UNKNOWN_RECEIVER)


def test_under_load_responder_sends_cookie_and_does_no_dh() -> None:
    ha, hb = pair()
    hb.set_forced_load(True)
    m1 = ha.initiate(key("b").public, 0x1111, now=0, wall=WALL0)
    before = snapshot(hb)
    out = hb.receive(m1, A_ADDR, now=0, wall=WALL0)
    assert isinstance(out, SendReply) and out.destination == A_ADDR, out
    assert hb.refused["cookie_required"] == 1 and hb.cookies_sent == 1
    assert snapshot(hb) == before  # not even the timestamp moved: no DH was done
    stored = ha.receive(out.message, B_ADDR, now=0.1, wall=WALL0 + 0.1)
    assert isinstance(stored, CookieStored) and ha.cookies_received == 1
    # the retry carries a valid mac2 and is processed despite the load
    m1b = ha.initiate(key("b").public, 0x1112, now=0.2, wall=WALL0 + 0.2)
    assert isinstance(hb.receive(m1b, A_ADDR, now=0.2, wall=WALL0 + 0.2), PeerInitiation)
    # the same cookie from another address is worthless: the cookie is bound to the source
    m1c = ha.initiate(key("b").public, 0x1113, now=0.3, wall=WALL0 + 0.3)
    other = hb.receive(m1c, B_ADDR, now=0.3, wall=WALL0 + 0.3)
    assert isinstance(other, SendReply) and other.destination == B_ADDR


def test_tampered_cookie_reply_is_refused() -> None:
    ha, hb = pair()
    hb.set_forced_load(True)
    m1 = ha.initiate(key("b").public, 0x1111, now=0, wall=WALL0)
    out = hb.receive(m1, A_ADDR, now=0, wall=WALL0)
    assert isinstance(out, SendReply)
    bad = bytearray(out.message)
    bad[-1] ^= 1
    before = snapshot(ha)
    refused(ha, ha.receive(bytes(bad), B_ADDR, now=0, wall=WALL0), Refusal.DECRYPT_FAILED)
    assert snapshot(ha) == before


def test_load_is_detected_from_the_handshake_rate() -> None:
    ha, hb = pair(config=HandshakeConfig(load_threshold=3, source_burst=100))
    outs = []
    for i in range(5):
        m = ha.initiate(key("b").public, 0x1000 + i, now=i * 0.01, wall=WALL0 + i * 0.01)
        outs.append(hb.receive(m, A_ADDR, now=i * 0.01, wall=WALL0 + i * 0.01))
    assert [type(o) for o in outs] == [PeerInitiation] * 3 + [SendReply] * 2
    # load passes after the hold time
    m = ha.initiate(key("b").public, 0x2000, now=5.0, wall=WALL0 + 5)
    assert isinstance(hb.receive(m, A_ADDR, now=5.0, wall=WALL0 + 5), PeerInitiation)


def test_per_source_rate_limit() -> None:
    ha, hb = pair(config=HandshakeConfig(source_rate=1.0, source_burst=2.0))
    results = []
    for i in range(4):
        m = ha.initiate(key("b").public, 0x1000 + i, now=i * 0.01, wall=WALL0 + i * 0.01)
        results.append(hb.receive(m, A_ADDR, now=i * 0.01, wall=WALL0 + i * 0.01))
    assert [type(r) for r in results] == [PeerInitiation, PeerInitiation, Refused, Refused]
    assert hb.refused["rate_limited"] == 2
    # another source is not affected, and the bucket refills with time
    m = ha.initiate(key("b").public, 0x2000, now=0.05, wall=WALL0 + 0.05)
    assert isinstance(hb.receive(m, B_ADDR, now=0.05, wall=WALL0 + 0.05), PeerInitiation)
    m = ha.initiate(key("b").public, 0x2001, now=2.0, wall=WALL0 + 2)
    assert isinstance(hb.receive(m, A_ADDR, now=2.0, wall=WALL0 + 2), PeerInitiation)


def test_wire_messages_round_trip_through_their_dataclasses() -> None:
    ha, hb = pair()
    m1 = ha.initiate(key("b").public, 0x1111, now=0, wall=WALL0)
    init = Initiation.parse(m1)
    assert init.sender == 0x1111 and init.to_bytes() == m1 and len(m1) == INITIATION_LEN
    peer_init = hb.receive(m1, A_ADDR, now=0, wall=WALL0)
    assert isinstance(peer_init, PeerInitiation)
    m2, _ = hb.respond(peer_init, 0x2222, now=0)
    resp = Response.parse(m2)
    assert (resp.sender, resp.receiver) == (0x2222, 0x1111) and resp.to_bytes() == m2
    done = ha.receive(m2, B_ADDR, now=0, wall=WALL0)
    assert isinstance(done, HandshakeComplete)
    conf = Confirm.parse(done.confirm)
    assert conf.kind == MessageType.CONFIRM and conf.receiver == 0x2222
    assert conf.to_bytes() == done.confirm


# --- a thief of a device key without the account secret (issue 11, item 6) -----------------

THIEF_ADDR = Endpoint("203.0.113.66", 4500)


def thief_of_a() -> Handshaker:
    """Holds a's device key but not the account secret."""
    h = Handshaker(key("a"), derive_psk(b"not the account secret of a and b"), CountingRandom("t"))
    h.add_peer(key("b").public)
    return h


@pytest.mark.parametrize("ahead", [599.0, 20.0])
def test_future_stamp_from_a_stolen_device_key_does_not_lock_out_the_peer(ahead: float) -> None:
    ha, hb = pair()
    thief = thief_of_a()
    forged = thief.initiate(key("b").public, 0x6666, now=0, wall=WALL0 + ahead)
    out = hb.receive(forged, THIEF_ADDR, now=0, wall=WALL0)
    if ahead > 30.0:  # beyond the default max_future: refused outright
        refused(hb, out, Refusal.STALE)
    else:
        # within the allowed clock difference the thief is answered (the PSK comes later) ...
        assert isinstance(out, PeerInitiation), out
        m2, _ = hb.respond(out, 0x2222, now=0)
        refused(thief, thief.receive(m2, B_ADDR, now=0, wall=WALL0), Refusal.DECRYPT_FAILED)
    # ... but the real peer's next initiation, one second later, is not a "replay"
    m1 = ha.initiate(key("b").public, 0x1111, now=1, wall=WALL0 + 1)
    assert isinstance(hb.receive(m1, A_ADDR, now=1, wall=WALL0 + 1), PeerInitiation)


def test_initiation_replay_is_refused_before_and_after_the_confirm() -> None:
    """Clamping the replay floor to our clock keeps replays out: the exact repeat of the last
    initiation, and, once the PSK is proven, anything up to its (future) timestamp."""
    ha, hb = pair()
    # a's clock runs 10 s ahead of b's
    first = ha.initiate(key("b").public, 0x1111, now=0, wall=WALL0 + 10)
    second = ha.initiate(key("b").public, 0x1112, now=0, wall=WALL0 + 11)
    init = hb.receive(second, A_ADDR, now=0, wall=WALL0)
    assert isinstance(init, PeerInitiation)
    refused(hb, hb.receive(second, A_ADDR, now=0.1, wall=WALL0 + 0.1), Refusal.REPLAY)
    m2, _ = hb.respond(init, 0x2222, now=0)
    done = ha.receive(m2, B_ADDR, now=0, wall=WALL0)
    assert isinstance(done, HandshakeComplete)
    assert isinstance(hb.receive(done.confirm, A_ADDR, now=0, wall=WALL0), Confirmed)
    refused(hb, hb.receive(first, A_ADDR, now=1, wall=WALL0 + 1), Refusal.REPLAY)


def _forged_response(receiver: int, i: int) -> bytes:
    """A response to a's initiation ``receiver`` that passes mac1 (a's public key is public)
    but was not made by b."""
    msg = Response(0x3000 + i, receiver, key(f"m{i}").public, bytes(24))
    mac1 = mac16(blake2s(LABEL_MAC1, key("a").public), msg.body())
    return Response(msg.sender, receiver, msg.ephemeral, msg.payload, mac1).to_bytes()


def test_forged_responses_beyond_the_rate_are_dropped_and_counted() -> None:
    cfg = HandshakeConfig(source_rate=1.0, source_burst=3.0)
    ha, hb = pair(config=cfg)
    m1 = ha.initiate(key("b").public, 0x1111, now=0, wall=WALL0)
    init = hb.receive(m1, A_ADDR, now=0, wall=WALL0)
    assert isinstance(init, PeerInitiation)
    before = snapshot(ha)
    outs = [ha.receive(_forged_response(0x1111, i), THIEF_ADDR, now=0.01 * i, wall=WALL0)
            for i in range(10)]
    reasons = [o.reason for o in outs if isinstance(o, Refused)]
    # the first few cost a DH and fail to decrypt; the rest are refused before any DH
    assert reasons == [Refusal.DECRYPT_FAILED] * 3 + [Refusal.RATE_LIMITED] * 7, reasons
    assert ha.refused["rate_limited"] == 7
    # cookie replies from there too: refused before decryption, counted, nothing stored
    fake = CookieReply(0x1111, bytes(12), bytes(32)).to_bytes()
    refused(ha, ha.receive(fake, THIEF_ADDR, now=0.2, wall=WALL0), Refusal.RATE_LIMITED)
    assert ha.refused["rate_limited"] == 8 and ha.cookies_received == 0
    assert snapshot(ha) == before
    # the genuine answer from the responder's address still completes the handshake
    m2, _ = hb.respond(init, 0x2222, now=0.2)
    assert isinstance(ha.receive(m2, B_ADDR, now=0.2, wall=WALL0), HandshakeComplete)
