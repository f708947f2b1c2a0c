"""``btmm serve`` on loopback against standard clients: BIND's nsupdate and dig, Knot's kdig and
knsupdate, and dnspython for leases and hand-made hostile messages."""

from __future__ import annotations

import base64
import re
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.update
import pytest
from registry_helpers import (
    HMAC_MD5,
    LiveRegistry,
    dnskey,
    live_registry,
    parse,
    sign,
    state_dir,
    tsig_error,
)

from btmm_core.dns.edns import UpdateLeaseOption
from btmm_core.dns.tsig import HMAC_SHA256, TsigError, TsigKey
from btmm_core.registry.model import Account

BOB = "bob.members.example."
ALICE = "alice.members.example."
CAROL = "carol.members.example."


@pytest.fixture(scope="module")
def reg() -> Iterator[LiveRegistry]:
    with (
        state_dir() as state,
        live_registry(
            state, "--lease-min", "1", "--lease-max", "30", "--tcp-idle-timeout", "1.5"
        ) as r,
    ):
        yield r


def run(cmd: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60, check=False)


def keyfile_secret(path: Path) -> str:
    m = re.search(r'secret "([^"]+)"', path.read_text())
    assert m is not None
    return m.group(1)


def nsupdate(
    reg: LiveRegistry, zone: str, lines: list[str], *auth: str
) -> subprocess.CompletedProcess[str]:
    script = "\n".join([f"server 127.0.0.1 {reg.port}", f"zone {zone}", *lines, "send", ""])
    return run(["nsupdate", "-t", "5", *auth], script)


