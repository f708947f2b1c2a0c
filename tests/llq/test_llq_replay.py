"""Replayed LLQ events and acknowledgements (issue 11, item 3), sans-I/O.

The TSIG MAC does not cover the header ID (RFC 8945 4.3.1): a captured signed message re-sent
with another ID still verifies. Neither side may take such a copy for a new message.
"""

from __future__ import annotations

import struct

import dns.flags
import dns.message
from llq_helpers import NOW, Lab, parse, sign, sign_ack, update

from btmm_core.dns.llq_option import LLQOpcode, LLQOption, find_llq
from btmm_core.llq.client import Changes, LLQClient, Send
from btmm_core.registry.handler import Transport

PEER = "127.0.0.1#40000"


def with_id(wire: bytes, msg_id: int) -> bytes:
    return struct.pack("!H", msg_id) + wire[2:]


def captured_event(lab: Lab, c: LLQClient) -> bytes:
    """The event now in flight to ``c``: what an on-path observer sees."""
    event = lab.llq.llqs[c.llq_id].inflight
    assert event is not None
    return event.wire


def deliver_by_hand(lab: Lab, c: LLQClient, wire: bytes) -> list[object]:
    """Give an event to the client and its acknowledgement to the server."""
    out = c.receive(wire, lab.now)
    for o in out:
        if isinstance(o, Send):
            lab.send(o.wire, lab.now, Transport.UDP, PEER)
    return list(out)


def ack_of(event: bytes) -> dns.message.Message:
    ev = dns.message.from_wire(event, keyring=False)
    (opt,) = find_llq(ev.options)
    ack = dns.message.Message(id=ev.id)
    ack.flags = dns.flags.QR
    ack.question = ev.question
    ack.use_edns(0, 0, 1232, options=[LLQOption(LLQOpcode.EVENT, 0, opt.llq_id, opt.lease)])
    return ack


def test_event_replayed_with_a_new_message_id_is_acknowledged_but_not_applied_again() -> None:
    lab = Lab.make()
    c = lab.client(PEER)
    lab.signed_update(update("laptop", "AAAA", add=("fd00::1",)))
    assert c.known
    del lab.clients[PEER]  # from here on the test carries every event by hand
    lab.signed_update(update("laptop", "AAAA", delete_all=True))
    removal = captured_event(lab, c)
    out = deliver_by_hand(lab, c, removal)
    assert [len(o.removed) for o in out if isinstance(o, Changes)] == [1]
    lab.signed_update(update("laptop", "AAAA", add=("fd00::1",)))
    out = deliver_by_hand(lab, c, captured_event(lab, c))
    assert [len(o.added) for o in out if isinstance(o, Changes)] == [1]
    # The attacker re-sends the captured "removed" event with another message ID, in the
    # same second (the MAC still verifies and the time is inside the fudge).
    (old_id,) = struct.unpack("!H", removal[:2])
    replayed = c.receive(with_id(removal, old_id ^ 0x5A5A), lab.now)
    assert not [o for o in replayed if isinstance(o, Changes)], "the replay removed the peer"
    assert len(c.known) == 1
    # It is the same event: acknowledged again (a lost acknowledgement is resent this way).
    assert [o for o in replayed if isinstance(o, Send)]
    # A byte-identical retransmission as well.
    again = c.receive(removal, lab.now)
    assert [o for o in again if isinstance(o, Send)]
    assert not [o for o in again if isinstance(o, Changes)] and len(c.known) == 1


