"""OpenSSH certificates for single sign-on between one account's hosts (docs/architecture.md
section 12, decision 6).

Certificates are OpenSSH's (PROTOCOL.certkeys, ``ssh-ed25519-cert-v01@openssh.com``), built
and signed by ``cryptography``'s ``SSHCertificateBuilder``, never encoded by hand. The signing
key is the device's own CA: Ed25519 with a seed derived from the device's X25519 private key by
HKDF-SHA256 (RFC 5869) under its own label, so it needs no file and changes with the device key.
Peers trust it only when the tag in the device's TXT record checks out: an HMAC-SHA256 (RFC
2104) under a key derived from the account secret, which the registry never sees.

Pure functions of their arguments (the time and the serial come in), so tests run them on any
clock and ``ssh-keygen`` checks what they make.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from enum import IntEnum

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import ssh

from btmm_core.errors import ConfigError

#: HKDF info of the device CA seed (salt below): a key unrelated to the handshake's
CA_LABEL = b"btmm v1 ssh ca"
CA_SALT = b"btmm device key"
#: HKDF info of the key that binds a device CA to the account (salt as the handshake PSK's)
BIND_LABEL = b"btmm v1 ssh ca binding"
BIND_SALT = b"btmm account secret"
#: bytes of HMAC-SHA256 kept in the published tag: 128 bits, as a MAC needs no more
TAG_LEN = 16
#: host certificates: hours-long, renewed at half their life
HOST_VALIDITY = 4 * 3600.0
#: user certificates: 10 h, the source design's ticket lifetime
USER_VALIDITY = 10 * 3600.0
#: certificates start this long before they are made, so a peer whose clock is a little
#: behind accepts them at once
BACKDATE = 300.0
#: what a user certificate permits (ssh-keygen's defaults for user certificates)
USER_EXTENSIONS = (
    "permit-X11-forwarding",
    "permit-agent-forwarding",
    "permit-port-forwarding",
    "permit-pty",
    "permit-user-rc",
)


class CertKind(IntEnum):
    """The certificate type field (PROTOCOL.certkeys)."""

    USER = 1
    HOST = 2


def device_ca(device_private: bytes) -> Ed25519PrivateKey:
    """This device's SSH CA, derived from its X25519 private key (32 bytes)."""
    if len(device_private) != 32:
        raise ConfigError(f"a device private key is 32 bytes, got {len(device_private)}")
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=CA_SALT, info=CA_LABEL).derive(
        device_private
    )
    return Ed25519PrivateKey.from_private_bytes(seed)


