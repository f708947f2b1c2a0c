"""Sans-I/O parts of the host daemon: identity, records, hosts block, configuration, status."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import stat
from pathlib import Path

import dns.message
import dns.name
import dns.opcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from btmm_core.daemon.cli import render_status
from btmm_core.daemon.config import join, load_config
from btmm_core.daemon.hosts import BEGIN, END, replace_block
from btmm_core.daemon.identity import HostIdentity, retire_legacy_identity
from btmm_core.daemon.records import (
    Publication,
    browse_name,
    granted_lease,
    peer_from_answers,
    publish_update,
    srv_name,
    withdraw_update,
)
from btmm_core.dns.edns import UpdateLeaseOption
from btmm_core.errors import ConfigError
from btmm_core.keyex.keys import ula_of

ZONE = dns.name.from_text("bob.members.example.")
ULA = ipaddress.IPv6Address("fd12:3456:789a:1:5054:ff:fe12:3456")
CREDS = b'key "bob.members.example." {\n\talgorithm hmac-sha256;\n\tsecret "AAAA";\n};\n'


def pub(port: int = 4500, addr: str = "203.0.113.2") -> Publication:
    ident = HostIdentity(ULA)
    return Publication("laptop", ULA, ident.autotunnel_label(), "A" * 43 + "=",
                       ipaddress.IPv4Address(addr), port, version="0.1.0")


def test_ula_derivation_and_autotunnel_label() -> None:
    public = bytes(range(32))
    digest = hashlib.sha256(b"btmm ULA v1" + public).digest()
    ula = HostIdentity.of_key(public).ula
    assert ula == ula_of(public) and ula.packed == b"\xfd" + digest[:15]
    assert HostIdentity(ula).autotunnel_label() == "AutoTunnel-" + "-".join(
        f"{b:02X}" for b in digest[7:15])
    assert HostIdentity.of_key(bytes(32)).ula != ula


def test_legacy_identity_file_is_retired_once(tmp_path: Path) -> None:
    path = tmp_path / "identity.json"
    assert retire_legacy_identity(path) is None
    path.write_text('{"ula": "fd12:3456:789a:1:5054:ff:fe12:3456", "interface_id": "eui64"}\n')
    assert retire_legacy_identity(path) == "fd12:3456:789a:1:5054:ff:fe12:3456"
    assert not path.exists() and retire_legacy_identity(path) is None
    path.write_text("garbage")
    assert retire_legacy_identity(path) == "an unreadable address" and not path.exists()


def test_old_interface_id_setting_still_loads(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[host]\nhost = "ok"\ninterface_id = "eui64"\n')
    assert load_config(tmp_path / "c.toml").interface_id == "eui64"  # the daemon warns


def _sections(msg: dns.message.Message) -> list[tuple[str, int, int]]:
    # UPDATE section = authority; (name, type, class) tells add (IN) from delete (ANY/NONE)
    return [(r.name.to_text(), r.rdtype, r.deleting or r.rdclass)
            for r in msg.update]  # type: ignore[attr-defined]


def test_first_publish_adds_everything_with_a_lease() -> None:
    msg = publish_update(ZONE, pub(), None, 5400)
    assert msg.opcode() == dns.opcode.UPDATE
    got = _sections(msg)
    assert ("laptop.bob.members.example.", dns.rdatatype.AAAA, 1) in got
    assert ("laptop.bob.members.example.", dns.rdatatype.TXT, 1) in got
    assert ("_autotunnel._udp.laptop.bob.members.example.", dns.rdatatype.SRV, 1) in got
    assert (f"{pub().autotunnel}.bob.members.example.", dns.rdatatype.A, 1) in got
    assert ("_autotunnel._udp.bob.members.example.", dns.rdatatype.PTR, 1) in got
    # nothing deleted but the candidate set a crashed run may have left (reach/candidates.py)
    assert [(n, t) for n, t, cls in got if cls != 1] == [
        ("_btmm-path._udp.laptop.bob.members.example.", dns.rdatatype.SRV)]
    leases = [o for o in msg.options if isinstance(o, UpdateLeaseOption)]
    assert [o.lease for o in leases] == [5400]


def test_refresh_only_readds_and_a_change_replaces() -> None:
    refresh = publish_update(ZONE, pub(), pub(), 5400)
    assert all(cls == 1 for _, _, cls in _sections(refresh))
    moved = publish_update(ZONE, pub(port=61000, addr="203.0.113.4"), pub(), 5400)
    deletes = [(n, t) for n, t, cls in _sections(moved) if cls != 1]
    assert sorted(deletes) == sorted([
        ("_autotunnel._udp.laptop.bob.members.example.", dns.rdatatype.SRV),
        (f"{pub().autotunnel}.bob.members.example.", dns.rdatatype.A),
    ])


def test_withdraw_deletes_only_our_records() -> None:
    got = _sections(withdraw_update(ZONE, pub()))
    # the five seed records and the candidate set (none in this publication)
    assert len(got) == 6 and all(cls != 1 for _, _, cls in got)
    assert ("_btmm-path._udp.laptop.bob.members.example.", dns.rdatatype.SRV,
            dns.rdataclass.ANY) in got
    # the browse PTR is removed by value (class NONE), not as a whole RRset (class ANY)
    ptr = [cls for n, t, cls in got if t == dns.rdatatype.PTR]
    assert ptr == [dns.rdataclass.NONE]


def test_peer_from_answers() -> None:
    name = dns.name.from_text("laptop", origin=ZONE)
    aaaa = dns.rrset.from_text(name, 60, "IN", "AAAA", str(ULA))
    txt = dns.rrset.from_text(name, 60, "IN", "TXT", '"btmm=1" "pk=KEY=" "model=linux" "sw=0.1"')
    target = dns.name.from_text(pub().autotunnel, origin=ZONE)
    srv = dns.rrset.from_text(srv_name("laptop", ZONE), 60, "IN", "SRV", f"0 0 61000 {target}")
    a = dns.rrset.from_text(target, 60, "IN", "A", "203.0.113.4")
    rec = peer_from_answers(name, ZONE, aaaa, txt, srv, a)
    assert rec is not None
    assert (rec.host, rec.ula, rec.public_key, rec.endpoint) == (
        "laptop", ULA, "KEY=", ("203.0.113.4", 61000))
    assert peer_from_answers(name, ZONE, aaaa, txt, None, None).endpoint is None  # type: ignore[union-attr]
    assert peer_from_answers(name, ZONE, None, txt, srv, a) is None
    notours = dns.rrset.from_text(name, 60, "IN", "TXT", '"model=printer"')
    assert peer_from_answers(name, ZONE, aaaa, notours, srv, a) is None
    assert browse_name(ZONE).to_text() == "_autotunnel._udp.bob.members.example."


def test_granted_lease_read_back() -> None:
    msg = publish_update(ZONE, pub(), None, 1234)
    assert granted_lease(msg) == 1234


def test_hosts_block_replaced_and_removed() -> None:
    base = "127.0.0.1 localhost\n192.0.2.7 printer\n"
    one = replace_block(base, {"laptop.bob.members.example.": ULA})
    assert one.startswith(base) and BEGIN in one and END in one
    assert f"{ULA}\tlaptop.bob.members.example\n" in one
    two = replace_block(one, {"desktop.bob.members.example.": ULA})
    assert "laptop" not in two and two.count(BEGIN) == 1
    assert replace_block(two, {}) == base


def test_join_stores_secrets_0600_and_config_loads(tmp_path: Path) -> None:
    cfg = join(tmp_path / "btmm.toml", credentials=CREDS, secret=b"s" * 32, host="laptop",
               settings={"state_dir": str(tmp_path / "state"), "server": "192.0.2.53:53",
                         "lease": 1800, "hosts_file": str(tmp_path / "hosts")})
    for p in (cfg.credentials, cfg.secret_file):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cfg.state_dir).st_mode) == 0o700
    again = load_config(tmp_path / "btmm.toml")
    assert (again.host, again.server, again.lease, again.hosts_file) == (
        "laptop", "192.0.2.53:53", 1800, tmp_path / "hosts")
    assert again.server_address() == ("192.0.2.53", 53)
    assert again.port == 4500 and again.portmap == "auto"  # defaults


@pytest.mark.parametrize("text,what", [
    ('[host]\nhost = "Bad_Name"\n', "DNS label"),
    ('[host]\nhost = "ok"\ncolour = 1\n', "unknown key"),
    ('[host]\nhost = "ok"\n[registry]\nserver = "nope"\n', "HOST:PORT"),
    ('[host]\nhost = "ok"\n[network]\nportmap = "maybe"\n', "portmap"),
    ('[host]\nhost = "ok"\n[tunnel]\nidle_timeout = -1\n', "idle_timeout"),
    ('[host]\nhost = "ok"\n[tunnel]\nconnect_timeout = 0\n', "connect_timeout"),
    ('[host]\nhost = "ok"\n[registry]\nresolve_interval = 0\n', "resolve_interval"),
    ('[host]\nhost = "ok"\n[registry]\nreread_interval = 10\n', "the shorter"),
])
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, what: str) -> None:
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ConfigError, match=what):
        load_config(tmp_path / "c.toml")


def test_join_refuses_a_short_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least"):
        join(tmp_path / "c.toml", credentials=CREDS, secret=b"short", host="x", settings={})


def test_status_table() -> None:
    st = {"host": {"name": "laptop.bob.members.example.", "ula": str(ULA), "external":
                   "203.0.113.3:4500", "local_address": "192.168.2.11", "local_port": 4500,
                   "mapping": "pcp via 192.168.2.1, 7200 s", "mapping_error": None,
                   "registry": "203.0.113.1:53", "registry_error": None, "lease": 1800,
                   "lease_left": 1700, "llq": "established", "dataplane": "FastEngine",
                   "public_key": "KEY="},
          "peers": [{"name": "desktop.bob.members.example.", "ula": "fd00::1",
                     "endpoint": "203.0.113.2:4500", "tunnel": "up", "handshake_age": 3.0,
                     "bytes_in": 2048, "bytes_out": 10, "drops": {"replay": 2}}]}
    text = render_status(st)
    assert "desktop.bob.members.example" in text and "2.0KiB" in text
    assert "203.0.113.3:4500" in text and "llq established" in text
    assert "candidate " not in text  # a status written before candidates existed
    st["host"]["candidates"] = [{"kind": "lan", "endpoint": "192.168.2.11:4500"},  # type: ignore[index]
                                {"kind": "mapped", "endpoint": "203.0.113.3:4500"}]
    assert "candidate lan 192.168.2.11:4500, mapped 203.0.113.3:4500" in render_status(st)


def test_lost_mapping_withdraws_the_endpoint_records() -> None:
    unreachable = Publication("laptop", ULA, pub().autotunnel, pub().public_key, None, None,
                              version="0.1.0")
    msg = publish_update(ZONE, unreachable, pub(), 5400)
    got = _sections(msg)
    deletes = sorted((n, t) for n, t, cls in got if cls != 1)
    assert deletes == sorted([
        ("_autotunnel._udp.laptop.bob.members.example.", dns.rdatatype.SRV),
        (f"{pub().autotunnel}.bob.members.example.", dns.rdatatype.A),
    ])
    adds = {t for _, t, cls in got if cls == 1}
    assert adds == {dns.rdatatype.AAAA, dns.rdatatype.TXT, dns.rdatatype.PTR}


def test_shipped_example_config_loads() -> None:
    example = Path(__file__).resolve().parents[2] / "contrib" / "btmm.toml.example"
    cfg = load_config(example)
    assert (cfg.host, cfg.port, cfg.portmap, cfg.dataplane) == ("laptop", 4500, "auto", "auto")
    assert cfg.control_path == Path("/var/lib/btmm/control.sock")
    assert (cfg.idle_timeout, cfg.connect_timeout) == (300.0, 15.0)
