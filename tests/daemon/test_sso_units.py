"""SSH single sign-on in the daemon, without namespaces: the [sso] configuration, the files
``btmm up`` writes for sshd and ssh, whom it trusts, revocation and renewal (daemon/sso.py)."""

from __future__ import annotations

import ipaddress
import signal
import subprocess
import sys
from pathlib import Path

import dns.name
import dns.rdatatype
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from btmm_core.daemon.config import Config, load_config
from btmm_core.daemon.records import PeerRecords, Publication, _rrsets, peer_from_answers
from btmm_core.daemon.sso import Sso, cert_path
from btmm_core.errors import ConfigError
from btmm_core.keyex.keys import StaticKey, encode_public, ula_of
from btmm_core.sso.certs import openssh_public, raw_public
from btmm_core.sso.files import BEGIN, Revoked

ZONE = dns.name.from_text("bob.members.example.")
SECRET = b"an account secret of enough length"
NOW = 1_800_000_000.0


def _config(tmp: Path, extra: str = "", host: str = "desktop") -> Config:
    path = tmp / "btmm.toml"
    path.write_text(f"""[host]
host = "{host}"
state_dir = "{tmp / 'state'}"
[sso]
enabled = true
users = {{"root" = "bob"}}
host_key = "{tmp / 'ssh' / 'host.pub'}"
user_key = "{tmp / 'ssh' / '%u.pub'}"
sshd_dropin = "{tmp / 'ssh' / 'btmm.conf'}"
known_hosts = "{tmp / 'ssh' / 'known_hosts'}"
sshd_pid_file = "{tmp / 'ssh' / 'sshd.pid'}"
{extra}""")
    return load_config(path)


def _sso(tmp: Path, key: StaticKey, host: str = "desktop", secret: bytes = SECRET) -> Sso:
    cfg = _config(tmp, host=host)
    (tmp / "ssh").mkdir(exist_ok=True)
    for name in ("host.pub", "root.pub"):
        (tmp / "ssh" / name).write_text(openssh_public(Ed25519PrivateKey.generate()) + "\n")
    return Sso(cfg, ZONE, key.private, key.public, secret, str(ula_of(key.public)))


def _peer(host: str, key: StaticKey, sso: Sso) -> PeerRecords:
    ca, tag = sso.published()
    return PeerRecords(host, dns.name.from_text(host, origin=ZONE), ula_of(key.public),
                       encode_public(key.public), None, ssh_ca=ca, ssh_bind=tag)


def test_sso_configuration(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "user_validity = 3600\n")
    assert cfg.sso_enabled and cfg.sso_users == {"root": "bob"}
    assert cfg.sso_sshd_dropin == tmp_path / "ssh" / "btmm.conf"
    assert cfg.sso_user_validity == 3600
    for bad, why in (('surprise = 1', "unknown key"), ('users = ["root"]', "table"),
                     ('users = {"../x" = "bob"}', "local user"),
                     ('users = {"root" = "a b"}', "principal"),
                     ('host_validity = 5', "between"), ('enabled = "yes"', "true or false")):
        path = tmp_path / "bad.toml"
        path.write_text(f'[host]\nhost = "d"\n[sso]\n{bad}\n')
        with pytest.raises(ConfigError, match=why):
            load_config(path)
    plain = tmp_path / "plain.toml"
    plain.write_text('[host]\nhost = "d"\n')
    assert not load_config(plain).sso_enabled


def test_start_writes_what_sshd_reads_and_stop_takes_it_out(tmp_path: Path) -> None:
    key = StaticKey.generate()
    sso = _sso(tmp_path, key)
    known = tmp_path / "ssh" / "known_hosts"
    known.write_text("other.example ssh-ed25519 AAAAkeepme\n")
    sso.start(NOW)
    dropin = (tmp_path / "ssh" / "btmm.conf").read_text()
    for line in (f"HostCertificate {sso.files.host_certificate}",
                 f"TrustedUserCAKeys {sso.files.trusted_user_cas}",
                 f"RevokedKeys {sso.files.revoked_keys}",
                 f"AuthorizedPrincipalsFile {sso.files.principals_dir}/%u"):
        assert line in dropin
    assert (sso.files.principals_dir / "root").read_text() == "bob\n"
    st = sso.status(NOW)
    assert st["host_cert"]["principals"] == ["desktop.bob.members.example",
                                             str(ula_of(key.public))]
    assert st["users"]["root"]["principals"] == ["bob"] and st["users"]["root"]["valid"]
    assert cert_path(tmp_path / "ssh" / "root.pub").exists()
    assert st["trusted"] == ["desktop"]
    assert known.read_text().startswith("other.example ssh-ed25519 AAAAkeepme\n" + BEGIN)
    sso.stop()
    assert not (tmp_path / "ssh" / "btmm.conf").exists()
    assert known.read_text() == "other.example ssh-ed25519 AAAAkeepme\n"


