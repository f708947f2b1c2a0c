"""Authenticated connectivity checks ("path probes"): wire format, keys and replay rules.

References: RFC 8445 (ICE) sections 2.2 and 7.2 (connectivity checks, simultaneous open,
peer-reflexive candidates, symmetric responses in 7.2.5.2.1); RFC 8489 (STUN) section 14.2
(XOR-MAPPED-ADDRESS: why a reported address is XORed); RFC 5869 (HKDF); RFC 7748 (X25519);
RFC 7693 (BLAKE2s); RFC 3948 section 2.2 (the non-ESP marker the control channel uses).

Used by ``reach.paths`` (the per-peer path manager core), which ``btmm up`` runs per peer.
``KeyExchange.receive`` ignores both types (``keyex.noise.is_path_message``), so a probe never
reaches the handshake; the key-exchange driver hands them to the daemon (``on_path_message``).

Where probes travel
-------------------
A probe is a key-exchange control message: it rides after the 4-zero-byte non-ESP marker on
the engine's UDP port, so it leaves by the very socket (and NAT mapping) ESP uses, and a path
that answers probes carries the tunnel. Its first four bytes are a type and three zero bytes,
like the handshake's; the types follow ``keyex.noise.MessageType``: 6 (PATH_PROBE) and 7
(PATH_PROBE_REPLY). Integers are big endian (network order, as in STUN).

    request  6 0 0 0 | sender id(8) | txid(12) | stamp ms(8) | destination | mac(16)
    reply    7 0 0 0 | sender id(8) | txid(12) | observed source (XORed)  | mac(16)

    endpoint  family(1) 4 or 6 | port(2) | address(4 or 16)

``sender id`` is the first 8 bytes of SHA-256("btmm path probe id" | sender's public key): it
tells the receiver which peer's key checks the MAC without a trial per peer. ``txid`` is 12
random bytes. ``stamp`` is the sender's wall clock in milliseconds. ``destination`` is the
endpoint the sender addressed (which candidate of the receiver it tests). ``observed`` is the
source the replier saw the request come from, XORed with ``XOR_PAD`` + txid (as STUN's
XOR-MAPPED-ADDRESS, so that a NAT that rewrites addresses it finds in payloads cannot spoil it):
a peer-reflexive candidate of the prober. A request of an IPv4 path is 55 bytes, its reply 47,
so a reply is never bigger than the request that caused it (for one family).

Authentication
--------------
Both peers compute one MAC key, and nobody else can:

    ikm  = X25519(own static private, peer static public)      (equal on both sides)
    key  = HKDF-SHA256(ikm, salt = account PSK,
                       info = "btmm path probe v1" | lower public key | higher public key)

so it takes a device key of the account *and* the account secret (via its PSK) to make a
probe, as it does to finish a handshake. MAC = BLAKE2s keyed with that key, 16 bytes, over
every byte before it. One key serves both directions; the sender id inside the MAC and the
rules below keep a message from being turned around (our own id is never a peer's).

Rules (``RequestGuard`` for requests, ``reach.paths`` for replies); a message that breaks one
is dropped and counted (``ProbeDrop``), and changes no state:

* a request is answered only if its MAC checks out, its stamp lies within
  [wall - ``max_age``, wall + ``max_future``], and its (sender, txid) was not seen while such a
  replay could still pass the stamp check; the memory of seen requests is bounded and when it
  is full further requests are refused (BUSY), never answered blindly;
* a reply counts only if its MAC checks out, its txid is one we sent and not yet answered,
  and it comes from the endpoint we sent that txid to (ICE's symmetric check): a copy of a
  genuine reply sent from any other address (WRONG_SOURCE), or sent again (UNSOLICITED),
  moves nothing.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import struct
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from btmm_core.dataplane.api import Endpoint
from btmm_core.errors import ConfigError, MalformedMessage
from btmm_core.keyex.keys import KEY_LEN, PSK_LEN, StaticKey
from btmm_core.keyex.noise import MessageType, x25519

PROBE_INFO = b"btmm path probe v1"
ID_LABEL = b"btmm path probe id"
ID_LEN = 8
TXID_LEN = 12
MAC_LEN = 16
#: XORed (with the txid) over the observed endpoint; STUN's magic cookie, for the same reason
XOR_PAD = bytes.fromhex("2112a442")
HEADER_LEN = 4
NO_MAC = bytes(MAC_LEN)


class Family(enum.IntEnum):
    IPV4 = 4
    IPV6 = 6


ADDRESS_LEN = {Family.IPV4: 4, Family.IPV6: 16}


class ProbeDrop(enum.IntEnum):
    """Why a probe or reply was dropped. Every drop is counted and changes nothing else."""

    MALFORMED = 1  #: truncated, wrong length, unknown family, non-zero reserved bytes
    UNKNOWN_SENDER = 2  #: sender id is not the peer's
    BAD_MAC = 3  #: forged or altered
    STALE = 4  #: request stamp outside the accepted window of our wall clock
    REPLAY = 5  #: request (sender, txid) seen before
    BUSY = 6  #: replay memory full: refused rather than answered unchecked
    UNSOLICITED = 7  #: reply to no probe of ours in flight (forged, replayed or late)
    WRONG_SOURCE = 8  #: reply from another endpoint than the probe was sent to


DROP_NAMES: dict[ProbeDrop, str] = {d: d.name.lower() for d in ProbeDrop}


def key_id(public: bytes) -> bytes:
    """The 8-byte sender id of a device's public key."""
    return hashlib.sha256(ID_LABEL + public).digest()[:ID_LEN]


