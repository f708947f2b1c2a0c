"""Sans-I/O tests of LLQ (RFC 8764): the option, the server state and the client state machine,
on memory storage and a virtual clock."""

from __future__ import annotations

import random

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.tsig
import pytest
from llq_helpers import BOB, LAPTOP, NOW, Lab, parse, sign, sign_ack, update

from btmm_core.dns.llq_option import (
    REMOVED_TTL,
    LLQError,
    LLQOpcode,
    LLQOption,
    find_llq,
    kdig_hex,
)
from btmm_core.dns.wire import last_rr_offset
from btmm_core.llq.client import ClientConfig, ClientState, LLQClient, Send, answer_ttls
from btmm_core.llq.server import LLQConfig
from btmm_core.registry.handler import Transport

PEER = "127.0.0.1#40000"


def llq_query(
    name: dns.name.Name | str, opt: LLQOption, rdtype: str = "AAAA"
) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, use_edns=0, options=[opt])
    q.flags = 0
    return q


def ask(lab: Lab, q: dns.message.Message, peer: str = PEER, user: str | None = "bob"):  # type: ignore[no-untyped-def]
    wire = sign(q, lab.accounts[user].key, int(lab.now)) if user else q.to_wire()
    r = parse(lab.send(wire, lab.now, Transport.UDP, peer))
    opts = find_llq(r.options)
    return r, (opts[0] if opts else None)


def setup_request(lease: int = 3600) -> LLQOption:
    return LLQOption(LLQOpcode.SETUP, LLQError.NO_ERROR, 0, lease)


# ---- option ---------------------------------------------------------------------------------


def test_option_round_trip_and_wire_layout() -> None:
    opt = LLQOption(LLQOpcode.EVENT, LLQError.NO_SUCH_LLQ, 0x0102030405060708, 3600)
    assert kdig_hex(opt) == "000100030004010203040506070800000e10"
    q = llq_query("x.example.", opt)
    back = find_llq(dns.message.from_wire(q.to_wire()).options)
    assert back == [opt]
    assert back[0].llq_id == 0x0102030405060708 and back[0].lease == 3600


def test_option_of_wrong_length_is_kept_as_malformed() -> None:
    q = dns.message.make_query("x.example.", "A", use_edns=0)
    q.use_edns(0, 0, 1232, options=[dns.edns.GenericOption(1, b"\x00\x01\x00\x01")])
    opts = find_llq(dns.message.from_wire(q.to_wire()).options)
    assert len(opts) == 1 and opts[0].malformed


def test_option_fields_are_range_checked() -> None:
    with pytest.raises(ValueError):
        LLQOption(LLQOpcode.SETUP, lease=1 << 32)


# ---- server ---------------------------------------------------------------------------------


def test_four_way_handshake_by_hand() -> None:
    lab = Lab.make()
    lab.signed_update(update("laptop", "AAAA", add=("fd00::1",)))
    r, opt = ask(lab, llq_query(LAPTOP, setup_request(3600)))
    assert r.rcode() == dns.rcode.NOERROR and not r.answer
    assert opt is not None and opt.opcode == LLQOpcode.SETUP and opt.error == 0
    assert opt.llq_id != 0 and opt.lease == 3600
    assert not lab.llq.llqs, "a setup request must leave no state"
    r, ack = ask(lab, llq_query(LAPTOP, LLQOption(LLQOpcode.SETUP, 0, opt.llq_id, 3600)))
    assert ack is not None and ack.error == 0 and ack.llq_id == opt.llq_id
    assert [rr.to_text() for rr in r.answer] == [f"{LAPTOP} 300 IN AAAA fd00::1"]
    assert r.flags & dns.flags.AA
    assert list(lab.llq.llqs) == [opt.llq_id]
    # A repeated challenge response (ACK lost) is answered again without a second LLQ.
    r2, ack2 = ask(lab, llq_query(LAPTOP, LLQOption(LLQOpcode.SETUP, 0, opt.llq_id, 3600)))
    assert ack2 is not None and ack2.error == 0 and r2.answer
    assert len(lab.llq.llqs) == 1