def test_only_account_bound_peer_cas_are_trusted_and_revoked_ones_never(tmp_path: Path) -> None:
    me = _sso(tmp_path, StaticKey.generate())
    me.start(NOW)
    lk, sk = StaticKey.generate(), StaticKey.generate()
    (tmp_path / "l").mkdir()
    laptop = _sso(tmp_path / "l", lk, "laptop")
    stranger_dir = tmp_path / "s"
    stranger_dir.mkdir()
    stranger = _sso(stranger_dir, sk, "phone", secret=b"another account's secret, long")
    # the laptop's CA bound under its own name: trusted; under another name: not
    good = _peer("laptop", lk, laptop)
    moved = PeerRecords("tablet", dns.name.from_text("tablet", origin=ZONE), good.ula,
                        good.public_key, None, ssh_ca=good.ssh_ca, ssh_bind=good.ssh_bind)
    me.set_peers([good, moved, _peer("phone", sk, stranger)])
    assert sorted(me.state.trusted) == ["desktop", "laptop"]
    cas = me.files.trusted_user_cas.read_text()
    assert "btmm-ca:laptop" in cas and "btmm-ca:tablet" not in cas
    known = (tmp_path / "ssh" / "known_hosts").read_text()
    assert f"@cert-authority laptop.bob.members.example,{good.ula} " in known
    # revoked: out of the trusted CAs, into the KRL and the known hosts' @revoked
    krl_before = me.files.revoked_keys.read_bytes()
    me.set_revoked([Revoked("laptop", raw_public(laptop.ca), int(NOW))], NOW)
    assert sorted(me.state.trusted) == ["desktop"]
    assert "btmm-ca:laptop" not in me.files.trusted_user_cas.read_text()
    assert me.files.revoked_keys.read_bytes() != krl_before
    assert "@revoked * " in (tmp_path / "ssh" / "known_hosts").read_text()
    me.set_peers([good])  # still published somewhere: still not trusted
    assert sorted(me.state.trusted) == ["desktop"]


def test_renewal_at_half_life_and_sshd_reload(tmp_path: Path) -> None:
    sso = _sso(tmp_path, StaticKey.generate())
    # a process of ours that dies of SIGHUP stands in for sshd's pid file; it restores the
    # default action first (a suite run under nohup hands SIGHUP down ignored) and says when
    child = subprocess.Popen(
        [sys.executable, "-c", "import signal, time\n"
         "signal.signal(signal.SIGHUP, signal.SIG_DFL)\nprint('ready', flush=True)\n"
         "time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        (tmp_path / "ssh" / "sshd.pid").write_text(f"{child.pid}\n")
        sso.start(NOW)
        assert child.wait(timeout=10) == -signal.SIGHUP
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    first = sso.state.host_cert
    assert first is not None
    sso.tick(NOW + 3600)
    assert sso.state.host_cert == first  # a quarter of its life: kept
    sso.tick(NOW + 2 * 3600 + 60)
    assert sso.state.host_cert is not None and sso.state.host_cert.valid_after > \
        first.valid_after
    user = sso.state.user_certs["root"]
    sso.tick(NOW + 5 * 3600 + 60)
    assert sso.state.user_certs["root"].valid_after > user.valid_after


def test_user_certificate_needs_a_mapped_principal(tmp_path: Path) -> None:
    sso = _sso(tmp_path, StaticKey.generate())
    with pytest.raises(ConfigError, match="no principal"):
        sso.issue_user("alice", tmp_path / "ssh" / "root.pub", NOW)


def test_txt_carries_the_bound_ca_and_peers_read_it_back() -> None:
    key = StaticKey.generate()
    pub = Publication("laptop", ula_of(key.public), "AutoTunnel-00", encode_public(key.public),
                      ipaddress.IPv4Address("203.0.113.9"), 4500, ssh_ca="Q0E=",
                      ssh_bind="VEFH")
    sets = {(r.name, r.rdtype): r for r in _rrsets(pub, ZONE)}
    name = dns.name.from_text("laptop", origin=ZONE)
    txt = sets[(name, dns.rdatatype.TXT)]
    aaaa = sets[(name, dns.rdatatype.AAAA)]
    rec = peer_from_answers(name, ZONE, aaaa, txt, None, None)
    assert rec is not None and (rec.ssh_ca, rec.ssh_bind) == ("Q0E=", "VEFH")
    plain = Publication("laptop", pub.ula, "AutoTunnel-00", pub.public_key, None, None)
    txt2 = {(r.name, r.rdtype): r for r in _rrsets(plain, ZONE)}[(name, dns.rdatatype.TXT)]
    assert "sshca" not in txt2.to_text()
