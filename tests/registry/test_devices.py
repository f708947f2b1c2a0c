"""One key per device (issue 11 item 2), sans-I/O against the registry core: enrolment over the
wire (X25519 + HKDF inside a signed UPDATE), per-device authority, invites, revocation, and the
per-key replay rule that no longer lets one host's clock lock out another."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.update
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from registry_helpers import PARENT, make_core, parse, sign, tsig_error

from btmm_core.dns.edns import UpdateLeaseOption
from btmm_core.dns.enrol import EnrolClient
from btmm_core.dns.llq_option import LLQError, LLQOpcode, LLQOption, find_llq
from btmm_core.dns.tsig import KeyRole, TsigError, TsigKey
from btmm_core.llq.server import LLQConfig, LLQServer
from btmm_core.registry.devices import list_devices, make_invite
from btmm_core.registry.handler import RegistryCore, Transport
from btmm_core.registry.model import RRsetChange
from btmm_core.registry.storage import Storage, StorageError
from btmm_core.registry.zones import ZoneConfig, ZoneStore

BOB = dns.name.from_text("bob.members.example.")
NS = dns.name.from_text("ns.members.example.")
BROWSE = dns.name.from_text("_autotunnel._udp.bob.members.example.")


def enrol(
    core: RegistryCore, signer: TsigKey, device: str, now: float, *, replace: bool = False,
    private: X25519PrivateKey | None = None,
) -> tuple[TsigKey | None, dns.message.Message, bytes, bytes]:
    """Enrol ``device`` with ``signer``: (device key or None, answer, request and answer wire)."""
    client = EnrolClient(BOB, device, replace=replace, private=private)
    wire = sign(client.request(), signer, int(now))
    mac = parse(wire).tsig[0].mac  # type: ignore[index]
    out = core.receive(wire, now, Transport.UDP, "test")
    assert out is not None
    answer = parse(out)
    if answer.rcode() != dns.rcode.NOERROR or answer.tsig is None or tsig_error(answer):
        return None, answer, wire, out
    return client.finish(answer, mac), answer, wire, out


def publish(device: str, at: str = "fd00::1") -> dns.update.UpdateMessage:
    """What a host publishes (records.py): its names, its browse PTR, its tunnel endpoint."""
    u = dns.update.UpdateMessage(BOB)
    host = f"{device}.bob.members.example."
    u.add(host, 60, "AAAA", at)
    u.add(BROWSE, 60, "PTR", host)
    u.add(f"_autotunnel._udp.{host}", 60, "SRV", f"0 0 4500 AutoTunnel-{device}-01.{BOB}")
    u.add(f"AutoTunnel-{device}-01.{BOB}", 60, "A", "203.0.113.9")
    u.use_edns(0, options=[UpdateLeaseOption(3600)])
    return u


def rcode(core: RegistryCore, msg: dns.message.Message, key: TsigKey, t: float,
          now: float) -> tuple[int, int]:
    out = parse(core.receive(sign(msg, key, int(t)), now, Transport.UDP, "test"))
    return out.rcode(), (tsig_error(out) if out.tsig is not None else 0)


def names(core: RegistryCore) -> set[tuple[str, int]]:
    zone = core.store.zones[BOB]
    return {(n.to_text(), t) for (n, t) in zone.rrsets}


def test_two_devices_one_clock_behind_the_other_still_updates() -> None:
    core, accounts = make_core()
    now = time.time()
    bob = accounts["bob"].key
    a, *_ = enrol(core, bob, "desktop", now)
    b, *_ = enrol(core, bob, "laptop", now + 1)
    assert a is not None and b is not None and a.name != b.name
    # the desktop signs one request stamped now+299 (in the fudge, so accepted) ...
    assert rcode(core, publish("desktop"), a, now + 299, now + 2) == (dns.rcode.NOERROR, 0)
    # ... and the laptop, whose clock is a second behind, still updates and reads
    assert rcode(core, publish("laptop"), b, now + 1, now + 2) == (dns.rcode.NOERROR, 0)
    q = dns.message.make_query(f"desktop.{BOB}", "AAAA")
    assert rcode(core, q, b, now + 1, now + 2) == (dns.rcode.NOERROR, 0)
    # the strict per-key rule stays: with ONE shared key the same two requests lock out the
    # second host (BADTIME), which is what every host of an account suffered before
    core2, accounts2 = make_core()
    shared = accounts2["bob"].key
    assert rcode(core2, publish("desktop"), shared, now + 299, now + 2) == (dns.rcode.NOERROR, 0)
    assert rcode(core2, publish("laptop"), shared, now + 1, now + 2) == (
        dns.rcode.NOTAUTH, TsigError.BADTIME)


def test_a_device_changes_only_its_own_names() -> None:
    core, accounts = make_core()
    now = time.time()
    bob = accounts["bob"].key
    a, *_ = enrol(core, bob, "desktop", now)
    b, *_ = enrol(core, bob, "laptop", now)
    assert a is not None and b is not None
    assert rcode(core, publish("desktop"), a, now, now)[0] == dns.rcode.NOERROR
    assert rcode(core, publish("laptop"), b, now, now)[0] == dns.rcode.NOERROR
    before = names(core)
    laptop = f"laptop.{BOB}"

    def upd() -> dns.update.UpdateMessage:
        return dns.update.UpdateMessage(BOB)

    attacks = []
    u = upd()
    u.add(laptop, 60, "AAAA", "2001:db8::53")  # B's host name
    attacks.append(u)
    u = upd()
    u.delete(f"_autotunnel._udp.{laptop}")  # B's SRV
    attacks.append(u)
    u = upd()
    u.delete(BROWSE, "PTR", laptop)  # B's browse entry
    attacks.append(u)
    u = upd()
    u.delete(BROWSE, "PTR")  # the whole browse RRset
    attacks.append(u)
    u = upd()
    u.delete(BROWSE)  # the whole browse name
    attacks.append(u)
    u = upd()
    u.add(BROWSE, 60, "PTR", "github.com.")  # a PTR that is not its own
    attacks.append(u)
    u = upd()
    u.delete(f"AutoTunnel-laptop-01.{BOB}", "A")  # the endpoint name B holds
    attacks.append(u)
    u = upd()
    u.add(f"AutoTunnel-laptop-01.{BOB}", 60, "A", "198.51.100.66")
    attacks.append(u)
    u = upd()
    u.add(f"printer.{BOB}", 60, "A", "198.51.100.66")  # any other name of the zone
    attacks.append(u)
    u = upd()
    u.add(BOB, 60, "TXT", "apex")  # the apex
    attacks.append(u)
    for i, attack in enumerate(attacks):
        assert rcode(core, attack, a, now + 1 + i, now + 1 + i)[0] == dns.rcode.REFUSED, attack
    assert names(core) == before
    zone = core.store.zones[BOB]
    assert {rd.target.to_text() for rd in zone.rrsets[(BROWSE, dns.rdatatype.PTR)]} == {
        f"desktop.{BOB}", laptop}
    # its own names, its own PTR and its own endpoint name: allowed
    u = upd()
    u.delete(BROWSE, "PTR", f"desktop.{BOB}")
    u.delete(f"AutoTunnel-desktop-01.{BOB}")
    u.add(f"_ssh._tcp.desktop.{BOB}", 60, "TXT", "x")
    assert rcode(core, u, a, now + 20, now + 20)[0] == dns.rcode.NOERROR
    # the account key keeps every right in its zone
    u = upd()
    u.delete(BROWSE, "PTR")
    assert rcode(core, u, bob, now + 21, now + 21)[0] == dns.rcode.NOERROR


def test_an_endpoint_name_is_free_again_once_empty() -> None:
    core, accounts = make_core()
    now = time.time()
    a, *_ = enrol(core, accounts["bob"].key, "desktop", now)
    b, *_ = enrol(core, accounts["bob"].key, "laptop", now)
    assert a is not None and b is not None
    shared = f"AutoTunnel-00-01.{BOB}"
    u = dns.update.UpdateMessage(BOB)
    u.add(shared, 60, "A", "203.0.113.1")
    assert rcode(core, u, a, now, now)[0] == dns.rcode.NOERROR
    u = dns.update.UpdateMessage(BOB)
    u.add(shared, 60, "A", "203.0.113.2")
    assert rcode(core, u, b, now, now)[0] == dns.rcode.REFUSED
    u = dns.update.UpdateMessage(BOB)
    u.delete(shared)
    assert rcode(core, u, a, now + 1, now + 1)[0] == dns.rcode.NOERROR
    u = dns.update.UpdateMessage(BOB)
    u.add(shared, 60, "A", "203.0.113.2")
    assert rcode(core, u, b, now + 1, now + 1)[0] == dns.rcode.NOERROR
    assert core.store.zones[BOB].owners[dns.name.from_text(shared)] == "laptop"


def test_enrolment_secret_never_crosses_the_wire() -> None:
    core, accounts = make_core()
    now = time.time()
    key, _answer, request_wire, answer_wire = enrol(core, accounts["bob"].key, "laptop", now)
    assert key is not None and key.role == KeyRole.DEVICE and key.device == "laptop"
    stored = core.store.keys[key.name]
    assert stored.secret == key.secret and len(key.secret) == 32  # both sides agree
    for wire in (request_wire, answer_wire):
        assert key.secret not in wire
        for i in range(len(key.secret) - 7):  # not even 8 bytes of it
            assert key.secret[i : i + 8] not in wire
    # the answer is signed with the enrolling key and validates as a TSIG response
    ring = {accounts["bob"].key.name: dns.tsig.Key(accounts["bob"].key.name,
                                                   accounts["bob"].key.secret, "hmac-sha256")}
    mac = parse(request_wire).tsig[0].mac  # type: ignore[index]
    dns.message.from_wire(answer_wire, keyring=ring, request_mac=mac)
    # another run of the same exchange gives another secret (ephemeral keys)
    again, *_ = enrol(core, accounts["bob"].key, "laptop", now + 1, replace=True)
    assert again is not None and again.secret != key.secret


def test_a_changed_public_key_breaks_the_exchange() -> None:
    # an on-path attacker who swaps the client's public key must re-sign: BADSIG
    core, accounts = make_core()
    now = time.time()
    client = EnrolClient(BOB, "laptop")
    wire = bytearray(sign(client.request(), accounts["bob"].key, int(now)))
    i = bytes(wire).index(client.public)
    wire[i] ^= 1
    out = parse(core.receive(bytes(wire), now, Transport.UDP, "test"))
    assert out.rcode() == dns.rcode.NOTAUTH and tsig_error(out) == TsigError.BADSIG
    assert not [k for k in core.store.keys.values() if k.role == KeyRole.DEVICE]


def test_device_names_are_enrolled_once_unless_replaced_with_the_account_key() -> None:
    core, accounts = make_core()
    now = time.time()
    bob = accounts["bob"].key
    first, *_ = enrol(core, bob, "laptop", now)
    assert first is not None
    again, answer, *_ = enrol(core, bob, "laptop", now + 1)
    assert again is None and answer.rcode() == dns.rcode.YXDOMAIN
    # a device key cannot enrol anything, not even itself
    own, answer, *_ = enrol(core, first, "phone", now + 1)
    assert own is None and answer.rcode() == dns.rcode.REFUSED
    # the account key may replace it: the old key stops working at once
    new, answer, *_ = enrol(core, bob, "laptop", now + 2, replace=True)
    assert new is not None and new.name == first.name and new.secret != first.secret
    assert rcode(core, publish("laptop"), first, now + 3, now + 3) == (
        dns.rcode.NOTAUTH, TsigError.BADSIG)
    assert rcode(core, publish("laptop"), new, now + 3, now + 3)[0] == dns.rcode.NOERROR
    # names that are not device names
    for bad in ("Bad_Name", "autotunnel-00-01", "a.b", ""):
        if bad:
            k, answer, *_ = enrol(core, bob, bad, now + 4)
            assert k is None and answer.rcode() == dns.rcode.REFUSED


def test_an_invite_enrols_once_and_only_once() -> None:
    core, _accounts = make_core()
    storage = core.store.storage
    now = time.time()
    invite = make_invite(storage, "bob", device=None, lifetime=3600, now=now)
    core.store.refresh_accounts()
    key, *_ = enrol(core, invite.key, "laptop", now)
    assert key is not None
    assert invite.key.name not in core.store.keys  # spent
    again, answer, *_ = enrol(core, invite.key, "phone", now + 1)
    assert again is None and answer.rcode() == dns.rcode.NOTAUTH
    assert tsig_error(answer) == TsigError.BADKEY
    # the invite itself never reads or writes the zone
    other = make_invite(storage, "bob", device="phone", lifetime=3600, now=now)
    core.store.refresh_accounts()
    q = dns.message.make_query(f"laptop.{BOB}", "AAAA")
    assert rcode(core, q, other.key, now, now)[0] == dns.rcode.REFUSED
    assert rcode(core, publish("phone"), other.key, now + 1, now + 1)[0] == dns.rcode.REFUSED
    # an invite made for "phone" enrols "phone" only, never replaces
    k, answer, *_ = enrol(core, other.key, "tablet", now + 2)
    assert k is None and answer.rcode() == dns.rcode.REFUSED
    k, answer, *_ = enrol(core, other.key, "laptop", now + 3, replace=True)
    assert k is None and answer.rcode() == dns.rcode.REFUSED
    k, *_ = enrol(core, other.key, "phone", now + 4)
    assert k is not None
    # an expired invite is refused
    old = make_invite(storage, "bob", device=None, lifetime=10, now=now)
    core.store.refresh_accounts()
    k, answer, *_ = enrol(core, old.key, "tablet", now + 11)
    assert k is None and answer.rcode() == dns.rcode.REFUSED
    assert [d.device for d in list_devices(storage, "bob", now + 11)] == ["laptop", "phone"]


def test_device_keys_may_watch_the_zone_invites_may_not() -> None:
    core, accounts = make_core()
    llq = LLQServer(core, LLQConfig(), b"s" * 32, random.Random(1))
    core.plug(llq)
    now = time.time()
    dev, *_ = enrol(core, accounts["bob"].key, "laptop", now)
    invite = make_invite(core.store.storage, "bob", device=None, lifetime=3600, now=now)
    core.store.refresh_accounts()
    assert dev is not None

    def setup(key: TsigKey, t: float) -> dns.message.Message:
        q = dns.message.make_query(BROWSE, "PTR", use_edns=0, options=[
            LLQOption(LLQOpcode.SETUP, LLQError.NO_ERROR, 0, 3600)])
        q.flags = 0
        return parse(core.receive(sign(q, key, int(t)), t, Transport.UDP, "192.0.2.7"))

    ok = setup(dev, now + 1)
    assert ok.rcode() == dns.rcode.NOERROR and find_llq(ok.options)[0].error == 0
    assert setup(invite.key, now + 1).rcode() == dns.rcode.REFUSED


def test_revoke_cuts_one_device_off_and_deletes_its_records(open_db: Callable[[], Storage]) -> None:
    core, accounts = make_core(open_db())
    events: list[RRsetChange] = []
    core.store.add_observer(events.append)
    now = time.time()
    bob = accounts["bob"].key
    a, *_ = enrol(core, bob, "desktop", now)
    b, *_ = enrol(core, bob, "laptop", now)
    assert a is not None and b is not None
    assert rcode(core, publish("desktop"), a, now, now)[0] == dns.rcode.NOERROR
    assert rcode(core, publish("laptop"), b, now, now)[0] == dns.rcode.NOERROR
    # `btmm serve user revoke bob laptop` runs in another process on the same database
    other = open_db()
    entry = other.remove_device("bob", "laptop")
    assert entry.key.name == b.name
    with pytest.raises(StorageError, match="no device"):
        other.remove_device("bob", "laptop")
    other.close()
    events.clear()
    core.store.refresh_accounts()  # the server's once-a-second poll
    # the laptop's key is gone (BADKEY), its records too, and watchers were told
    assert rcode(core, publish("laptop"), b, now + 1, now + 1) == (
        dns.rcode.NOTAUTH, TsigError.BADKEY)
    left = names(core)
    assert not [n for n, _ in left if "laptop" in n]
    zone = core.store.zones[BOB]
    assert {rd.target.to_text() for rd in zone.rrsets[(BROWSE, dns.rdatatype.PTR)]} == {
        f"desktop.{BOB}"}
    removed = {(e.name.to_text(), e.rdtype) for e in events if e.removed}
    assert (BROWSE.to_text(), dns.rdatatype.PTR) in removed
    assert (f"laptop.{BOB}", dns.rdatatype.AAAA) in removed
    # the desktop carries on, and after a restart the state is the same
    assert rcode(core, publish("desktop"), a, now + 2, now + 2)[0] == dns.rcode.NOERROR
    core.store.storage.close()
    store = ZoneStore(open_db(), ZoneConfig(PARENT, NS, ("192.0.2.53",), 5300))
    restarted = RegistryCore(store)
    assert b.name not in store.keys and a.name in store.keys
    assert rcode(restarted, publish("desktop"), a, now + 3, now + 3)[0] == dns.rcode.NOERROR
    assert store.zones[BOB].owners[dns.name.from_text(f"AutoTunnel-desktop-01.{BOB}")] == (
        "desktop")
    store.storage.close()


def test_an_enrolment_replayed_after_a_restart_is_refused(open_db: Callable[[], Storage]) -> None:
    core, accounts = make_core(open_db())
    now = time.time()
    client = EnrolClient(BOB, "laptop", replace=True)
    wire = sign(client.request(), accounts["bob"].key, int(now))
    assert parse(core.receive(wire, now, Transport.UDP, "t")).rcode() == dns.rcode.NOERROR
    core.store.storage.close()
    store = ZoneStore(open_db(), ZoneConfig(PARENT, NS, ("192.0.2.53",), 5300))
    out = parse(RegistryCore(store).receive(wire, now + 1, Transport.UDP, "t"))
    assert out.rcode() == dns.rcode.NOTAUTH and tsig_error(out) == TsigError.BADTIME
    store.storage.close()


def test_removing_the_account_removes_its_devices_and_invites(
    open_db: Callable[[], Storage],
) -> None:
    core, accounts = make_core(open_db())
    now = time.time()
    dev, *_ = enrol(core, accounts["bob"].key, "laptop", now)
    assert dev is not None
    other = open_db()
    make_invite(other, "bob", device=None, lifetime=3600, now=now)
    other.remove_account("bob")
    assert other.devices("bob") == []
    other.close()
    core.store.refresh_accounts()
    assert not [k for k in core.store.keys.values() if k.zone == BOB]
    core.store.storage.close()


def test_key_files_round_trip_and_old_files_still_read() -> None:
    from btmm_core.dns.keyfile import key_file_text, parse_key_file
    from btmm_core.dns.tsig import HMAC_SHA256
    from btmm_core.registry.devices import parse_duration

    secret = bytes(range(32))
    device = TsigKey(dns.name.from_text("laptop", origin=BOB), HMAC_SHA256, secret, BOB,
                     KeyRole.DEVICE, "laptop")
    invite = TsigKey(dns.name.from_text("_invite-0a0b", origin=BOB), HMAC_SHA256, secret, BOB,
                     KeyRole.INVITE, None, 1_900_000_000.0)
    for key in (device, invite):
        back = parse_key_file(key_file_text(key, user="bob", server="ns.x. port 53"), "t")
        assert back.key == key and back.user == "bob" and back.server == "ns.x. port 53"
    # a credentials file from before (no zone line): the key is named after the zone
    old = 'key "bob.members.example." {\n\talgorithm hmac-sha256;\n\tsecret "AAAA";\n};\n'
    account = parse_key_file(old, "old").key
    assert account.role == KeyRole.ACCOUNT and account.zone == BOB
    assert [parse_duration(t) for t in ("90", "30m", "24h", "7d")] == [90, 1800, 86400, 604800]


def test_revoking_a_device_publishes_its_ssh_ca_for_the_krl(
    open_db: Callable[[], Storage],
) -> None:
    """docs/architecture.md section 12: the revoked device's CA lands at _btmm-revoked, a name
    no device key may change, and stays there (no lease) across a restart."""
    from btmm_core.sso.files import Revoked, parse_revocation

    core, accounts = make_core(open_db())
    now = time.time()
    bob = accounts["bob"].key
    a, *_ = enrol(core, bob, "desktop", now)
    b, *_ = enrol(core, bob, "laptop", now)
    assert a is not None and b is not None
    ca = bytes(range(32))
    msg = publish("laptop")
    msg.add(f"laptop.{BOB}", 60, "TXT",
            '"btmm=1" "pk=x" "sshca=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=" "sshbind=y"')
    assert rcode(core, msg, b, now, now)[0] == dns.rcode.NOERROR
    assert rcode(core, publish("desktop"), a, now, now)[0] == dns.rcode.NOERROR
    other = open_db()
    other.remove_device("bob", "laptop")
    other.remove_device("bob", "desktop")  # published no CA: no revocation record
    other.close()
    core.store.refresh_accounts()
    revoked = dns.name.from_text(f"_btmm-revoked.{BOB}")
    rrset = core.store.zones[BOB].rrsets[(revoked, dns.rdatatype.TXT)]
    found = [parse_revocation(rd.strings) for rd in rrset]
    assert len(found) == 1 and isinstance(found[0], Revoked)
    assert (found[0].device, found[0].ca) == ("laptop", ca)
    assert abs(found[0].when - now) < 60
    # a device key cannot take the revocation back
    c, *_ = enrol(core, bob, "tablet", now + 1)
    assert c is not None
    undo = dns.update.UpdateMessage(BOB)
    undo.delete(revoked, "TXT")
    assert rcode(core, undo, c, now + 2, now + 2)[0] == dns.rcode.REFUSED
    core.store.storage.close()
    store = ZoneStore(open_db(), ZoneConfig(PARENT, NS, ("192.0.2.53",), 5300))
    assert (revoked, dns.rdatatype.TXT) in store.zones[BOB].rrsets
    store.storage.close()
