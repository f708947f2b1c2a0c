"""The fuzz targets: one per parser of network input, each with the contract it asserts.

A target takes the fuzzer's bytes, hands them to the parser the way the daemon or the
registry does, and lets through only a clean result or the errors the module documents for
bad input (``BtmmError`` subclasses: ``MalformedMessage``, ``DSOError``; dnspython's
``DNSException`` where the caller catches it). Anything else propagates, and atheris
reports it as a crash with the input that caused it.

Parsers that keep state (the registry core, the LLQ and Push servers and clients, the
handshake endpoint) are built once per process with fixed keys and a fixed clock, so that
a crash reproduces from its input and the seeds (``fuzz/seeds.py``) reach past the
authentication that random bytes never pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import dns.exception
import dns.message
import dns.name
import dns.rdatatype

from btmm_core.dataplane.api import Endpoint
from btmm_core.dns import tsig
from btmm_core.dns.dso import DSOMessage, DSOType, is_dso
from btmm_core.dns.push import parse_push
from btmm_core.errors import BtmmError, DSOError, MalformedMessage
from btmm_core.keyex.keys import StaticKey, derive_psk, ula_of
from btmm_core.keyex.noise import LABEL_MAC1, Handshaker, blake2s, mac16
from btmm_core.keyex.session import KeyExchange
from btmm_core.llq.client import LLQClient
from btmm_core.llq.server import LLQConfig, LLQServer
from btmm_core.portmap import natpmp, pcp
from btmm_core.push.client import PushClient
from btmm_core.push.server import PushServer
from btmm_core.reach import probe
from btmm_core.registry.handler import Policy, RegistryCore, Transport
from btmm_core.registry.model import Account
from btmm_core.registry.storage import MemoryStorage
from btmm_core.registry.zones import ZoneConfig, ZoneStore
from btmm_core.stun import message as stun
from btmm_core.turn.client import AllocationState, TurnClient

#: The fixed clock of every stateful target (seconds since the epoch), and the zone.
NOW = 1_800_000_000.0
PARENT = dns.name.from_text("members.example.")
NS = dns.name.from_text("ns.members.example.")
PEER = "192.0.2.7#5353"
WATCHED = dns.name.from_text("_btmm._udp.bob.members.example.")


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    about: str


# ---- the registry and its plug-ins ------------------------------------------------------


@dataclass
class Registry:
    core: RegistryCore
    accounts: dict[str, Account]
    llq: LLQServer
    push: PushServer


@cache
def registry() -> Registry:
    """A registry core on memory storage with LLQ and DNS Push plugged in, as ``btmm serve``
    composes it; users ``bob`` (HMAC-SHA256) and ``carol`` (legacy HMAC-MD5)."""
    storage = MemoryStorage()
    storage.ensure_zone(PARENT, None)
    accounts = {}
    for user, algorithm in (("bob", tsig.HMAC_SHA256), ("carol", tsig.HMAC_MD5)):
        # fixed secrets (not accounts.add_user's random ones): the seeds are signed with them
        zone = dns.name.from_text(user, origin=PARENT)
        secret = hashlib.sha256(b"fuzz tsig " + user.encode()).digest()
        key = tsig.TsigKey(zone, algorithm, secret, zone)
        accounts[user] = Account(user, zone, key, NOW)
        storage.add_account(accounts[user])
    store = ZoneStore(storage, ZoneConfig(PARENT, NS, ("192.0.2.53",), 53))
    core = RegistryCore(store, Policy(lease_min=10, lease_max=7200))
    llq = LLQServer(core, LLQConfig(), b"fuzz-llq-secret!" * 2, random.Random(1))
    push = PushServer(core)
    core.plug(llq)
    core.plug(push)
    return Registry(core, accounts, llq, push)


def _transport(data: bytes) -> Transport:
    # The last byte picks the transport so that a seed's message stays intact at the front.
    return Transport.TCP if data and data[-1] & 1 else Transport.UDP


def fuzz_registry(data: bytes) -> None:
    """``RegistryCore.receive``: any bytes get an answer or silence, never an exception."""
    r = registry()
    reply = r.core.receive(data, NOW, _transport(data), PEER)
    assert reply is None or isinstance(reply, bytes)


def fuzz_llq_server(data: bytes) -> None:
    """LLQ requests through the core (setup, refresh, cancel) and event acknowledgements
    (messages with QR set) into ``LLQServer.receive_response``: neither may raise."""
    r = registry()
    t = _transport(data)
    r.core.receive(data, NOW, t, PEER)
    r.llq.receive_response(data, NOW, t, PEER)
    for out in r.llq.tick(NOW):
        assert isinstance(out.wire, bytes)


def on_push_connection(data: bytes) -> list[bytes]:
    """What the registry's TLS driver does with one message on a Push connection: DSO to
    the Push server, anything else (the client's signed binding query) to the core."""
    r = registry()
    if is_dso(data):
        return [o.wire for o in r.push.receive_message(data, NOW, Transport.TLS, PEER)]
    reply = r.core.receive(data, NOW, Transport.TLS, PEER)
    return [] if reply is None else [reply]


def frames(data: bytes) -> list[bytes]:
    """The messages of a DNS stream (RFC 1035 4.2.2: a 2-byte length before each), the way a
    TLS connection delivers them; a cut last frame is dropped, as the driver would wait."""
    out = []
    p = 0
    while p + 2 <= len(data):
        n = int.from_bytes(data[p : p + 2], "big")
        if p + 2 + n > len(data):
            break
        out.append(data[p + 2 : p + 2 + n])
        p += 2 + n
    return out


def framed(messages: list[bytes]) -> bytes:
    return b"".join(len(m).to_bytes(2, "big") + m for m in messages)


def fuzz_push_server(data: bytes) -> None:
    """A Push client's connection (a stream of DSO messages and signed binding queries) as the
    TLS driver routes it; the session is closed after each input, so inputs do not mix."""
    r = registry()
    for message in frames(data):
        for wire in on_push_connection(message):
            assert isinstance(wire, bytes)
    r.push.connection_closed(Transport.TLS, PEER)


# ---- clients --------------------------------------------------------------------------


def _started_llq_client() -> LLQClient:
    c = LLQClient(WATCHED, dns.rdatatype.PTR, random.Random(3),
                  key=registry().accounts["bob"].key)
    c.start(NOW)
    return c


def fuzz_llq_client(data: bytes) -> None:
    """The server's datagrams (length-prefixed, several per input: the setup answers, then
    events) into a new ``LLQClient.receive``; its rng is seeded, so its request IDs are the
    ones the seeds answer. Outputs or nothing, never an exception."""
    c = _started_llq_client()
    for i, message in enumerate(frames(data)):
        c.receive(message, NOW + 0.1 * (i + 1))
        c.tick(NOW + 0.1 * (i + 1))


def _connected_push_client() -> PushClient:
    c = PushClient(WATCHED, dns.rdatatype.PTR, random.Random(3),
                   key=registry().accounts["bob"].key)
    c.start(NOW)
    c.connected(NOW)
    return c


def fuzz_push_client(data: bytes) -> None:
    """The server's side of a Push connection (framed messages) into ``PushClient.receive``:
    protocol errors end the session (a ``Disconnect`` output), they never raise."""
    c = _connected_push_client()
    for message in frames(data):
        c.receive(message, NOW + 0.1)


# ---- DNS codecs ------------------------------------------------------------------------


def fuzz_dso(data: bytes) -> None:
    """``DSOMessage.parse`` and ``parse_push`` of its PUSH TLVs: ``DSOError`` or a result."""
    try:
        msg = DSOMessage.parse(data)
    except DSOError:
        return
    for tlv in msg.tlvs:
        if tlv.dso_type == DSOType.PUSH:
            with contextlib.suppress(DSOError):
                parse_push(data, tlv)


def _tsig_lookup(name: dns.name.Name) -> tsig.TsigKey | None:
    for account in registry().accounts.values():
        if account.key.name == name:
            return account.key
    return None


def fuzz_tsig(data: bytes) -> None:
    """TSIG verification as the registry does it: a message dnspython parses and that has a
    TSIG RR gets a verdict (good, or a ``TsigError``), never an exception."""
    try:
        msg = dns.message.from_wire(data, keyring=False)
    except dns.exception.DNSException:
        return  # the registry answers FORMERR before TSIG is looked at
    if msg.tsig is None:
        return
    record = tsig.record_of(data, msg)
    verdict = tsig.verify(data, record, _tsig_lookup, now=int(NOW), fudge=300)
    assert isinstance(verdict.error, tsig.TsigError)


# ---- port mapping ------------------------------------------------------------------------


_NATPMP_REQUESTS = (
    natpmp.PublicAddressRequest(),
    natpmp.MapRequest(natpmp.Opcode.MAP_UDP, 4500, 4500),
)


def fuzz_natpmp(data: bytes) -> None:
    """NAT-PMP answers, announcements and (for the lab gateway) requests:
    ``MalformedMessage`` or a decoded message."""
    for decode in (natpmp.decode_response, natpmp.decode_request):
        with contextlib.suppress(MalformedMessage):
            decode(data)
    natpmp.decode_announcement(data)
    for request in _NATPMP_REQUESTS:
        with contextlib.suppress(MalformedMessage):
            natpmp.answer_parser(request)(data)


PCP_NONCE = bytes(range(12))
PCP_CLIENT = ipaddress.IPv4Address("10.0.0.2")
_PCP_REQUEST = pcp.map_request(nonce=PCP_NONCE, client_address=PCP_CLIENT, internal_port=4500,
                               suggested_external_port=4500, lifetime=7200)


def fuzz_pcp(data: bytes) -> None:
    """PCP answers, ANNOUNCEs and (for the lab gateway) requests."""
    for decode in (pcp.decode_response, pcp.decode_request):
        with contextlib.suppress(MalformedMessage):
            decode(data)
    pcp.decode_announce(data)
    with contextlib.suppress(MalformedMessage):
        pcp.answer_parser(_PCP_REQUEST)(data)


# ---- handshake, probes, STUN -------------------------------------------------------------


@cache
def static_key(name: str) -> StaticKey:
    return StaticKey.from_private(hashlib.sha256(b"fuzz static " + name.encode()).digest())


PSK = derive_psk(b"fuzz account secret")
A_ADDR = Endpoint("192.0.2.1", 4500)
B_ADDR = Endpoint("198.51.100.2", 4500)
WALL = 1_800_000_000.0


class _Counting:
    """Deterministic randomness, so that seeds stay valid from run to run."""

    def __init__(self, label: bytes) -> None:
        self.label = label
        self.n = 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            self.n += 1
            out += hashlib.sha256(self.label + self.n.to_bytes(8, "big")).digest()
        return out[:n]


def key_exchange(name: str, peer: str) -> KeyExchange:
    me, other = static_key(name), static_key(peer)
    kx = KeyExchange(Handshaker(me, PSK, _Counting(name.encode())))
    kx.add_peer(other.public, str(ula_of(other.public)), A_ADDR if name == "b" else B_ADDR)
    return kx


def fuzz_handshake(data: bytes) -> None:
    """Handshake messages into ``KeyExchange.receive`` of a fresh responder (b, knows a) and
    initiator (a, has an initiation out). A first byte with the top bit set asks the target
    to put a valid mac1 on the rest, so the fuzzer gets past the mac1 filter (random bytes
    never would) and into the DH, decryption and replay checks."""
    if not data:
        return
    fix, body = data[0] & 0x80, data[1:]
    a = key_exchange("a", "b")
    a.connect(str(ula_of(static_key("b").public)), NOW, WALL)
    b = key_exchange("b", "a")
    for kx, me, source in ((b, "b", A_ADDR), (a, "a", B_ADDR)):
        msg = body
        if fix and len(msg) >= 32:
            mac1 = mac16(blake2s(LABEL_MAC1, static_key(me).public), msg[:-32])
            msg = msg[:-32] + mac1 + msg[-16:]
        for action in kx.receive(msg, source, NOW, WALL):
            assert action is not None


def fuzz_stun(data: bytes) -> None:
    """STUN: ``looks_like_stun`` never raises; ``parse`` returns a message or raises
    ``MalformedMessage`` with a ``Fault`` reason."""
    stun.looks_like_stun(data)
    try:
        stun.parse_header(data)
        stun.parse(data)
    except MalformedMessage as e:
        assert isinstance(e.reason, stun.Fault)


def fuzz_probe(data: bytes) -> None:
    """Path probes (``reach.probe``): ``MalformedMessage`` or a message; ``peek_sender``
    never raises."""
    probe.peek_sender(data)
    with contextlib.suppress(MalformedMessage):
        probe.parse_probe(data)


# ---- the TURN client --------------------------------------------------------------------------

TURN_SERVER = stun.TransportAddress("198.51.100.1", 3478)
TURN_PEER = stun.TransportAddress("203.0.113.9", 4500)
TURN_USER, TURN_PASSWORD, TURN_REALM = "1800000000:laptop", "pw", "btmm.test"


def _turn_answer(request: bytes, key: bytes | None) -> bytes:
    """What a TURN server answers to one of the client's requests: a 401 challenge to an
    unauthenticated one, else a success (with XOR-RELAYED-ADDRESS for an Allocate)."""
    msg = stun.parse(request)
    txid = msg.transaction_id
    if key is None:
        return stun.Message(msg.method, stun.MessageClass.ERROR, txid,
                            error=stun.ErrorAttribute(401, "Unauthorized"),
                            others=(stun.text_attribute(stun.AttributeType.REALM, TURN_REALM),
                                    stun.text_attribute(stun.AttributeType.NONCE, "n")),
                            ).to_bytes()
    others: tuple[stun.Attribute, ...] = ()
    if msg.method == stun.Method.ALLOCATE:
        others = (stun.xor_address_attribute(stun.TurnAttributeType.XOR_RELAYED_ADDRESS,
                                             TURN_SERVER, txid), stun.lifetime_attribute(600))
    reply = stun.Message(msg.method, stun.MessageClass.SUCCESS, txid, others=others)
    return stun.add_integrity(reply.to_bytes(), key)


def turn_allocated() -> TurnClient:
    """A client with an allocation and a channel (0x4000) bound to ``TURN_PEER``, made by the
    same exchange every time (deterministic transaction ids, fixed clock)."""
    client = TurnClient(TURN_SERVER, TURN_USER, TURN_PASSWORD, _Counting(b"turn"))
    key = stun.long_term_key(TURN_USER, TURN_REALM, TURN_PASSWORD)
    client.start(NOW)
    [first] = client.datagrams_to_send()
    client.receive(_turn_answer(first, None), TURN_SERVER, NOW)
    [second] = client.datagrams_to_send()
    client.receive(_turn_answer(second, key), TURN_SERVER, NOW)
    client.bind(TURN_PEER, NOW)
    [bind] = client.datagrams_to_send()
    client.receive(_turn_answer(bind, key), TURN_SERVER, NOW)
    assert client.state is AllocationState.ALLOCATED and client.channel_of(TURN_PEER)
    return client


def fuzz_turn_client(data: bytes) -> None:
    """TURN (``turn.client``): any datagram from the server is an event or a counted drop,
    never an exception, and never loses the allocation or the channel."""
    client = turn_allocated()
    client.receive(data, TURN_SERVER, NOW)
    while client.next_event() is not None:
        pass
    assert client.state is AllocationState.ALLOCATED
    assert client.channel_of(TURN_PEER) == 0x4000


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("registry", fuzz_registry, "DNS messages into RegistryCore.receive"),
        Target("llq_server", fuzz_llq_server, "LLQ requests and event acks (llq/server.py)"),
        Target("llq_client", fuzz_llq_client, "answers and events into LLQClient.receive"),
        Target("push_server", fuzz_push_server, "DSO messages into PushServer"),
        Target("push_client", fuzz_push_client, "DSO messages into PushClient.receive"),
        Target("dso", fuzz_dso, "DSOMessage.parse and parse_push (dns/dso.py, dns/push.py)"),
        Target("tsig", fuzz_tsig, "TSIG record and verification (dns/tsig.py)"),
        Target("natpmp", fuzz_natpmp, "NAT-PMP replies, announcements, requests"),
        Target("pcp", fuzz_pcp, "PCP replies, ANNOUNCEs, requests"),
        Target("handshake", fuzz_handshake, "Noise handshake messages into KeyExchange"),
        Target("stun", fuzz_stun, "STUN messages (stun/message.py)"),
        Target("probe", fuzz_probe, "path probes (reach/probe.py)"),
        Target("turn_client", fuzz_turn_client, "TURN responses, indications and ChannelData "
               "into TurnClient.receive (turn/client.py)"),
    )
}

#: The errors a target lets through as documented refusals (everything else is a crash).
DOCUMENTED: tuple[type[BaseException], ...] = (BtmmError,)
