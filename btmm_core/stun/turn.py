"""TURN framing and credentials, sans-I/O (RFC 8656 section 12.4: ChannelData; the TURN REST
API credential scheme that coturn's ``use-auth-secret`` implements).

ChannelData is a 4-byte header (channel number 0x4000..0x4FFF, length of the application data)
and the data. Over UDP the padding to a multiple of 4 is optional and the datagram may be
longer than the header says (the rest is padding, ignored); over TCP/TLS the padding is
required so that the next message starts on a 4-byte boundary (12.5). A datagram shorter than
its header says is dropped. The first two bits of a ChannelData message are 01, of a STUN
message 00: ``is_channel_data`` tells the two apart on a shared socket.

Credentials: the registry holds a secret it shares with the TURN server; a device gets a
username ``"<expiry>:<name>"`` (expiry in seconds since the epoch) and the password
base64(HMAC-SHA1(secret, username)). The TURN server recomputes the password from the username
and refuses it once the expiry is past, so the secret never leaves the registry and a leaked
credential dies by itself. ``TurnOffer`` is what a device is given: the server, the username,
the password and the expiry, carried as the strings of one TXT record.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from dataclasses import dataclass

from btmm_core.errors import MalformedMessage
from btmm_core.stun.message import DEFAULT_PORT, Fault

CHANNEL_HEADER_LEN = 4
CHANNEL_MIN = 0x4000
CHANNEL_MAX = 0x4FFF  #: RFC 8656 section 12: 0x5000..0x7FFF are reserved
#: the TXT record's version string; anything else is refused
OFFER_VERSION = "v=turn1"


def is_channel_data(data: bytes) -> bool:
    """The first two bits are 01 (section 12.4 and RFC 7983's demultiplexing)."""
    return len(data) >= 1 and data[0] & 0xC0 == 0x40


def encode_channel_data(channel: int, data: bytes, *, pad: bool = False) -> bytes:
    """One ChannelData message; ``pad`` (required over TCP/TLS) to a multiple of 4 bytes."""
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise ValueError(f"channel {channel:#06x} is not in 0x4000..0x4fff")
    if len(data) > 0xFFFF:
        raise ValueError(f"{len(data)} bytes do not fit a ChannelData message")
    out = struct.pack("!HH", channel, len(data)) + data
    return out + b"\0" * (-len(data) % 4) if pad else out


def decode_channel_data(datagram: bytes, *, stream: bool = False) -> tuple[int, bytes]:
    """(channel, application data); raises ``MalformedMessage`` for a short datagram, a
    channel number outside 0x4000..0x4FFF, or (``stream``) padding that is missing."""
    if len(datagram) < CHANNEL_HEADER_LEN:
        raise MalformedMessage(f"ChannelData: {len(datagram)} bytes, the header needs 4",
                               reason=Fault.TRUNCATED)
    channel, length = struct.unpack_from("!HH", datagram)
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise MalformedMessage(f"ChannelData: channel {channel:#06x} is not in 0x4000..0x4fff",
                               reason=Fault.NOT_STUN)
    end = CHANNEL_HEADER_LEN + length
    if end > len(datagram):
        raise MalformedMessage(f"ChannelData: the header says {length} bytes, "
                               f"{len(datagram) - CHANNEL_HEADER_LEN} follow",
                               reason=Fault.BAD_LENGTH)
    if stream and len(datagram) < end + (-length % 4):
        raise MalformedMessage("ChannelData over a stream without its padding",
                               reason=Fault.BAD_LENGTH)
    return channel, datagram[CHANNEL_HEADER_LEN:end]


def rest_password(secret: bytes, username: str) -> str:
    """The password coturn's ``use-auth-secret`` expects for ``username``."""
    mac = hmac.new(secret, username.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode()


def rest_username(name: str, expiry: int) -> str:
    if ":" in name or not name:
        raise ValueError(f"TURN user name {name!r}: not empty, no ':'")
    return f"{expiry}:{name}"


@dataclass(frozen=True)
class TurnOffer:
    """Time-limited credentials for a TURN server: what the registry hands a device."""

    host: str
    port: int
    username: str
    password: str
    expiry: int  #: seconds since the epoch

    @classmethod
    def make(cls, host: str, port: int, secret: bytes, name: str, expiry: int) -> TurnOffer:
        username = rest_username(name, expiry)
        return cls(host, port, username, rest_password(secret, username), expiry)

    def expired(self, now: float) -> bool:
        return now >= self.expiry

    def server(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def to_txt(self) -> list[str]:
        """The strings of the TXT record (each under 255 bytes)."""
        return [OFFER_VERSION, f"server={self.server()}", f"username={self.username}",
                f"password={self.password}", f"expires={self.expiry}"]

    @classmethod
    def from_txt(cls, strings: list[str]) -> TurnOffer:
        """Raises ``MalformedMessage`` for a record that is not a version-1 offer."""
        if not strings or strings[0] != OFFER_VERSION:
            raise MalformedMessage("TURN offer: not a v=turn1 record")
        fields: dict[str, str] = {}
        for s in strings[1:]:
            key, sep, value = s.partition("=")
            if not sep or key in fields:
                raise MalformedMessage(f"TURN offer: bad or repeated field {s[:40]!r}")
            fields[key] = value
        try:
            host, port = split_server(fields["server"])
            expiry = int(fields["expires"])
            return cls(host, port, fields["username"], fields["password"], expiry)
        except (KeyError, ValueError) as e:
            raise MalformedMessage(f"TURN offer: {e}") from None


def split_server(text: str) -> tuple[str, int]:
    """``HOST[:PORT]`` or ``[V6]:PORT``; port 3478 when absent. Raises ``ValueError``."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: write an IPv6 server as [ADDRESS]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        host, port_text = text, ""
    else:
        host, port_text = text, ""
    port = int(port_text) if port_text else DEFAULT_PORT
    if not host or not 1 <= port <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, port
