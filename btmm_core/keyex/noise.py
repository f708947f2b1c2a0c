"""The btmm handshake: Noise IKpsk2 over control packets, yielding two ESP SAs.

References: The Noise Protocol Framework, revision 34 (2018-07-11), sections 5 (processing
rules), 7.5 (pattern IK), 9 (pre-shared keys), 12 (BLAKE2s, ChaChaPoly, 25519); J. A.
Donenfeld, "WireGuard: Next Generation Kernel Network Tunnel" (NDSS 2017), sections 5.1-5.4
(messages, mac1/mac2, cookies, timestamps); RFC 7748 (X25519), RFC 8439 (ChaCha20-Poly1305),
RFC 7693 (BLAKE2s), RFC 5869 (HKDF), RFC 4106 (ESP AES-GCM keying material).

Construction
------------
The pattern is ``Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s`` with the prologue ``PROLOGUE``:

    <- s                     (the initiator knows the responder's static key beforehand)
    -> e, es, s, ss          payload1 = TAI64N timestamp(12) | initiator's inbound SPI(4)
    <- e, ee, se, psk        payload2 = responder's inbound SPI(4) | initiator's SPI(4)

Noise itself supplies mutual authentication, forward secrecy, the hiding of the initiator's
identity (its static key travels encrypted) and key confirmation of the responder. The PSK
(derived from the account secret, see ``keys.derive_psk``) is mixed in by message 2, so
a thief of a device key who lacks the account secret cannot complete a handshake. After
message 2, ``Split()`` gives c1 (initiator to responder) and c2 (the other way). Those are
Noise transport keys for ChaChaPoly; the ESP SAs use AES-256-GCM, so each is expanded with
HKDF-SHA256 (salt = the handshake hash h, which covers both SPIs and both static keys):

    keymat(i->r) = HKDF(c1, salt=h, info="btmm v1 esp aes-256-gcm initiator->responder", 36)
    keymat(r->i) = HKDF(c2, salt=h, info="btmm v1 esp aes-256-gcm responder->initiator", 36)
    confirm key  = HKDF(c1, salt=h, info="btmm v1 confirm", 32)

Each 36-byte keymat is an AES-256 key plus a 4-byte salt (RFC 4106 section 8.1). Distinct
labels keep the three keys independent although two share an input key.

Beyond Noise, as in WireGuard: every initiation and response ends with ``mac1`` =
BLAKE2s-128 keyed by BLAKE2s("mac1----" | receiver's public key), so packets from anyone who
does not know the receiver's public key are dropped before any Diffie-Hellman; and with
``mac2`` = BLAKE2s-128 keyed by a cookie. Under load the responder does no DH for an
initiation without a valid mac2 and instead sends a cookie reply: the cookie is
BLAKE2s-128(rotating secret, source address and port), encrypted with ChaCha20-Poly1305
(WireGuard uses XChaCha20; ``cryptography`` lacks it, so a random 96-bit nonce is used: a
repeat becomes likely only after about 2**48 replies under the one key) under
BLAKE2s("cookie--" | responder's public key), with the initiation's mac1 as associated
data. Only a host that can receive at that source address learns the cookie. Per-source
token buckets bound the rate of initiations that reach the DH.

The responder cannot know that the initiator holds the PSK until the initiator proves it,
so the exchange ends with a short confirm message (initiator to responder, an AEAD tag under
the confirm key, nonce 0), which the responder acknowledges (same key, nonce 1). The
responder installs its receive SA when it answers, but transmits on the new SA only after
the confirm; the initiator repeats the confirm until the acknowledgement arrives, and only
then counts the responder as switched (see ``session``). Repeated confirms are answered
again, so a lost acknowledgement costs one more round trip, never a key.

Replay and timestamps: an initiation is authenticated by the static keys alone (the PSK
enters only in message 2), so a thief of a device key who lacks the account secret can make
initiations that pass every check of message 1. Its timestamp must therefore not be trusted
further than our own clock. The rules, per peer:

* an initiation stamped more than ``max_skew`` before our wall clock, or more than
  ``max_future`` after it, is refused (STALE); ``max_skew`` bounds replay after a responder
  restart, when the per-peer state is forgotten;
* each accepted initiation raises the peer's replay floor to its timestamp *clamped to our
  wall clock* (min(stamp, now)); an initiation not above the floor, or equal to the last one
  accepted, is refused (REPLAY);
* once the initiator proves the PSK (its confirm), the floor rises to the full timestamp of
  that handshake.

So an initiation stamped now+599 s (or anything ahead of our clock) forged with a stolen
device key cannot lock out the real peer: the floor it leaves is our "now", which the real
peer's next timestamp exceeds. What remains possible: the thief's initiations are answered
(costing a DH and a pending receive SA); one timed into the round trip of a genuine
handshake displaces it, as before: the responder drops the receive SA it had answered with,
and the real initiator may send on it until its unacknowledged confirm times out and it
rekeys (see ``session``); a peer whose clock runs ahead of ours by d <= ``max_future``
seconds has its captured initiations replayable for d seconds (answered, never completed,
with the same effect); a peer whose clock runs more than ``max_future`` ahead cannot
initiate to us (refused STALE; it can still answer ours). The endpoint of a peer is never
taken from an initiation (see ``session``), only from a message that proves the PSK.

Handshake responses and cookie replies are accepted only for an initiation of ours in
flight (its SPI), must pass mac1, and draw from a per-source token bucket like initiations
(same rate and burst) before any Diffie-Hellman or decryption: forged ones beyond the rate
are refused RATE_LIMITED and change nothing.

Wire formats are those of the dataclasses ``Initiation``, ``Response``, ``CookieReply`` and
``Confirm``; each message rides after the 4-zero-byte non-ESP marker (RFC 3948 section 2.2),
which the engine adds and strips. The SPIs in the clear headers (needed to find the state a
reply belongs to) are also inside the encrypted payloads, and must agree.

Everything here is sans-I/O: callers pass bytes, the monotonic time ``now`` and the wall
clock ``wall`` (Unix seconds), and a source of random bytes; nothing reads a clock or opens
a socket.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from btmm_core.dataplane.api import KEYMAT_LEN, Endpoint
from btmm_core.errors import ConfigError
from btmm_core.keyex.keys import KEY_LEN, PSK_LEN, StaticKey

PROTOCOL_NAME = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
PROLOGUE = b"btmm keyex v1"
HASH_LEN = 32
TAG_LEN = 16
MAC_LEN = 16
TIMESTAMP_LEN = 12
COOKIE_NONCE_LEN = 12
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"
INFO_I2R = b"btmm v1 esp aes-256-gcm initiator->responder"
INFO_R2I = b"btmm v1 esp aes-256-gcm responder->initiator"
INFO_CONFIRM = b"btmm v1 confirm"
#: RFC 4303 section 2.1: SPIs 1-255 are reserved by IANA and 0 is never valid
SPI_MIN = 256
SPI_MAX = 2**32 - 1
#: TAI64 labels second s as 2**62 + s (https://cr.yp.to/libtai/tai64.html)
TAI64_BASE = 2**62

RandomSource = Callable[[int], bytes]


class MessageType(enum.IntEnum):
    INITIATION = 1
    RESPONSE = 2
    COOKIE_REPLY = 3
    CONFIRM = 4
    CONFIRM_ACK = 5
    #: connectivity checks (``reach.probe``): they share the control channel but never reach
    #: the handshake (``is_path_message``)
    PATH_PROBE = 6
    PATH_PROBE_REPLY = 7


PATH_MESSAGES = frozenset({MessageType.PATH_PROBE, MessageType.PATH_PROBE_REPLY})


def is_path_message(message: bytes) -> bool:
    """A connectivity check rather than a handshake message (type 6 or 7, reserved zero)."""
    return len(message) >= 4 and message[0] in PATH_MESSAGES and message[1:4] == b"\0\0\0"


class Refusal(enum.IntEnum):
    """Why a handshake message was refused. Every refusal is counted and leaves no state."""

    MALFORMED = 1  #: wrong length, unknown type, non-zero reserved bytes
    BAD_MAC1 = 2  #: sender does not know our public key (or the packet was altered)
    COOKIE_REQUIRED = 3  #: under load, no valid mac2: answered with a cookie reply instead
    RATE_LIMITED = 4  #: too many initiations (or responses, cookie replies) from this address
    DECRYPT_FAILED = 5  #: an AEAD check failed: tampered, wrong keys or wrong PSK
    UNKNOWN_PEER = 6  #: authenticated static key is not one of our peers
    REPLAY = 7  #: timestamp not newer than the last accepted initiation of the peer
    STALE = 8  #: timestamp too far from our wall clock
    UNKNOWN_RECEIVER = 9  #: response/cookie/confirm for no handshake we are running
    WEAK_KEY = 10  #: a Diffie-Hellman result was all zeros (low-order point)
    SPI_MISMATCH = 11  #: the encrypted SPIs disagree with the clear header


REFUSAL_NAMES: dict[Refusal, str] = {r: r.name.lower() for r in Refusal}

INITIATION_LEN = 4 + 4 + 32 + (KEY_LEN + TAG_LEN) + (TIMESTAMP_LEN + 4 + TAG_LEN) + 2 * MAC_LEN
RESPONSE_LEN = 4 + 4 + 4 + 32 + (8 + TAG_LEN) + 2 * MAC_LEN
COOKIE_REPLY_LEN = 4 + 4 + COOKIE_NONCE_LEN + (MAC_LEN + TAG_LEN)
CONFIRM_LEN = 4 + 4 + TAG_LEN
#: how many answered handshakes keep their confirm key, to re-acknowledge repeated confirms
CONFIRMED_MEMORY = 64
NO_MAC = bytes(MAC_LEN)


# --- wire messages (all integers little endian, as in WireGuard; reserved bytes zero) ----------


def _header(kind: MessageType, *spis: int) -> bytes:
    return bytes([kind, 0, 0, 0]) + b"".join(struct.pack("<I", x) for x in spis)


def _check_length(data: bytes, want: int, what: str) -> None:
    if len(data) != want:
        raise _HandshakeFailure(Refusal.MALFORMED, f"{what} of {len(data)} bytes, not {want}")


@dataclass(frozen=True)
class Initiation:
    """Message 1: type 1 | reserved(3) | sender(4) | ephemeral(32) | static(32+16) |
    payload(16+16) | mac1(16) | mac2(16). ``sender`` is the initiator's inbound SPI."""

    sender: int
    ephemeral: bytes
    static: bytes
    payload: bytes
    mac1: bytes = NO_MAC
    mac2: bytes = NO_MAC

    def body(self) -> bytes:
        """The bytes that mac1 covers."""
        return _header(MessageType.INITIATION, self.sender) + (
            self.ephemeral + self.static + self.payload
        )

    def to_bytes(self) -> bytes:
        return self.body() + self.mac1 + self.mac2

    @classmethod
    def parse(cls, data: bytes) -> Initiation:
        _check_length(data, INITIATION_LEN, "initiation")
        (sender,) = struct.unpack_from("<I", data, 4)
        return cls(sender, data[8:40], data[40:88], data[88:120], data[120:136], data[136:152])