@pytest.mark.parametrize(("asked", "granted"), [(0, 900), (60, 900), (3600, 3600), (99999, 7200)])
def test_lease_is_clamped_to_the_default_bounds(asked: int, granted: int) -> None:
    lab = Lab.make()
    _, opt = ask(lab, llq_query(LAPTOP, setup_request(asked)))
    assert opt is not None and opt.lease == granted


def test_spoofed_setups_leave_no_state_and_foreign_ids_are_no_such_llq() -> None:
    lab = Lab.make(LLQConfig(max_total=1))
    ids = []
    for port in range(1000, 1200):
        q = llq_query(LAPTOP, setup_request())
        q.id = port  # same id, time and content would be the same MAC: a replay (BADTIME)
        _, opt = ask(lab, q, peer=f"192.0.2.7#{port}")
        assert opt is not None and opt.error == 0
        ids.append(opt.llq_id)
    assert not lab.llq.llqs
    # A challenge is bound to the address and port it was sent to.
    _, opt = ask(lab, llq_query(LAPTOP, LLQOption(LLQOpcode.SETUP, 0, ids[0], 900)))
    assert opt is not None and opt.error == LLQError.NO_SUCH_LLQ
    # ... and to the question.
    _, opt = ask(
        lab,
        llq_query("desktop.bob.members.example.", LLQOption(LLQOpcode.SETUP, 0, ids[0], 900)),
        peer="192.0.2.7#1000",
    )
    assert opt is not None and opt.error == LLQError.NO_SUCH_LLQ
    # The genuine client still gets its LLQ although max_total is 1.
    _, ch = ask(lab, llq_query(LAPTOP, setup_request()))
    assert ch is not None
    _, ack = ask(lab, llq_query(LAPTOP, LLQOption(LLQOpcode.SETUP, 0, ch.llq_id, 900)))
    assert ack is not None and ack.error == 0 and len(lab.llq.llqs) == 1


def test_challenge_expires() -> None:
    lab = Lab.make(LLQConfig(challenge_window=60))
    _, ch = ask(lab, llq_query(LAPTOP, setup_request()))
    assert ch is not None
    lab.now += 61
    _, ack = ask(lab, llq_query(LAPTOP, LLQOption(LLQOpcode.SETUP, 0, ch.llq_id, 900)))
    assert ack is not None and ack.error == LLQError.NO_SUCH_LLQ and not lab.llq.llqs


def test_wrong_id_refresh_is_no_such_llq() -> None:
    lab = Lab.make()
    _, opt = ask(lab, llq_query(LAPTOP, LLQOption(LLQOpcode.REFRESH, 0, 0xDEADBEEF, 900)))
    assert opt is not None and opt.opcode == LLQOpcode.REFRESH
    assert opt.error == LLQError.NO_SUCH_LLQ


def test_unsigned_or_foreign_key_llq_into_private_zone_is_refused() -> None:
    lab = Lab.make()
    r, opt = ask(lab, llq_query(LAPTOP, setup_request()), user=None)
    assert r.rcode() == dns.rcode.REFUSED and opt is None
    r, opt = ask(lab, llq_query(LAPTOP, setup_request()), user="alice")
    assert r.rcode() == dns.rcode.REFUSED and opt is None
    assert lab.llq.stats["refused"] == 2


@pytest.mark.parametrize(
    "name",
    ["_dns-llq._udp.bob.members.example.", "members.example.", "ns.members.example."],
)
def test_server_managed_records_are_static(name: str) -> None:
    lab = Lab.make()
    _, opt = ask(lab, llq_query(name, setup_request(), "SRV"), user=None)
    assert opt is not None and opt.error == LLQError.STATIC


def test_bad_version_and_format_errors_keep_rcode_noerror() -> None:
    lab = Lab.make()
    r, opt = ask(lab, llq_query(LAPTOP, LLQOption(LLQOpcode.SETUP, 0, 0, 900, version=2)))
    assert r.rcode() == dns.rcode.NOERROR and opt is not None and opt.error == LLQError.BAD_VERS
    r, opt = ask(lab, llq_query(LAPTOP, LLQOption(LLQOpcode.EVENT, 0, 0, 900)))
    assert r.rcode() == dns.rcode.NOERROR and opt is not None and opt.error == LLQError.FORMAT_ERR
    q = dns.message.make_query(LAPTOP, "AAAA", use_edns=0)
    q.use_edns(0, 0, 1232, options=[dns.edns.GenericOption(1, b"\x00\x01")])
    r, opt = ask(lab, q)
    assert r.rcode() == dns.rcode.NOERROR and opt is not None and opt.error == LLQError.FORMAT_ERR
    r, opt = ask(lab, llq_query(LAPTOP, setup_request(), "AXFR"))
    assert opt is not None and opt.error == LLQError.FORMAT_ERR


