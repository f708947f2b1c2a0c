"""Device enrolment: the EDNS option and the key agreement, sans-I/O (client and server side).

A host that joins an account gets its own TSIG key (RFC 8945, hmac-sha256, 256 bits) without
the secret ever crossing the network: the client sends a DNS UPDATE (RFC 2136) for the user's
zone with no prerequisites and no updates, signed with the account key or an invite token,
carrying the ``EnrolOption`` (EDNS0, RFC 6891; code 65321 from the local/experimental range)
with its ephemeral X25519 public key (RFC 7748) and the device name. The registry answers,
signed with the same key (so the answer's MAC covers the request's MAC, RFC 8945 section 5.3),
with its own ephemeral public key and the new key's name. Both sides derive the secret with
HKDF-SHA256 (RFC 5869) from the X25519 result, salted with the request's MAC, over a transcript
of the zone, key name, device name and both public keys. An on-path observer sees only the two
public keys; changing either breaks a TSIG MAC.

Option data: version (1) | flags (1; bit 0: replace an enrolled device) | public key (32) |
text: the device name in a request, the key name in an answer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import dns.edns
import dns.exception
import dns.message
import dns.name
import dns.update
import dns.wire
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from btmm_core.dns.tsig import HMAC_SHA256, KeyRole, TsigKey

ENROL_CODE = 65321
VERSION = 1
FLAG_REPLACE = 0x01
SECRET_LEN = 32
_INFO = b"btmm device key v1"


class EnrolOption(dns.edns.Option):
    """One side's ephemeral public key and, in a request, the device name (else the key name)."""

    def __init__(self, public: bytes, text: str, *, replace: bool = False, version: int = VERSION):
        super().__init__(dns.edns.OptionType.make(ENROL_CODE))
        if len(public) != 32:
            raise ValueError("an X25519 public key has 32 bytes")
        self.public = public
        self.text = text
        self.replace = replace
        self.version = version

    def to_wire(self, file: Any | None = None) -> bytes | None:
        data = (
            struct.pack("!BB", self.version, FLAG_REPLACE if self.replace else 0)
            + self.public
            + self.text.encode("ascii")
        )
        if file:
            file.write(data)
            return None
        return data

    def to_text(self) -> str:
        return f"ENROL v{self.version} {self.text}{' replace' if self.replace else ''}"

    @classmethod
    def from_wire_parser(cls, otype: Any, parser: dns.wire.Parser) -> dns.edns.Option:
        data = parser.get_remaining()
        if len(data) < 35 or len(data) > 34 + 255:
            raise dns.exception.FormError(  # type: ignore[no-untyped-call]
                f"enrolment option has {len(data)} bytes"
            )
        version, flags = struct.unpack("!BB", data[:2])
        try:
            text = data[34:].decode("ascii")
        except UnicodeDecodeError as e:
            raise dns.exception.FormError(  # type: ignore[no-untyped-call]
                "enrolment option text is not ASCII"
            ) from e
        return cls(data[2:34], text, replace=bool(flags & FLAG_REPLACE), version=version)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EnrolOption) and (
            self.public, self.text, self.replace, self.version
        ) == (other.public, other.text, other.replace, other.version)

    def __hash__(self) -> int:
        return hash((self.public, self.text, self.replace, self.version))


dns.edns.register_type(EnrolOption, dns.edns.OptionType.make(ENROL_CODE))


def find_option(msg: dns.message.Message) -> EnrolOption | None:
    for opt in msg.options:
        if isinstance(opt, EnrolOption):
            return opt
    return None


def device_key_name(device: str, zone: dns.name.Name) -> dns.name.Name:
    """A device's TSIG key is named like its host name: ``<device>.<zone>``."""
    return dns.name.from_text(device, origin=zone)


def derive_secret(
    shared: bytes,
    *,
    zone: dns.name.Name,
    key_name: dns.name.Name,
    device: str,
    client_public: bytes,
    server_public: bytes,
    request_mac: bytes,
) -> bytes:
    """HKDF-SHA256 over the X25519 result, salted with the request's MAC, bound to the
    transcript (zone, key name, device, both public keys)."""
    info = b"".join(
        struct.pack("!H", len(part)) + part
        for part in (
            _INFO,
            zone.canonicalize().to_wire() or b"",
            key_name.canonicalize().to_wire() or b"",
            device.encode("ascii"),
            client_public,
            server_public,
        )
    )
    return HKDF(hashes.SHA256(), SECRET_LEN, request_mac, info).derive(shared)


def _raw(public: X25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class ServerAnswer:
    """What the registry sends back and the key it stores."""

    option: EnrolOption
    key: TsigKey


def server_side(
    private: X25519PrivateKey,
    request: EnrolOption,
    *,
    zone: dns.name.Name,
    request_mac: bytes,
) -> ServerAnswer:
    """The registry's half: the new device key and the option of the answer."""
    device = request.text
    key_name = device_key_name(device, zone)
    server_public = _raw(private.public_key())
    shared = private.exchange(X25519PublicKey.from_public_bytes(request.public))
    secret = derive_secret(
        shared,
        zone=zone,
        key_name=key_name,
        device=device,
        client_public=request.public,
        server_public=server_public,
        request_mac=request_mac,
    )
    key = TsigKey(key_name, HMAC_SHA256, secret, zone, KeyRole.DEVICE, device)
    return ServerAnswer(EnrolOption(server_public, key_name.to_text()), key)


class EnrolClient:
    """The joining host's half: ``request()`` to send (sign it, keep its MAC), ``finish()``."""

    def __init__(self, zone: dns.name.Name, device: str, *, replace: bool = False,
                 private: X25519PrivateKey | None = None) -> None:
        self.zone = zone
        self.device = device
        self.replace = replace
        self._private = private or X25519PrivateKey.generate()
        self.public = _raw(self._private.public_key())

    def request(self) -> dns.update.UpdateMessage:
        msg = dns.update.UpdateMessage(self.zone)
        msg.use_edns(0, options=[EnrolOption(self.public, self.device, replace=self.replace)])
        return msg

    def finish(self, answer: dns.message.Message, request_mac: bytes) -> TsigKey:
        """The device key from the registry's (already TSIG-verified) answer."""
        from btmm_core.errors import RegistryError

        opt = find_option(answer)
        if opt is None or opt.version != VERSION:
            raise RegistryError(
                "the registry's answer to the enrolment carries no usable enrolment option",
                hint="the registry may be too old for `btmm join`; update `btmm serve`",
            )
        key_name = dns.name.from_text(opt.text)
        if key_name != device_key_name(self.device, self.zone):
            raise RegistryError(f"the registry named the device key {key_name}, not "
                                f"{device_key_name(self.device, self.zone)}")
        shared = self._private.exchange(X25519PublicKey.from_public_bytes(opt.public))
        secret = derive_secret(
            shared,
            zone=self.zone,
            key_name=key_name,
            device=self.device,
            client_public=self.public,
            server_public=opt.public,
            request_mac=request_mac,
        )
        return TsigKey(key_name, HMAC_SHA256, secret, self.zone, KeyRole.DEVICE, self.device)