@dataclass(frozen=True)
class Response:
    """Message 2: type 2 | reserved(3) | sender(4) | receiver(4) | ephemeral(32) |
    payload(8+16) | mac1(16) | mac2(16). ``sender`` is the responder's inbound SPI,
    ``receiver`` the initiator's."""

    sender: int
    receiver: int
    ephemeral: bytes
    payload: bytes
    mac1: bytes = NO_MAC
    mac2: bytes = NO_MAC

    def body(self) -> bytes:
        return _header(MessageType.RESPONSE, self.sender, self.receiver) + (
            self.ephemeral + self.payload
        )

    def to_bytes(self) -> bytes:
        return self.body() + self.mac1 + self.mac2

    @classmethod
    def parse(cls, data: bytes) -> Response:
        _check_length(data, RESPONSE_LEN, "response")
        sender, receiver = struct.unpack_from("<II", data, 4)
        return cls(sender, receiver, data[12:44], data[44:68], data[68:84], data[84:100])


_M = TypeVar("_M", Initiation, Response)


@dataclass(frozen=True)
class CookieReply:
    """type 3 | reserved(3) | receiver(4) | nonce(12) | cookie(16+16)."""

    receiver: int
    nonce: bytes
    sealed_cookie: bytes

    def to_bytes(self) -> bytes:
        return _header(MessageType.COOKIE_REPLY, self.receiver) + self.nonce + self.sealed_cookie

    @classmethod
    def parse(cls, data: bytes) -> CookieReply:
        _check_length(data, COOKIE_REPLY_LEN, "cookie reply")
        (receiver,) = struct.unpack_from("<I", data, 4)
        return cls(receiver, data[8 : 8 + COOKIE_NONCE_LEN], data[8 + COOKIE_NONCE_LEN :])


