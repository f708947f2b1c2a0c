"""Device keys, the inner address bound to them, and the account pre-shared key.

Each host has one X25519 key pair (RFC 7748); its public key is what the user's other hosts
trust (the daemon publishes it in the host's TXT record). The private key lives in a file
readable only by its owner (mode 0600), created atomically so that a half-written or
world-readable key never exists on disk.

The account secret is shared by one user's hosts and never sent to the registry. The
handshake mixes in a pre-shared key derived from it with HKDF-SHA256 (RFC 5869) under a
fixed label, so the raw secret is never used as a key and the same secret can safely feed
other derivations under other labels.

A device's inner address (its ULA, RFC 4193) is derived from its public key (``ula_of``):
``fd`` followed by the first 15 bytes of SHA-256(``ULA_LABEL`` | public key). Whoever proves
the key in a handshake thereby owns the address, so a peer cannot claim another device's
address (nor any address outside fd00::/8) without that device's private key, and nothing
else has to carry or sign the address. Making a key whose address equals a given device's
means finding a 120-bit second preimage of SHA-256 (about 2**120 tries).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from btmm_core.errors import ConfigError

KEY_LEN = 32
PSK_LEN = 32
#: HKDF info for the handshake PSK; a different label gives an unrelated key
PSK_LABEL = b"btmm v1 handshake psk"
#: fixed salt so that the PSK depends on the secret alone (RFC 5869 section 3.1)
PSK_SALT = b"btmm account secret"
#: an account secret shorter than this is refused: it is the only thing between a thief of a
#: device key and an impersonation of that device
MIN_SECRET_LEN = 16
#: domain separation for the address derivation (``ula_of``)
ULA_LABEL = b"btmm ULA v1"


def _raw_public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


@dataclass(frozen=True)
class StaticKey:
    """An X25519 key pair as raw 32-byte strings."""

    private: bytes = field(repr=False)
    public: bytes

    @classmethod
    def from_private(cls, private: bytes) -> StaticKey:
        if len(private) != KEY_LEN:
            raise ConfigError(
                f"an X25519 private key is {KEY_LEN} bytes, got {len(private)}",
                hint="the key file is damaged; move it away and let btmm create a new key",
            )
        return cls(private, _raw_public(X25519PrivateKey.from_private_bytes(private)))

    @classmethod
    def generate(cls) -> StaticKey:
        key = X25519PrivateKey.generate()
        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return cls(raw, _raw_public(key))

    @property
    def public_b64(self) -> str:
        return encode_public(self.public)


def encode_public(public: bytes) -> str:
    """The text form of a public key (standard base64, as in WireGuard configurations)."""
    return base64.b64encode(public).decode("ascii")


def ula_of(public: bytes) -> ipaddress.IPv6Address:
    """The inner address bound to a device key: ``fd`` + SHA-256(``ULA_LABEL`` | key)[:15]."""
    if len(public) != KEY_LEN:
        raise ConfigError(f"a public key is {KEY_LEN} bytes, got {len(public)}")
    return ipaddress.IPv6Address(b"\xfd" + hashlib.sha256(ULA_LABEL + public).digest()[:15])


def decode_public(text: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(
            f"public key {text!r} is not base64", hint="copy the key exactly as published"
        ) from exc
    if len(raw) != KEY_LEN:
        raise ConfigError(
            f"public key {text!r} decodes to {len(raw)} bytes, not {KEY_LEN}",
            hint="copy the key exactly as published",
        )
    return raw


def load_or_create(path: Path) -> StaticKey:
    """Read the device key from ``path`` (base64 of the private key), creating it if absent.

    The file must be a regular file owned by us with no group or other permission bits: a
    key that others could have read is refused rather than silently trusted.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return _create(path)
    except OSError as exc:
        raise ConfigError(
            f"cannot open device key {path}: {exc.strerror}",
            hint="the key must be a regular file, not a symlink",
        ) from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"device key {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"device key {path} has mode {stat.S_IMODE(st.st_mode):04o}; others may "
                "have read it",
                hint=f"if nobody else could have read it, `chmod 600 {path}`; otherwise "
                "delete it so a new key is made and republished",
            )
        if st.st_uid != os.geteuid():
            raise ConfigError(
                f"device key {path} belongs to uid {st.st_uid}, not to us ({os.geteuid()})",
                hint="run btmm as the key's owner or fix the ownership",
            )
        text = f.read().decode("ascii", "replace").strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(
            f"device key {path} is not base64",
            hint="the file is damaged; move it away and let btmm create a new key",
        ) from exc
    return StaticKey.from_private(raw)


def _create(path: Path) -> StaticKey:
    key = StaticKey.generate()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # O_EXCL + mode 0600 at creation: the key is never readable by others, not even briefly
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64encode(key.private) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        # link, not rename: if another process created the key meanwhile, keep theirs
        try:
            os.link(tmp, path)
        except FileExistsError:
            return load_or_create(path)
    finally:
        tmp.unlink(missing_ok=True)
    return key


def derive_psk(account_secret: bytes) -> bytes:
    """The handshake pre-shared key: HKDF-SHA256(secret, salt, ``PSK_LABEL``), 32 bytes."""
    if len(account_secret) < MIN_SECRET_LEN:
        raise ConfigError(
            f"the account secret is {len(account_secret)} bytes; at least {MIN_SECRET_LEN} "
            "are needed",
            hint="generate one with `head -c 32 /dev/urandom | base64` and give the same "
            "value to each of your hosts",
        )
    return HKDF(algorithm=hashes.SHA256(), length=PSK_LEN, salt=PSK_SALT, info=PSK_LABEL).derive(
        account_secret
    )