def test_limits_per_client_and_in_total_answer_serv_full() -> None:
    lab = Lab.make(LLQConfig(max_per_client=2, max_total=3, full_retry=120))

    def establish(peer: str) -> LLQOption:
        _, ch = ask(lab, llq_query(LAPTOP, setup_request()), peer=peer)
        assert ch is not None
        if ch.error:
            return ch
        _, ack = ask(lab, llq_query(LAPTOP, LLQOption(LLQOpcode.SETUP, 0, ch.llq_id, 900)), peer)
        assert ack is not None
        return ack

    assert establish("127.0.0.1#1").error == 0
    assert establish("127.0.0.1#2").error == 0
    full = establish("127.0.0.1#3")
    assert full.error == LLQError.SERV_FULL and full.lease == 120
    assert establish("127.0.0.2#1").error == 0
    assert establish("127.0.0.3#1").error == LLQError.SERV_FULL
    assert len(lab.llq.llqs) == 3


def test_refresh_cancel_and_expiry() -> None:
    lab = Lab.make(LLQConfig(lease_min=10, lease_max=100))
    c = lab.client(PEER, config=ClientConfig(lease=20))
    assert c.state == ClientState.ESTABLISHED and c.lease == 20
    llq_id = c.llq_id
    _, opt = ask(lab, llq_query(LAPTOP, LLQOption(LLQOpcode.REFRESH, 0, llq_id, 5000)))
    assert opt is not None and opt.error == 0 and opt.lease == 100
    _, opt = ask(lab, llq_query(LAPTOP, LLQOption(LLQOpcode.REFRESH, 0, llq_id, 50)), "10.0.0.1#1")
    assert opt is not None and opt.error == LLQError.NO_SUCH_LLQ, "refresh from another address"
    _, opt = ask(lab, llq_query(LAPTOP, LLQOption(LLQOpcode.REFRESH, 0, llq_id, 0)))
    assert opt is not None and opt.error == 0 and opt.lease == 0
    assert not lab.llq.llqs
    # Expiry: an LLQ whose client stops refreshing is gone after its lease.
    del lab.clients[PEER]
    _, ch = ask(lab, llq_query(LAPTOP, setup_request(10)))
    assert ch is not None
    ask(lab, llq_query(LAPTOP, LLQOption(LLQOpcode.SETUP, 0, ch.llq_id, 10)))
    assert len(lab.llq.llqs) == 1
    lab.advance(9)
    assert len(lab.llq.llqs) == 1
    lab.advance(2)
    assert not lab.llq.llqs and lab.llq.stats["expired"] == 1


def test_events_for_add_change_delete_and_lease_expiry() -> None:
    lab = Lab.make()
    c = lab.client(PEER)
    assert c.state == ClientState.ESTABLISHED
    lab.signed_update(update("laptop", "AAAA", add=("fd00::1",)))
    lab.signed_update(update("laptop", "AAAA", delete=("fd00::1",), add=("fd00::2",)))
    lab.signed_update(update("laptop", "AAAA", delete_all=True))
    lab.signed_update(update("laptop", "AAAA", add=("fd00::3",), lease=10))
    seen = [
        ([r.to_text() for r in ch.added], [r.rdata.to_text() for r in ch.removed])
        for ch in lab.changes[PEER]
    ]
    assert seen == [
        ([f"{LAPTOP} 300 IN AAAA fd00::1"], []),
        ([f"{LAPTOP} 300 IN AAAA fd00::2"], ["fd00::1"]),
        ([], ["fd00::2"]),
        ([f"{LAPTOP} 10 IN AAAA fd00::3"], []),  # the TTL is cut to the 10 s lease
    ]
    lab.changes[PEER].clear()
    lab.advance(11)
    assert [[r.rdata.to_text() for r in ch.removed] for ch in lab.changes[PEER]] == [["fd00::3"]]
    assert lab.llq.stats["acks"] == lab.llq.stats["events"] == 5
    assert lab.llq.stats["resends"] == 0