def dig(reg: LiveRegistry, name: str, rdtype: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run(
        [
            "dig",
            "@127.0.0.1",
            "-p",
            str(reg.port),
            "+norec",
            "+tries=1",
            "+time=3",
            *extra,
            name,
            rdtype,
        ]
    )


def dig_short(reg: LiveRegistry, user: str, name: str, rdtype: str) -> list[str]:
    r = dig(reg, name, rdtype, "-k", str(reg.keyfile(user)), "+short")
    assert r.returncode == 0, r.stdout + r.stderr
    return sorted(line for line in r.stdout.splitlines() if line and not line.startswith(";"))


def kdig(reg: LiveRegistry, user: str, alg: str, name: str, rdtype: str, *extra: str) -> str:
    secret = keyfile_secret(reg.keyfile(user))
    zone = {"bob": BOB, "alice": ALICE, "carol": CAROL}[user]
    r = run(
        [
            "kdig",
            "@127.0.0.1",
            "-p",
            str(reg.port),
            "+retry=0",
            "+timeout=3",
            "-y",
            f"{alg}:{zone}:{secret}",
            *extra,
            name,
            rdtype,
        ]
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def status(output: str) -> str:
    m = re.search(r"status: (\w+)", output)
    assert m is not None, output
    return m.group(1)


def account(reg: LiveRegistry, user: str) -> Account:
    text = reg.keyfile(user).read_text()
    zone = dns.name.from_text(f"{user}.members.example.")
    alg = HMAC_MD5 if "hmac-md5" in text else HMAC_SHA256
    key = TsigKey(zone, alg, base64.b64decode(keyfile_secret(reg.keyfile(user))), zone)
    return Account(user, zone, key, 0.0)


def udp(reg: LiveRegistry, wire: bytes) -> dns.message.Message:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(wire, ("127.0.0.1", reg.port))
        return parse(s.recv(65535))


# ---- standard clients ------------------------------------------------------------------------


def test_nsupdate_sha256_add_change_delete_read_back_with_dig_and_kdig(reg: LiveRegistry) -> None:
    k = ("-k", str(reg.keyfile("bob")))
    r = nsupdate(
        reg,
        BOB,
        [
            f"update add laptop.{BOB} 300 AAAA fd00::1",
            f"update add _autotunnel._udp.laptop.{BOB} 300 SRV 0 0 4500 laptop.{BOB}",
            f"update add AutoTunnel-00-11-22-33-44-55-66-77.{BOB} 300 A 203.0.113.7",
            f'update add laptop.{BOB} 300 TXT "model=test" "ver=1"',
        ],
        *k,
    )
    assert r.returncode == 0, r.stderr
    assert dig_short(reg, "bob", f"laptop.{BOB}", "AAAA") == ["fd00::1"]
    assert dig_short(reg, "bob", f"_autotunnel._udp.laptop.{BOB}", "SRV") == [
        f"0 0 4500 laptop.{BOB}"
    ]
    assert dig_short(reg, "bob", f"AutoTunnel-00-11-22-33-44-55-66-77.{BOB}", "A") == [
        "203.0.113.7"
    ]
    out = kdig(reg, "bob", "hmac-sha256", f"laptop.{BOB}", "TXT")
    assert status(out) == "NOERROR" and '"model=test" "ver=1"' in out and "TSIG" in out
    # change: the host moved
    r = nsupdate(
        reg,
        BOB,
        [
            f"update delete AutoTunnel-00-11-22-33-44-55-66-77.{BOB} A",
            f"update add AutoTunnel-00-11-22-33-44-55-66-77.{BOB} 300 A 198.51.100.9",
        ],
        *k,
    )
    assert r.returncode == 0, r.stderr
    assert dig_short(reg, "bob", f"AutoTunnel-00-11-22-33-44-55-66-77.{BOB}", "A") == [
        "198.51.100.9"
    ]
    # delete
    r = nsupdate(
        reg,
        BOB,
        [f"update delete laptop.{BOB}", f"update delete _autotunnel._udp.laptop.{BOB} SRV"],
        *k,
    )
    assert r.returncode == 0, r.stderr
    out = dig(reg, f"laptop.{BOB}", "AAAA", "-k", str(reg.keyfile("bob"))).stdout
    assert status(out) == "NXDOMAIN"


def test_knsupdate_and_kdig(reg: LiveRegistry) -> None:
    secret = keyfile_secret(reg.keyfile("alice"))
    script = "\n".join(
        [
            f"server 127.0.0.1 {reg.port}",
            f"zone {ALICE}",
            f"update add desk.{ALICE} 300 AAAA fd00::a",
            "send",
            "quit",
            "",
        ]
    )
    r = run(["knsupdate", "-y", f"hmac-sha256:{ALICE}:{secret}"], script)
    assert r.returncode == 0, r.stdout + r.stderr
    out = kdig(reg, "alice", "hmac-sha256", f"desk.{ALICE}", "AAAA")
    assert status(out) == "NOERROR" and "fd00::a" in out


def test_legacy_md5_key_with_nsupdate_and_kdig(reg: LiveRegistry) -> None:
    r = nsupdate(
        reg, CAROL, [f"update add old.{CAROL} 300 A 192.0.2.5"], "-k", str(reg.keyfile("carol"))
    )
    assert r.returncode == 0, r.stderr
    assert dig_short(reg, "carol", f"old.{CAROL}", "A") == ["192.0.2.5"]
    out = kdig(reg, "carol", "hmac-md5", f"old.{CAROL}", "A")
    assert status(out) == "NOERROR" and "192.0.2.5" in out


def test_queries_need_the_key_but_discovery_is_public(reg: LiveRegistry) -> None:
    nsupdate(reg, BOB, [f"update add secret.{BOB} 300 A 192.0.2.8"], "-k", str(reg.keyfile("bob")))
    assert status(dig(reg, f"secret.{BOB}", "A").stdout) == "REFUSED"
    assert (
        status(dig(reg, f"secret.{BOB}", "A", "-k", str(reg.keyfile("alice"))).stdout) == "REFUSED"
    )
    r = dig(reg, f"_dns-update._udp.{BOB}", "SRV", "+short")
    assert r.stdout.split() == ["0", "0", str(reg.port), "ns.members.example."]
    r = dig(reg, f"_dns-llq._udp.{BOB}", "SRV", "+short")
    assert r.stdout.split() == ["0", "0", str(reg.port), "ns.members.example."]
    out = dig(reg, BOB, "SOA").stdout
    assert status(out) == "NOERROR" and "flags: qr aa" in out


def test_large_answer_truncates_and_dig_retries_over_tcp(reg: LiveRegistry) -> None:
    lines = [f'update add big.{BOB} 300 TXT "{"y" * 60} {i}"' for i in range(30)]
    assert nsupdate(reg, BOB, lines, "-k", str(reg.keyfile("bob"))).returncode == 0
    out = dig(reg, f"big.{BOB}", "TXT", "-k", str(reg.keyfile("bob")), "+bufsize=1232").stdout
    assert "Truncated, retrying in TCP mode" in out
    assert status(out) == "NOERROR" and out.count("\tTXT\t") == 30


def test_dns_over_tls_with_kdig(reg: LiveRegistry) -> None:
    nsupdate(reg, BOB, [f"update add tls.{BOB} 300 AAAA fd00::7"], "-k", str(reg.keyfile("bob")))
    out = kdig(reg, "bob", "hmac-sha256", f"tls.{BOB}", "AAAA", "+tls", "-p", str(reg.tls_port))
    assert status(out) == "NOERROR" and "fd00::7" in out and "TLS" in out


# ---- policy and TSIG negatives ---------------------------------------------------------------


def _unchanged(reg: LiveRegistry, name: str) -> None:
    out = dig(reg, name, "A", "-k", str(reg.keyfile("alice" if ALICE in name else "bob"))).stdout
    assert status(out) == "NXDOMAIN", out


def test_bobs_key_cannot_touch_alices_zone_and_unsigned_is_refused(reg: LiveRegistry) -> None:
    r = nsupdate(
        reg, ALICE, [f"update add x.{ALICE} 300 A 192.0.2.1"], "-k", str(reg.keyfile("bob"))
    )
    assert r.returncode != 0 and "REFUSED" in r.stdout + r.stderr
    r = nsupdate(reg, BOB, [f"update add unsigned.{BOB} 300 A 192.0.2.1"])
    assert r.returncode != 0 and "REFUSED" in r.stdout + r.stderr
    _unchanged(reg, f"x.{ALICE}")
    _unchanged(reg, f"unsigned.{BOB}")


def test_nsupdate_wrong_secret_unknown_key_and_wrong_algorithm(reg: LiveRegistry) -> None:
    secret = keyfile_secret(reg.keyfile("bob"))
    wrong = base64.b64encode(b"\x01" * 32).decode()
    for auth, name in [
        (f"hmac-sha256:{BOB}:{wrong}", "wrongsecret"),
        (f"hmac-sha256:mallory.members.example.:{secret}", "unknownkey"),
        (f"hmac-md5:{BOB}:{secret}", "wrongalg"),
    ]:
        r = nsupdate(reg, BOB, [f"update add {name}.{BOB} 300 A 192.0.2.1"], "-y", auth)
        assert r.returncode != 0, (name, r.stdout, r.stderr)
        _unchanged(reg, f"{name}.{BOB}")


def _add(name: str) -> dns.update.UpdateMessage:
    u = dns.update.UpdateMessage(BOB)
    u.add(name, 300, "A", "192.0.2.66")
    return u


def test_skew_fudge_replay_and_truncated_mac_over_the_wire(reg: LiveRegistry) -> None:
    bob = account(reg, "bob").key
    now = int(time.time())
    r = udp(reg, sign(_add("skew"), bob, now - 400))
    assert tsig_error(r) == TsigError.BADTIME and r.tsig[0].mac
    assert abs(struct.unpack("!HI", r.tsig[0].other)[1] - now) <= 5
    r = udp(reg, sign(_add("fudge"), bob, now - 1000, fudge=3600))
    assert tsig_error(r) == TsigError.BADTIME
    r = udp(reg, sign(_add("trunc"), bob, now, mac_len=16))
    assert r.rcode() == dns.rcode.NOTAUTH and tsig_error(r) == TsigError.BADTRUNC
    wire = sign(_add("replay"), bob, int(time.time()))
    assert udp(reg, wire).rcode() == dns.rcode.NOERROR
    nsupdate(reg, BOB, [f"update delete replay.{BOB}"], "-k", str(reg.keyfile("bob")))
    r = udp(reg, wire)
    assert r.rcode() == dns.rcode.NOTAUTH and tsig_error(r) == TsigError.BADTIME
    for name in ("skew", "fudge", "trunc", "replay"):
        _unchanged(reg, f"{name}.{BOB}")


# ---- leases ----------------------------------------------------------------------------------


def _lease_update(name: str, lease: int) -> dns.update.UpdateMessage:
    u = dns.update.UpdateMessage(BOB)
    u.replace(name, 60, "AAAA", "fd00::42")
    u.use_edns(0, 0, 1232, options=[UpdateLeaseOption(lease)])
    return u


def test_dnspython_update_with_lease_expires_unless_refreshed(reg: LiveRegistry) -> None:
    key = dnskey(account(reg, "bob"))
    grants = []
    for name in ("short", "kept"):
        u = _lease_update(name, 3)
        u.use_tsig(key)
        resp = dns.query.udp(u, "127.0.0.1", port=reg.port, timeout=5)
        assert resp.rcode() == dns.rcode.NOERROR
        grants += [o.lease for o in resp.options if isinstance(o, UpdateLeaseOption)]
    assert grants == [3, 3]
    gone_after = None
    t0 = time.monotonic()
    while time.monotonic() - t0 < 20:  # refresh "kept" every second, bounded
        u = _lease_update("kept", 3)
        u.use_tsig(key)
        assert dns.query.tcp(u, "127.0.0.1", port=reg.port, timeout=5).rcode() == dns.rcode.NOERROR
        if dig_short(reg, "bob", f"short.{BOB}", "AAAA") == []:
            gone_after = time.monotonic() - t0
            break
        time.sleep(1)
    assert gone_after is not None, "the unrefreshed record outlived its 3 s lease by far"
    assert dig_short(reg, "bob", f"kept.{BOB}", "AAAA") == ["fd00::42"]


# ---- bad input over TCP ----------------------------------------------------------------------


def test_garbage_and_idle_tcp_clients_are_disconnected(reg: LiveRegistry) -> None:
    with socket.create_connection(("127.0.0.1", reg.port), timeout=5) as s:
        s.sendall(b"\x00\x05hello")
        assert s.recv(100) == b""  # closed: too short for a DNS header
    # idle: closed by the server (after its 1.5 s); our own timeout is only a backstop, far
    # enough that a busy machine never mistakes one for the other
    with socket.create_connection(("127.0.0.1", reg.port), timeout=30) as s:
        assert s.recv(100) == b""
    with socket.create_connection(("127.0.0.1", reg.port), timeout=5) as s:
        junk = bytes(range(256)) * 4
        s.sendall(struct.pack("!H", len(junk)) + junk)
        data = s.recv(4096)
        assert len(data) >= 14 and parse(data[2:]).rcode() == dns.rcode.FORMERR
    assert status(dig(reg, BOB, "SOA").stdout) == "NOERROR"
    assert "Traceback" not in reg.log()


# ---- accounts while running --------------------------------------------------------------------


def _eventually(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """The server notices account changes on its next poll (every second): wait for it with a
    deadline, never for a fixed time (a loaded machine can take longer than one second)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.2)


def test_user_add_rotate_and_remove_while_running(reg: LiveRegistry) -> None:
    r = reg.cli("user", "add", "dave")
    assert r.returncode == 0, r.stderr
    dave = "dave.members.example."
    k = ("-k", str(reg.keyfile("dave")))
    # adding the same RR again changes nothing: safe to repeat until the key is known
    _eventually(lambda: nsupdate(reg, dave, [f"update add h.{dave} 300 A 192.0.2.4"],
                                 *k).returncode == 0, "the new account's key works")
    old = reg.keyfile("dave").read_text()
    (reg.state / "old-dave.key").write_text(old)
    r = reg.cli("user", "rotate-key", "dave")
    assert r.returncode == 0, r.stderr
    _eventually(lambda: nsupdate(reg, dave, [f"update add i.{dave} 300 A 192.0.2.4"], "-k",
                                 str(reg.state / "old-dave.key")).returncode != 0,
                "the rotated-out key refused")
    assert nsupdate(reg, dave, [f"update add j.{dave} 300 A 192.0.2.4"], *k).returncode == 0
    listing = reg.cli("user", "list").stdout
    assert re.search(r"^dave\s+dave\.members\.example\.\s+hmac-sha256$", listing, re.M)
    assert re.search(r"^carol\s+carol\.members\.example\.\s+hmac-md5$", listing, re.M)
    assert reg.cli("user", "remove", "dave").returncode == 0
    # only the parent is left
    _eventually(lambda: status(dig(reg, dave, "SOA").stdout) == "NXDOMAIN", "the zone gone")
    assert reg.cli("user", "add", "bob").returncode != 0  # exists already
    assert reg.cli("user", "add", "Not_A_Label").returncode != 0
