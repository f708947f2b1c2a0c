"""Sans-I/O tests of the registry's message handler: queries, RFC 2136 UPDATE, strict TSIG
(RFC 8945), leases (RFC 9664), the RRset-changed hook. Everything on memory storage."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.update
import pytest
from registry_helpers import HMAC_MD5, ask, dnskey, make_core, parse, sign, tsig_error

from btmm_core.dns.edns import UpdateLeaseOption
from btmm_core.dns.tsig import TsigError
from btmm_core.registry.handler import Policy, Transport
from btmm_core.registry.model import Cause, RRsetChange
from btmm_core.registry.storage import MemoryStorage
from btmm_core.registry.update import NoLeasePolicy

NOW = 1_800_000_000.0
BOB = "bob.members.example."


def upd(zone: str = BOB) -> dns.update.UpdateMessage:
    return dns.update.UpdateMessage(zone)


def signed(core, accounts, msg, user="bob", now=NOW, **kw):  # type: ignore[no-untyped-def]
    return ask(core, sign(msg, accounts[user].key, int(now), **kw), now)


def query(name: str, rdtype: str = "AAAA") -> dns.message.Message:
    return dns.message.make_query(name, rdtype)


def snapshot(core) -> tuple[int, dict]:  # type: ignore[no-untyped-def]
    zone = core.store.zones[dns.name.from_text(BOB)]
    return zone.serial, {k: dict(v) for k, v in zone.rrsets.items()}


def test_add_then_signed_query_reads_it_back_and_serial_increases() -> None:
    core, acc = make_core()
    serial0, _ = snapshot(core)
    u = upd()
    u.add("laptop", 300, "AAAA", "fd00::1")
    r = signed(core, acc, u)
    assert r.rcode() == dns.rcode.NOERROR
    assert tsig_error(r) == 0 and len(r.tsig[0].mac) == 32
    serial1, _ = snapshot(core)
    assert serial1 == serial0 + 1
    r = signed(core, acc, query("laptop." + BOB))
    assert r.flags & dns.flags.AA
    assert [rd.to_text() for rd in r.answer[0]] == ["fd00::1"]


def test_signed_responses_verify_with_dnspython() -> None:
    core, acc = make_core()
    key = dnskey(acc["bob"])
    q = query("laptop." + BOB)
    q.use_tsig(key)
    wire = q.to_wire()
    # dnspython checks our MAC (and uses its own clock, so use the real time here).
    import time

    out = core.receive(wire, time.time(), Transport.UDP)
    assert out is not None
    r = dns.message.from_wire(out, keyring=key, request_mac=q.mac)
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert r.authority[0].rdtype == dns.rdatatype.SOA


def test_nxdomain_nodata_and_empty_non_terminal() -> None:
    core, acc = make_core()
    u = upd()
    u.add("_autotunnel._udp.laptop", 300, "SRV", "0 0 4500 laptop." + BOB)
    assert signed(core, acc, u).rcode() == dns.rcode.NOERROR
    r = signed(core, acc, query("nohost." + BOB))
    assert r.rcode() == dns.rcode.NXDOMAIN and r.authority[0].rdtype == dns.rdatatype.SOA
    r = signed(core, acc, query("_udp.laptop." + BOB, "SRV"))
    assert r.rcode() == dns.rcode.NOERROR and not r.answer  # empty non-terminal: NODATA
    r = signed(core, acc, query("_autotunnel._udp.laptop." + BOB, "TXT"))
    assert r.rcode() == dns.rcode.NOERROR and not r.answer and r.authority


def test_private_records_need_the_zone_owners_key_discovery_is_public() -> None:
    core, acc = make_core()
    u = upd()
    u.add("laptop", 300, "AAAA", "fd00::1")
    signed(core, acc, u)
    assert ask(core, query("laptop." + BOB).to_wire(), NOW).rcode() == dns.rcode.REFUSED
    r = signed(core, acc, query("laptop." + BOB), user="alice", now=NOW + 1)
    assert r.rcode() == dns.rcode.REFUSED
    for name in ("_dns-update._udp." + BOB, "_dns-llq._udp." + BOB):
        r = ask(core, query(name, "SRV").to_wire(), NOW)
        assert r.rcode() == dns.rcode.NOERROR
        srv = r.answer[0][0]
        assert srv.port == 5300 and srv.target == dns.name.from_text("ns.members.example.")
    r = ask(core, query(BOB, "SOA").to_wire(), NOW)
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
    r = ask(core, query("elsewhere.example.", "A").to_wire(), NOW)
    assert r.rcode() == dns.rcode.REFUSED and not r.flags & dns.flags.AA


def test_large_answer_truncated_over_udp_complete_over_tcp() -> None:
    core, acc = make_core()
    u = upd()
    for i in range(40):
        u.add("big", 300, "TXT", f'"{"x" * 40} {i}"')
    assert signed(core, acc, u).rcode() == dns.rcode.NOERROR
    q = query("big." + BOB, "TXT")
    r = ask(core, sign(q, acc["bob"].key, int(NOW) + 1), NOW + 1)
    assert r.flags & dns.flags.TC and not r.answer
    assert tsig_error(r) == 0 and r.tsig[0].mac  # still signed
    r = ask(core, sign(q, acc["bob"].key, int(NOW) + 2), NOW + 2, Transport.TCP)
    assert not r.flags & dns.flags.TC and len(r.answer[0]) == 40


@pytest.mark.parametrize(
    ("build", "rcode"),
    [
        (lambda u: u.present("nothere"), dns.rcode.NXDOMAIN),
        (lambda u: u.present("laptop", "TXT"), dns.rcode.NXRRSET),
        (lambda u: u.present("laptop", "AAAA", "fd00::9"), dns.rcode.NXRRSET),
        (lambda u: u.absent("laptop"), dns.rcode.YXDOMAIN),
        (lambda u: u.absent("laptop", "AAAA"), dns.rcode.YXRRSET),
        (lambda u: u.add("x.other.example.", 300, "A", "192.0.2.1"), dns.rcode.NOTZONE),
        (lambda u: u.present("x.other.example."), dns.rcode.NOTZONE),
        (lambda u: u.add("soa", 300, "NS", "ns.example."), dns.rcode.REFUSED),
        (lambda u: u.delete("_dns-update._udp", "SRV"), dns.rcode.REFUSED),
    ],
)
def test_update_rcodes_leave_the_zone_unchanged(build, rcode) -> None:  # type: ignore[no-untyped-def]
    core, acc = make_core()
    u = upd()
    u.add("laptop", 300, "AAAA", "fd00::1")
    signed(core, acc, u)
    before = snapshot(core)
    u = upd()
    build(u)
    u.add("sneaky", 300, "A", "192.0.2.7")
    r = signed(core, acc, u, now=NOW + 1)
    assert r.rcode() == rcode
    assert snapshot(core) == before


def test_prerequisites_that_hold_let_the_update_through() -> None:
    core, acc = make_core()
    u = upd()
    u.add("laptop", 300, "AAAA", "fd00::1")
    signed(core, acc, u)
    u = upd()
    u.present("laptop")
    u.present("laptop", "AAAA")
    u.present("laptop", "AAAA", "fd00::1")
    u.absent("desktop")
    u.absent("laptop", "TXT")
    u.replace("laptop", 300, "AAAA", "fd00::2")
    r = signed(core, acc, u, now=NOW + 1)
    assert r.rcode() == dns.rcode.NOERROR
    r = signed(core, acc, query("laptop." + BOB), now=NOW + 2)
    assert [rd.to_text() for rd in r.answer[0]] == ["fd00::2"]


def test_delete_rr_rrset_and_name_and_apex_records_survive() -> None:
    core, acc = make_core()
    u = upd()
    u.add("h", 300, "A", "192.0.2.1")
    u.add("h", 300, "A", "192.0.2.2")
    u.add("h", 300, "TXT", '"v=1"')
    u.add(BOB, 300, "TXT", '"apex"')
    signed(core, acc, u)
    u = upd()
    u.delete("h", "A", "192.0.2.1")
    signed(core, acc, u, now=NOW + 1)
    r = signed(core, acc, query("h." + BOB, "A"), now=NOW + 2)
    assert [rd.to_text() for rd in r.answer[0]] == ["192.0.2.2"]
    u = upd()
    u.delete("h", "A")
    signed(core, acc, u, now=NOW + 3)
    assert not signed(core, acc, query("h." + BOB, "A"), now=NOW + 4).answer
    u = upd()
    u.delete("h")
    u.delete(BOB)  # delete name at the apex: SOA and NS stay (RFC 2136 3.4.2.3)
    signed(core, acc, u, now=NOW + 5)
    assert signed(core, acc, query("h." + BOB, "TXT"), now=NOW + 6).rcode() == dns.rcode.NXDOMAIN
    r = signed(core, acc, query(BOB, "ANY"), now=NOW + 7)
    assert {rs.rdtype for rs in r.answer} == {dns.rdatatype.SOA, dns.rdatatype.NS}


def test_update_order_is_kept_delete_then_add() -> None:
    core, acc = make_core()
    u = upd()
    u.add("h", 300, "A", "192.0.2.1")
    u.delete("h", "A")
    u.add("h", 300, "A", "192.0.2.9")
    signed(core, acc, u)
    r = signed(core, acc, query("h." + BOB, "A"), now=NOW + 1)
    assert [rd.to_text() for rd in r.answer[0]] == ["192.0.2.9"]


def test_malformed_update_sections_are_formerr() -> None:
    core, acc = make_core()
    before = snapshot(core)
    u = upd()
    u.add("h", 300, "A", "192.0.2.1")
    u.question.append(u.question[0])  # two zone entries
    assert signed(core, acc, u).rcode() == dns.rcode.FORMERR
    u = upd()
    u.prerequisite.append(dns.rrset.from_text("h." + BOB, 300, "IN", "A", "192.0.2.1"))
    assert signed(core, acc, u, now=NOW + 1).rcode() == dns.rcode.FORMERR  # prereq TTL != 0
    assert snapshot(core) == before


def test_update_for_unknown_zone_is_notauth() -> None:
    core, acc = make_core()
    u = upd("nobody.members.example.")
    u.add("h", 300, "A", "192.0.2.1")
    assert signed(core, acc, u).rcode() == dns.rcode.NOTAUTH


# ---- policy ------------------------------------------------------------------------------


def test_bobs_key_cannot_touch_alices_zone_and_unsigned_is_refused() -> None:
    core, acc = make_core()
    alice = "alice.members.example."
    before = core.store.zones[dns.name.from_text(alice)].serial
    u = upd(alice)
    u.add("h", 300, "A", "192.0.2.1")
    assert signed(core, acc, u, user="bob").rcode() == dns.rcode.REFUSED
    assert ask(core, u.to_wire(), NOW).rcode() == dns.rcode.REFUSED
    zone = core.store.zones[dns.name.from_text(alice)]
    assert zone.serial == before and not zone.rrsets
    u = upd("members.example.")
    u.add("bob", 300, "A", "192.0.2.1")
    assert signed(core, acc, u, now=NOW + 1).rcode() == dns.rcode.REFUSED


# ---- TSIG ------------------------------------------------------------------------------------


def _attempt(core, acc, wire, now=NOW):  # type: ignore[no-untyped-def]
    before = snapshot(core)
    r = ask(core, wire, now)
    assert snapshot(core) == before, "a refused update changed the zone"
    return r


def _add() -> dns.update.UpdateMessage:
    u = upd()
    u.add("evil", 300, "A", "192.0.2.66")
    return u


def test_wrong_secret_is_badsig_unsigned() -> None:
    core, acc = make_core()
    k = acc["bob"].key
    forged = type(k)(k.name, k.algorithm, b"\x00" * 32, k.zone)
    r = _attempt(core, acc, sign(_add(), forged, int(NOW)))
    assert r.rcode() == dns.rcode.NOTAUTH and tsig_error(r) == TsigError.BADSIG
    assert r.tsig[0].mac == b""


def test_unknown_key_is_badkey_unsigned() -> None:
    core, acc = make_core()
    k = acc["bob"].key
    stranger = type(k)(
        dns.name.from_text("mallory.members.example."), k.algorithm, k.secret, k.zone
    )
    r = _attempt(core, acc, sign(_add(), stranger, int(NOW)))
    assert r.rcode() == dns.rcode.NOTAUTH and tsig_error(r) == TsigError.BADKEY
    assert r.tsig[0].mac == b""


def test_md5_signature_for_a_sha256_key_is_refused() -> None:
    core, acc = make_core()
    r = _attempt(core, acc, sign(_add(), acc["bob"].key, int(NOW), algorithm=HMAC_MD5))
    assert r.rcode() == dns.rcode.NOTAUTH and tsig_error(r) == TsigError.BADKEY


def test_legacy_md5_key_works_when_created_as_such() -> None:
    core, acc = make_core()
    u = upd("carol.members.example.")
    u.add("h", 300, "A", "192.0.2.1")
    r = signed(core, acc, u, user="carol")
    assert r.rcode() == dns.rcode.NOERROR and len(r.tsig[0].mac) == 16


@pytest.mark.parametrize("skew", [301, -301, 5000])
def test_clock_skew_beyond_300s_is_badtime_signed_with_server_time(skew: int) -> None:
    core, acc = make_core()
    r = _attempt(core, acc, sign(_add(), acc["bob"].key, int(NOW) + skew))
    assert r.rcode() == dns.rcode.NOTAUTH and tsig_error(r) == TsigError.BADTIME
    assert len(r.tsig[0].mac) == 32
    other = r.tsig[0].other
    assert struct.unpack("!HI", other) == (0, int(NOW))


def test_inflated_fudge_does_not_widen_the_window() -> None:
    core, acc = make_core()
    r = _attempt(core, acc, sign(_add(), acc["bob"].key, int(NOW) - 1000, fudge=3600))
    assert tsig_error(r) == TsigError.BADTIME


def test_server_fudge_is_configurable_down() -> None:
    core, acc = make_core(policy=Policy(fudge=10))
    r = _attempt(core, acc, sign(_add(), acc["bob"].key, int(NOW) - 11))
    assert tsig_error(r) == TsigError.BADTIME
    with pytest.raises(ValueError, match="fudge"):
        Policy(fudge=301)


def test_replayed_message_and_older_time_signed_are_refused() -> None:
    core, acc = make_core()
    wire = sign(_add(), acc["bob"].key, int(NOW))
    assert ask(core, wire, NOW).rcode() == dns.rcode.NOERROR
    u = upd()
    u.delete("evil")
    first = sign(u, acc["bob"].key, int(NOW) + 5)
    assert ask(core, first, NOW + 5).rcode() == dns.rcode.NOERROR
    r = _attempt(core, acc, wire, NOW + 6)  # replay of the add
    assert tsig_error(r) == TsigError.BADTIME
    older = sign(_add(), acc["bob"].key, int(NOW) + 1)  # fresh MAC, older time
    r = _attempt(core, acc, older, NOW + 6)
    assert tsig_error(r) == TsigError.BADTIME


@pytest.mark.parametrize(
    ("mac_len", "rcode", "error"),
    [
        (8, dns.rcode.FORMERR, None),
        (16, dns.rcode.NOTAUTH, TsigError.BADTRUNC),
        (0, dns.rcode.FORMERR, None),
    ],
)
def test_truncated_mac_is_refused(mac_len: int, rcode: int, error: int | None) -> None:
    core, acc = make_core()
    r = _attempt(core, acc, sign(_add(), acc["bob"].key, int(NOW), mac_len=mac_len))
    assert r.rcode() == rcode
    if error is not None:
        assert tsig_error(r) == error


def test_tsig_not_last_is_formerr() -> None:
    core, acc = make_core()
    wire = sign(_add(), acc["bob"].key, int(NOW))
    # Append a junk A RR after the TSIG: ARCOUNT + 1.
    rr = b"\x00" + struct.pack("!HHIH", 1, 1, 0, 4) + b"\xc0\x00\x02\x01"
    wire = wire[:10] + struct.pack("!H", 2) + wire[12:] + rr
    r = _attempt(core, acc, wire)
    assert r.rcode() == dns.rcode.FORMERR


# ---- leases ------------------------------------------------------------------------------------


def _leased(lease: int, key_lease: int | None = None) -> dns.update.UpdateMessage:
    u = upd()
    u.add("laptop", 60, "AAAA", "fd00::1")
    u.use_edns(0, 0, 1232, options=[UpdateLeaseOption(lease, key_lease)])
    return u


@pytest.mark.parametrize(("asked", "granted"), [(5, 30), (45, 45), (9999, 120)])
def test_lease_is_clamped_and_returned(asked: int, granted: int) -> None:
    core, acc = make_core(policy=Policy(lease_min=30, lease_max=120))
    r = signed(core, acc, _leased(asked))
    opts = [o for o in r.options if isinstance(o, UpdateLeaseOption)]
    assert len(opts) == 1 and opts[0].lease == granted and opts[0].key_lease is None


def test_eight_byte_lease_form_is_answered_in_kind() -> None:
    core, acc = make_core(policy=Policy(lease_min=30, lease_max=120))
    r = signed(core, acc, _leased(60, 500))
    (opt,) = [o for o in r.options if isinstance(o, UpdateLeaseOption)]
    assert (opt.lease, opt.key_lease) == (60, 120)


def test_malformed_lease_option_is_formerr() -> None:
    core, acc = make_core()
    u = upd()
    u.add("laptop", 60, "AAAA", "fd00::1")
    u.use_edns(0, 0, 1232, options=[dns.edns.GenericOption(2, b"\x00\x00\x01")])
    r = ask(core, sign(u, acc["bob"].key, int(NOW)), NOW)
    assert r.rcode() == dns.rcode.FORMERR


def test_expired_records_vanish_refreshed_stay_and_observers_hear() -> None:
    core, acc = make_core(policy=Policy(lease_min=10, lease_max=100))
    events: list[RRsetChange] = []
    core.store.add_observer(events.append)
    signed(core, acc, _leased(10))
    u = upd()
    u.add("desktop", 60, "AAAA", "fd00::2")
    u.use_edns(0, 0, 1232, options=[UpdateLeaseOption(10)])
    signed(core, acc, u, now=NOW + 1)
    serial = snapshot(core)[0]
    # Refresh the desktop only, at 80 % of its lease.
    signed(core, acc, u, now=NOW + 8)
    assert snapshot(core)[0] == serial, "a pure lease refresh must not bump the serial"
    assert core.next_deadline() == NOW + 10
    events.clear()
    assert core.tick(NOW + 10.5) == 1
    assert [(str(e.name), e.cause, e.removed[0].to_text()) for e in events] == [
        ("laptop." + BOB, Cause.EXPIRY, "fd00::1")
    ]
    assert snapshot(core)[0] == serial + 1
    r = signed(core, acc, query("laptop." + BOB), now=NOW + 11)
    assert r.rcode() == dns.rcode.NXDOMAIN
    r = signed(core, acc, query("desktop." + BOB), now=NOW + 12)
    assert r.answer
    core.tick(NOW + 18.5)
    assert signed(core, acc, query("desktop." + BOB), now=NOW + 19).rcode() == dns.rcode.NXDOMAIN


def test_updates_without_lease_follow_policy() -> None:
    core, acc = make_core(policy=Policy(no_lease=NoLeasePolicy.REFUSE))
    u = upd()
    u.add("h", 300, "A", "192.0.2.1")
    assert signed(core, acc, u).rcode() == dns.rcode.REFUSED
    core, acc = make_core(
        policy=Policy(lease_min=10, no_lease=NoLeasePolicy.DEFAULT_LEASE, default_lease=50)
    )
    assert signed(core, acc, u).rcode() == dns.rcode.NOERROR
    assert core.next_deadline() == NOW + 50
    core, acc = make_core()
    assert signed(core, acc, u).rcode() == dns.rcode.NOERROR
    assert core.next_deadline() is None


def test_update_events_report_added_and_removed() -> None:
    core, acc = make_core()
    events: list[RRsetChange] = []
    core.store.add_observer(events.append)
    u = upd()
    u.add("h", 300, "A", "192.0.2.1")
    signed(core, acc, u)
    u = upd()
    u.replace("h", 300, "A", "192.0.2.2")
    signed(core, acc, u, now=NOW + 1)
    assert [
        (e.cause, [a.to_text() for a in e.added], [r.to_text() for r in e.removed]) for e in events
    ] == [
        (Cause.UPDATE, ["192.0.2.1"], []),
        (Cause.UPDATE, ["192.0.2.2"], ["192.0.2.1"]),
    ]


def test_failed_commit_is_servfail_and_memory_unchanged() -> None:
    class Broken(MemoryStorage):
        fail = False

        def commit(self, change):  # type: ignore[no-untyped-def]
            if self.fail:
                raise OSError("disk full")
            super().commit(change)

    storage = Broken()
    core, acc = make_core(storage)
    storage.fail = True
    before = snapshot(core)
    u = upd()
    u.add("h", 300, "A", "192.0.2.1")
    assert signed(core, acc, u).rcode() == dns.rcode.SERVFAIL
    assert snapshot(core) == before


# ---- bad input ---------------------------------------------------------------------------------


def test_short_and_garbage_messages() -> None:
    core, _ = make_core()
    assert core.receive(b"\x01\x02", NOW, Transport.UDP) is None
    r = parse(
        core.receive(b"\x12\x34" + b"\x01\x00" + b"\x00\x01" * 4 + b"\xff" * 20, NOW, Transport.UDP)
    )
    assert r.id == 0x1234 and r.rcode() == dns.rcode.FORMERR


def test_compression_loop_is_formerr() -> None:
    core, _ = make_core()
    wire = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    assert parse(core.receive(wire, NOW, Transport.UDP)).rcode() == dns.rcode.FORMERR


def test_responses_are_not_answered_and_edns_version_1_is_badvers() -> None:
    core, _ = make_core()
    q = query(BOB, "SOA")
    q.flags |= dns.flags.QR
    assert core.receive(q.to_wire(), NOW, Transport.UDP) is None
    q = query(BOB, "SOA")
    q.use_edns(1)
    r = parse(core.receive(q.to_wire(), NOW, Transport.UDP))
    assert r.rcode() == dns.rcode.BADVERS


def test_option_handler_hook_can_take_over_a_request() -> None:
    core, _ = make_core()
    seen = []

    def llq(ctx):  # type: ignore[no-untyped-def]
        seen.append(ctx.transport)
        resp = ctx.core.answer(ctx.request, ctx.key)
        resp.use_edns(0, 0, 1232, options=[dns.edns.GenericOption(1, b"\x00" * 18)])
        return resp

    core.option_handlers[1] = llq
    q = query("_dns-llq._udp." + BOB, "SRV")
    q.use_edns(0, 0, 1232, options=[dns.edns.GenericOption(1, b"\x00" * 18)])
    r = parse(core.receive(q.to_wire(), NOW, Transport.UDP))
    assert seen == [Transport.UDP] and r.answer and r.options[0].otype == 1


def test_a_plugin_cannot_take_an_edns_option_that_is_taken() -> None:
    from btmm_core.dns.enrol import ENROL_CODE

    class Taker:
        option_codes = (ENROL_CODE,)

    core, _ = make_core()
    with pytest.raises(ValueError, match="taken already"):
        core.plug(Taker())  # type: ignore[arg-type]
    assert not core.plugins
