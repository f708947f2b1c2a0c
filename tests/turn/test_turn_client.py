"""The TURN allocation core (turn/client.py) on a virtual clock, against a small scripted
server made of the same codec (the real one, coturn, is in test_turn_live.py)."""

from __future__ import annotations

import itertools
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from btmm_core.stun.message import (
    AttributeType,
    ErrorAttribute,
    ErrorCode,
    Message,
    MessageClass,
    Method,
    TransportAddress,
    TurnAttributeType,
    add_integrity,
    check_integrity,
    data_attribute,
    lifetime_attribute,
    long_term_key,
    parse,
    text_attribute,
    turn_attributes,
    xor_address_attribute,
)
from btmm_core.stun.turn import decode_channel_data, encode_channel_data
from btmm_core.turn.client import (
    PEER_REFRESH,
    Allocated,
    AllocationFailed,
    AllocationLost,
    AllocationState,
    ChannelBound,
    PeerData,
    PermissionCreated,
    TurnClient,
)

SERVER = TransportAddress("198.51.100.1", 3478)
RELAYED = TransportAddress("198.51.100.1", 50000)
MAPPED = TransportAddress("203.0.113.7", 40000)
PEER = TransportAddress("203.0.113.9", 4500)
REALM = "btmm.test"
USER, PASSWORD = "1800000000:laptop", "pw"


def counter_bytes() -> object:
    n = itertools.count(1)
    return lambda k: next(n).to_bytes(k, "big")


class FakeServer:
    """Answers as RFC 8656 says, with knobs for what goes wrong."""

    def __init__(self, password: str = PASSWORD, lifetime: int = 600) -> None:
        self.key = long_term_key(USER, REALM, password)
        self.nonce = "n1"
        self.lifetime = lifetime
        self.allocated = False
        self.stale_once = False
        self.mismatch = False
        self.silent = False
        self.requests: list[Message] = []

    def handle(self, wire: bytes) -> list[bytes]:
        msg = parse(wire)
        self.requests.append(msg)
        if self.silent:
            return []
        a = turn_attributes(msg)
        txid = msg.transaction_id
        if a.nonce is None:
            return [self.error(msg, ErrorCode.UNAUTHENTICATED, nonce=True)]
        if self.stale_once:
            self.stale_once = False
            self.nonce = "n2"
            return [self.error(msg, ErrorCode.STALE_NONCE, nonce=True)]
        if a.nonce != self.nonce:
            return [self.error(msg, ErrorCode.STALE_NONCE, nonce=True)]
        if not check_integrity(wire, self.key):
            return [self.error(msg, ErrorCode.UNAUTHENTICATED, nonce=True)]
        if msg.method != Method.ALLOCATE and (self.mismatch or not self.allocated):
            return [self.error(msg, ErrorCode.ALLOCATION_MISMATCH)]
        others: tuple = ()
        if msg.method == Method.ALLOCATE:
            self.allocated = True
            others = (xor_address_attribute(TurnAttributeType.XOR_RELAYED_ADDRESS, RELAYED, txid),
                      lifetime_attribute(self.lifetime))
            reply = Message(msg.method, MessageClass.SUCCESS, txid, xor_mapped=MAPPED,
                            others=others)
        elif msg.method == Method.REFRESH:
            others = (lifetime_attribute(a.lifetime or 0),)
            reply = Message(msg.method, MessageClass.SUCCESS, txid, others=others)
        else:
            reply = Message(msg.method, MessageClass.SUCCESS, txid)
        return [add_integrity(reply.to_bytes(), self.key)]

    def error(self, msg: Message, code: ErrorCode, nonce: bool = False) -> bytes:
        others = (text_attribute(AttributeType.REALM, REALM),
                  text_attribute(AttributeType.NONCE, self.nonce)) if nonce else ()
        return Message(msg.method, MessageClass.ERROR, msg.transaction_id,
                       error=ErrorAttribute(code, code.name), others=others,
                       fingerprint=True).to_bytes()


