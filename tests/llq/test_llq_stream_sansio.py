"""LLQ over TCP/TLS (RFC 8764 section 4), sans-I/O: the LLQ belongs to its connection, events
are pushed once (no resend on a reliable transport) and still need their acknowledgement."""

from __future__ import annotations

import random

import dns.flags
import dns.message
import dns.rdatatype
from llq_helpers import LAPTOP, Lab, parse, sign, sign_ack, update

from btmm_core.dns.llq_option import LLQError, LLQOpcode, LLQOption, find_llq
from btmm_core.llq.client import Changes, ClientState, LLQClient, Output, Send
from btmm_core.registry.handler import Transport

CONN = "127.0.0.1#41000"


def llq_query(opt: LLQOption) -> dns.message.Message:
    q = dns.message.make_query(LAPTOP, "AAAA", use_edns=0, options=[opt])
    q.flags = 0
    return q


def ask(lab: Lab, opt: LLQOption, transport: Transport, peer: str = CONN, msg_id: int = 1):  # type: ignore[no-untyped-def]
    q = llq_query(opt)
    q.id = msg_id
    wire = sign(q, lab.accounts["bob"].key, int(lab.now))
    r = parse(lab.send(wire, lab.now, transport, peer))
    opts = find_llq(r.options)
    return r, (opts[0] if opts else None)


def establish(lab: Lab, transport: Transport, peer: str = CONN, base: int = 10) -> int:
    _, challenge = ask(lab, LLQOption(LLQOpcode.SETUP, 0, 0, 3600), transport, peer, base)
    assert challenge is not None and challenge.error == LLQError.NO_ERROR
    _, ack = ask(
        lab, LLQOption(LLQOpcode.SETUP, 0, challenge.llq_id, 3600), transport, peer, base + 1
    )
    assert ack is not None and ack.error == LLQError.NO_ERROR
    return int(ack.llq_id)


def change(lab: Lab, msg: dns.message.Message) -> None:
    """A signed UPDATE; unlike ``Lab.signed_update`` it leaves the server's outbox alone."""
    wire = sign(msg, lab.accounts["bob"].key, int(lab.now))
    assert parse(lab.send(wire, lab.now, Transport.UDP, "updater#1")).rcode() == 0


class StreamClient:
    """An ``LLQClient`` on one simulated connection to the lab's core."""

    def __init__(self, lab: Lab, transport: Transport, peer: str = CONN, seed: int = 5,
                 *, hold_streams: bool = False) -> None:
        self.lab = lab
        self.transport = transport
        self.peer = peer
        self.client = LLQClient(
            LAPTOP, dns.rdatatype.AAAA, random.Random(seed), key=lab.accounts["bob"].key
        )
        self.changes: list[Changes] = []
        #: requests the client wanted sent over TCP (``Send.stream``), in order
        self.streamed: list[bytes] = []
        #: hold them instead of sending them (``send_held`` sends them)
        self.hold_streams = hold_streams
        self.held: list[bytes] = []
        self.deliver(self.client.start(lab.now))

    def deliver(self, outputs: list[Output]) -> None:
        queue = list(outputs)
        while queue:
            o = queue.pop(0)
            if isinstance(o, Changes):
                self.changes.append(o)
            elif isinstance(o, Send):
                if o.stream:
                    self.streamed.append(o.wire)
                    if self.hold_streams:
                        self.held.append(o.wire)
                        continue
                    answer = self._over_tcp(o.wire)
                else:
                    answer = self.lab.send(o.wire, self.lab.now, self.transport, self.peer)
                if answer is not None:
                    queue.extend(self.client.receive(answer, self.lab.now))

    def _over_tcp(self, wire: bytes) -> bytes | None:
        # a connection of its own, as the driver opens one
        return self.lab.send(wire, self.lab.now, Transport.TCP,
                             f"{self.peer}-tcp{len(self.streamed)}")

    def send_held(self) -> None:
        held, self.held = self.held, []
        for wire in held:
            answer = self._over_tcp(wire)
            if answer is not None:
                self.deliver(self.client.receive(answer, self.lab.now))

    def pump(self) -> None:
        """Run the server's timers; deliver what it pushes on this connection."""
        for out in self.lab.run_server():
            assert out.transport == self.transport and out.peer == self.peer
            self.deliver(self.client.receive(out.wire, self.lab.now))


