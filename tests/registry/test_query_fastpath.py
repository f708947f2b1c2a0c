"""The signed-query fast path (``RegistryCore._cached`` with ``RawKey``): a signed query for a
cached answer is verified and signed on bytes, and every answer, good or refused, is the full
path's byte for byte, for good, replayed, forged, truncated, mistimed and malformed queries."""

from __future__ import annotations

import random
import struct

import dns.message
import dns.name
import dns.update
import pytest
from registry_helpers import make_core, sign

from btmm_core.dns.fastpath import scan
from btmm_core.dns.tsig import HMAC_MD5, HMAC_SHA256, TsigKey, compute_mac, tsig_rr
from btmm_core.registry.handler import RegistryCore, Transport
from btmm_core.registry.model import Account
from btmm_core.registry.storage import MemoryStorage

NOW = 1_800_000_000
ZONES = {"bob": "bob.members.example.", "carol": "carol.members.example."}
NAMES = ("laptop", "desk", "nothere", "_dns-update._udp", "")


def _pair() -> tuple[RegistryCore, RegistryCore, dict[str, Account]]:
    """Two cores with the same keys and zones: ``fast`` with the answer cache, ``slow``
    without it (every message through dnspython)."""
    fast, accounts = make_core(MemoryStorage())
    slow, _ = make_core(MemoryStorage())
    slow.store.keys = dict(fast.store.keys)
    slow.answer_cache_size = 0
    for user, zone in ZONES.items():
        u = dns.update.UpdateMessage(zone)
        # one record per RRset: nothing for dnspython to shuffle, so bytes compare exactly
        u.add("laptop", 300, "AAAA", "fd00::1")
        u.add("desk", 300, "A", "192.0.2.7")
        wire = sign(u, accounts[user].key, NOW - 10)
        for core in (fast, slow):
            assert core.receive(wire, NOW - 10, Transport.UDP) is not None
    return fast, slow, accounts


def _query(user: str, name: str, rdtype: str, qid: int, edns: bool) -> dns.message.Message:
    zone = ZONES[user]
    q = dns.message.make_query(f"{name}.{zone}" if name else zone, rdtype, use_edns=edns)
    q.id = qid
    return q


def _signed(
    q: dns.message.Message, key: TsigKey, t: int, *, other: bytes = b"", error: int = 0,
    key_name: dns.name.Name | None = None, algorithm: dns.name.Name | None = None,
    mac_len: int | None = None, secret: bytes | None = None,
) -> bytes:
    """``q`` signed with everything chosen (an error or Other Data a client would not send)."""
    wire = q.to_wire()
    name = key_name or key.name
    alg = algorithm or key.algorithm
    signing = TsigKey(name, key.algorithm, secret or key.secret, key.zone)
    mac = compute_mac(signing, wire, original_id=q.id, time_signed=t, fudge=300, error=error,
                      other=other, request_mac=None)[: mac_len or 64]
    rr = tsig_rr(name, alg, time_signed=t, fudge=300, mac=mac, original_id=q.id, error=error,
                 other=other)
    (ar,) = struct.unpack("!H", wire[10:12])
    return wire[:10] + struct.pack("!H", ar + 1) + wire[12:] + rr


def _same(fast: RegistryCore, slow: RegistryCore, wire: bytes, now: float,
          transport: Transport = Transport.UDP) -> bytes | None:
    a = fast.receive(wire, now, transport, "peer")
    b = slow.receive(wire, now, transport, "peer")
    assert a == b, f"fast and full paths differ for {wire.hex()}"
    return a