def exchange(client: TurnClient, server: FakeServer, now: float) -> list[object]:
    """Deliver the client's datagrams to the server and its answers back, until quiet."""
    for _ in range(20):
        out = client.datagrams_to_send()
        if not out:
            break
        for wire in out:
            if wire[0] & 0xC0 == 0x40:
                continue  # ChannelData to a peer
            msg = parse(wire)
            if msg.cls is MessageClass.INDICATION:
                continue
            for answer in server.handle(wire):
                client.receive(answer, SERVER, now)
    events = []
    while (ev := client.next_event()) is not None:
        events.append(ev)
    return events


def allocated(server: FakeServer | None = None) -> tuple[TurnClient, FakeServer]:
    server = server or FakeServer()
    client = TurnClient(SERVER, USER, PASSWORD, counter_bytes())  # type: ignore[arg-type]
    client.start(0.0)
    assert exchange(client, server, 0.0) == [Allocated(RELAYED, MAPPED, 600)]
    return client, server


def test_allocate_after_the_challenge_then_refresh_before_expiry() -> None:
    client, server = allocated()
    first, second = server.requests
    assert turn_attributes(first).nonce is None and turn_attributes(second).integrity
    assert client.state is AllocationState.ALLOCATED
    assert client.next_timer() == 540.0  # a minute before the 600 s run out
    client.handle_timer(539.0)
    assert client.datagrams_to_send() == []
    client.handle_timer(540.0)
    assert exchange(client, server, 540.0) == []
    assert server.requests[-1].method == Method.REFRESH
    assert client.expires_at == 1140.0 and client.next_timer() == 1080.0


def test_a_stale_nonce_is_retried_with_the_new_one() -> None:
    server = FakeServer()
    server.stale_once = True
    allocated(server)
    assert [turn_attributes(m).nonce for m in server.requests] == [None, "n1", "n2"]


def test_wrong_credentials_fail_the_allocation() -> None:
    server = FakeServer(password="other")
    client = TurnClient(SERVER, USER, PASSWORD, counter_bytes())  # type: ignore[arg-type]
    client.start(0.0)
    [ev] = exchange(client, server, 0.0)
    assert isinstance(ev, AllocationFailed) and ev.code == 401
    assert client.state is AllocationState.FAILED and len(server.requests) == 2


def test_no_answer_fails_after_the_retransmissions() -> None:
    server = FakeServer()
    server.silent = True
    client = TurnClient(SERVER, USER, PASSWORD, counter_bytes())  # type: ignore[arg-type]
    client.start(0.0)
    sent = len(client.datagrams_to_send())
    now = 0.0
    while (t := client.next_timer()) is not None:
        now = t
        client.handle_timer(now)
        sent += len(client.datagrams_to_send())
    assert sent == 5 and now == 11.5  # 0, .5, 1.5, 3.5, 7.5, then 8 x RTO
    assert client.next_event() == AllocationFailed(None, client.error or "")


def test_forged_and_foreign_answers_are_counted_drops() -> None:
    server = FakeServer()
    client = TurnClient(SERVER, USER, PASSWORD, counter_bytes())  # type: ignore[arg-type]
    client.start(0.0)
    [challenge] = client.datagrams_to_send()
    client.receive(server.handle(challenge)[0], SERVER, 0.0)
    [request] = client.datagrams_to_send()
    txid = parse(request).transaction_id
    forged = Message(Method.ALLOCATE, MessageClass.SUCCESS, txid, others=(
        xor_address_attribute(TurnAttributeType.XOR_RELAYED_ADDRESS, PEER, txid),))
    client.receive(add_integrity(forged.to_bytes(), b"not the key"), SERVER, 0.0)
    client.receive(forged.to_bytes(), SERVER, 0.0)  # no integrity at all
    good = server.handle(request)[0]
    client.receive(good, PEER, 0.0)  # right answer, wrong sender
    client.receive(good[:-3], SERVER, 0.0)
    assert client.state is AllocationState.ALLOCATING
    assert client.drops == {"integrity": 2, "not from the server": 1, "malformed": 1}
    client.receive(good, SERVER, 0.0)
    assert client.state is AllocationState.ALLOCATED
    client.receive(good, SERVER, 0.0)  # a duplicate: its transaction is over
    assert client.drops["no such transaction"] == 1


