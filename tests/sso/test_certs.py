"""The SSO module against the real ``ssh-keygen`` (OpenSSH from Debian)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from btmm_core.errors import ConfigError
from btmm_core.sso.certs import (
    CertKind,
    binding_key,
    binding_tag,
    check_binding,
    device_ca,
    load_public,
    openssh_public,
    raw_public,
    read_cert,
    request,
    sign,
)
from btmm_core.sso.files import (
    BEGIN,
    END,
    Revoked,
    SshdFiles,
    dropin_text,
    known_hosts_lines,
    parse_revocation,
    replace_block,
    revocation_strings,
)
from btmm_core.sso.krl import build_krl

NOW = 1_800_000_000.0
SECRET = b"an account secret of enough bytes"

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None,
                                reason="openssh-client is in .ci/apt-packages")


def keygen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh-keygen", *args], capture_output=True, text=True, timeout=30,
                          check=False)


def test_device_ca_is_derived_per_device_key() -> None:
    a, b = device_ca(b"\x01" * 32), device_ca(b"\x02" * 32)
    assert raw_public(a) == raw_public(device_ca(b"\x01" * 32))
    assert raw_public(a) != raw_public(b)
    with pytest.raises(ConfigError):
        device_ca(b"short")


def test_binding_tag_binds_zone_host_device_and_ca() -> None:
    key = binding_key(SECRET)
    ca = raw_public(device_ca(b"\x01" * 32))
    pk = b"\x07" * 32
    tag = base64.b64encode(binding_tag(key, "bob.members.example", "laptop", pk, ca)).decode()
    ca_text = base64.b64encode(ca).decode()
    found = check_binding(key, "bob.members.example.", "laptop", pk, ca_text, tag)
    assert found is not None and raw_public(found) == ca
    # another name, another device key, another account, another CA: refused
    assert check_binding(key, "bob.members.example", "desktop", pk, ca_text, tag) is None
    assert check_binding(key, "bob.members.example", "laptop", b"\x08" * 32, ca_text, tag) is None
    other = binding_key(b"another account's secret, long enough")
    assert check_binding(other, "bob.members.example", "laptop", pk, ca_text, tag) is None
    ca2 = base64.b64encode(raw_public(device_ca(b"\x02" * 32))).decode()
    assert check_binding(key, "bob.members.example", "laptop", pk, ca2, tag) is None
    # malformed input is a refusal, never an exception
    for bad_ca, bad_tag in (("!!", tag), (ca_text, "AAAA"), ("", ""), (ca_text[:-4], tag)):
        assert check_binding(key, "bob.members.example", "laptop", pk, bad_ca, bad_tag) is None


def test_host_certificate_read_by_ssh_keygen(tmp_path: Path) -> None:
    ca = device_ca(b"\x01" * 32)
    host = Ed25519PrivateKey.generate()
    req = request(CertKind.HOST, host.public_key(), "desktop.bob.members.example",
                  ("desktop.bob.members.example", "fd00::1"), now=NOW, validity=4 * 3600,
                  serial=7)
    path = tmp_path / "host-cert.pub"
    path.write_text(sign(req, ca))
    out = keygen("-L", "-f", str(path))
    assert out.returncode == 0, out.stderr
    assert "host certificate" in out.stdout
    assert "desktop.bob.members.example" in out.stdout and "fd00::1" in out.stdout
    fp = keygen("-l", "-f", str(_write(tmp_path / "ca.pub", openssh_public(ca))))
    assert fp.stdout.split()[1] in out.stdout  # signed by this CA
    info = read_cert(path.read_text())
    assert info.kind == CertKind.HOST and info.valid_before - info.valid_after == 4 * 3600 + 300
    assert not info.due(NOW) and info.due(NOW + 2 * 3600) and info.due(NOW - 3600)


def test_user_certificate_read_by_ssh_keygen(tmp_path: Path) -> None:
    ca = device_ca(b"\x01" * 32)
    user = Ed25519PrivateKey.generate()
    pub = load_public(openssh_public(user, "alice@laptop"))
    path = tmp_path / "id_ed25519-cert.pub"
    path.write_text(sign(request(CertKind.USER, pub, "alice@laptop", ("alice",), now=NOW,
                                 validity=36000, serial=1), ca))
    out = keygen("-L", "-f", str(path))
    assert out.returncode == 0, out.stderr
    assert "user certificate" in out.stdout and "permit-pty" in out.stdout
    assert read_cert(path.read_text()).principals == ("alice",)


def test_tampered_certificate_is_refused(tmp_path: Path) -> None:
    ca = device_ca(b"\x01" * 32)
    text = sign(request(CertKind.USER, Ed25519PrivateKey.generate().public_key(), "alice",
                        ("alice",), now=NOW, validity=60, serial=1), ca)
    kind, blob, *_ = text.split()
    raw = base64.b64decode(blob)
    signed_part = raw.replace(b"\x00\x00\x00\x05alice", b"\x00\x00\x00\x05mallo")
    signature = bytearray(raw)
    signature[-10] ^= 1  # inside the 64 signature bytes at the end
    for forged in (signed_part, bytes(signature)):
        assert forged != raw
        with pytest.raises(ConfigError, match="does not verify"):
            read_cert(f"{kind} {base64.b64encode(forged).decode()}")
    with pytest.raises(ConfigError):
        read_cert(openssh_public(ca))
    with pytest.raises(ConfigError):
        load_public("ssh-rsa AAAA")


def test_no_principals_no_certificate() -> None:
    with pytest.raises(ConfigError, match="principals"):
        request(CertKind.USER, Ed25519PrivateKey.generate().public_key(), "a", (), now=NOW,
                validity=60, serial=1)


def test_krl_revokes_every_certificate_of_a_revoked_ca(tmp_path: Path) -> None:
    revoked, kept = device_ca(b"\x01" * 32), device_ca(b"\x02" * 32)
    krl = tmp_path / "revoked.krl"
    krl.write_bytes(build_krl([raw_public(revoked), revoked.public_key()], version=3,
                              generated=int(NOW)))
    user = Ed25519PrivateKey.generate().public_key()
    for ca, want in ((revoked, 1), (kept, 0)):
        cert = _write(tmp_path / "c.pub", sign(request(CertKind.USER, user, "u", ("u",), now=NOW,
                                                       validity=60, serial=9), ca))
        out = keygen("-Q", "-f", str(krl), str(cert))
        assert out.returncode == want, out.stdout + out.stderr
    listing = keygen("-Q", "-l", "-f", str(krl))
    assert listing.returncode == 0 and listing.stdout.count("hash: SHA256:") == 1
    empty = _write(tmp_path / "empty.krl", "")
    empty.write_bytes(build_krl([], version=1, generated=0))
    assert keygen("-Q", "-f", str(empty), str(cert)).returncode == 0


def test_files_texts() -> None:
    files = SshdFiles(Path("/s/host-cert.pub"), Path("/s/cas"), Path("/s/krl"), Path("/s/p"))
    text = dropin_text(files)
    assert "AuthorizedPrincipalsFile /s/p/%u\n" in text and "RevokedKeys /s/krl\n" in text
    ca, bad = device_ca(b"\x01" * 32).public_key(), device_ca(b"\x02" * 32).public_key()
    lines = known_hosts_lines({"desktop": (("desktop.z", "fd00::1"), ca)}, [bad])
    assert lines[0].startswith("@cert-authority desktop.z,fd00::1 ssh-ed25519 ")
    assert lines[1].startswith("@revoked * ssh-ed25519 ")
    mine = "host.example ssh-ed25519 AAAAkeep\n"
    with_block = replace_block(mine, lines)
    assert with_block.startswith(mine) and BEGIN in with_block and END in with_block
    assert replace_block(replace_block(with_block, lines), []) == mine


def test_revocation_records_parse_or_are_refused() -> None:
    ca = raw_public(device_ca(b"\x01" * 32))
    strings = [s.encode() for s in revocation_strings("laptop", ca, 1234)]
    assert parse_revocation(strings) == Revoked("laptop", ca, 1234)
    assert isinstance(parse_revocation([b"device=x", b"sshca=!!"]), str)
    assert isinstance(parse_revocation([b"device=x", b"sshca=AAAA", b"revoked=1"]), str)
    assert isinstance(parse_revocation([b"\xff\xfe", b"revoked=x"]), str)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
