"""Key files (dns/keyfile.py): the one reader and writer of key files and the account secret."""

from __future__ import annotations

import stat
from pathlib import Path

import dns.name

from btmm_core.dns.keyfile import key_file_text, read_key, write_key_file, write_secret
from btmm_core.dns.tsig import HMAC_SHA256, KeyRole, TsigKey

ZONE = dns.name.from_text("bob.members.example.")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_written_key_file_reads_back(tmp_path: Path) -> None:
    key = TsigKey(dns.name.from_text("laptop", origin=ZONE), HMAC_SHA256, bytes(range(32)), ZONE,
                  KeyRole.DEVICE, "laptop")
    path = tmp_path / "keys" / "laptop.key"
    write_key_file(path, key_file_text(key))
    assert read_key(path) == key
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700


def test_only_a_private_directory_is_made_0700(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    write_secret(shared / "a", b"x")
    assert _mode(shared) == 0o755
    write_secret(shared / "b", b"y", private_dir=True)
    assert _mode(shared) == 0o700
    assert (shared / "b").read_bytes() == b"y" and _mode(shared / "b") == 0o600