def test_channel_bind_then_data_both_ways() -> None:
    client, server = allocated()
    channel = client.bind(PEER, 1.0)
    assert client.send(PEER, b"early", 1.0) is False and client.unsent == 1
    assert exchange(client, server, 1.0) == [ChannelBound(PEER, channel)]
    assert client.send(PEER, b"esp", 2.0)
    [wire] = client.datagrams_to_send()
    assert decode_channel_data(wire) == (channel, b"esp")
    client.receive(encode_channel_data(channel, b"back"), SERVER, 3.0)
    assert client.next_event() == PeerData(PEER, b"back", True)
    client.receive(encode_channel_data(channel + 1, b"x"), SERVER, 3.0)
    client.receive(b"\x40\x00\x00\x09short", SERVER, 3.0)
    assert client.next_event() is None
    assert client.drops == {"unknown channel": 1, "malformed channel data": 1}
    # The channel (and its permission) is renewed before the permission's 300 s are over.
    assert client.next_timer() == 1.0 + PEER_REFRESH
    client.handle_timer(1.0 + PEER_REFRESH)
    assert exchange(client, server, 1.0 + PEER_REFRESH) == []
    assert server.requests[-1].method == Method.CHANNEL_BIND


def test_permission_send_indication_and_data_indication() -> None:
    client, server = allocated()
    client.permit(PEER, 1.0)
    assert exchange(client, server, 1.0) == [PermissionCreated(PEER)]
    assert client.send(PEER, b"hi", 1.0)
    [ind] = client.datagrams_to_send()
    msg = parse(ind)
    assert (msg.method, msg.cls) == (Method.SEND, MessageClass.INDICATION)
    assert turn_attributes(msg).peers == (PEER,) and turn_attributes(msg).data == b"hi"
    for peer, expect in ((PEER, True), (TransportAddress("192.0.2.66", 1), False)):
        txid = bytes(12)
        data = Message(Method.DATA, MessageClass.INDICATION, txid, others=(
            xor_address_attribute(TurnAttributeType.XOR_PEER_ADDRESS, peer, txid),
            data_attribute(b"in"))).to_bytes()
        client.receive(data, SERVER, 2.0)
        assert (client.next_event() == PeerData(peer, b"in", False)) is expect
    assert client.drops == {"no permission": 1}


def test_a_lost_allocation_is_made_again_with_its_channels() -> None:
    client, server = allocated()
    channel = client.bind(PEER, 1.0)
    exchange(client, server, 1.0)
    # The server restarted: a new nonce, no allocation.
    server.allocated, server.nonce = False, "fresh"
    client.refresh(10.0)
    events = exchange(client, server, 10.0)
    assert isinstance(events[0], AllocationLost)
    assert events[1:] == [Allocated(RELAYED, MAPPED, 600), ChannelBound(PEER, channel)]
    assert client.losses == 1 and client.allocations == 2


def test_release_sends_lifetime_zero() -> None:
    client, server = allocated()
    client.release(5.0)
    exchange(client, server, 5.0)
    last = server.requests[-1]
    assert last.method == Method.REFRESH and turn_attributes(last).lifetime == 0
    assert client.state is AllocationState.RELEASED and client.next_timer() is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_input_is_a_drop_or_an_answer_never_a_crash(data: bytes) -> None:
    client, _ = allocated()
    client.bind(PEER, 1.0)
    client.receive(data, SERVER, 2.0)
    client.receive(b"\x01\x01" + struct.pack("!H", len(data) // 4 * 4) + data, SERVER, 2.0)
    assert client.state is AllocationState.ALLOCATED


def test_a_permission_is_for_the_address_any_port() -> None:
    # RFC 8656 section 9: permissions are per IP address; the peer's NAT picks the port.
    client, server = allocated()
    client.permit(TransportAddress(PEER.host, 0), 1.0)
    exchange(client, server, 1.0)
    other_port = TransportAddress(PEER.host, 61000)
    txid = bytes(12)
    data = Message(Method.DATA, MessageClass.INDICATION, txid, others=(
        xor_address_attribute(TurnAttributeType.XOR_PEER_ADDRESS, other_port, txid),
        data_attribute(b"in"))).to_bytes()
    client.receive(data, SERVER, 2.0)
    assert client.next_event() == PeerData(other_port, b"in", False)
    assert client.send(other_port, b"out", 2.0)
    assert not client.send(TransportAddress("192.0.2.1", 61000), b"out", 2.0)
    assert client.unsent == 1
