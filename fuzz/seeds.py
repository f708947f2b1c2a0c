"""``python3 -m fuzz.seeds``: write the seed corpora (``fuzz/corpus/TARGET/seed-NN``).

Seeds are valid messages made by the project's own encoders and state machines, as the tests
make them: a signed UPDATE and queries, an LLQ setup and the registry's real answers to it,
a Push session's messages both ways, a Noise initiation and response, NAT-PMP/PCP/STUN/probe
messages. Replies come from running the real peer on the real request (``targets.registry()``
and friends), with the targets' fixed keys and clock, so the fuzzer starts from inputs that
pass authentication and reach deep code. Deterministic: running it again writes the same
files.
"""

from __future__ import annotations

import ipaddress
import random
import shutil
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.update

from btmm_core.dataplane.api import Endpoint
from btmm_core.dns import tsig
from btmm_core.dns.llq_option import LLQOpcode, LLQOption
from btmm_core.keyex.keys import ula_of
from btmm_core.keyex.session import SendControl
from btmm_core.llq.client import LLQClient
from btmm_core.llq.client import Send as LLQSend
from btmm_core.portmap import natpmp, pcp
from btmm_core.push.client import PushClient
from btmm_core.push.client import Send as PushSend
from btmm_core.reach import probe
from btmm_core.registry.handler import Transport
from btmm_core.registry.model import RRsetChange
from btmm_core.stun import message as stun
from fuzz import targets as t

CORPUS = Path(__file__).resolve().parent / "corpus"
BOB = dns.name.from_text("bob.members.example.")


def _signed_update() -> bytes:
    u = dns.update.UpdateMessage(BOB)
    u.id = 0x4242
    u.add(t.WATCHED, 300, "PTR", "laptop._btmm._udp.bob.members.example.")
    u.add("laptop.bob.members.example.", 300, "AAAA", "2001:db8::7")
    wire, _ = tsig.sign(u.to_wire(), t.registry().accounts["bob"].key, time_signed=int(t.NOW),
                        fudge=300)
    return wire


def _queries() -> list[bytes]:
    out = []
    for name, rdtype in ((t.WATCHED, "PTR"), (BOB, "SOA"), ("laptop.bob.members.example.",
                                                           "AAAA")):
        q = dns.message.make_query(name, rdtype)
        q.id = 0x1234
        out.append(q.to_wire())
    q = dns.message.make_query(BOB, "NS", use_edns=0, payload=1232)
    q.id = 0x1235
    out.append(q.to_wire())
    signed, _ = tsig.sign(out[0], t.registry().accounts["carol"].key, time_signed=int(t.NOW),
                          fudge=300)
    out.append(signed)
    return out


def _llq_exchange() -> tuple[list[bytes], list[bytes]]:
    """(what the client sent, what the server answered) over one LLQ setup."""
    r = t.registry()
    client = t._started_llq_client()
    sent: list[bytes] = []
    answered: list[bytes] = []
    # the target's client is started already; a twin with the same rng goes through setup
    twin = LLQClient(t.WATCHED, dns.rdatatype.PTR, random.Random(3), key=r.accounts["bob"].key)
    outs = twin.start(t.NOW)
    for _ in range(3):
        wires = [o.wire for o in outs if isinstance(o, LLQSend)]
        if not wires:
            break
        outs = []
        for w in wires:
            sent.append(w)
            reply = r.core.receive(w, t.NOW, Transport.UDP, t.PEER)
            if reply is not None:
                answered.append(reply)
                outs += twin.receive(reply, t.NOW + 0.1)
                client.receive(reply, t.NOW + 0.1)
    # an event and its acknowledgement: a change to the watched RRset
    changed: list[RRsetChange] = []
    r.core.store.add_observer(changed.append)
    r.core.receive(_signed_update(), t.NOW, Transport.UDP, "192.0.2.99#53")
    events = [o.wire for o in r.llq.on_changes(changed, t.NOW + 1)]
    assert events, "the LLQ set up above saw no event"
    answered += events
    for e in events:
        for o in twin.receive(e, t.NOW + 1):
            if isinstance(o, LLQSend):
                sent.append(o.wire)
    ack = dns.message.make_query(t.WATCHED, "PTR", use_edns=0,
                                 options=[LLQOption(LLQOpcode.EVENT, llq_id=1, lease=0)])
    ack.id = 0x7777
    ack.flags |= dns.flags.QR
    sent.append(ack.to_wire())
    return sent, answered


def _push_exchange() -> tuple[list[bytes], list[bytes]]:
    r = t.registry()
    c = PushClient(t.WATCHED, dns.rdatatype.PTR, random.Random(3), key=r.accounts["bob"].key)
    c.start(t.NOW)
    outs = c.connected(t.NOW)
    sent: list[bytes] = []
    answered: list[bytes] = []
    for _ in range(3):
        wires = [o.wire for o in outs if isinstance(o, PushSend)]
        if not wires:
            break
        outs = []
        for w in wires:
            sent.append(w)
            for reply in t.on_push_connection(w):
                answered.append(reply)
                outs += c.receive(reply, t.NOW + 0.1)
    r.push.connection_closed(Transport.TLS, t.PEER)
    return sent, answered