def _variants(q: dns.message.Message, key: TsigKey, t: int) -> list[tuple[str, bytes]]:
    good = _signed(q, key, t)
    upper = dns.name.from_text(key.name.to_text().upper())
    other_alg = HMAC_MD5 if key.algorithm == HMAC_SHA256 else HMAC_SHA256
    forged = bytearray(good)
    forged[-10] ^= 0x40  # inside the MAC
    return [
        ("good", good),
        ("replayed", good),
        ("older time", _signed(q, key, t - 1)),
        ("key name in upper case", _signed(q, key, t + 1, key_name=upper)),
        ("other data", _signed(q, key, t + 1, other=b"\x00\x01\x02")),
        ("error set", _signed(q, key, t + 1, error=18)),
        ("forged MAC", bytes(forged)),
        ("wrong secret", _signed(q, key, t + 1, secret=b"\x07" * 32)),
        ("truncated MAC", _signed(q, key, t + 1, mac_len=len(key.secret) // 2 + 6)),
        ("too short MAC", _signed(q, key, t + 1, mac_len=8)),
        ("unknown key", _signed(q, key, t + 1, key_name=dns.name.from_text("nobody.example."))),
        ("other algorithm", _signed(q, key, t + 1, algorithm=other_alg)),
        ("too early", _signed(q, key, t + 400)),
        ("too late", _signed(q, key, t - 400)),
        ("later good", _signed(q, key, t + 2)),
    ]


@pytest.mark.parametrize("transport", [Transport.UDP, Transport.TCP])
def test_fast_answers_equal_full_path_byte_for_byte(transport: Transport) -> None:
    fast, slow, accounts = _pair()
    t = NOW
    qid = 1
    for user in ("bob", "carol"):  # carol's key is hmac-md5
        key = accounts[user].key
        for name in NAMES:
            for rdtype in ("AAAA", "A", "SOA", "TXT"):
                for edns in (False, True):
                    q = _query(user, name, rdtype, qid, edns)
                    qid += 1
                    t += 5
                    # the first one fills the cache (full path in both)
                    _same(fast, slow, _signed(q, key, t), t, transport)
                    for _, wire in _variants(q, key, t + 1):
                        _same(fast, slow, wire, t + 1, transport)
                    # another signer's query of the same name: never the cached answer
                    other = accounts["alice"].key
                    _same(fast, slow, _signed(q, other, t + 3), t + 3, transport)
                    t += 5
    # the good variants ("good", "key name in upper case", "other data", "later good") came
    # from the cache: 4 per query; error set is accepted too (the request's error is not
    # checked, RFC 8945 5.2), so 5
    assert fast.cached_answers == 5 * 2 * len(NAMES) * 4 * 2


def test_malformed_and_cut_queries_equal_full_path() -> None:
    fast, slow, accounts = _pair()
    key = accounts["bob"].key
    rng = random.Random(17)
    t = NOW
    q = _query("bob", "laptop", "AAAA", 7, True)
    _same(fast, slow, _signed(q, key, t), t)
    for i in range(1200):
        t += 1
        wire = bytearray(_signed(q, key, t))
        kind = i % 3
        if kind == 0:  # cut anywhere
            wire = wire[: rng.randrange(len(wire))]
        elif kind == 1:  # one byte changed anywhere
            p = rng.randrange(len(wire))
            wire[p] = rng.randrange(256)
        else:  # a few bytes appended or a length field broken
            wire += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4)))
        _same(fast, slow, bytes(wire), t)
    # and the good query still comes from the cache afterwards
    before = fast.cached_answers
    t += 1
    assert _same(fast, slow, _signed(q, key, t), t) is not None
    assert fast.cached_answers == before + 1


def test_a_change_of_keys_is_seen_by_the_fast_path() -> None:
    fast, _, accounts = _pair()
    key = accounts["bob"].key
    q = _query("bob", "laptop", "AAAA", 9, False)
    assert fast.receive(_signed(q, key, NOW), NOW, Transport.UDP) is not None
    hit = fast.receive(_signed(q, key, NOW + 1), NOW + 1, Transport.UDP)
    assert hit is not None and fast.cached_answers == 1
    # the key goes (as a rotation elsewhere would do): the fast path must not use it
    fast.store.keys = {n: k for n, k in fast.store.keys.items() if n != key.name}
    reply = fast.receive(_signed(q, key, NOW + 2), NOW + 2, Transport.UDP)
    msg = dns.message.from_wire(reply, keyring=False)
    assert msg.rcode() == dns.rcode.NOTAUTH and msg.tsig is not None
    assert msg.tsig[0].error == 17  # BADKEY
    assert fast.cached_answers == 1


def test_scan_keeps_the_tsig_as_sent() -> None:
    _, _, accounts = _pair()
    key = accounts["bob"].key
    q = _query("bob", "laptop", "AAAA", 3, False)
    upper = dns.name.from_text("BOB.members.example.")
    wire = _signed(q, key, NOW, key_name=upper)
    plain = scan(wire, False)
    assert plain is not None and plain.tsig is not None
    assert plain.tsig.key_wire == upper.to_wire()
    record = plain.tsig.record()
    assert record.key_name == key.name and record.time_signed == NOW
    # the cache key names the signer whatever its spelling
    assert plain.key == scan(_signed(q, key, NOW), False).key  # type: ignore[union-attr]