def test_event_older_than_the_newest_applied_is_refused() -> None:
    lab = Lab.make()
    c = lab.client(PEER)
    del lab.clients[PEER]
    lab.signed_update(update("laptop", "AAAA", add=("fd00::1",)))
    first = captured_event(lab, c)
    # The client never sees the first event; its acknowledgement is made by hand so that
    # the server sends the next one (as an attacker holding back the first would see).
    lab.send(
        sign_ack(ack_of(first), lab.accounts["bob"].key, int(lab.now), first),
        lab.now,
        Transport.UDP,
        PEER,
    )
    assert lab.llq.llqs[c.llq_id].inflight is None
    lab.now += 5
    lab.signed_update(update("laptop", "AAAA", add=("fd00::2",)))
    second = captured_event(lab, c)
    out = deliver_by_hand(lab, c, second)
    assert [o.added[0].rdata.to_text() for o in out if isinstance(o, Changes)] == ["fd00::2"]
    # The older event, delivered now (with its own ID or another): refused, not acknowledged.
    for wire in (first, with_id(first, 1)):
        assert c.receive(wire, lab.now) == []
    assert {rd.to_text() for (_, _, rd) in c.known} == {"fd00::2"}


def test_events_of_a_new_llq_are_not_held_against_the_old_one() -> None:
    """The newest-time rule is per LLQ: after a new setup, events start afresh."""
    lab = Lab.make()
    c = lab.client(PEER)
    lab.signed_update(update("laptop", "AAAA", add=("fd00::1",)))
    first_llq = c.llq_id
    lab.restart_llq()
    lab.advance(c.lease)  # the refresh finds no LLQ and sets up again
    assert c.llq_id != first_llq and c.llq_id in lab.llq.llqs
    lab.signed_update(update("laptop", "AAAA", add=("fd00::2",)))
    assert {rd.to_text() for (_, _, rd) in c.known} == {"fd00::1", "fd00::2"}


def test_acknowledgement_replayed_with_the_id_of_a_later_event_does_not_count() -> None:
    lab = Lab.make()
    c = lab.client(PEER)
    del lab.clients[PEER]
    lab.signed_update(update("laptop", "AAAA", add=("fd00::1",)))
    first = captured_event(lab, c)
    acks = [o for o in c.receive(first, lab.now) if isinstance(o, Send)]
    assert len(acks) == 1
    lab.send(acks[0].wire, lab.now, Transport.UDP, PEER)
    assert lab.llq.stats["acks"] == 1
    lab.signed_update(update("laptop", "AAAA", add=("fd00::2",)))
    llq = lab.llq.llqs[c.llq_id]
    second = llq.inflight
    assert second is not None
    # The captured acknowledgement of the first event, re-sent with the second event's ID.
    lab.send(with_id(acks[0].wire, second.msg_id), lab.now, Transport.UDP, PEER)
    assert llq.inflight is second, "a replayed acknowledgement silenced an event"
    assert lab.llq.stats["acks"] == 1 and lab.llq.stats["ack_bad_tsig"] == 1
    # The client's own acknowledgement of the second event counts.
    out = deliver_by_hand(lab, c, second.wire)
    assert [o for o in out if isinstance(o, Changes)]
    assert llq.inflight is None and lab.llq.stats["acks"] == 2


def test_server_clock_stepping_back_does_not_stall_events() -> None:
    """The client refuses an event signed before the newest it applied, so the server never
    signs an LLQ's events with a time earlier than the last one (a clock stepped back by NTP
    must not make every later event look like a replay)."""
    lab = Lab.make()
    c = lab.client(PEER)
    lab.now += 10
    lab.signed_update(update("laptop", "AAAA", add=("fd00::1",)))
    lab.now -= 3  # the registry's clock steps back
    # (The updater's clock did not: the registry refuses a Time Signed older than the last.)
    wire = sign(update("laptop", "AAAA", add=("fd00::2",)), lab.accounts["bob"].key, int(NOW) + 10)
    assert parse(lab.send(wire, lab.now, Transport.UDP, "updater#1")).rcode() == 0
    lab.pump_server()
    assert {rd.to_text() for (_, _, rd) in c.known} == {"fd00::1", "fd00::2"}
    assert lab.llq.stats["acks"] == 2 and lab.llq.stats["resends"] == 0