def _handshake() -> list[bytes]:
    a = t.key_exchange("a", "b")
    b = t.key_exchange("b", "a")
    init = [x.message for x in a.connect(str(ula_of(t.static_key("b").public)), t.NOW, t.WALL)
            if isinstance(x, SendControl)]
    resp = [x.message for m in init for x in b.receive(m, t.A_ADDR, t.NOW, t.WALL)
            if isinstance(x, SendControl)]
    confirm = [x.message for m in resp for x in a.receive(m, t.B_ADDR, t.NOW, t.WALL)
               if isinstance(x, SendControl)]
    msgs = init + resp + confirm
    assert len(msgs) == 3, msgs
    return [b"\x00" + m for m in msgs] + [b"\x80" + m for m in msgs]


def _natpmp() -> list[bytes]:
    ext = ipaddress.IPv4Address("203.0.113.9")
    return [
        natpmp.encode_response(natpmp.PublicAddressResponse(0, 1000, ext)),
        natpmp.encode_response(natpmp.MapResponse(natpmp.Opcode.MAP_UDP, 0, 1000, 4500, 4501,
                                                  7200)),
        natpmp.encode_response(natpmp.MapResponse(natpmp.Opcode.MAP_UDP, 3, 1000, 4500, 0, 0)),
        *(r.encode() for r in t._NATPMP_REQUESTS),
    ]


def _pcp() -> list[bytes]:
    ext = ipaddress.IPv4Address("203.0.113.9")
    m = pcp.MapData(t.PCP_NONCE, pcp.Protocol.UDP, 4500, 4501, ext)
    peer = pcp.PeerData(m, 4500, ipaddress.IPv4Address("198.51.100.2"))
    return [
        pcp.encode_response(pcp.Response(pcp.Opcode.MAP, 0, 7200, 1000, m)),
        pcp.encode_response(pcp.Response(pcp.Opcode.ANNOUNCE, 0, 0, 3)),
        pcp.encode_response(pcp.Response(pcp.Opcode.PEER, 0, 10, 4, m, peer)),
        t._PCP_REQUEST.encode(),
    ]


def _stun() -> list[bytes]:
    txid = bytes(range(12))
    mapped = stun.TransportAddress("203.0.113.9", 4501)
    mapped6 = stun.TransportAddress("2001:db8::9", 4501)
    return [
        stun.binding_request(txid, software="btmm"),
        stun.binding_request(txid, fingerprint=False),
        stun.binding_success(txid, mapped),
        stun.binding_success(txid, mapped6, software="btmm"),
        stun.error_response(stun.Method.BINDING, txid, stun.ErrorCode.BAD_REQUEST, "bad"),
    ]


def _probe() -> list[bytes]:
    key = bytes(32)
    sender = probe.key_id(t.static_key("a").public)
    req = probe.ProbeRequest(sender, bytes(range(12))[: probe.TXID_LEN], 1234,
                             Endpoint("198.51.100.2", 4500)).sealed(key)
    rep = probe.ProbeReply(sender, req.txid, Endpoint("2001:db8::2", 4500)).sealed(key)
    return [req.to_bytes(), rep.to_bytes()]


def _turn_client() -> list[bytes]:
    from btmm_core.stun.turn import encode_channel_data

    txid = bytes(range(12))
    data = stun.Message(stun.Method.DATA, stun.MessageClass.INDICATION, txid, others=(
        stun.xor_address_attribute(stun.TurnAttributeType.XOR_PEER_ADDRESS, t.TURN_PEER, txid),
        stun.data_attribute(b"esp"))).to_bytes()
    client = t.turn_allocated()
    client.refresh(t.NOW)
    [refresh] = client.datagrams_to_send()
    key = stun.long_term_key(t.TURN_USER, t.TURN_REALM, t.TURN_PASSWORD)
    stale = stun.Message(stun.Method.REFRESH, stun.MessageClass.ERROR,
                         stun.parse(refresh).transaction_id,
                         error=stun.ErrorAttribute(438, "Stale Nonce"),
                         others=(stun.text_attribute(stun.AttributeType.NONCE, "n2"),)).to_bytes()
    return [encode_channel_data(0x4000, b"esp"), encode_channel_data(0x4000, b"e", pad=True),
            data, t._turn_answer(refresh, key), stale]


def seeds() -> dict[str, list[bytes]]:
    update = _signed_update()
    queries = _queries()
    llq_sent, llq_answered = _llq_exchange()
    push_sent, push_answered = _push_exchange()
    return {
        "registry": [update, *queries, *llq_sent[:1]],
        "llq_server": llq_sent,
        "llq_client": [t.framed(llq_answered), *(t.framed([m]) for m in llq_answered)],
        "push_server": [t.framed(push_sent), *(t.framed([m]) for m in push_sent)],
        "push_client": [t.framed(push_answered), *(t.framed([m]) for m in push_answered)],
        "dso": push_sent + push_answered,
        "tsig": [update, queries[-1]],
        "natpmp": _natpmp(),
        "pcp": _pcp(),
        "handshake": _handshake(),
        "stun": _stun(),
        "probe": _probe(),
        "turn_client": _turn_client(),
    }


def write(root: Path = CORPUS) -> dict[str, int]:
    counts = {}
    for name, items in seeds().items():
        d = root / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        unique = list(dict.fromkeys(items))
        for i, data in enumerate(unique):
            (d / f"seed-{i:02d}").write_bytes(data)
        counts[name] = len(unique)
    return counts


if __name__ == "__main__":
    for name, n in write().items():
        print(f"{name}: {n} seeds")