def raw_public(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def openssh_public(key: Ed25519PrivateKey | Ed25519PublicKey, comment: str = "") -> str:
    """``ssh-ed25519 AAAA... [comment]``, one line of an authorized keys or CA file."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    text = pub.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH).decode()
    return f"{text} {comment}" if comment else text


def binding_key(account_secret: bytes) -> bytes:
    """The key of the tags that bind device CAs to the account."""
    if len(account_secret) < 16:
        raise ConfigError(f"the account secret is {len(account_secret)} bytes; at least 16 "
                          "are needed")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=BIND_SALT,
                info=BIND_LABEL).derive(account_secret)


def _bound(zone: str, host: str, device_public: bytes, ca_public: bytes) -> bytes:
    # each field length-prefixed, so no two different tuples give the same bytes
    out = b""
    for part in (zone.lower().rstrip(".").encode(), host.lower().encode(), device_public,
                 ca_public):
        out += len(part).to_bytes(2, "big") + part
    return out


def binding_tag(key: bytes, zone: str, host: str, device_public: bytes,
                ca_public: bytes) -> bytes:
    """HMAC-SHA256(key, zone | host | device key | CA key)[:16]: the CA is this device's,
    said by someone who holds the account secret."""
    mac = hmac.new(key, _bound(zone, host, device_public, ca_public), hashlib.sha256)
    return mac.digest()[:TAG_LEN]


def check_binding(key: bytes, zone: str, host: str, device_public: bytes,
                  ca_text: str, tag_text: str) -> Ed25519PublicKey | None:
    """The peer's CA from its TXT strings ``sshca``/``sshbind``, or None when either is
    malformed or the tag does not match (a CA the account did not bind is never trusted)."""
    try:
        ca_raw = base64.b64decode(ca_text, validate=True)
        tag = base64.b64decode(tag_text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(ca_raw) != 32 or len(tag) != TAG_LEN:
        return None
    want = binding_tag(key, zone, host, device_public, ca_raw)
    if not hmac.compare_digest(want, tag):
        return None
    return Ed25519PublicKey.from_public_bytes(ca_raw)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def load_public(text: str) -> Ed25519PublicKey:
    """An ``ssh-ed25519`` public key line (a host key or a user's ``id_ed25519.pub``)."""
    try:
        key = ssh.load_ssh_public_key(text.strip().encode())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"not an OpenSSH public key: {text.strip()[:40]!r}",
                          hint="give the .pub file of an ed25519 key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"the key is {type(key).__name__}, not ed25519",
                          hint="make one with `ssh-keygen -t ed25519`")
    return key


@dataclass(frozen=True)
class CertRequest:
    """What to sign: a public key, for whom, and for how long (Unix times)."""

    kind: CertKind
    public_key: Ed25519PublicKey
    key_id: str
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    serial: int


def request(kind: CertKind, public_key: Ed25519PublicKey, key_id: str,
            principals: tuple[str, ...], *, now: float, validity: float,
            serial: int) -> CertRequest:
    if not principals:
        raise ConfigError(f"certificate {key_id}: no principals",
                          hint="a certificate without principals would be valid for anyone")
    if validity <= 0:
        raise ConfigError(f"certificate {key_id}: validity {validity} s")
    return CertRequest(kind, public_key, key_id, tuple(principals), int(now - BACKDATE),
                       int(now + validity), serial & 0xFFFF_FFFF_FFFF_FFFF)


def sign(req: CertRequest, ca: Ed25519PrivateKey) -> str:
    """The certificate as one line (``ssh-ed25519-cert-v01@openssh.com AAAA... key id``)."""
    builder = (
        ssh.SSHCertificateBuilder()
        .public_key(req.public_key)
        .serial(req.serial)
        .type(ssh.SSHCertificateType.USER if req.kind == CertKind.USER
              else ssh.SSHCertificateType.HOST)
        .key_id(req.key_id.encode())
        .valid_principals([p.encode() for p in req.principals])
        .valid_after(req.valid_after)
        .valid_before(req.valid_before)
    )
    if req.kind == CertKind.USER:
        for ext in USER_EXTENSIONS:
            builder = builder.add_extension(ext.encode(), b"")
    cert = builder.sign(ca)
    return f"{cert.public_bytes().decode()} {req.key_id}\n"


@dataclass(frozen=True)
class CertInfo:
    """What ``btmm status`` shows of a certificate."""

    kind: CertKind
    key_id: str
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    ca: bytes

    def left(self, now: float) -> float:
        return self.valid_before - now

    def due(self, now: float) -> bool:
        """Time to renew: half of its life is gone (or it is not valid yet or any more)."""
        half = self.valid_after + (self.valid_before - self.valid_after) / 2
        return now >= half or now < self.valid_after

    def to_json(self, now: float) -> dict[str, object]:
        return {"key_id": self.key_id, "principals": list(self.principals),
                "valid_after": self.valid_after, "valid_before": self.valid_before,
                "left": round(self.valid_before - now), "valid": self.valid_after <= now
                < self.valid_before}


def read_cert(text: str) -> CertInfo:
    """Parse a certificate line and check its signature (ConfigError if it is not one)."""
    try:
        cert = ssh.load_ssh_public_identity(text.strip().encode())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"not an OpenSSH certificate: {exc}") from exc
    if not isinstance(cert, ssh.SSHCertificate):
        raise ConfigError("a public key, not a certificate")
    try:
        cert.verify_cert_signature()
    except Exception as exc:  # cryptography raises InvalidSignature, not a ValueError
        raise ConfigError("the certificate's signature does not verify",
                          hint="it was altered or is damaged; issue it again") from exc
    ca = cert.signature_key()
    kind = CertKind.USER if cert.type == ssh.SSHCertificateType.USER else CertKind.HOST
    return CertInfo(kind, cert.key_id.decode("utf-8", "replace"),
                    tuple(p.decode("utf-8", "replace") for p in cert.valid_principals),
                    cert.valid_after, cert.valid_before,
                    raw_public(ca) if isinstance(ca, Ed25519PublicKey) else b"")