@dataclass(frozen=True)
class ProbeKeys:
    """The MAC key one pair of devices shares, and both sender ids."""

    own_id: bytes
    peer_id: bytes
    mac_key: bytes = field(repr=False)

    @classmethod
    def derive(cls, static: StaticKey, peer_public: bytes, psk: bytes) -> ProbeKeys:
        if len(peer_public) != KEY_LEN or len(psk) != PSK_LEN:
            raise ConfigError(
                f"probe keys need a {KEY_LEN}-byte public key and a {PSK_LEN}-byte PSK"
            )
        if peer_public == static.public:
            raise ConfigError("a host does not probe itself: the peer key is our own")
        try:
            shared = x25519(static.private, peer_public)
        except ValueError:  # cryptography refuses an all-zero result (a low-order point)
            shared = bytes(KEY_LEN)
        if not any(shared):
            raise ConfigError("the peer's public key is a low-order point", hint="bad TXT pk=")
        low, high = sorted((static.public, peer_public))
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=psk, info=PROBE_INFO + low + high
        ).derive(shared)
        return cls(key_id(static.public), key_id(peer_public), key)


def mac(key: bytes, body: bytes) -> bytes:
    return hashlib.blake2s(body, key=key, digest_size=MAC_LEN).digest()


# --- endpoints on the wire ---------------------------------------------------------------


def encode_endpoint(endpoint: Endpoint, pad: bytes = b"") -> bytes:
    """family | port | address, each byte XORed with ``pad`` (cycled) when one is given."""
    addr = ipaddress.ip_address(endpoint.host)
    family = Family.IPV4 if addr.version == 4 else Family.IPV6
    if not 0 < endpoint.port <= 0xFFFF:
        raise ValueError(f"port out of range: {endpoint.port}")
    raw = struct.pack(">H", endpoint.port) + addr.packed
    return bytes([family]) + _xor(raw, pad)


def decode_endpoint(data: bytes, pad: bytes = b"") -> Endpoint:
    """The inverse of ``encode_endpoint``; ``data`` must be exactly one endpoint."""
    if not data or data[0] not in ADDRESS_LEN:
        raise MalformedMessage("endpoint family is neither 4 nor 6")
    family = Family(data[0])
    if len(data) != 3 + ADDRESS_LEN[family]:
        raise MalformedMessage(f"IPv{family} endpoint of {len(data)} bytes")
    raw = _xor(data[1:], pad)
    (port,) = struct.unpack_from(">H", raw)
    if port == 0:
        raise MalformedMessage("endpoint port 0")
    return Endpoint(str(ipaddress.ip_address(raw[2:])), port)


def _xor(data: bytes, pad: bytes) -> bytes:
    if not pad:
        return data
    return bytes(b ^ pad[i % len(pad)] for i, b in enumerate(data))


def _header(kind: MessageType) -> bytes:
    return bytes([kind, 0, 0, 0])


def _check_header(data: bytes, kind: MessageType, fixed: int) -> None:
    if len(data) < fixed + 3 + ADDRESS_LEN[Family.IPV4] + MAC_LEN:
        raise MalformedMessage(f"probe message of {len(data)} bytes is truncated")
    if data[0] != kind or data[1:4] != b"\0\0\0":
        raise MalformedMessage("not a probe message or non-zero reserved bytes")


# --- messages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeRequest:
    """6 0 0 0 | sender(8) | txid(12) | stamp ms(8) | destination | mac(16)."""

    sender: bytes
    txid: bytes
    stamp_ms: int
    destination: Endpoint
    mac: bytes = NO_MAC

    def body(self) -> bytes:
        return (
            _header(MessageType.PATH_PROBE)
            + self.sender
            + self.txid
            + struct.pack(">Q", self.stamp_ms)
            + encode_endpoint(self.destination)
        )

    def sealed(self, key: bytes) -> ProbeRequest:
        body = self.body()
        return ProbeRequest(self.sender, self.txid, self.stamp_ms, self.destination, mac(key, body))

    def verify(self, key: bytes) -> bool:
        return hmac.compare_digest(mac(key, self.body()), self.mac)

    def to_bytes(self) -> bytes:
        return self.body() + self.mac

    @classmethod
    def parse(cls, data: bytes) -> ProbeRequest:
        fixed = HEADER_LEN + ID_LEN + TXID_LEN + 8
        _check_header(data, MessageType.PATH_PROBE, fixed)
        sender = data[HEADER_LEN : HEADER_LEN + ID_LEN]
        txid = data[HEADER_LEN + ID_LEN : HEADER_LEN + ID_LEN + TXID_LEN]
        (stamp,) = struct.unpack_from(">Q", data, fixed - 8)
        destination = decode_endpoint(data[fixed:-MAC_LEN])
        return cls(sender, txid, stamp, destination, data[-MAC_LEN:])


