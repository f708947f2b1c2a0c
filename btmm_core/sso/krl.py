"""OpenSSH key revocation lists (KRL), as ``sshd``'s ``RevokedKeys`` and ``ssh-keygen -Q``
read them (OpenSSH's PROTOCOL.krl).

btmm revokes whole device CAs, so one section kind is enough: explicitly revoked keys
(``KRL_SECTION_EXPLICIT_KEY``). A certificate is refused when its own key *or the CA that
signed it* is listed, so revoking a device's CA revokes every certificate it ever issued.
No signature section: the file is written locally by ``btmm up`` from what the zone says.

Layout (integers big endian, ``string`` = uint32 length + bytes, as in RFC 4251 section 5)::

    uint64 magic "SSHKRL\\n\\0"   uint32 format version 1   uint64 krl version
    uint64 generated date        uint64 flags (0)          string reserved   string comment
    then sections: byte type, string data; type 2 data = string key blob, repeated
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from btmm_core.sso.certs import raw_public

MAGIC = b"SSHKRL\n\x00"
FORMAT_VERSION = 1
SECTION_EXPLICIT_KEY = 2
ED25519 = b"ssh-ed25519"


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def key_blob(raw: bytes) -> bytes:
    """The SSH wire form of an Ed25519 public key (RFC 8709 section 4)."""
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    return _string(ED25519) + _string(raw)


def build_krl(revoked: Iterable[bytes | Ed25519PublicKey], *, version: int, generated: int,
              comment: str = "btmm") -> bytes:
    """A KRL revoking each Ed25519 public key (raw 32 bytes or a key object); sorted and
    without repeats, so the same set always gives the same file."""
    raws = set()
    for key in revoked:
        if isinstance(key, Ed25519PublicKey):
            key = raw_public(key)
        raws.add(bytes(key))
    out = MAGIC + struct.pack(">IQQQ", FORMAT_VERSION, version, generated, 0)
    out += _string(b"") + _string(comment.encode())
    if raws:
        out += bytes([SECTION_EXPLICIT_KEY]) + _string(
            b"".join(_string(key_blob(r)) for r in sorted(raws)))
    return out
