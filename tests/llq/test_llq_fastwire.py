"""LLQ events and acknowledgements as bytes (``llq/fastwire.py``) against the dnspython path.

Two LLQ servers in the same state, one with ``fast`` and one without, get the same inputs: the
events they send must be the same bytes, and every acknowledgement (good, malformed, truncated,
forged, replayed, of an odd shape) must have the same effect on both. ``parse_ack`` must read a
message as dnspython does or leave it to dnspython.
"""

from __future__ import annotations

import copy
import random
import struct

import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import pytest
from llq_helpers import Lab, update
from llq_helpers import sign as sign_msg

from btmm_core.dns.llq_option import LLQOpcode, LLQOption, find_llq
from btmm_core.dns.tsig import HMAC_SHA256, TsigKey, append_tsig, compute_mac, sign
from btmm_core.llq.client import LLQClient, Send
from btmm_core.llq.fastwire import EventTemplate, KeyWire, llq_option_data, parse_ack
from btmm_core.llq.server import LLQServer
from btmm_core.registry.handler import Transport

PEER = "127.0.0.1#40000"


def twin_labs() -> tuple[Lab, Lab]:
    """The same registry and LLQ server twice (same keys, secret and random draws), one
    reading and writing bytes, one through dnspython."""
    fast = Lab.make(seed=5)
    slow = copy.deepcopy(fast)
    slow.core.store._observers = [slow.changed.append]  # a copied bound method is not rebound
    slow.llq.fast = False
    assert fast.llq.fast
    return fast, slow


def in_flight(lab: Lab, c: LLQClient) -> bytes:
    event = lab.llq.llqs[c.llq_id].inflight
    assert event is not None
    return event.wire


def held_event(lab: Lab) -> tuple[LLQClient, bytes]:
    """An established LLQ whose next event is in flight and not acknowledged."""
    c = lab.client(PEER)
    lab.signed_update(update("laptop", "AAAA", add=("fd00::1",)))
    del lab.clients[PEER]  # from here the test carries messages by hand
    lab.signed_update(update("laptop", "AAAA", add=("fd00::2",)))
    return c, in_flight(lab, c)


def test_events_are_the_same_bytes_on_both_paths() -> None:
    fast, slow = twin_labs()
    sent: dict[str, list[bytes]] = {"fast": [], "slow": []}
    for name, lab in (("fast", fast), ("slow", slow)):
        peers = [f"127.0.0.{i}#4000{i}" for i in range(1, 4)]
        for i, p in enumerate(peers):
            lab.client(p, seed=10 + i)
            lab.now += 1
        assert len(lab.llq.llqs) == 3
        del lab.clients[peers[2]]  # one never acknowledges: its events are resent
        for n in range(4):
            u = update("laptop", "AAAA", add=(f"fd00::{n + 1}",), delete=(f"fd00::{n}",))
            wire = sign_msg(u, lab.accounts["bob"].key, int(lab.now))
            assert lab.core.receive(wire, lab.now, Transport.UDP, "updater#1") is not None
            out = lab.run_server()
            sent[name] += [o.wire for o in out]
            for o in out:
                if o.peer in lab.clients:
                    lab.deliver(o.peer, lab._to_client(o.peer, o.wire))
            lab.now += 3  # past the first resend
            sent[name] += [o.wire for o in lab.llq.tick(lab.now)]
        assert lab.llq.stats["events"] >= 8
    assert sent["fast"] and sent["fast"] == sent["slow"]
    assert fast.llq.stats == slow.llq.stats


def test_key_wire_signs_and_macs_as_dns_tsig() -> None:
    rng = random.Random(3)
    for name in ("Bob.Members.Example.", "k.x.", "d-1.alice.members.example."):
        key = TsigKey(dns.name.from_text(name), HMAC_SHA256, rng.randbytes(32),
                      dns.name.from_text("members.example."))  # fmt: skip
        kw = KeyWire(key)
        for _ in range(20):
            msg = rng.randbytes(12 + rng.randrange(200))
            t = rng.randrange(1 << 40)
            req = rng.choice([None, rng.randbytes(32)])
            assert kw.sign(msg, time_signed=t, fudge=300, request_mac=req) == sign(
                msg, key, time_signed=t, fudge=300, request_mac=req
            )
            other = rng.randbytes(rng.choice([0, 6]))
            err = rng.choice([0, 16, 18])
            assert kw.mac(msg, original_id=7, time_signed=t, fudge=5, error=err, other=other,
                          request_mac=req) == compute_mac(
                key, msg, original_id=7, time_signed=t, fudge=5, error=err, other=other,
                request_mac=req,
            )  # fmt: skip