def test_event_wire_marks_removals_with_ttl_ffffffff_and_is_signed() -> None:
    lab = Lab.make()
    c = lab.client(PEER)
    lab.signed_update(update("laptop", "AAAA", add=("fd00::1",)))
    del lab.clients[PEER]  # stop delivering: look at the raw event
    lab.signed_update(update("laptop", "AAAA", delete=("fd00::1",), add=("fd00::2",)))
    assert lab.run_server() == []  # the first event was acknowledged, the second in flight
    event = lab.llq.llqs[c.llq_id].inflight
    assert event is not None
    msg = dns.message.from_wire(event.wire, keyring=False, one_rr_per_rrset=True)
    assert msg.tsig is not None
    # dnspython checks the MAC (raises on a bad one), at the virtual time.
    dns.tsig.validate(
        event.wire,
        dnskey_of(lab),
        msg.tsig.name,
        msg.tsig[0],
        int(lab.now),
        b"",
        last_rr_offset(event.wire),
    )
    assert msg.flags & dns.flags.QR and msg.question[0].name == LAPTOP
    # dnspython reads TTLs above 2^31 - 1 as 0: the raw TTL is what the client must look at.
    ttls = sorted(zip([rr[0].to_text() for rr in msg.answer], answer_ttls(event.wire), strict=True))
    assert ttls == [("fd00::1", REMOVED_TTL), ("fd00::2", 300)]
    (opt,) = find_llq(msg.options)
    assert opt.opcode == LLQOpcode.EVENT and opt.llq_id == c.llq_id


def dnskey_of(lab: Lab):  # type: ignore[no-untyped-def]
    from llq_helpers import dnskey

    return dnskey(lab.accounts["bob"])


def test_unacknowledged_event_is_resent_then_the_llq_is_dropped() -> None:
    lab = Lab.make()
    c = lab.client(PEER)
    lab.drop = lambda direction, wire: direction == "down"
    lab.signed_update(update("laptop", "AAAA", add=("fd00::1",)))
    assert lab.llq.stats["events"] == 1
    lab.advance(1.9, step=0.1)
    assert lab.llq.stats["resends"] == 0
    lab.advance(0.2, step=0.1)
    assert lab.llq.stats["resends"] == 1
    lab.advance(4.0, step=0.1)
    assert lab.llq.stats["resends"] == 2
    assert c.llq_id in lab.llq.llqs
    lab.advance(8.0, step=0.1)
    assert c.llq_id not in lab.llq.llqs and lab.llq.stats["unacknowledged"] == 1


def test_unsigned_or_forged_acknowledgement_does_not_count() -> None:
    lab = Lab.make()
    c = lab.client(PEER)
    del lab.clients[PEER]
    lab.signed_update(update("laptop", "AAAA", add=("fd00::1",)))
    event = lab.llq.llqs[c.llq_id].inflight
    assert event is not None
    ev = dns.message.from_wire(event.wire, keyring=False)
    ack = dns.message.Message(id=ev.id)
    ack.flags = dns.flags.QR
    ack.question = list(ev.question)
    ack.use_edns(0, 0, 1232, options=[LLQOption(LLQOpcode.EVENT, 0, c.llq_id, 0)])
    lab.send(ack.to_wire(), lab.now, Transport.UDP, PEER)
    assert lab.llq.llqs[c.llq_id].inflight is event and lab.llq.stats["ack_unsigned"] == 1
    lab.send(
        sign(ack, lab.accounts["alice"].key, int(lab.now)), lab.now, Transport.UDP, PEER
    )
    assert lab.llq.llqs[c.llq_id].inflight is event
    # Signed with the right key but as a request, not as a response to this event.
    lab.send(sign(ack, lab.accounts["bob"].key, int(lab.now)), lab.now, Transport.UDP, PEER)
    assert lab.llq.llqs[c.llq_id].inflight is event and lab.llq.stats["ack_bad_tsig"] == 1
    wire = sign_ack(ack, lab.accounts["bob"].key, int(lab.now), event.wire)
    lab.send(wire, lab.now, Transport.UDP, PEER)
    assert lab.llq.llqs[c.llq_id].inflight is None


