"""Bounds on UPDATE work (issue 11 item 5): planning is linear, an oversized update is refused
before it is parsed or planned, and each key has a budget of RRs per second. Sans-I/O; the
work is counted in executed lines of update.py, never timed."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import dns.message
import dns.name
import dns.rcode
import dns.tsig
import dns.update
import pytest
from registry_helpers import NS, PARENT, ask, dnskey, make_core, sign

import btmm_core.registry.handler as handler_mod
import btmm_core.registry.update as update_mod
from btmm_core.registry.accounts import add_user
from btmm_core.registry.handler import Policy, RegistryCore, Transport
from btmm_core.registry.limits import KeyBudget, UpdateLimits
from btmm_core.registry.storage import MemoryStorage
from btmm_core.registry.update import Grant, plan_update
from btmm_core.registry.zones import ZoneConfig, ZoneStore

NOW = 1_800_000_000.0
BOB = "bob.members.example."


def _names(n: int) -> dns.update.UpdateMessage:
    u = dns.update.UpdateMessage(BOB)
    for i in range(n):
        u.add(f"h{i}", 300, "A", f"10.0.{i >> 8}.{i & 255}")
    return u


def _one_rrset(n: int) -> dns.update.UpdateMessage:
    u = dns.update.UpdateMessage(BOB)
    for i in range(n):
        # each add with a new TTL: the RRset's TTL follows the newest add
        u.add("many", 300 + i % 2, "A", f"10.0.{i >> 8}.{i & 255}")
    return u


def _lines_planning(build: Callable[[int], dns.update.UpdateMessage], n: int) -> int:
    """Lines of update.py executed while planning an update of ``n`` RRs."""
    core, _ = make_core()
    zone = core.store.zones[dns.name.from_text(BOB)]
    request = dns.message.from_wire(build(n).to_wire(), one_rr_per_rrset=True)
    count = 0
    target = update_mod.__file__

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if frame.f_code.co_filename != target:
            return None
        if event == "line":
            count += 1
        return trace

    sys.settrace(trace)
    try:
        outcome = plan_update(zone, request, now=NOW, grant=Grant(None, None))
    finally:
        sys.settrace(None)
    assert outcome.rcode == dns.rcode.NOERROR
    assert outcome.change is not None and len(outcome.change.upserts) == n
    return count


@pytest.mark.parametrize("build", [_names, _one_rrset], ids=["names", "one-rrset"])
def test_planning_work_grows_linearly_with_the_rrs(build: Callable[[int], Any]) -> None:
    small = _lines_planning(build, 250)
    large = _lines_planning(build, 1000)
    # 4x the RRs: linear work is ~4x, the old quadratic planning was ~16x
    assert large < 5 * small, (small, large)
    assert large < 60 * 1000


def _signed(core: RegistryCore, key: Any, msg: dns.message.Message, now: float) -> Any:
    return ask(core, sign(msg, key, int(now)), now, Transport.TCP)


def test_a_64k_update_is_refused_from_its_header_before_planning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    core, acc = make_core()
    before = dict(core.store.zones[dns.name.from_text(BOB)].rrsets)

    def must_not_plan(*a: Any, **kw: Any) -> Any:
        raise AssertionError("an oversized update reached planning")

    monkeypatch.setattr(handler_mod, "plan_update", must_not_plan)
    u = _names(3000)
    wire = sign(u, acc["bob"].key, int(NOW))
    assert len(wire) > 50000
    r = ask(core, wire, NOW, Transport.TCP)
    assert r.rcode() == dns.rcode.REFUSED
    assert core.updates_over_limit == 1
    assert core.store.zones[dns.name.from_text(BOB)].rrsets == before


def test_the_early_refusal_is_signed_and_verifies_with_dnspython(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    core, acc = make_core()
    # the early refusal never parses the whole message
    real = dns.message.from_wire

    def no_full_parse(wire: bytes, *a: Any, **kw: Any) -> Any:
        assert len(wire) < 10000, "an oversized update was parsed"
        return real(wire, *a, **kw)

    monkeypatch.setattr(dns.message, "from_wire", no_full_parse)
    key = dnskey(acc["bob"])
    u = _names(3000)
    u.use_tsig(key)
    wire = u.to_wire()
    now = time.time()  # dnspython checks the MAC with its own clock
    out = core.receive(wire, now, Transport.TCP, "test")
    assert out is not None
    r = real(out, keyring=key, request_mac=u.mac)
    assert r.rcode() == dns.rcode.REFUSED and r.had_tsig
    assert u.is_response(r)
    # a forged signature gets an unsigned refusal
    forged = _names(3000)
    forged.use_tsig(dns.tsig.Key(key.name, b"\x07" * 32, key.algorithm))
    bad = forged.to_wire()
    r = real(core.receive(bad, now, Transport.TCP, "test") or b"", keyring=False)
    assert r.rcode() == dns.rcode.REFUSED and not r.had_tsig
    # garbage after a big header is FORMERR, never a crash
    junk = wire[:4] + b"\x00\x01\x00\x00\x0f\xff\x00\x01" + bytes(20)
    r = real(core.receive(junk, now, Transport.TCP, "test") or b"", keyring=False)
    assert r.rcode() in (dns.rcode.FORMERR, dns.rcode.REFUSED)
    assert core.updates_over_limit == 3


def test_per_message_limit_is_configurable_and_exact() -> None:
    core, acc = make_core(policy=Policy(update_limits=UpdateLimits(max_rrs=10)))
    u = _names(9)
    u.absent("nothere")  # prerequisites count too
    assert _signed(core, acc["bob"].key, u, NOW).rcode() == dns.rcode.NOERROR
    u = _names(10)
    u.absent("nothere")
    assert _signed(core, acc["bob"].key, u, NOW + 1).rcode() == dns.rcode.REFUSED
    assert core.updates_over_limit == 1


def test_adds_beyond_the_zone_limit_are_refused_before_planning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = MemoryStorage()
    storage.ensure_zone(PARENT, None)
    bob = add_user(storage, "bob", PARENT, legacy=False)
    store = ZoneStore(storage, ZoneConfig(PARENT, NS, ("192.0.2.53",), 53, max_records=20))
    core = RegistryCore(store)
    monkeypatch.setattr(handler_mod, "plan_update", lambda *a, **kw: pytest.fail("planned"))
    r = _signed(core, bob.key, _names(21), NOW)
    assert r.rcode() == dns.rcode.REFUSED
    assert core.updates_over_limit == 1


def test_each_key_has_a_budget_of_rrs_per_second() -> None:
    limits = UpdateLimits(max_rrs=10, key_rate=5.0, key_burst=20)
    core, acc = make_core(policy=Policy(update_limits=limits))
    bob, alice = acc["bob"].key, acc["alice"].key
    assert _signed(core, bob, _names(10), NOW).rcode() == dns.rcode.NOERROR
    assert _signed(core, bob, _names(10), NOW).rcode() == dns.rcode.NOERROR
    # the bucket is empty: even one RR is refused, and nothing changes
    one = dns.update.UpdateMessage(BOB)
    one.add("late", 300, "A", "192.0.2.9")
    assert _signed(core, bob, one, NOW).rcode() == dns.rcode.REFUSED
    assert core.updates_over_limit == 1
    assert (dns.name.from_text("late." + BOB), 1) not in core.store.zones[
        dns.name.from_text(BOB)
    ].rrsets
    # another key has its own budget
    other = dns.update.UpdateMessage("alice.members.example.")
    other.add("x", 300, "A", "192.0.2.1")
    assert _signed(core, alice, other, NOW).rcode() == dns.rcode.NOERROR
    # one second later five RRs' worth came back
    assert _signed(core, bob, one, NOW + 1).rcode() == dns.rcode.NOERROR
    assert _signed(core, bob, _names(5), NOW + 1).rcode() == dns.rcode.REFUSED
    assert _signed(core, bob, _names(4), NOW + 1).rcode() == dns.rcode.NOERROR


def test_key_budget_refills_caps_and_forgets_idle_keys() -> None:
    b = KeyBudget(rate=10.0, burst=100)
    k = dns.name.from_text("k.example.")
    assert b.take(k, 100, 0.0)
    assert not b.take(k, 1, 0.0)
    assert b.take(k, 50, 5.0)
    assert b.level(k, 1000.0) == 100.0
    b.MAX_TRACKED = 2
    others = [dns.name.from_text(f"o{i}.example.") for i in range(3)]
    for i, o in enumerate(others):
        assert b.take(o, 1, 2000.0 + i)
    assert len(b._buckets) <= 3
    assert KeyBudget(rate=0.0, burst=1).take(k, 10**6, 0.0)


@pytest.mark.parametrize(
    "kw",
    [{"max_rrs": 0}, {"key_rate": -1.0}, {"max_rrs": 100, "key_burst": 50}],
)
def test_update_limits_refuse_nonsense(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        UpdateLimits(**kw)