def test_event_template_patches_id_and_option_only() -> None:
    msg = dns.message.Message(id=0)
    msg.flags = dns.flags.QR | dns.flags.AA
    msg.use_edns(0, 0, 1232, options=[LLQOption(LLQOpcode.EVENT)])
    t = EventTemplate.of(msg.to_wire())
    msg.id = 0xBEEF
    msg.use_edns(0, 0, 1232, options=[LLQOption(LLQOpcode.EVENT, 0, 1 << 60, 3600)])
    assert t.event(0xBEEF, 1 << 60, 3600) == msg.to_wire()
    assert llq_option_data(3, 0, 5, 6) == LLQOption(3, 0, 5, 6).data()
    with pytest.raises(ValueError):
        EventTemplate.of(msg.to_wire())  # the option is not the zero one


def _client_ack(lab: Lab, c: LLQClient, event: bytes) -> bytes:
    """The acknowledgement the real client sends for ``event``."""
    (out,) = [o for o in c.receive(event, lab.now) if isinstance(o, Send)]
    return out.wire


def _dnspython_ack(event: bytes, **edit: object) -> dns.message.Message:
    ev = dns.message.from_wire(event, keyring=False)
    (opt,) = find_llq(ev.options)
    ack = dns.message.Message(id=ev.id)
    ack.flags = dns.flags.QR
    ack.question = ev.question
    options = edit.get("options", [LLQOption(LLQOpcode.EVENT, 0, opt.llq_id, opt.lease)])
    ack.use_edns(0, 0, 1232, options=options)
    return ack


def _signed(lab: Lab, msg: bytes, event: bytes, *, key: TsigKey | None = None,
            time_signed: int | None = None, request_mac: bytes | None = None,
            error: int = 0) -> bytes:  # fmt: skip
    ev = dns.message.from_wire(event, keyring=False)
    assert ev.tsig is not None
    k = key or lab.accounts["bob"].key
    return append_tsig(
        msg, key=k, key_name=k.name, algorithm=k.algorithm,
        request_mac=ev.tsig[0].mac if request_mac is None else request_mac,
        time_signed=int(lab.now) if time_signed is None else time_signed,
        fudge=300, error=error,
    )  # fmt: skip


def _acks(lab: Lab, c: LLQClient, event: bytes) -> dict[str, bytes]:
    """Acknowledgements of ``event``: the client's own and every way to get one wrong."""
    good = _client_ack(lab, c, event)
    plain = _dnspython_ack(event).to_wire()
    other = TsigKey(lab.accounts["bob"].key.name, HMAC_SHA256, b"x" * 32,
                    lab.accounts["bob"].key.zone)  # fmt: skip
    alice = lab.accounts["alice"].key if "alice" in lab.accounts else other
    (ev_id,) = struct.unpack("!H", event[:2])
    upper = good.replace(b"\x03bob", b"\x03BOB")
    cases = {
        "good": good,
        "unsigned": plain,
        "signed_by_hand": _signed(lab, plain, event),
        "forged_mac": good[:-8] + bytes(b ^ 0xFF for b in good[-8:-6]) + good[-6:],
        "wrong_secret": _signed(lab, plain, event, key=other),
        "another_users_key": _signed(lab, plain, event, key=alice),
        "old_time": _signed(lab, plain, event, time_signed=int(lab.now) - 1000),
        "not_a_response_to_this_event": _signed(lab, plain, event, request_mac=b"\0" * 32),
        "tsig_error_set": _signed(lab, plain, event, error=16),
        "replayed_with_another_id": struct.pack("!H", (ev_id + 1) & 0xFFFF) + good[2:],
        "upper_case_names": upper,
        "trailing_junk": good + b"\0",
        "empty": b"",
        "header_only": good[:12],
        "opcode_update": good[:2] + bytes([good[2] | 0x28]) + good[3:],
        "two_llq_options": _signed(
            lab, _dnspython_ack(event, options=[LLQOption(3, 0, 1, 1)] * 2).to_wire(), event
        ),
        "malformed_llq": _signed(
            lab, _dnspython_ack(event, options=[LLQOption(0, raw=b"\1\2\3")]).to_wire(), event
        ),
        "wrong_opcode": _signed(
            lab,
            _dnspython_ack(event, options=[LLQOption(LLQOpcode.REFRESH, 0, c.llq_id, 1)]).to_wire(),
            event,
        ),
        "unknown_llq": _signed(
            lab,
            _dnspython_ack(event, options=[LLQOption(LLQOpcode.EVENT, 0, 12345, 1)]).to_wire(),
            event,
        ),
        "pointer_loop": good[:12] + b"\xc0\x0c" + good[-30:],
    }
    for cut in (1, 2, 5, 11, 13, 20, 30, 40, 60, len(good) - 40, len(good) - 7, len(good) - 1):
        cases[f"truncated_{cut}"] = good[:cut]
    rng = random.Random(9)
    for i in range(60):
        b = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cases[f"flipped_{i}"] = bytes(b)
    return cases