@dataclass(frozen=True)
class Confirm:
    """type 4 (confirm) or 5 (its acknowledgement) | reserved(3) | receiver(4) | tag(16); the
    tag is ChaCha20-Poly1305 of nothing under the confirm key, nonce 0 (confirm) or 1 (ack),
    with the 8 header bytes as associated data."""

    kind: MessageType
    receiver: int
    tag: bytes

    @staticmethod
    def header(kind: MessageType, receiver: int) -> bytes:
        return _header(kind, receiver)

    @classmethod
    def seal(cls, kind: MessageType, receiver: int, key: bytes) -> Confirm:
        nonce = aead_nonce(0 if kind == MessageType.CONFIRM else 1)
        return cls(
            kind, receiver, ChaCha20Poly1305(key).encrypt(nonce, b"", _header(kind, receiver))
        )

    def verify(self, key: bytes) -> bool:
        nonce = aead_nonce(0 if self.kind == MessageType.CONFIRM else 1)
        try:
            ChaCha20Poly1305(key).decrypt(nonce, self.tag, _header(self.kind, self.receiver))
        except InvalidTag:
            return False
        return True

    def to_bytes(self) -> bytes:
        return _header(self.kind, self.receiver) + self.tag

    @classmethod
    def parse(cls, data: bytes) -> Confirm:
        _check_length(data, CONFIRM_LEN, "confirm")
        (receiver,) = struct.unpack_from("<I", data, 4)
        return cls(MessageType(data[0]), receiver, data[8:])


# --- primitives (Noise rev 34 sections 4, 5 and 12) -----------------------------------------


