"""The DNS Push client core on a virtual clock, against the server core (both sans-I/O) and
against crafted messages: the order of what it sends on a connection, applying PUSHes and the
full answer, keepalives, refusals, the server's Retry Delay and cancellation, protocol errors,
and reconnecting with backoff."""

from __future__ import annotations

import random

import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdatatype
from push_helpers import LAPTOP, NOW, PEER, PushLab, aaaa_update

from btmm_core.dns.dso import DSOMessage, DSOType, Keepalive, Kind, Rcode, RetryDelay
from btmm_core.dns.push import Change, Subscribe, push_tlv
from btmm_core.push.client import (
    Changes,
    Connect,
    Disconnect,
    Output,
    PushClient,
    PushState,
    Send,
)
from btmm_core.registry.handler import Transport

AAAA = dns.rdatatype.AAAA


def rd(text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text("IN", "AAAA", text)


class Pair:
    """A client core talking to the server core through a perfect, instant connection."""

    def __init__(self, user: str | None = "bob") -> None:
        self.lab = PushLab.make()
        key = self.lab.accounts[user].key if user else None
        self.client = PushClient(LAPTOP, AAAA, random.Random(3), key=key)
        self.changes: list[Changes] = []
        self.connects = 0
        self.disconnects: list[Disconnect] = []
        self.up = False

    def handle(self, outputs: list[Output]) -> None:
        queue = list(outputs)
        while queue:
            o = queue.pop(0)
            if isinstance(o, Connect):
                self.connects += 1
                self.up = True
                queue += self.client.connected(self.lab.now)
            elif isinstance(o, Disconnect):
                self.disconnects.append(o)
                self.up = False
                self.lab.push.connection_closed(Transport.TLS, PEER)
            elif isinstance(o, Send) and self.up:
                for back in self.lab.send(o.wire):
                    if back.close:
                        self.up = False
                        queue += self.client.connection_lost(self.lab.now)
                    elif back.wire:
                        queue += self.client.receive(back.wire, self.lab.now)
            elif isinstance(o, Changes):
                self.changes.append(o)

    def update(self, **kw: object) -> None:
        for out in self.lab.update(aaaa_update(**kw)):  # type: ignore[arg-type]
            if self.up and out.wire:
                self.handle(self.client.receive(out.wire, self.lab.now))

    def advance(self, seconds: float) -> None:
        end = self.lab.now + seconds
        for _ in range(10_000):  # a timer that never moves on is a bug, not a hang
            d = self.client.next_deadline()
            if d is None or d > end:
                break
            self.lab.now = max(self.lab.now, d)
            self.handle(self.client.tick(self.lab.now))
        else:
            raise AssertionError(f"the client's timer is stuck at {d}")
        self.lab.now = end


def added(ch: Changes) -> list[str]:
    return [r.rdata.to_text() for r in ch.added]


def removed(ch: Changes) -> list[str]:
    return [r.rdata.to_text() for r in ch.removed]


def test_bind_and_keepalive_first_then_subscribe_and_full_query() -> None:
    c = PushClient(LAPTOP, AAAA, random.Random(1), key=PushLab.make().accounts["bob"].key)
    assert Connect() in c.start(NOW)
    sent = [o.wire for o in c.connected(NOW) if isinstance(o, Send)]
    assert len(sent) == 2
    bind = dns.message.from_wire(sent[0], keyring=False)
    assert bind.had_tsig and bind.question[0].name == LAPTOP
    ka = DSOMessage.parse(sent[1])
    assert ka.kind == Kind.REQUEST and ka.tlvs[0].dso_type == DSOType.KEEPALIVE
    # the binding answered: now the SUBSCRIBE and the signed full query
    answer = dns.message.make_response(bind)
    sent = [o.wire for o in c.receive(answer.to_wire(), NOW) if isinstance(o, Send)]
    assert len(sent) == 2
    sub = DSOMessage.parse(sent[0])
    assert Subscribe.from_tlv(sub.tlvs[0]) == Subscribe(LAPTOP, AAAA)
    assert dns.message.from_wire(sent[1], keyring=False).had_tsig


def test_a_refused_signature_is_signed_again_then_given_up() -> None:
    c = PushClient(LAPTOP, AAAA, random.Random(1), key=PushLab.make().accounts["bob"].key)
    c.start(NOW)
    bind = dns.message.from_wire(c.connected(NOW)[0].wire, keyring=False)  # type: ignore[union-attr]
    for attempt in range(3):
        refused = dns.message.make_response(bind)
        refused.set_rcode(dns.rcode.NOTAUTH)
        out = c.receive(refused.to_wire(), NOW + attempt)
        if attempt < 2:
            (again,) = out
            assert isinstance(again, Send)
            bind = dns.message.from_wire(again.wire, keyring=False)
    assert Disconnect(abort=False) in out and c.state == PushState.WAITING
    assert c.next_deadline() == NOW + 2 + 300


def test_subscribes_and_follows_changes_through_the_server_core() -> None:
    p = Pair()
    p.update(add=("fd00::1",))
    p.handle(p.client.start(p.lab.now))
    assert p.client.state == PushState.SUBSCRIBED
    # the initial PUSH, then the full answer (which agrees)
    assert [added(c) for c in p.changes] == [["fd00::1"], []] and p.changes[-1].full
    p.update(delete=("fd00::1",), add=("fd00::2",))
    assert (added(p.changes[-1]), removed(p.changes[-1])) == (["fd00::2"], ["fd00::1"])
    p.update(all_=True)  # a collective removal
    assert removed(p.changes[-1]) == ["fd00::2"] and not p.client.known


def test_keepalive_goes_out_when_the_granted_interval_passes() -> None:
    p = Pair()
    p.handle(p.client.start(p.lab.now))
    assert p.client.interval_ms == 600_000  # granted what it asked (within 10 s .. 1 h)
    p.advance(600)
    assert p.client.state == PushState.SUBSCRIBED and not p.disconnects
    p.advance(1200)  # the server's 2 x interval never passes: the client kept it alive
    assert p.lab.push.sessions and p.lab.push.stats["keepalives"] >= 3


def test_refused_subscription_waits_five_minutes_then_retries() -> None:
    p = Pair(user=None)
    p.handle(p.client.start(p.lab.now))
    assert p.client.state == PushState.WAITING and p.disconnects[-1].abort is False
    assert p.client.next_deadline() == NOW + 300
    p.advance(300)
    assert p.connects == 2


def test_retry_delay_from_the_server_closes_and_reconnects_after_it() -> None:
    p = Pair()
    p.handle(p.client.start(p.lab.now))
    for out in p.lab.push.shut_down(p.lab.now, delay_ms=2500):
        p.handle(p.client.receive(out.wire, p.lab.now))
    assert p.client.state == PushState.WAITING and p.client.next_deadline() == NOW + 2.5
    p.advance(2.5)
    assert p.connects == 2 and p.client.state == PushState.SUBSCRIBED


def test_server_cancellation_of_the_subscription() -> None:
    p = Pair()
    p.handle(p.client.start(p.lab.now))
    cancel = DSOMessage(p.client._subscribe_id, (), response=True, rcode=Rcode.REFUSED)
    p.handle(p.client.receive(cancel.to_bytes(), p.lab.now))
    assert p.client.state == PushState.WAITING and p.client.next_deadline() == NOW + 300


def test_lost_connection_reconnects_with_growing_backoff_and_resyncs() -> None:
    p = Pair()
    p.update(add=("fd00::1",))
    p.handle(p.client.start(p.lab.now))
    waits = []
    for _ in range(3):
        p.up = False
        p.handle(p.client.connection_lost(p.lab.now))
        d = p.client.next_deadline()
        assert d is not None
        waits.append(d - p.lab.now)
        # the connection attempt fails at once
        p.lab.now = d
        out = p.client.tick(p.lab.now)
        assert out[-1] == Connect()
        p.handle(p.client.connection_lost(p.lab.now))
    assert 0.5 <= waits[0] <= 0.625 and waits[1] > waits[0]
    p.update(delete=("fd00::1",))  # changed while away
    p.advance(60)
    assert p.client.state == PushState.SUBSCRIBED and p.changes[-1].full
    assert removed(p.changes[-1]) == ["fd00::1"] and not p.client.known


def test_protocol_errors_from_the_server_abort_and_reconnect() -> None:
    bad = [
        DSOMessage(0, (push_tlv(b"\x00\x00"),)).to_bytes(),  # malformed PUSH
        DSOMessage(77, (), response=True).to_bytes(),  # a response to nothing
        DSOMessage(5, (Keepalive(0, 10_000).tlv(),)).to_bytes(),  # a request from the server
        DSOMessage(0, (Keepalive(0, 5_000).tlv(),)).to_bytes(),  # interval under 10 s
        DSOMessage(0, (RetryDelay(1).tlv(),)).to_bytes()[:-1],  # truncated
    ]
    for wire in bad:
        p = Pair()
        p.handle(p.client.start(p.lab.now))
        out = p.client.receive(wire, p.lab.now)
        assert Disconnect(abort=True) in out, wire
        assert p.client.state == PushState.WAITING


def test_push_for_another_name_is_ignored() -> None:
    p = Pair()
    p.handle(p.client.start(p.lab.now))
    other = dns.name.from_text("desktop.bob.members.example.")
    wire = DSOMessage(0, (push_tlv(Change.add(other, rd("fd00::9"), 60).to_bytes()),)).to_bytes()
    assert p.client.receive(wire, p.lab.now) == [] and not p.client.known


def test_unanswered_request_for_30_s_aborts() -> None:
    c = PushClient(LAPTOP, AAAA, random.Random(1))
    c.start(NOW)
    c.connected(NOW)
    assert c.next_deadline() == NOW + 30
    out = c.tick(NOW + 30)
    assert out[0] == Disconnect(abort=True) and c.state == PushState.WAITING


def test_cancel_unsubscribes_and_closes() -> None:
    p = Pair()
    p.handle(p.client.start(p.lab.now))
    out = p.client.cancel(p.lab.now)
    (unsub,) = [o for o in out if isinstance(o, Send)]
    assert DSOMessage.parse(unsub.wire).tlvs[0].dso_type == DSOType.UNSUBSCRIBE
    assert Disconnect(abort=False) in out and p.client.next_deadline() is None
