"""Device key file and PSK derivation."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from btmm_core.errors import ConfigError
from btmm_core.keyex.keys import (
    StaticKey,
    decode_public,
    derive_psk,
    encode_public,
    load_or_create,
)
from btmm_core.keyex.noise import public_of


def test_key_file_is_created_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "device.key"
    key = load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert public_of(key.private) == key.public
    again = load_or_create(path)
    assert again == key
    assert [p.name for p in path.parent.iterdir()] == ["device.key"]  # no temp file left


def test_readable_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    load_or_create(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="others may have read it"):
        load_or_create(path)


def test_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    load_or_create(real)
    link = tmp_path / "device.key"
    link.symlink_to(real)
    with pytest.raises(ConfigError):
        load_or_create(link)


def test_damaged_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    path.write_text("not base64 at all!\n")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="not base64"):
        load_or_create(path)
    path.write_text("AAAA\n")
    with pytest.raises(ConfigError, match="32 bytes"):
        load_or_create(path)


def test_public_key_text_round_trip() -> None:
    key = StaticKey.generate()
    assert decode_public(encode_public(key.public)) == key.public
    with pytest.raises(ConfigError):
        decode_public("AAAA")
    with pytest.raises(ConfigError):
        decode_public("*not base64*")


def test_psk_is_labelled_hkdf_of_the_secret() -> None:
    a = derive_psk(b"0123456789abcdef-account")
    assert len(a) == 32
    assert a == derive_psk(b"0123456789abcdef-account")
    assert a != derive_psk(b"0123456789abcdef-accounT")
    assert a != b"0123456789abcdef-account"[:32]
    with pytest.raises(ConfigError, match="at least"):
        derive_psk(b"short")


def test_private_key_is_not_in_repr() -> None:
    key = StaticKey.generate()
    assert key.private.hex() not in repr(key)