def test_every_acknowledgement_has_the_same_effect_on_both_paths() -> None:
    fast, slow = twin_labs()
    c_fast, ev_fast = held_event(fast)
    _, ev_slow = held_event(slow)
    assert ev_fast == ev_slow
    names = list(_acks(fast, c_fast, ev_fast))
    decided = set()
    for name in names:
        results = []
        for lab in twin_labs():
            c, ev = held_event(lab)
            wire = _acks(lab, c, ev)[name]
            out = lab.llq.receive_response(wire, lab.now, Transport.UDP, PEER)
            results.append(
                (
                    [o.wire for o in out],
                    dict(lab.llq.stats),
                    lab.llq.llqs[c.llq_id].inflight is None,
                )
            )
        assert results[0] == results[1], name
        if results[0][2]:
            decided.add(name)
    # the genuine acknowledgements count, and none of the made-up ones (a random byte flip
    # may hit a byte the MAC does not cover, e.g. the case of the key name: then both agree)
    assert {"good", "signed_by_hand"} <= decided
    assert not decided & {n for n in names if not n.startswith(("good", "signed", "flipped"))}


def test_parse_ack_reads_as_dnspython_or_leaves_it_to_dnspython() -> None:
    lab = Lab.make()
    c, ev = held_event(lab)
    fast_read = 0
    for name, wire in _acks(lab, c, ev).items():
        got = parse_ack(wire)
        if got is not None:
            fast_read += 1
            assert got == LLQServer._ack_of(wire), name
    assert fast_read >= 8  # the usual shapes do take the fast path
    assert parse_ack(_client_ack(lab, c, ev)) is not None


@pytest.mark.parametrize(
    "text",
    ["LapTop.Bob.Members.Example.", "a.b.", ".", "X\\065y.\\090z.example.", "\\@Q\\.r.EXAMPLE."],
)
def test_canonical_is_the_bytes_of_dnspython_canonical_form(text: str) -> None:
    from btmm_core.llq.fastwire import canonical

    name = dns.name.from_text(text)
    assert canonical(name) == name.canonicalize().to_wire()


def test_canonical_of_random_binary_labels() -> None:
    from btmm_core.llq.fastwire import canonical

    rng = random.Random(11)
    for _ in range(300):
        labels = [rng.randbytes(rng.randrange(1, 63)) for _ in range(rng.randrange(1, 4))]
        name = dns.name.Name([*labels, b""])
        assert canonical(name) == name.canonicalize().to_wire()


def test_event_ids_are_the_generators_draws_in_batches() -> None:
    """Ids come 512 at a time from the injected generator, in order, on both paths."""
    fast, slow = twin_labs()
    draws = random.Random(77)
    expected = b"".join(draws.getrandbits(16 * 512).to_bytes(1024, "big") for _ in range(3))
    for lab in (fast, slow):
        lab.llq._rng = random.Random(77)
        got = [lab.llq._msg_id() for _ in range(1536)]
        assert got == [int.from_bytes(expected[i : i + 2], "big") for i in range(0, 3072, 2)]
    assert len(set(got)) > 1400  # 1536 draws of 16 bits: a few repeats, no pattern


def test_keys_are_prepared_at_setup_not_when_the_events_go_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fan-out to new LLQs prepares no key: setup did (each cost ~100 us of dnspython
    names and an HMAC state while every other watcher waited)."""
    import btmm_core.llq.server as server

    lab = Lab.make(seed=5)
    for i in range(1, 4):
        lab.client(f"127.0.0.{i}#4000{i}", seed=10 + i)
    key = lab.accounts["bob"].key
    assert lab.llq._key_wires[canonical_of(key.name)][0].key is key
    made: list[TsigKey] = []

    class Counting(KeyWire):
        def __init__(self, k: TsigKey) -> None:
            made.append(k)
            super().__init__(k)

    monkeypatch.setattr(server, "KeyWire", Counting)
    lab.signed_update(update("laptop", "AAAA", add=("fd00::9",)))
    assert lab.llq.stats["events"] == 3
    assert all(c.state.name == "ESTABLISHED" for c in lab.clients.values())
    assert [ch.added for c in lab.changes.values() for ch in c][-1]  # delivered
    assert made == []


def canonical_of(name: dns.name.Name) -> bytes:
    return name.canonicalize().to_wire()
