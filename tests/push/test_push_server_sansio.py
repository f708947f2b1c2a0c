"""The DNS Push server core (RFC 8765 over RFC 8490 sessions) on a virtual clock: session
establishment and timers, SUBSCRIBE/PUSH/UNSUBSCRIBE/RECONFIRM, the TTL conventions, the
access rule (a session bound by a signed query), limits, and every error path."""

from __future__ import annotations

import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from push_helpers import (
    BOB,
    LAPTOP,
    NOW,
    PEER,
    PushLab,
    aaaa_update,
    changes_of,
    dso,
    parse,
    sign,
)

from btmm_core.dns.dso import TLV, DSOMessage, DSOType, Keepalive, Rcode, RetryDelay, padding
from btmm_core.dns.push import (
    ANY,
    REMOVE_COLLECTIVE,
    REMOVE_RR,
    Change,
    Reconfirm,
    Subscribe,
    Unsubscribe,
)
from btmm_core.dns.tsig import KeyRole, TsigKey
from btmm_core.push.server import PushConfig
from btmm_core.registry.handler import Transport

AAAA = dns.rdatatype.AAAA


def rd(text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text("IN", "AAAA", text)


def subscribe(
    lab: PushLab,
    msg_id: int = 1,
    name: dns.name.Name = LAPTOP,
    rdtype: int = AAAA,
    peer: str = PEER,
    rdclass: int = dns.rdataclass.IN,
) -> list:  # type: ignore[type-arg]
    wire = DSOMessage(msg_id, (Subscribe(name, rdtype, rdclass).tlv(),)).to_bytes()
    return lab.send(wire, peer)


def aborted(out: list) -> bool:  # type: ignore[type-arg]
    return len(out) == 1 and out[0].close and out[0].wire == b""


@pytest.fixture
def lab() -> PushLab:
    return PushLab.make()


def test_keepalive_establishes_and_grants_within_bounds(lab: PushLab) -> None:
    out = lab.send(DSOMessage(5, (Keepalive(3_600_000, 1_000).tlv(),)).to_bytes())
    (resp,) = out
    msg = dso(resp)
    assert msg.response and msg.msg_id == 5 and msg.rcode == Rcode.NOERROR
    # 10 s is the least interval a server may dictate; inactivity capped by the config
    assert Keepalive.from_tlv(msg.tlvs[0]) == Keepalive(60_000, 10_000)
    assert lab.push.holds_connection(Transport.TLS, PEER)


def test_padding_in_a_request_gets_padding_back(lab: PushLab) -> None:
    (resp,) = lab.send(DSOMessage(5, (Keepalive(0, 10_000).tlv(), padding(8))).to_bytes())
    assert [t.dso_type for t in dso(resp).tlvs] == [DSOType.KEEPALIVE, DSOType.ENCRYPTION_PADDING]


def test_subscribe_to_a_public_name_needs_no_binding_and_gets_current_records(
    lab: PushLab,
) -> None:
    srv = dns.name.from_text("_dns-update._udp.bob.members.example.")
    resp, initial = subscribe(lab, 7, srv, dns.rdatatype.SRV)
    assert dso(resp).rcode == Rcode.NOERROR and dso(resp).msg_id == 7
    (change,) = changes_of(initial)
    assert change.name == srv and change.rdtype == dns.rdatatype.SRV and change.is_add


def test_private_name_is_refused_without_binding_and_with_another_users_key(
    lab: PushLab,
) -> None:
    (resp,) = subscribe(lab)
    msg = dso(resp)
    assert msg.rcode == Rcode.REFUSED
    assert RetryDelay.from_tlv(msg.tlvs[0]).delay_ms == 300_000
    lab.bind("alice")
    (resp,) = subscribe(lab, 2)
    assert dso(resp).rcode == Rcode.REFUSED
    assert lab.push.stats["subscribe_refused"] == 2


def test_binding_on_another_connection_or_over_udp_does_not_count(lab: PushLab) -> None:
    lab.bind("bob", peer="192.0.2.8#1")
    (resp,) = subscribe(lab)
    assert dso(resp).rcode == Rcode.REFUSED


def test_bound_session_gets_add_change_and_delete_with_the_rfc_ttls(lab: PushLab) -> None:
    assert lab.bind().rcode() == 0
    out = subscribe(lab)
    assert len(out) == 1 and dso(out[0]).rcode == Rcode.NOERROR  # nothing there yet: no PUSH
    (push,) = lab.update(aaaa_update(add=("fd00::1",)))
    assert changes_of(push) == [Change(LAPTOP, AAAA, 1, 300, rd("fd00::1"))]
    (push,) = lab.update(aaaa_update(delete=("fd00::1",), add=("fd00::2",)))
    assert changes_of(push) == [
        Change(LAPTOP, AAAA, 1, REMOVE_RR, rd("fd00::1")),
        Change(LAPTOP, AAAA, 1, 300, rd("fd00::2")),
    ]
    (push,) = lab.update(aaaa_update(all_=True))
    assert changes_of(push) == [Change(LAPTOP, AAAA, 1, REMOVE_COLLECTIVE)]


def test_ttl_only_change_re_adds_the_rrset(lab: PushLab) -> None:
    lab.bind()
    lab.update(aaaa_update(add=("fd00::1",)))
    subscribe(lab)
    (push,) = lab.update(aaaa_update(add=("fd00::1",), ttl=60))
    assert changes_of(push) == [Change(LAPTOP, AAAA, 1, 60, rd("fd00::1"))]


def test_other_names_and_types_send_nothing_and_any_gets_all(lab: PushLab) -> None:
    lab.bind()
    subscribe(lab, 1)
    desktop = dns.name.from_text("desktop.bob.members.example.")
    assert lab.update(aaaa_update(add=("fd00::9",), name=desktop)) == []
    subscribe(lab, 2, rdtype=ANY, rdclass=ANY)
    u = aaaa_update(add=("fd00::1",))
    u.add(LAPTOP, 300, "TXT", '"x"')
    (push,) = lab.update(u)  # one PUSH for the session, each notification once
    got = changes_of(push)
    assert sorted(c.rdtype for c in got) == sorted([AAAA, dns.rdatatype.TXT])


def test_one_update_renders_once_for_many_sessions(lab: PushLab) -> None:
    peers = [f"192.0.2.{i}#5000" for i in range(1, 21)]
    for p in peers:
        lab.bind(peer=p)
        subscribe(lab, peer=p)
    out = lab.update(aaaa_update(add=("fd00::1",)))
    assert sorted(o.peer for o in out) == sorted(peers)
    assert len({id(o.wire) for o in out}) == 1  # the same bytes object for all


def test_unsubscribe_stops_events_and_unknown_ids_are_ignored(lab: PushLab) -> None:
    lab.bind()
    subscribe(lab, 4)
    assert lab.send(DSOMessage(0, (Unsubscribe(99).tlv(),)).to_bytes()) == []
    assert lab.send(DSOMessage(0, (Unsubscribe(4).tlv(),)).to_bytes()) == []
    assert lab.update(aaaa_update(add=("fd00::1",))) == []
    assert lab.push.stats["unsubscribed"] == 1 and lab.push.stats["unsubscribe_unknown"] == 1
    # the id is free again
    assert dso(subscribe(lab, 4)[0]).rcode == Rcode.NOERROR


def test_reconfirm_of_a_gone_record_pushes_its_removal(lab: PushLab) -> None:
    lab.bind()
    lab.update(aaaa_update(add=("fd00::1",)))
    subscribe(lab)
    held = Reconfirm(LAPTOP, AAAA, 1, rd("fd00::1"))
    gone = Reconfirm(LAPTOP, AAAA, 1, rd("fd00::7"))
    assert lab.send(DSOMessage(0, (held.tlv(),)).to_bytes()) == []
    (push,) = lab.send(DSOMessage(0, (gone.tlv(),)).to_bytes())
    assert changes_of(push) == [Change(LAPTOP, AAAA, 1, REMOVE_RR, rd("fd00::7"))]


def test_revoked_key_cancels_its_subscriptions(lab: PushLab) -> None:
    bob = lab.accounts["bob"].key
    laptop = TsigKey(
        dns.name.from_text("laptop.bob.members.example."),
        bob.algorithm,
        b"k" * 32,
        bob.zone,
        KeyRole.DEVICE,
        "laptop",
    )
    lab.core.store.keys[laptop.name] = laptop
    q = dns.message.make_query(BOB, dns.rdatatype.SOA)
    (answer,) = lab.send(sign(q, laptop, int(lab.now)))
    assert parse(answer.wire).rcode() == 0
    subscribe(lab, 3)
    del lab.core.store.keys[laptop.name]  # the device was revoked
    (cancel,) = lab.update(aaaa_update(add=("fd00::1",)))
    msg = dso(cancel)
    assert msg.response and msg.msg_id == 3 and msg.rcode == Rcode.REFUSED
    assert lab.push.stats["cancelled_key_gone"] == 1 and lab.push._total == 0


# ---- error paths -----------------------------------------------------------------------------


def test_unknown_primary_request_gets_dsotypeni_without_the_tlv(lab: PushLab) -> None:
    (resp,) = lab.send(DSOMessage(9, (TLV(0xF00D, b"x"),)).to_bytes())
    msg = dso(resp)
    assert msg.rcode == Rcode.DSOTYPENI and msg.msg_id == 9 and msg.tlvs == ()


def test_unknown_primary_unidirectional_is_fatal(lab: PushLab) -> None:
    assert aborted(lab.send(DSOMessage(0, (TLV(0xF00D, b"x"),)).to_bytes()))


def test_malformed_tlv_is_fatal(lab: PushLab) -> None:
    lab.send(DSOMessage(1, (Keepalive(0, 10_000).tlv(),)).to_bytes())
    assert aborted(lab.send(DSOMessage(2, (TLV(DSOType.KEEPALIVE, b"1234567"),)).to_bytes()))
    assert not lab.push.sessions
    lab2 = PushLab.make()
    assert aborted(lab2.send(DSOMessage(2, (TLV(DSOType.SUBSCRIBE, b"\x07laptop"),)).to_bytes()))
    truncated = DSOMessage(1, (Keepalive(0, 10_000).tlv(),)).to_bytes()[:-1]
    assert aborted(PushLab.make().send(truncated))


def test_nonzero_counts_in_a_request_get_formerr(lab: PushLab) -> None:
    wire = bytearray(DSOMessage(6, (Keepalive(0, 10_000).tlv(),)).to_bytes())
    wire[5] = 1  # QDCOUNT
    (resp,) = lab.send(bytes(wire))
    assert dso(resp).rcode == Rcode.FORMERR and dso(resp).msg_id == 6


def test_unidirectional_before_the_session_is_fatal(lab: PushLab) -> None:
    lab.bind()  # a bound connection is not yet a DSO session
    assert aborted(lab.send(DSOMessage(0, (Unsubscribe(1).tlv(),)).to_bytes()))
    lab2 = PushLab.make()
    r = Reconfirm(LAPTOP, AAAA, 1, rd("fd00::1"))
    assert aborted(lab2.send(DSOMessage(0, (r.tlv(),)).to_bytes()))


def test_duplicate_subscription_is_fatal(lab: PushLab) -> None:
    lab.bind()
    subscribe(lab, 1)
    upper = dns.name.from_text("LAPTOP.Bob.members.example.")
    assert aborted(subscribe(lab, 2, upper))
    assert lab.push._total == 0 and not lab.push.sessions


def test_message_id_in_use_is_fatal(lab: PushLab) -> None:
    lab.bind()
    subscribe(lab, 1)
    assert aborted(subscribe(lab, 1, dns.name.from_text("desktop.bob.members.example.")))


@pytest.mark.parametrize(
    ("tlv", "msg_id"),
    [
        (Keepalive(0, 10_000).tlv(), 0),  # keepalive must be a request
        (Subscribe(LAPTOP, AAAA).tlv(), 0),  # so must SUBSCRIBE
        (Unsubscribe(1).tlv(), 5),  # UNSUBSCRIBE must be unidirectional
        (RetryDelay(1).tlv(), 0),  # only a server sends Retry Delay
        (TLV(DSOType.PUSH, b""), 0),  # ... and PUSH
        (padding(2), 3),  # padding is never primary
    ],
)
def test_wrong_direction_or_kind_is_fatal(lab: PushLab, tlv: TLV, msg_id: int) -> None:
    lab.send(DSOMessage(1, (Keepalive(0, 10_000).tlv(),)).to_bytes())
    assert aborted(lab.send(DSOMessage(msg_id, (tlv,)).to_bytes()))


def test_a_response_from_the_client_is_fatal(lab: PushLab) -> None:
    assert aborted(lab.send(DSOMessage(3, (), response=True).to_bytes()))


def test_names_outside_our_zones_are_notauth_and_bad_types_formerr(lab: PushLab) -> None:
    (resp,) = subscribe(lab, 1, dns.name.from_text("example.org."))
    assert dso(resp).rcode == Rcode.NOTAUTH
    (resp,) = subscribe(lab, 2, rdtype=dns.rdatatype.AXFR)
    assert dso(resp).rcode == Rcode.FORMERR
    (resp,) = subscribe(lab, 3, rdclass=dns.rdataclass.CH)
    assert dso(resp).rcode == Rcode.NOTAUTH


def test_limits_per_session_per_client_and_in_total() -> None:
    lab = PushLab.make(PushConfig(max_per_session=2, max_per_client=3, max_total=4))
    names = [dns.name.from_text(f"h{i}.bob.members.example.") for i in range(6)]
    a, b, c = "192.0.2.7#1", "192.0.2.7#2", "192.0.2.9#1"
    for p in (a, b, c):
        lab.bind(peer=p)
    assert dso(subscribe(lab, 1, names[0], peer=a)[0]).rcode == Rcode.NOERROR
    assert dso(subscribe(lab, 2, names[1], peer=a)[0]).rcode == Rcode.NOERROR
    assert dso(subscribe(lab, 3, names[2], peer=a)[0]).rcode == Rcode.REFUSED  # per session
    assert dso(subscribe(lab, 1, names[2], peer=b)[0]).rcode == Rcode.NOERROR
    full = dso(subscribe(lab, 2, names[3], peer=b)[0])  # per client address
    assert full.rcode == Rcode.SERVFAIL and RetryDelay.from_tlv(full.tlvs[0]).delay_ms == 60_000
    assert dso(subscribe(lab, 1, names[3], peer=c)[0]).rcode == Rcode.NOERROR
    assert dso(subscribe(lab, 2, names[4], peer=c)[0]).rcode == Rcode.SERVFAIL  # in total
    lab.push.connection_closed(Transport.TLS, a)
    assert dso(subscribe(lab, 2, names[4], peer=c)[0]).rcode == Rcode.NOERROR


# ---- timers ----------------------------------------------------------------------------------


def test_keepalive_timeout_aborts_a_silent_session(lab: PushLab) -> None:
    lab.bind()
    lab.send(DSOMessage(1, (Keepalive(0, 10_000).tlv(),)).to_bytes())
    subscribe(lab, 2)
    assert lab.push.next_deadline() == pytest.approx(NOW + 20)
    lab.now = NOW + 19
    assert lab.run() == []
    lab.now = NOW + 15  # a keepalive at 15 s moves the deadline to 35 s
    lab.send(DSOMessage(3, (Keepalive(0, 10_000).tlv(),)).to_bytes())
    lab.now = NOW + 34.9
    assert lab.run() == []
    lab.now = NOW + 35
    (out,) = lab.run()
    assert out.close and lab.push.stats["abort_keepalive_timeout"] == 1
    assert not lab.push.sessions and lab.push._total == 0


def test_pushes_count_as_traffic_for_the_keepalive_timer(lab: PushLab) -> None:
    lab.bind()
    lab.send(DSOMessage(1, (Keepalive(0, 10_000).tlv(),)).to_bytes())
    subscribe(lab, 2)
    lab.now = NOW + 15
    assert len(lab.update(aaaa_update(add=("fd00::1",)))) == 1
    lab.now = NOW + 25
    assert lab.run() == []


def test_inactive_session_without_subscriptions_is_aborted(lab: PushLab) -> None:
    lab.send(DSOMessage(1, (Keepalive(1_000, 3_600_000).tlv(),)).to_bytes())
    # no subscription: max(5 s, 2 x 1 s) after the last activity; keepalives do not count
    lab.now = NOW + 4
    lab.send(DSOMessage(2, (Keepalive(1_000, 3_600_000).tlv(),)).to_bytes())
    lab.now = NOW + 4.9
    assert lab.run() == []
    lab.now = NOW + 5
    (out,) = lab.run()
    assert out.close and lab.push.stats["abort_inactive"] == 1


def test_unestablished_connection_has_no_timers(lab: PushLab) -> None:
    lab.bind()
    assert lab.push.next_deadline() is None
    assert not lab.push.holds_connection(Transport.TLS, PEER)


def test_shut_down_sends_retry_delay_and_ignores_what_follows(lab: PushLab) -> None:
    lab.bind()
    subscribe(lab, 1)
    (bye,) = lab.push.shut_down(lab.now, delay_ms=1500)
    msg = dso(bye)
    assert msg.msg_id == 0 and RetryDelay.from_tlv(msg.tlvs[0]).delay_ms == 1500
    assert subscribe(lab, 2, dns.name.from_text("x.bob.members.example.")) == []
    lab.now = NOW + 5
    (out,) = lab.run()
    assert out.close and lab.push.stats["abort_retry_delay_ignored"] == 1


def test_a_chatty_session_keeps_one_timer_entry(lab: PushLab) -> None:
    lab.bind()
    subscribe(lab, 1)
    for i in range(200):
        lab.now = NOW + i * 0.01
        lab.send(DSOMessage(2 + i, (Keepalive(0, 10_000).tlv(),)).to_bytes())
    assert len(lab.push._timers) <= 2
    lab.now = NOW + 21.99
    (out,) = lab.run()  # twice 10 s after the last keepalive
    assert out.close


def test_closed_sessions_leave_nothing_behind(lab: PushLab) -> None:
    """Open and close many sessions: the session table, the subscription index, the counts
    and the timer heap come back to (nearly) empty. A closed session's timer entry used to
    stay until its deadline, twice the keepalive interval (up to 2 h): sessions coming and
    going piled them up (the bench saw the server grow and slow down run after run)."""
    for rnd in range(3):
        peers = [f"192.0.2.{i % 250 + 1}#{6000 + rnd * 500 + i}" for i in range(300)]
        for i, p in enumerate(peers):
            # a second apart: two binding queries alike (same ID by chance) in one second
            # would be one replayed message to the registry
            lab.now = NOW + rnd * 400 + i
            lab.bind(peer=p)
            lab.send(DSOMessage(1, (Keepalive(15_000, 3_600_000).tlv(),)).to_bytes(), p)
            subscribe(lab, 2, peer=p)
        assert len(lab.push.sessions) == 300 and lab.push._total == 300
        for p in peers:
            assert lab.push.connection_closed(Transport.TLS, p) == 1
        assert lab.push.sessions == {}
        assert lab.push._by_name == {} and not lab.push._per_client and lab.push._total == 0
        assert len(lab.push._timers) <= 64, len(lab.push._timers)
    # the sessions still open keep their timers through a compaction
    lab.now += 1
    lab.bind()
    subscribe(lab, 1)
    lab.send(DSOMessage(2, (Keepalive(15_000, 10_000).tlv(),)).to_bytes())
    for i in range(200):
        p = f"198.51.100.{i % 250 + 1}#{7000 + i}"
        lab.now += 1
        lab.bind(peer=p)
        subscribe(lab, 2, peer=p)
        lab.push.connection_closed(Transport.TLS, p)
    lab.now += 21
    (out,) = lab.run()
    assert out.peer == PEER and out.close  # the keepalive timeout still fires