def test_changes_during_an_unacknowledged_event_are_merged_in_order() -> None:
    lab = Lab.make()
    lab.client(PEER)
    lost = {"n": 0}

    def drop(direction: str, wire: bytes) -> bool:
        # Lose the first event only; its retransmission gets through.
        if direction == "down" and lost["n"] == 0:
            lost["n"] += 1
            return True
        return False

    lab.drop = drop
    lab.signed_update(update("laptop", "AAAA", add=("fd00::1",)))
    lab.signed_update(update("laptop", "AAAA", add=("fd00::2",)))
    lab.signed_update(update("laptop", "AAAA", delete=("fd00::1",)))
    assert lab.changes[PEER] == []
    lab.advance(2.5, step=0.1)
    assert lab.known(PEER) == {f"{LAPTOP} AAAA fd00::2"}
    assert lab.llq.stats["events"] == 2 and lab.llq.stats["resends"] == 1


def test_any_type_llq_sees_every_type_at_the_name() -> None:
    lab = Lab.make()
    lab.client(PEER, qtype="ANY")
    lab.signed_update(update("laptop", "AAAA", add=("fd00::1",)))
    lab.signed_update(update("laptop", "TXT", add=('"model=x"',)))
    assert lab.known(PEER) == {f"{LAPTOP} AAAA fd00::1", f'{LAPTOP} TXT "model=x"'}


def test_other_names_and_types_send_no_event() -> None:
    lab = Lab.make()
    lab.client(PEER)
    lab.signed_update(update("laptop", "TXT", add=('"x"',)))
    lab.signed_update(update("desktop", "AAAA", add=("fd00::9",)))
    assert lab.llq.stats["events"] == 0 and lab.changes[PEER] == []


def test_rotated_key_signs_events_with_the_new_secret_and_removed_user_drops_llq() -> None:
    lab = Lab.make()
    c = lab.client(PEER)
    key = lab.accounts["bob"].key
    lab.core.store.keys.pop(key.name)
    lab.signed_update(update("laptop", "AAAA", add=("fd00::1",)))  # REFUSED now: no key
    lab.core.store.keys[key.name] = key
    assert c.llq_id in lab.llq.llqs


# ---- client ---------------------------------------------------------------------------------


def test_client_setup_retries_2_4_then_listens_8_then_polls() -> None:
    lab = Lab.make()
    lab.server_up = False
    c = lab.client(PEER, config=ClientConfig(poll_interval=30))
    sends = []
    orig = lab.deliver

    def spy(peer, outputs):  # type: ignore[no-untyped-def]
        sends.extend((lab.now, o) for o in outputs if isinstance(o, Send))
        orig(peer, outputs)

    lab.deliver = spy  # type: ignore[method-assign]
    lab.advance(13.75, step=0.25)
    assert [t - NOW for t, _ in sends] == [2.0, 6.0]
    assert c.state == ClientState.SETUP
    lab.advance(0.25, step=0.25)
    assert c.state == ClientState.POLLING
    assert lab.states[PEER][-1].why == "no answer to the LLQ setup"
    lab.server_up = True
    lab.signed_update(update("laptop", "AAAA", add=("fd00::1",)))
    lab.advance(31, step=0.5)
    assert c.state == ClientState.ESTABLISHED
    assert lab.known(PEER) == {f"{LAPTOP} AAAA fd00::1"}


def test_client_refreshes_at_half_lease_plus_jitter() -> None:
    lab = Lab.make(LLQConfig(lease_min=10, lease_max=7200))
    c = lab.client(PEER, config=ClientConfig(lease=1000))
    d = c.next_deadline()
    assert d is not None and NOW + 500 <= d <= NOW + 600
    lab.advance(d - lab.now + 0.1, step=5)
    assert lab.llq.stats["refreshes"] == 1 and c.state == ClientState.ESTABLISHED
    lab.advance(5000, step=50)
    assert lab.llq.stats["refreshes"] >= 8 and c.llq_id in lab.llq.llqs