def test_four_way_setup_events_and_acks_over_tcp() -> None:
    lab = Lab.make()
    sc = StreamClient(lab, Transport.TCP)
    assert sc.client.state == ClientState.ESTABLISHED
    (llq,) = lab.llq.llqs.values()
    assert llq.transport == Transport.TCP and llq.peer == CONN
    for adds in (("fd00::1",), ("fd00::2",)):
        change(lab, update("laptop", "AAAA", add=adds))
        sc.pump()
    assert [[r.rdata.to_text() for r in ch.added] for ch in sc.changes] == [
        ["fd00::1"],
        ["fd00::2"],
    ]
    assert lab.llq.stats["acks"] == 2 and lab.llq.stats["resends"] == 0


def test_no_resend_on_a_stream_and_no_ack_within_14_s_drops_the_llq() -> None:
    lab = Lab.make()
    llq_id = establish(lab, Transport.TCP)
    change(lab, update("laptop", "AAAA", add=("fd00::1",)))
    (event,) = lab.run_server()
    assert event.transport == Transport.TCP
    for step in range(1, 14):
        assert not lab.run_server(lab.now + step), "an event on a reliable transport is not resent"
    assert llq_id in lab.llq.llqs
    lab.run_server(lab.now + 14.01)
    assert llq_id not in lab.llq.llqs and lab.llq.stats["unacknowledged"] == 1
    assert lab.llq.stats["resends"] == 0


def test_connection_closed_ends_only_that_connections_llqs() -> None:
    lab = Lab.make()
    on_conn = establish(lab, Transport.TCP, CONN, 10)
    other_conn = establish(lab, Transport.TLS, "127.0.0.1#41001", 20)
    # The same address#port over UDP is a different client.
    over_udp = establish(lab, Transport.UDP, CONN, 30)
    assert lab.llq.holds_connection(Transport.TCP, CONN)
    assert lab.llq.connection_closed(Transport.TCP, CONN) == 1
    assert set(lab.llq.llqs) == {other_conn, over_udp}
    assert on_conn not in lab.llq.llqs and not lab.llq.holds_connection(Transport.TCP, CONN)
    assert lab.llq.connection_closed(Transport.TCP, CONN) == 0
    # A cancel also frees the connection from keep-open.
    _, cancel = ask(
        lab, LLQOption(LLQOpcode.REFRESH, 0, other_conn, 0), Transport.TLS, "127.0.0.1#41001", 40
    )
    assert cancel is not None and cancel.error == LLQError.NO_ERROR
    assert not lab.llq.holds_connection(Transport.TLS, "127.0.0.1#41001")