def blake2s(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def mac16(key: bytes, data: bytes) -> bytes:
    """Keyed BLAKE2s with a 16-byte output (WireGuard's MAC)."""
    return hashlib.blake2s(data, key=key, digest_size=MAC_LEN).digest()


def hmac_blake2s(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def noise_hkdf(chaining_key: bytes, ikm: bytes, n: int) -> tuple[bytes, ...]:
    """Noise's HKDF (section 4.3) over HMAC-BLAKE2s, returning ``n`` (2 or 3) outputs."""
    temp = hmac_blake2s(chaining_key, ikm)
    out: list[bytes] = []
    prev = b""
    for i in range(1, n + 1):
        prev = hmac_blake2s(temp, prev + bytes([i]))
        out.append(prev)
    return tuple(out)


def aead_nonce(n: int) -> bytes:
    """ChaChaPoly nonce of Noise section 12.3: 32 zero bits then the 64-bit counter, LE."""
    return b"\x00\x00\x00\x00" + struct.pack("<Q", n)


def x25519(private: bytes, public: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(public)
    )


def public_of(private: bytes) -> bytes:
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def esp_hkdf(key: bytes, handshake_hash: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=handshake_hash, info=info).derive(
        key
    )


def tai64n(wall: float) -> bytes:
    seconds = int(wall)
    nanos = min(int((wall - seconds) * 1e9), 999_999_999)
    return struct.pack(">QI", TAI64_BASE + seconds, nanos)


def tai64n_seconds(stamp: bytes) -> float:
    seconds, nanos = struct.unpack(">QI", stamp)
    return float(seconds - TAI64_BASE) + float(nanos) / 1e9


class _HandshakeFailure(Exception):
    """Internal: a message failed a check; carries the refusal reason."""

    def __init__(self, reason: Refusal, what: str) -> None:
        super().__init__(what)
        self.reason = reason
        self.what = what


class SymmetricState:
    """Noise section 5.2, with the CipherState of section 5.1 folded in."""

    def __init__(self) -> None:
        name = PROTOCOL_NAME
        self.h = name.ljust(HASH_LEN, b"\x00") if len(name) <= HASH_LEN else blake2s(name)
        self.ck = self.h
        self.k: bytes | None = None
        self.n = 0

    def mix_hash(self, data: bytes) -> None:
        self.h = blake2s(self.h, data)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = noise_hkdf(self.ck, ikm, 2)
        self.k, self.n = temp_k, 0

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, temp_k = noise_hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.k, self.n = temp_k, 0

    def mix_dh(self, private: bytes, public: bytes) -> None:
        # An all-zero result means a low-order public key: the "secret" is public knowledge.
        # OpenSSL refuses to compute it (ValueError); other backends may return zeros.
        try:
            shared = x25519(private, public)
        except ValueError:
            shared = bytes(KEY_LEN)
        if not any(shared):
            raise _HandshakeFailure(Refusal.WEAK_KEY, "Diffie-Hellman gave the zero point")
        self.mix_key(shared)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        assert self.k is not None
        ct = ChaCha20Poly1305(self.k).encrypt(aead_nonce(self.n), plaintext, self.h)
        self.n += 1
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext: bytes, what: str) -> bytes:
        assert self.k is not None
        try:
            pt = ChaCha20Poly1305(self.k).decrypt(aead_nonce(self.n), ciphertext, self.h)
        except InvalidTag:
            raise _HandshakeFailure(Refusal.DECRYPT_FAILED, f"{what} failed to decrypt") from None
        self.n += 1
        self.mix_hash(ciphertext)
        return pt

    def copy(self) -> SymmetricState:
        new = SymmetricState.__new__(SymmetricState)
        new.h, new.ck, new.k, new.n = self.h, self.ck, self.k, self.n
        return new

    def split(self) -> tuple[bytes, bytes]:
        c1, c2 = noise_hkdf(self.ck, b"", 2)
        return c1, c2


def _initial_state(responder_static: bytes) -> SymmetricState:
    st = SymmetricState()
    st.mix_hash(PROLOGUE)
    st.mix_hash(responder_static)  # pre-message "<- s"
    return st


# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaKeys:
    """The outcome of one handshake: a pair of ESP SAs seen from the local side."""

    peer: bytes  #: the peer's static public key
    initiator: bool  #: whether we initiated
    rx_spi: int  #: our inbound SPI (the peer sends with it)
    tx_spi: int  #: the peer's inbound SPI (we send with it)
    rx_keymat: bytes = field(repr=False)
    tx_keymat: bytes = field(repr=False)
    handshake_hash: bytes = field(repr=False)


def _derive(
    st: SymmetricState, peer: bytes, *, initiator: bool, i_spi: int, r_spi: int
) -> tuple[SaKeys, bytes]:
    c1, c2 = st.split()
    h = st.h
    i2r = esp_hkdf(c1, h, INFO_I2R, KEYMAT_LEN)
    r2i = esp_hkdf(c2, h, INFO_R2I, KEYMAT_LEN)
    confirm = esp_hkdf(c1, h, INFO_CONFIRM, 32)
    if initiator:
        keys = SaKeys(peer, True, i_spi, r_spi, r2i, i2r, h)
    else:
        keys = SaKeys(peer, False, r_spi, i_spi, i2r, r2i, h)
    return keys, confirm


# --- outcomes of Handshaker.receive --------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    reason: Refusal
    what: str


@dataclass(frozen=True)
class SendReply:
    """Send ``message`` back to ``destination`` (a cookie reply)."""

    destination: Endpoint
    message: bytes


@dataclass(frozen=True)
class PeerInitiation:
    """A valid initiation from a known peer. Answer it with ``Handshaker.respond``."""

    peer: bytes
    remote_spi: int
    source: Endpoint
    timestamp: float
    _state: SymmetricState = field(repr=False, compare=False)
    _remote_ephemeral: bytes = field(repr=False, compare=False)
    _stamp: bytes = field(repr=False, compare=False)


@dataclass(frozen=True)
class HandshakeComplete:
    """Our initiation was answered; ``confirm`` must be sent to the peer."""

    keys: SaKeys
    confirm: bytes
    source: Endpoint


@dataclass(frozen=True)
class CookieStored:
    peer: bytes


@dataclass(frozen=True)
class Confirmed:
    """The initiator proved it holds the keys of a handshake we answered; send it ``ack``.
    ``repeated`` is true for a confirm we had already accepted (our ack was lost)."""

    keys: SaKeys
    source: Endpoint
    ack: bytes
    repeated: bool


@dataclass(frozen=True)
class ConfirmAcked:
    """The responder acknowledged our confirm: it now transmits on the new SA."""

    peer: bytes
    rx_spi: int


Outcome = (
    Refused
    | SendReply
    | PeerInitiation
    | HandshakeComplete
    | CookieStored
    | Confirmed
    | ConfirmAcked
)


# --- the device-level handshake endpoint --------------------------------------------------


@dataclass(frozen=True)
class HandshakeConfig:
    #: maximum age of an initiation's timestamp by our wall clock
    max_skew: float = 600.0
    #: how far ahead of our wall clock an initiation's timestamp may be (a peer's clock may
    #: run ahead by this much and still initiate)
    max_future: float = 30.0
    #: how many initiations per second may reach the DH before we call ourselves loaded
    load_threshold: int = 64
    #: how long a load condition lasts once detected
    load_hold: float = 1.0
    #: per-source token bucket for initiations that reach the DH
    source_rate: float = 20.0
    source_burst: float = 5.0
    #: how long a cookie (and the secret it derives from) is valid (WireGuard: 2 minutes)
    cookie_lifetime: float = 120.0
    #: bound on each per-source bucket table (oldest entries are dropped beyond it)
    max_sources: int = 4096

    def __post_init__(self) -> None:
        if not 0 <= self.max_future <= self.max_skew:
            raise ConfigError(
                "need 0 <= max_future <= max_skew",
                hint=f"got max_future {self.max_future}, max_skew {self.max_skew}",
            )


@dataclass
class _Pending:
    """Our outstanding initiation to a peer (state kept by the initiator)."""

    peer: bytes
    spi: int
    ephemeral: bytes
    state: SymmetricState
    mac1: bytes
    created: float


@dataclass
class _Awaiting:
    keys: SaKeys
    confirm_key: bytes
    created: float
    #: the TAI64N timestamp of the initiation answered
    stamp: bytes = b"\x00" * TIMESTAMP_LEN


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class _PeerRecord:
    #: the replay floor: an initiation must be stamped above it (see the module docstring)
    greatest_timestamp: bytes = b"\x00" * TIMESTAMP_LEN
    #: the timestamp of the last initiation accepted (its exact repeat is refused)
    last_timestamp: bytes = b"\x00" * TIMESTAMP_LEN
    cookie: bytes | None = None
    cookie_time: float = 0.0


def _source_bytes(source: Endpoint) -> bytes:
    return source.host.encode("ascii", "replace") + b"|" + struct.pack(">H", source.port)


class Handshaker:
    """One host's handshake endpoint: builds and checks messages for all its peers."""

    def __init__(
        self,
        static: StaticKey,
        psk: bytes,
        random: RandomSource,
        config: HandshakeConfig | None = None,
    ) -> None:
        if len(psk) != PSK_LEN:
            raise ValueError(f"the PSK is {PSK_LEN} bytes, got {len(psk)}")
        self.static = static
        self.psk = psk
        self.random = random
        self.config = config or HandshakeConfig()
        self.peers: dict[bytes, _PeerRecord] = {}
        self.pending: dict[int, _Pending] = {}
        self.awaiting: dict[int, _Awaiting] = {}
        #: answered and confirmed handshakes (insertion ordered, bounded), by our SPI
        self.confirmed: dict[int, _Awaiting] = {}
        #: our completed initiations whose confirm is not yet acknowledged, by our SPI
        self.unacked: dict[int, tuple[bytes, bytes]] = {}
        self.refused: dict[str, int] = {name: 0 for name in REFUSAL_NAMES.values()}
        self.cookies_sent = 0
        self.cookies_received = 0
        self._mac1_key = blake2s(LABEL_MAC1, static.public)
        self._cookie_key = blake2s(LABEL_COOKIE, static.public)
        self._cookie_secret = b""
        self._old_cookie_secret = b""
        self._cookie_secret_time = float("-inf")
        self._sources: dict[str, _Bucket] = {}
        #: a separate table for responses and cookie replies: forged ones cannot use up the
        #: initiation budget of an address, nor the other way round
        self._reply_sources: dict[str, _Bucket] = {}
        self._recent_dh: list[float] = []
        self._loaded_until = float("-inf")
        self._forced_load = False

    # -- peers ----------------------------------------------------------------------------

    def add_peer(self, public: bytes) -> None:
        if len(public) != KEY_LEN:
            raise ValueError(f"a peer public key is {KEY_LEN} bytes")
        self.peers.setdefault(public, _PeerRecord())

    def remove_peer(self, public: bytes) -> None:
        self.peers.pop(public, None)
        for spi in [s for s, p in self.pending.items() if p.peer == public]:
            del self.pending[spi]
        for table in (self.awaiting, self.confirmed):
            for spi in [s for s, a in table.items() if a.keys.peer == public]:
                del table[spi]
        for spi in [s for s, (peer, _) in self.unacked.items() if peer == public]:
            del self.unacked[spi]

    # -- load -------------------------------------------------------------------------

    def set_forced_load(self, loaded: bool) -> None:
        """Let a driver declare load (for example when its receive queue backs up)."""
        self._forced_load = loaded

    def under_load(self, now: float) -> bool:
        return self._forced_load or now < self._loaded_until

    def _note_dh(self, now: float) -> None:
        self._recent_dh = [t for t in self._recent_dh if now - t < 1.0]
        self._recent_dh.append(now)
        if len(self._recent_dh) >= self.config.load_threshold:
            self._loaded_until = now + self.config.load_hold

    def _take_token(
        self, source: Endpoint, now: float, table: dict[str, _Bucket] | None = None
    ) -> bool:
        cfg = self.config
        sources = self._sources if table is None else table
        b = sources.get(source.host)
        if b is None:
            if len(sources) >= cfg.max_sources:
                sources.pop(next(iter(sources)))
            b = sources[source.host] = _Bucket(cfg.source_burst, now)
        b.tokens = min(cfg.source_burst, b.tokens + (now - b.stamp) * cfg.source_rate)
        b.stamp = now
        if b.tokens < 1.0:
            return False
        b.tokens -= 1.0
        return True

    def _cookie_secrets(self, now: float) -> tuple[bytes, bytes]:
        if now - self._cookie_secret_time >= self.config.cookie_lifetime:
            self._old_cookie_secret = self._cookie_secret
            self._cookie_secret = self.random(32)
            self._cookie_secret_time = now
        return self._cookie_secret, self._old_cookie_secret

    def _refuse(self, reason: Refusal, what: str) -> Refused:
        self.refused[REFUSAL_NAMES[reason]] += 1
        return Refused(reason, what)

    def _mac2_for(self, peer: bytes, now: float) -> bytes:
        rec = self.peers.get(peer)
        if (
            rec is None
            or rec.cookie is None
            or now - rec.cookie_time >= self.config.cookie_lifetime
        ):
            return b"\x00" * MAC_LEN
        return rec.cookie

    # -- initiator ---------------------------------------------------------------------

    def initiate(self, peer: bytes, local_spi: int, now: float, wall: float) -> bytes:
        """Build an initiation to ``peer`` announcing ``local_spi`` as our inbound SPI.

        ``wall`` must not go backwards across calls for one peer (the responder refuses
        a timestamp that is not newer than the last it accepted).
        """
        if peer not in self.peers:
            raise ValueError("initiate() to a key that is not a peer; add_peer() first")
        if not SPI_MIN <= local_spi <= SPI_MAX:
            raise ValueError(f"SPI {local_spi} is outside {SPI_MIN}..{SPI_MAX}")
        ephemeral = self.random(KEY_LEN)
        payload = tai64n(wall) + struct.pack(">I", local_spi)
        msg, st = build_initiation(self.static, peer, ephemeral, local_spi, payload)
        msg = self._with_macs(msg, peer, now)
        self.pending[local_spi] = _Pending(peer, local_spi, ephemeral, st, msg.mac1, now)
        return msg.to_bytes()

    def _with_macs(self, msg: _M, peer: bytes, now: float) -> _M:
        body = msg.body()
        mac1 = mac16(blake2s(LABEL_MAC1, peer), body)
        cookie = self._mac2_for(peer, now)
        mac2 = mac16(cookie, body + mac1) if any(cookie) else NO_MAC
        return replace(msg, mac1=mac1, mac2=mac2)

    def cancel(self, local_spi: int) -> None:
        """Forget an initiation (superseded by a retry or given up)."""
        self.pending.pop(local_spi, None)

    def forget_awaiting(self, local_spi: int) -> None:
        self.awaiting.pop(local_spi, None)

    def forget_unacked(self, local_spi: int) -> None:
        self.unacked.pop(local_spi, None)

    # -- responder --------------------------------------------------------------------------

    def respond(
        self, initiation: PeerInitiation, local_spi: int, now: float
    ) -> tuple[bytes, SaKeys]:
        """Answer a valid initiation. The receive SA must be installed before this message is
        sent; the transmit SA only after ``Confirmed`` (the initiator proving the PSK)."""
        if not SPI_MIN <= local_spi <= SPI_MAX:
            raise ValueError(f"SPI {local_spi} is outside {SPI_MIN}..{SPI_MAX}")
        st = initiation._state.copy()
        ephemeral = self.random(KEY_LEN)
        msg = build_response(
            st,
            self.psk,
            ephemeral,
            initiation._remote_ephemeral,
            initiation.peer,
            local_spi,
            initiation.remote_spi,
        )
        msg = self._with_macs(msg, initiation.peer, now)
        keys, confirm_key = _derive(
            st, initiation.peer, initiator=False, i_spi=initiation.remote_spi, r_spi=local_spi
        )
        self.awaiting[local_spi] = _Awaiting(keys, confirm_key, now, initiation._stamp)
        return msg.to_bytes(), keys

    # -- dispatch ---------------------------------------------------------------------------

    def receive(self, message: bytes, source: Endpoint, now: float, wall: float) -> Outcome:
        """Check one control message. Refusals change nothing but the counters."""
        if len(message) < 4 or message[1:4] != b"\x00\x00\x00":
            return self._refuse(Refusal.MALFORMED, "too short or non-zero reserved bytes")
        kind = message[0]
        try:
            if kind == MessageType.INITIATION:
                return self._on_initiation(Initiation.parse(message), source, now, wall)
            if kind == MessageType.RESPONSE:
                return self._on_response(Response.parse(message), source, now)
            if kind == MessageType.COOKIE_REPLY:
                return self._on_cookie_reply(CookieReply.parse(message), source, now)
            if kind == MessageType.CONFIRM:
                return self._on_confirm(Confirm.parse(message), source)
            if kind == MessageType.CONFIRM_ACK:
                return self._on_confirm_ack(Confirm.parse(message))
        except _HandshakeFailure as exc:
            return self._refuse(exc.reason, exc.what)
        return self._refuse(Refusal.MALFORMED, f"unknown message type {kind}")

    def _check_macs(
        self, msg: Initiation | Response, source: Endpoint, now: float, *, cookie_for: int | None
    ) -> Outcome | None:
        """mac1 always; under load, for initiations (``cookie_for`` = the sender's SPI), mac2
        too, answering a missing or stale one with a cookie reply instead of doing the DH."""
        body = msg.body()
        if not hmac.compare_digest(mac16(self._mac1_key, body), msg.mac1):
            return self._refuse(Refusal.BAD_MAC1, "mac1 does not match our public key")
        if cookie_for is None or not self.under_load(now):
            return None
        current, old = self._cookie_secrets(now)
        for secret in (current, old):
            if secret and hmac.compare_digest(
                mac16(mac16(secret, _source_bytes(source)), body + msg.mac1), msg.mac2
            ):
                return None
        cookie = mac16(current, _source_bytes(source))
        nonce = self.random(COOKIE_NONCE_LEN)
        sealed = ChaCha20Poly1305(self._cookie_key).encrypt(nonce, cookie, msg.mac1)
        self.refused[REFUSAL_NAMES[Refusal.COOKIE_REQUIRED]] += 1
        self.cookies_sent += 1
        return SendReply(source, CookieReply(cookie_for, nonce, sealed).to_bytes())

    def _on_initiation(self, msg: Initiation, source: Endpoint, now: float, wall: float) -> Outcome:
        early = self._check_macs(msg, source, now, cookie_for=msg.sender)
        if early is not None:
            return early
        if not self._take_token(source, now):
            return self._refuse(Refusal.RATE_LIMITED, f"too many initiations from {source.host}")
        self._note_dh(now)
        st = _initial_state(self.static.public)
        e = msg.ephemeral
        st.mix_hash(e)
        st.mix_key(e)  # psk modifier: "e" also calls MixKey (Noise section 9.2)
        st.mix_dh(self.static.private, e)  # es
        peer = st.decrypt_and_hash(msg.static, "the initiator's static key")
        record = self.peers.get(peer)
        if record is None:
            return self._refuse(Refusal.UNKNOWN_PEER, "the initiator's key is not one of our peers")
        st.mix_dh(self.static.private, peer)  # ss
        payload = st.decrypt_and_hash(msg.payload, "the initiation payload")
        stamp, inner_spi = payload[:TIMESTAMP_LEN], struct.unpack(">I", payload[12:16])[0]
        if inner_spi != msg.sender or not SPI_MIN <= msg.sender <= SPI_MAX:
            return self._refuse(Refusal.SPI_MISMATCH, "initiation SPI fields disagree")
        when = tai64n_seconds(stamp)
        if when - wall > self.config.max_future:
            return self._refuse(
                Refusal.STALE,
                f"initiation timestamp is {when - wall:+.0f} s ahead of our clock (at most "
                f"{self.config.max_future:.0f} s allowed); check that both clocks are synced",
            )
        if wall - when > self.config.max_skew:
            return self._refuse(
                Refusal.STALE, f"initiation timestamp is {when - wall:+.0f} s from our clock"
            )
        if stamp <= record.greatest_timestamp or stamp == record.last_timestamp:
            return self._refuse(Refusal.REPLAY, "initiation timestamp is not newer than the last")
        # not proven by the PSK yet: never raise the floor above our own clock (a thief of the
        # device key could otherwise stamp now+max_future and lock the real peer out)
        record.greatest_timestamp = max(record.greatest_timestamp, min(stamp, tai64n(wall)))
        record.last_timestamp = stamp
        return PeerInitiation(peer, msg.sender, source, when, st, e, stamp)

    def _on_response(self, msg: Response, source: Endpoint, now: float) -> Outcome:
        pending = self.pending.get(msg.receiver)
        if pending is None:
            return self._refuse(Refusal.UNKNOWN_RECEIVER, "response to no initiation of ours")
        early = self._check_macs(msg, source, now, cookie_for=None)
        if early is not None:
            return early
        if not self._take_token(source, now, self._reply_sources):
            return self._refuse(Refusal.RATE_LIMITED, f"too many responses from {source.host}")
        st = pending.state.copy()
        e = msg.ephemeral
        st.mix_hash(e)
        st.mix_key(e)
        st.mix_dh(pending.ephemeral, e)  # ee
        st.mix_dh(self.static.private, e)  # se
        st.mix_key_and_hash(self.psk)
        payload = st.decrypt_and_hash(msg.payload, "the response payload")
        r_spi, i_spi = struct.unpack(">II", payload)
        if r_spi != msg.sender or i_spi != msg.receiver or not SPI_MIN <= r_spi <= SPI_MAX:
            return self._refuse(Refusal.SPI_MISMATCH, "response SPI fields disagree")
        keys, confirm_key = _derive(st, pending.peer, initiator=True, i_spi=i_spi, r_spi=r_spi)
        del self.pending[i_spi]
        self.unacked[i_spi] = (pending.peer, confirm_key)
        confirm = Confirm.seal(MessageType.CONFIRM, r_spi, confirm_key)
        return HandshakeComplete(keys, confirm.to_bytes(), source)

    def _on_cookie_reply(self, msg: CookieReply, source: Endpoint, now: float) -> Outcome:
        pending = self.pending.get(msg.receiver)
        if pending is None:
            return self._refuse(Refusal.UNKNOWN_RECEIVER, "cookie reply to no initiation of ours")
        if not self._take_token(source, now, self._reply_sources):
            return self._refuse(
                Refusal.RATE_LIMITED, f"too many cookie replies from {source.host}"
            )
        try:
            cookie = ChaCha20Poly1305(blake2s(LABEL_COOKIE, pending.peer)).decrypt(
                msg.nonce, msg.sealed_cookie, pending.mac1
            )
        except InvalidTag:
            return self._refuse(Refusal.DECRYPT_FAILED, "cookie reply failed to decrypt")
        record = self.peers[pending.peer]
        record.cookie, record.cookie_time = cookie, now
        self.cookies_received += 1
        return CookieStored(pending.peer)

    def _on_confirm(self, msg: Confirm, source: Endpoint) -> Outcome:
        entry = self.awaiting.get(msg.receiver)
        repeated = entry is None
        if entry is None:
            entry = self.confirmed.get(msg.receiver)
        if entry is None:
            return self._refuse(Refusal.UNKNOWN_RECEIVER, "confirm for no handshake we answered")
        if not msg.verify(entry.confirm_key):
            return self._refuse(Refusal.DECRYPT_FAILED, "confirm failed to verify (wrong PSK?)")
        if not repeated:
            del self.awaiting[msg.receiver]
            record = self.peers.get(entry.keys.peer)
            if record is not None:
                # the initiator proved the PSK: its timestamp is now trusted in full
                record.greatest_timestamp = max(record.greatest_timestamp, entry.stamp)
            self.confirmed[msg.receiver] = entry
            while len(self.confirmed) > CONFIRMED_MEMORY:
                del self.confirmed[next(iter(self.confirmed))]
        ack = Confirm.seal(MessageType.CONFIRM_ACK, entry.keys.tx_spi, entry.confirm_key)
        return Confirmed(entry.keys, source, ack.to_bytes(), repeated)

    def _on_confirm_ack(self, msg: Confirm) -> Outcome:
        entry = self.unacked.get(msg.receiver)
        if entry is None:
            return self._refuse(Refusal.UNKNOWN_RECEIVER, "ack for no confirm of ours")
        peer, confirm_key = entry
        if not msg.verify(confirm_key):
            return self._refuse(Refusal.DECRYPT_FAILED, "confirm ack failed to verify")
        del self.unacked[msg.receiver]
        return ConfirmAcked(peer, msg.receiver)


def build_initiation(
    static: StaticKey, peer: bytes, ephemeral: bytes, spi: int, payload: bytes
) -> tuple[Initiation, SymmetricState]:
    """Message 1 without its MACs; ``payload`` is timestamp | SPI (16 bytes)."""
    st = _initial_state(peer)
    e_pub = public_of(ephemeral)
    st.mix_hash(e_pub)
    st.mix_key(e_pub)
    st.mix_dh(ephemeral, peer)  # es
    enc_static = st.encrypt_and_hash(static.public)
    st.mix_dh(static.private, peer)  # ss
    enc_payload = st.encrypt_and_hash(payload)
    return Initiation(spi, e_pub, enc_static, enc_payload), st


def build_response(
    st: SymmetricState,
    psk: bytes,
    ephemeral: bytes,
    remote_ephemeral: bytes,
    peer: bytes,
    spi: int,
    remote_spi: int,
) -> Response:
    """Message 2 without its MACs; advances ``st`` to the end of the handshake."""
    e_pub = public_of(ephemeral)
    st.mix_hash(e_pub)
    st.mix_key(e_pub)
    st.mix_dh(ephemeral, remote_ephemeral)  # ee
    st.mix_dh(ephemeral, peer)  # se
    st.mix_key_and_hash(psk)
    enc_payload = st.encrypt_and_hash(struct.pack(">II", spi, remote_spi))
    return Response(spi, remote_spi, e_pub, enc_payload)