def test_client_jitter_spreads_refreshes() -> None:
    lab = Lab.make()
    deadlines = {
        lab.client(f"127.0.0.1#{i}", config=ClientConfig(lease=3600), seed=i).next_deadline()
        for i in range(20)
    }
    assert len(deadlines) > 10


def test_server_restart_client_recovers_every_change() -> None:
    lab = Lab.make(LLQConfig(lease_min=10, lease_max=100))
    c = lab.client(PEER, config=ClientConfig(lease=20, poll_interval=10))
    lab.signed_update(update("laptop", "AAAA", add=("fd00::1",)))
    old_id = c.llq_id
    lab.server_up = False
    lab.restart_llq()
    lab.server_up = True
    # Changes while the client's LLQ no longer exists on the server.
    lab.signed_update(update("laptop", "AAAA", add=("fd00::2",)))
    lab.signed_update(update("laptop", "AAAA", delete=("fd00::1",)))
    assert lab.known(PEER) == {f"{LAPTOP} AAAA fd00::1"}
    lab.advance(13)
    assert c.state == ClientState.ESTABLISHED and c.llq_id != old_id
    assert lab.known(PEER) == {f"{LAPTOP} AAAA fd00::2"}
    assert any(s.why == "server has no such LLQ" for s in lab.states[PEER])
    full = [ch for ch in lab.changes[PEER] if ch.full]
    assert [r.rdata.to_text() for r in full[-1].added] == ["fd00::2"]
    assert [r.rdata.to_text() for r in full[-1].removed] == ["fd00::1"]


def test_client_rejects_unsigned_or_forged_events() -> None:
    lab = Lab.make()
    c = lab.client(PEER)
    forged = dns.message.Message(id=1234)
    forged.flags = dns.flags.QR
    forged.question.append(dns.rrset.RRset(LAPTOP, dns.rdataclass.IN, dns.rdatatype.AAAA))
    rrset = dns.rrset.from_text(LAPTOP, 300, "IN", "AAAA", "fd00::666")
    forged.answer.append(rrset)
    forged.use_edns(0, 0, 1232, options=[LLQOption(LLQOpcode.EVENT, 0, c.llq_id, 100)])
    assert c.receive(forged.to_wire(), lab.now) == []
    assert c.receive(sign(forged, lab.accounts["alice"].key, int(lab.now)), lab.now) == []
    out = c.receive(sign(forged, lab.accounts["bob"].key, int(lab.now)), lab.now)
    assert any(isinstance(o, Send) for o in out), "a genuine event is acknowledged"


def test_loss_ten_percent_both_ways_every_change_arrives() -> None:
    rng = random.Random(42)
    lab = Lab.make(LLQConfig(lease_min=10, lease_max=100))
    lab.drop = lambda direction, wire: rng.random() < 0.10
    peers = [f"127.0.0.1#{2000 + i}" for i in range(10)]
    for i, p in enumerate(peers):
        lab.client(p, config=ClientConfig(lease=20, poll_interval=5), seed=i)
    lab.advance(30)
    expected: set[str] = set()
    for i in range(40):
        addr = f"fd00::{i + 1:x}"
        if i % 3 == 2:
            old = sorted(expected)[0].split()[-1]
            lab.signed_update(update("laptop", "AAAA", delete=(old,)))
            expected.discard(f"{LAPTOP} AAAA {old}")
        else:
            lab.signed_update(update("laptop", "AAAA", add=(addr,)))
            expected.add(f"{LAPTOP} AAAA {addr}")
        lab.advance(1)
    lab.advance(60)
    for p in peers:
        assert lab.known(p) == expected, p
    assert lab.llq.stats["resends"] > 0


def test_static_answer_stops_the_llq_and_polls_once() -> None:
    lab = Lab.make()
    c = LLQClient(
        dns.name.from_text("_dns-llq._udp", origin=BOB),
        dns.rdatatype.SRV,
        random.Random(1),
        key=None,
    )
    lab.clients[PEER] = c
    lab.changes[PEER] = []
    lab.states[PEER] = []
    lab.deliver(PEER, c.start(lab.now))
    assert c.state == ClientState.STATIC
    assert len(lab.changes[PEER]) == 1 and lab.changes[PEER][0].added
    assert c.next_deadline() is None