def test_challenges_refreshes_and_acks_do_not_cross_transports() -> None:
    lab = Lab.make()
    _, challenge = ask(lab, LLQOption(LLQOpcode.SETUP, 0, 0, 3600), Transport.UDP, CONN, 1)
    assert challenge is not None
    _, echo = ask(
        lab, LLQOption(LLQOpcode.SETUP, 0, challenge.llq_id, 3600), Transport.TCP, CONN, 2
    )
    assert echo is not None and echo.error == LLQError.NO_SUCH_LLQ and not lab.llq.llqs
    llq_id = establish(lab, Transport.TCP, CONN, 10)
    _, refresh = ask(lab, LLQOption(LLQOpcode.REFRESH, 0, llq_id, 3600), Transport.UDP, CONN, 20)
    assert refresh is not None and refresh.error == LLQError.NO_SUCH_LLQ
    # An acknowledgement over UDP for the TCP LLQ does not count.
    change(lab, update("laptop", "AAAA", add=("fd00::1",)))
    (event,) = lab.run_server()
    ev = dns.message.from_wire(event.wire, keyring=False)
    ack = dns.message.Message(id=ev.id)
    ack.flags = dns.flags.QR
    ack.question = ev.question
    ack.use_edns(0, 0, 1232, options=[LLQOption(LLQOpcode.EVENT, 0, llq_id, 3600)])
    wire = sign_ack(ack, lab.accounts["bob"].key, int(lab.now), event.wire)
    lab.send(wire, lab.now, Transport.UDP, CONN)
    assert lab.llq.stats["acks"] == 0 and lab.llq.stats["ack_unknown"] == 1
    lab.send(wire, lab.now, Transport.TCP, CONN)
    assert lab.llq.stats["acks"] == 1


def test_ack_over_a_stream_is_not_truncated_to_the_udp_payload() -> None:
    lab = Lab.make()
    many = tuple(f"fd00::{i:x}" for i in range(1, 81))  # 80 AAAA: well over 1232 bytes
    lab.signed_update(update("laptop", "AAAA", add=many))
    udp = StreamClient(lab, Transport.UDP, "127.0.0.1#42000")
    assert udp.client.state == ClientState.ESTABLISHED
    # TC over UDP: the client asked again over TCP, once, and has the whole answer
    assert len(udp.streamed) == 1
    (full,) = udp.changes
    assert full.full and len(full.added) == 80
    tcp = StreamClient(lab, Transport.TCP, seed=6)
    (full,) = tcp.changes
    assert full.full and len(full.added) == 80 and not tcp.streamed


def test_an_event_between_a_tcp_ask_and_its_answer_asks_again() -> None:
    """The answer over TCP and the LLQ's events travel apart: an event applied while the
    ask was out may be newer or older than the answer, so the client asks once more."""
    lab = Lab.make()
    many = tuple(f"fd00::{i:x}" for i in range(1, 81))
    lab.signed_update(update("laptop", "AAAA", add=many))
    udp = StreamClient(lab, Transport.UDP, "127.0.0.1#42000", hold_streams=True)
    assert udp.client.state == ClientState.ESTABLISHED and len(udp.held) == 1
    change(lab, update("laptop", "AAAA", add=("fd00::aaaa",)))
    udp.pump()  # the event comes first: one record, applied
    assert [len(c.added) for c in udp.changes] == [1] and not udp.changes[0].full
    udp.hold_streams = False
    udp.send_held()  # its answer came after an event: asked again, then taken
    assert len(udp.streamed) == 2
    assert [(c.full, len(c.added), len(c.removed)) for c in udp.changes[1:]] == [(True, 80, 0)]
    assert len(udp.client.known) == 81


def test_client_sets_up_again_after_the_connection_closed_and_sees_what_it_missed() -> None:
    lab = Lab.make()
    lab.signed_update(update("laptop", "AAAA", add=("fd00::1",)))
    sc = StreamClient(lab, Transport.TCP)
    first_id = sc.client.llq_id
    lab.llq.connection_closed(Transport.TCP, CONN)
    change(lab, update("laptop", "AAAA", delete=("fd00::1",), add=("fd00::2",)))
    assert not lab.run_server()  # nobody to tell: the LLQ went with the connection
    sc.peer = "127.0.0.1#41002"  # the driver's new connection
    sc.deliver(sc.client.connection_lost(lab.now))
    assert sc.client.state == ClientState.ESTABLISHED and sc.client.llq_id != first_id
    last = sc.changes[-1]
    assert last.full
    assert [r.rdata.to_text() for r in last.added] == ["fd00::2"]
    assert [r.rdata.to_text() for r in last.removed] == ["fd00::1"]