@dataclass(frozen=True)
class ProbeReply:
    """7 0 0 0 | sender(8) | txid(12) | observed source XOR (pad | txid) | mac(16)."""

    sender: bytes
    txid: bytes
    observed: Endpoint
    mac: bytes = NO_MAC

    def body(self) -> bytes:
        return (
            _header(MessageType.PATH_PROBE_REPLY)
            + self.sender
            + self.txid
            + encode_endpoint(self.observed, XOR_PAD + self.txid)
        )

    def sealed(self, key: bytes) -> ProbeReply:
        return ProbeReply(self.sender, self.txid, self.observed, mac(key, self.body()))

    def verify(self, key: bytes) -> bool:
        return hmac.compare_digest(mac(key, self.body()), self.mac)

    def to_bytes(self) -> bytes:
        return self.body() + self.mac

    @classmethod
    def parse(cls, data: bytes) -> ProbeReply:
        fixed = HEADER_LEN + ID_LEN + TXID_LEN
        _check_header(data, MessageType.PATH_PROBE_REPLY, fixed)
        sender = data[HEADER_LEN : HEADER_LEN + ID_LEN]
        txid = data[HEADER_LEN + ID_LEN : fixed]
        observed = decode_endpoint(data[fixed:-MAC_LEN], XOR_PAD + txid)
        return cls(sender, txid, observed, data[-MAC_LEN:])


def parse_probe(data: bytes) -> ProbeRequest | ProbeReply:
    """Either message, by its type byte; anything else raises ``MalformedMessage``."""
    if data[:1] == bytes([MessageType.PATH_PROBE]):
        return ProbeRequest.parse(data)
    if data[:1] == bytes([MessageType.PATH_PROBE_REPLY]):
        return ProbeReply.parse(data)
    raise MalformedMessage("not a path probe message")


def peek_sender(data: bytes) -> bytes | None:
    """The sender id of a probe message, unchecked: for routing it to the right peer's core."""
    if len(data) < HEADER_LEN + ID_LEN or data[0] not in (6, 7) or data[1:4] != b"\0\0\0":
        return None
    return data[HEADER_LEN : HEADER_LEN + ID_LEN]


# --- requests: the replay rule -----------------------------------------------------------


@dataclass(frozen=True)
class GuardConfig:
    #: oldest request stamp accepted, by our wall clock (the handshake's ``max_skew``)
    max_age: float = 600.0
    #: how far ahead of our wall clock a request stamp may be
    max_future: float = 30.0
    #: requests remembered at most; a peer that paces its probes stays far below
    memory: int = 8192

    def __post_init__(self) -> None:
        if not 0 <= self.max_future <= self.max_age or self.memory < 1:
            raise ConfigError("need 0 <= max_future <= max_age and memory >= 1")


class RequestGuard:
    """Decides whether a request of one peer is answered; remembers what it answered.

    A (sender, txid) is remembered from the moment it is answered for ``max_age +
    max_future`` seconds of ``now``: a copy that came later would have a stamp older than
    ``max_age`` by our wall clock (our clocks advance together), so it fails the stamp check.
    """

    def __init__(self, keys: ProbeKeys, config: GuardConfig | None = None) -> None:
        self.keys = keys
        self.config = config or GuardConfig()
        self._seen: dict[bytes, float] = {}  # txid -> forget after; insertion = expiry order

    def check(self, request: ProbeRequest, now: float, wall: float) -> ProbeDrop | None:
        """None if the request is to be answered (and is now remembered), else why not."""
        cfg = self.config
        if request.sender != self.keys.peer_id:
            return ProbeDrop.UNKNOWN_SENDER
        if not request.verify(self.keys.mac_key):
            return ProbeDrop.BAD_MAC
        stamp = request.stamp_ms / 1000.0
        if stamp < wall - cfg.max_age or stamp > wall + cfg.max_future:
            return ProbeDrop.STALE
        self._forget(now)
        if request.txid in self._seen:
            return ProbeDrop.REPLAY
        if len(self._seen) >= cfg.memory:
            return ProbeDrop.BUSY
        self._seen[request.txid] = now + cfg.max_age + cfg.max_future
        return None

    def _forget(self, now: float) -> None:
        while self._seen:
            txid, until = next(iter(self._seen.items()))
            if until >= now:
                return
            del self._seen[txid]

    def __len__(self) -> int:
        return len(self._seen)
