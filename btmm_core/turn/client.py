"""A TURN allocation over UDP, client side, sans-I/O (RFC 8656; authentication: RFC 8489
section 9.2, the long-term credential mechanism).

What it does, in the order it happens:

1. ``start(now)``: an Allocate request without credentials (REQUESTED-TRANSPORT UDP). The
   server answers 401 with a REALM and a NONCE; the request is made again with USERNAME,
   REALM, NONCE and MESSAGE-INTEGRITY (key MD5(username:realm:password)). A 401 to that one
   means the credentials are wrong (or expired): ``AllocationFailed``.
2. A success carries XOR-RELAYED-ADDRESS, XOR-MAPPED-ADDRESS and LIFETIME: ``Allocated``.
   A Refresh is sent before the lifetime runs out (at half of it, or a minute before: the
   later); ``release`` sends one with LIFETIME 0.
3. ``permit(peer)``: CreatePermission (permissions last 300 s, refreshed every 240 s; a
   permission is for the peer's IP address, any port).
   ``bind(peer)``: ChannelBind (which installs the permission too), refreshed every 240 s;
   once the server confirmed it, ``send`` frames data to that peer as ChannelData (4 bytes of
   header) instead of a Send indication (36 or more).
4. A 438 (stale nonce) to any request: the request is made again with the new NONCE (three
   times at most). A Refresh, permission or channel answered 437 (allocation mismatch), or a
   Refresh that times out, means the server lost the allocation (it restarted):
   ``AllocationLost``, and the client allocates again and restores its permissions and
   channels.

Requests are retransmitted as RFC 8489 6.2.1 says, with a shorter budget (``rc`` sends, the
last awaited ``rm`` x RTO). Only a response to one of our transactions, from the server, counts;
a success to an authenticated request must carry a MESSAGE-INTEGRITY made with our key. Any
other input (a forged or malformed message, ChannelData on a channel not bound, a Data
indication from a peer without a permission) is dropped and counted in ``drops``; it never
changes the state.

The vocabulary is the one every btmm core uses: ``receive(data, source, now)``,
``datagrams_to_send()`` (all of them to the server), ``next_timer()``, ``handle_timer(now)``,
``next_event()``. ``turn.driver`` runs it on asyncio.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from btmm_core.errors import MalformedMessage
from btmm_core.stun.message import (
    TRANSACTION_ID_LEN,
    Attribute,
    AttributeType,
    ErrorCode,
    Message,
    MessageClass,
    Method,
    TransportAddress,
    TurnAttributeType,
    add_integrity,
    channel_attribute,
    check_integrity,
    data_attribute,
    lifetime_attribute,
    long_term_key,
    parse,
    text_attribute,
    transport_attribute,
    turn_attributes,
    xor_address_attribute,
)
from btmm_core.stun.turn import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    decode_channel_data,
    encode_channel_data,
    is_channel_data,
)

RTO = 0.5
RC = 5
RM = 8
#: RFC 8656: the default allocation lifetime (7.2), a permission's (9) and a channel's (12).
DEFAULT_LIFETIME = 600
PERMISSION_LIFETIME = 300
CHANNEL_LIFETIME = 600
#: permissions and channels are refreshed this often (a minute before the permission ends)
PEER_REFRESH = 240.0
MAX_STALE_RETRIES = 3


class AllocationState(enum.Enum):
    IDLE = "idle"
    ALLOCATING = "allocating"
    ALLOCATED = "allocated"
    FAILED = "failed"  #: refused or unanswered: a caller may ``start`` again (new credentials)
    RELEASED = "released"


# ---- events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Allocated:
    relayed: TransportAddress
    mapped: TransportAddress | None
    lifetime: int


@dataclass(frozen=True)
class AllocationFailed:
    code: int | None  #: the server's error code; None: no answer
    reason: str


@dataclass(frozen=True)
class AllocationLost:
    """The server no longer has our allocation; the client is allocating again."""

    reason: str


@dataclass(frozen=True)
class PermissionCreated:
    peer: TransportAddress


@dataclass(frozen=True)
class ChannelBound:
    peer: TransportAddress
    channel: int


@dataclass(frozen=True)
class PeerFailed:
    """A CreatePermission or ChannelBind for ``peer`` was refused or not answered."""

    peer: TransportAddress
    code: int | None
    reason: str


@dataclass(frozen=True)
class PeerData:
    """Data a peer sent to our relayed address; ``channel`` says it came as ChannelData."""

    peer: TransportAddress
    data: bytes
    channel: bool


Event = (Allocated | AllocationFailed | AllocationLost | PermissionCreated | ChannelBound
         | PeerFailed | PeerData)


class _Kind(enum.Enum):
    ALLOCATE = "allocate"
    REFRESH = "refresh"
    PERMISSION = "permission"
    CHANNEL = "channel"


@dataclass
class _Tx:
    kind: _Kind
    method: Method
    attrs: Callable[[bytes], list[Attribute]]
    authenticated: bool
    wire: bytes = b""
    deadline: float = 0.0
    tries: int = 0
    stale: int = 0
    peer: TransportAddress | None = None
    channel: int | None = None
    lifetime: int | None = None


@dataclass
class _Peer:
    channel: int | None = None  #: the number asked for (bound once ``bound``)
    bound: bool = False
    permitted: bool = False
    refresh_at: float | None = None  #: when its permission or channel is renewed
    pending: bool = False  #: a request for it is in flight


class TurnClient:
    def __init__(
        self,
        server: TransportAddress,
        username: str,
        password: str,
        random_bytes: Callable[[int], bytes],
        *,
        lifetime: int = DEFAULT_LIFETIME,
        software: str | None = None,
        rto: float = RTO,
        rc: int = RC,
        rm: int = RM,
    ) -> None:
        if rc < 1 or rm < 1 or rto <= 0 or lifetime <= 0:
            raise ValueError("rto and lifetime must be positive, rc and rm at least 1")
        self.server = server
        self.username, self.password = username, password
        self._random_bytes = random_bytes
        self.requested_lifetime = lifetime
        self.software = software
        self.rto, self.rc, self.rm = rto, rc, rm
        self.state = AllocationState.IDLE
        self.relayed: TransportAddress | None = None
        self.mapped: TransportAddress | None = None
        self.lifetime = 0
        self.expires_at: float | None = None
        self.error: str | None = None
        #: inputs dropped, by reason (never a state change)
        self.drops: Counter[str] = Counter()
        #: data the caller asked to send that could not be (no allocation, no permission)
        self.unsent = 0
        #: allocations made, and lost (server restarts) since start
        self.allocations = 0
        self.losses = 0
        self._realm: str | None = None
        self._nonce: str | None = None
        self._key: bytes | None = None
        self._txs: dict[bytes, _Tx] = {}
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()
        self._refresh_at: float | None = None
        self._peers: dict[TransportAddress, _Peer] = {}
        self._channels: dict[int, TransportAddress] = {}
        self._next_channel = CHANNEL_MIN

    # ---- the caller's side -------------------------------------------------------------

    def start(self, now: float) -> None:
        """Allocate (again, after ``FAILED``: with the credentials set last)."""
        if self.state in (AllocationState.ALLOCATING, AllocationState.ALLOCATED):
            raise RuntimeError(f"the allocation is {self.state.value} already")
        self._allocate(now)

    def set_credentials(self, username: str, password: str) -> None:
        """New credentials (a fresh offer): used from the next allocation on (the server ties
        an allocation to the username that made it)."""
        self.username, self.password = username, password

    def permit(self, peer: TransportAddress, now: float) -> None:
        """Ask for a permission for ``peer`` (kept and refreshed until ``forget``)."""
        p = self._peers.setdefault(peer, _Peer())
        if self.state is AllocationState.ALLOCATED and not p.pending:
            self._permission(peer, p, now)

    def bind(self, peer: TransportAddress, now: float) -> int:
        """Bind a channel to ``peer`` (its permission included); returns its number."""
        p = self._peers.setdefault(peer, _Peer())
        if p.channel is None:
            if self._next_channel > CHANNEL_MAX:
                raise RuntimeError("all 4096 channel numbers are used")
            p.channel = self._next_channel
            self._next_channel += 1
        if self.state is AllocationState.ALLOCATED and not p.pending:
            self._channel_bind(peer, p, now)
        return p.channel

    def forget(self, peer: TransportAddress) -> None:
        """Stop refreshing ``peer``'s permission and channel (they lapse on the server)."""
        p = self._peers.pop(peer, None)
        if p is not None and p.channel is not None:
            self._channels.pop(p.channel, None)

    def permitted(self, host: str) -> bool:
        """Whether the server has confirmed a permission for ``host`` (permissions are per IP
        address, any port: RFC 8656 section 9), by CreatePermission or ChannelBind."""
        return any(p.permitted and a.host == host for a, p in self._peers.items())

    def channel_of(self, peer: TransportAddress) -> int | None:
        """The channel bound (and confirmed) to ``peer``, or None."""
        p = self._peers.get(peer)
        return p.channel if p is not None and p.bound else None

    def send(self, peer: TransportAddress, data: bytes, now: float) -> bool:
        """Queue ``data`` for ``peer`` through the relay: ChannelData on a bound channel, else
        a Send indication once a permission exists. False (counted in ``unsent``) when
        neither is possible yet."""
        p = self._peers.get(peer)
        if self.state is not AllocationState.ALLOCATED:
            self.unsent += 1
            return False
        if p is not None and p.bound and p.channel is not None:
            self._out.append(encode_channel_data(p.channel, data))
            return True
        if not self.permitted(peer.host):
            self.unsent += 1
            return False
        txid = self._txid()
        self._out.append(Message(
            Method.SEND, MessageClass.INDICATION, txid,
            others=(xor_address_attribute(TurnAttributeType.XOR_PEER_ADDRESS, peer, txid),
                    data_attribute(data)),
            fingerprint=True).to_bytes())
        return True

    def release(self, now: float) -> None:
        """Give the allocation back (a Refresh with LIFETIME 0)."""
        if self.state is AllocationState.ALLOCATED:
            self._txs = {k: t for k, t in self._txs.items() if t.kind is _Kind.ALLOCATE}
            self._request(_Kind.REFRESH, Method.REFRESH, lambda _: [lifetime_attribute(0)],
                          now, lifetime=0)
        self.state = AllocationState.RELEASED
        self._refresh_at = None
        for p in self._peers.values():
            p.refresh_at = None

    def refresh(self, now: float) -> None:
        """Refresh the allocation now (the timer does it by itself)."""
        if self.state is AllocationState.ALLOCATED:
            self._refresh_at = None
            self._send_refresh(now)

    def datagrams_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def next_timer(self) -> float | None:
        times = [t.deadline for t in self._txs.values()]
        if self._refresh_at is not None:
            times.append(self._refresh_at)
        times.extend(p.refresh_at for p in self._peers.values() if p.refresh_at is not None)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        for txid, tx in list(self._txs.items()):
            if txid in self._txs and now >= tx.deadline:
                if tx.tries >= self.rc:
                    del self._txs[txid]
                    self._timed_out(tx, now)
                else:
                    self._transmit(tx, now)
        if self._refresh_at is not None and now >= self._refresh_at:
            self._refresh_at = None
            self._send_refresh(now)
        if self.state is AllocationState.ALLOCATED:
            for peer, p in list(self._peers.items()):
                if p.refresh_at is not None and now >= p.refresh_at and not p.pending:
                    p.refresh_at = None
                    if p.channel is not None:
                        self._channel_bind(peer, p, now)
                    else:
                        self._permission(peer, p, now)

    # ---- input -------------------------------------------------------------------------

    def receive(self, data: bytes, source: TransportAddress, now: float) -> None:
        if source != self.server:
            self.drops["not from the server"] += 1
            return
        if is_channel_data(data):
            self._channel_data(data)
            return
        try:
            msg = parse(data)
        except MalformedMessage:
            self.drops["malformed"] += 1
            return
        if msg.cls is MessageClass.INDICATION:
            self._indication(msg)
            return
        if msg.cls is MessageClass.REQUEST:
            self.drops["request"] += 1
            return
        tx = self._txs.get(msg.transaction_id)
        if tx is None or tx.method != msg.method:
            self.drops["no such transaction"] += 1
            return
        try:
            attrs = turn_attributes(msg)
        except MalformedMessage:
            self.drops["malformed"] += 1
            return
        if tx.authenticated and self._key is not None:
            if attrs.integrity and not check_integrity(data, self._key):
                self.drops["integrity"] += 1
                return
            if msg.cls is MessageClass.SUCCESS and not attrs.integrity:
                self.drops["integrity"] += 1
                return
        del self._txs[msg.transaction_id]
        if msg.cls is MessageClass.SUCCESS:
            self._success(tx, msg, attrs.relayed, attrs.lifetime, now)
        else:
            code = msg.error.code if msg.error is not None else None
            why = str(msg.error) if msg.error is not None else "an error without ERROR-CODE"
            self._error(tx, code, why, attrs.realm, attrs.nonce, now)

    def _channel_data(self, data: bytes) -> None:
        try:
            channel, payload = decode_channel_data(data)
        except MalformedMessage:
            self.drops["malformed channel data"] += 1
            return
        peer = self._channels.get(channel)
        if peer is None:
            self.drops["unknown channel"] += 1
            return
        self._events.append(PeerData(peer, payload, True))

    def _indication(self, msg: Message) -> None:
        if msg.method != Method.DATA:
            self.drops["indication"] += 1
            return
        try:
            attrs = turn_attributes(msg)
        except MalformedMessage:
            self.drops["malformed"] += 1
            return
        if not attrs.peers or attrs.data is None:
            self.drops["malformed"] += 1
            return
        if not self.permitted(attrs.peers[0].host):
            self.drops["no permission"] += 1
            return
        self._events.append(PeerData(attrs.peers[0], attrs.data, False))

    def _success(self, tx: _Tx, msg: Message, relayed: TransportAddress | None,
                 lifetime: int | None, now: float) -> None:
        if tx.kind is _Kind.ALLOCATE:
            if relayed is None:
                self._fail(None, "the Allocate success has no XOR-RELAYED-ADDRESS")
                return
            self.state = AllocationState.ALLOCATED
            self.allocations += 1
            self.relayed, self.mapped = relayed, msg.xor_mapped
            self._lifetime(lifetime or DEFAULT_LIFETIME, now)
            self._events.append(Allocated(relayed, msg.xor_mapped, self.lifetime))
            for peer, p in self._peers.items():  # after a loss: put them back
                if p.channel is not None:
                    self._channel_bind(peer, p, now)
                else:
                    self._permission(peer, p, now)
        elif tx.kind is _Kind.REFRESH:
            if tx.lifetime == 0 or self.state is not AllocationState.ALLOCATED:
                return
            self._lifetime(lifetime or self.lifetime, now)
        else:
            assert tx.peer is not None
            known = self._peers.get(tx.peer)
            if known is None or self.state is not AllocationState.ALLOCATED:
                return  # forgotten meanwhile
            self._peer_ok(tx, known, now)

    def _peer_ok(self, tx: _Tx, p: _Peer, now: float) -> None:
        assert tx.peer is not None
        p.pending = False
        p.refresh_at = now + PEER_REFRESH
        if tx.kind is _Kind.CHANNEL and tx.channel is not None and tx.channel == p.channel:
            p.permitted = True
            if not p.bound:
                p.bound = True
                self._channels[tx.channel] = tx.peer
                self._events.append(ChannelBound(tx.peer, tx.channel))
        elif tx.kind is _Kind.PERMISSION and not p.permitted:
            p.permitted = True
            self._events.append(PermissionCreated(tx.peer))

    def _error(self, tx: _Tx, code: int | None, why: str, realm: str | None,
               nonce: str | None, now: float) -> None:
        if code in (ErrorCode.UNAUTHENTICATED, ErrorCode.STALE_NONCE) and nonce is not None:
            first = code == ErrorCode.UNAUTHENTICATED and not tx.authenticated
            if (first or code == ErrorCode.STALE_NONCE) and tx.stale < MAX_STALE_RETRIES:
                if realm is not None:
                    self._realm = realm
                if self._realm is None:
                    self._fail(code, "the server sent a NONCE without a REALM")
                    return
                self._nonce = nonce
                self._key = long_term_key(self.username, self._realm, self.password)
                self._request(tx.kind, tx.method, tx.attrs, now, peer=tx.peer,
                              channel=tx.channel, lifetime=tx.lifetime, stale=tx.stale + 1)
                return
        if tx.kind is _Kind.ALLOCATE:
            self._fail(code, f"{self.server} refused the allocation: {why}")
        elif tx.kind is _Kind.REFRESH:
            if tx.lifetime != 0 and self.state is AllocationState.ALLOCATED:
                self._lost(f"{self.server} refused the refresh: {why}", now)
        elif code == ErrorCode.ALLOCATION_MISMATCH:
            if self.state is AllocationState.ALLOCATED:
                self._lost(f"{self.server} has no allocation for us: {why}", now)
        else:
            self._peer_failed(tx, code, why)

    def _timed_out(self, tx: _Tx, now: float) -> None:
        why = f"no answer from {self.server} after {tx.tries} requests"
        if tx.kind is _Kind.ALLOCATE:
            self._fail(None, why)
        elif tx.kind is _Kind.REFRESH:
            if tx.lifetime != 0 and self.state is AllocationState.ALLOCATED:
                self._lost(why, now)
        else:
            self._peer_failed(tx, None, why)

    def _peer_failed(self, tx: _Tx, code: int | None, why: str) -> None:
        assert tx.peer is not None
        p = self._peers.get(tx.peer)
        if p is not None:
            p.pending = False
        self._events.append(PeerFailed(tx.peer, code, why))

    # ---- state changes -------------------------------------------------------------------

    def _lifetime(self, lifetime: int, now: float) -> None:
        self.lifetime = lifetime
        self.expires_at = now + lifetime
        self._refresh_at = now + max(lifetime / 2, lifetime - 60)

    def _fail(self, code: int | None, why: str) -> None:
        self.state = AllocationState.FAILED
        self.error = why
        self._txs.clear()
        self._refresh_at = None
        for p in self._peers.values():
            p.pending, p.bound, p.permitted, p.refresh_at = False, False, False, None
        self._channels.clear()
        self._events.append(AllocationFailed(code, why))

    def _lost(self, why: str, now: float) -> None:
        self.losses += 1
        self._events.append(AllocationLost(why))
        self._allocate(now)

    def _allocate(self, now: float) -> None:
        self.state = AllocationState.ALLOCATING
        self.error = None
        self.relayed = self.mapped = None
        self._txs.clear()
        self._refresh_at = None
        self._channels.clear()
        for p in self._peers.values():
            p.pending, p.bound, p.permitted, p.refresh_at = False, False, False, None
        # A fresh start: the server tells its realm and nonce again (after a restart they
        # changed anyway), and the credentials set last are the ones used.
        self._realm = self._nonce = None
        self._key = None
        lifetime = self.requested_lifetime

        def attrs(_: bytes) -> list[Attribute]:
            return [transport_attribute(), lifetime_attribute(lifetime)]

        self._request(_Kind.ALLOCATE, Method.ALLOCATE, attrs, now)

    def _send_refresh(self, now: float) -> None:
        lifetime = self.requested_lifetime
        self._request(_Kind.REFRESH, Method.REFRESH, lambda _: [lifetime_attribute(lifetime)],
                      now, lifetime=lifetime)

    def _permission(self, peer: TransportAddress, p: _Peer, now: float) -> None:
        p.pending = True
        self._request(
            _Kind.PERMISSION, Method.CREATE_PERMISSION,
            lambda txid: [xor_address_attribute(TurnAttributeType.XOR_PEER_ADDRESS, peer, txid)],
            now, peer=peer)

    def _channel_bind(self, peer: TransportAddress, p: _Peer, now: float) -> None:
        assert p.channel is not None
        p.pending = True
        channel = p.channel
        self._request(
            _Kind.CHANNEL, Method.CHANNEL_BIND,
            lambda txid: [channel_attribute(channel),
                          xor_address_attribute(TurnAttributeType.XOR_PEER_ADDRESS, peer, txid)],
            now, peer=peer, channel=channel)

    # ---- requests ------------------------------------------------------------------------

    def _txid(self) -> bytes:
        txid = self._random_bytes(TRANSACTION_ID_LEN)
        if len(txid) != TRANSACTION_ID_LEN:
            raise ValueError(f"random_bytes gave {len(txid)} bytes, not {TRANSACTION_ID_LEN}")
        return txid

    def _request(self, kind: _Kind, method: Method, attrs: Callable[[bytes], list[Attribute]],
                 now: float, *, peer: TransportAddress | None = None, channel: int | None = None,
                 lifetime: int | None = None, stale: int = 0) -> None:
        txid = self._txid()
        others = list(attrs(txid))
        authenticated = self._key is not None and self._nonce is not None
        if authenticated:
            assert self._realm is not None and self._nonce is not None
            others += [text_attribute(AttributeType.USERNAME, self.username),
                       text_attribute(AttributeType.REALM, self._realm),
                       text_attribute(AttributeType.NONCE, self._nonce)]
        msg = Message(method, MessageClass.REQUEST, txid, software=self.software,
                      others=tuple(others), fingerprint=not authenticated)
        wire = msg.to_bytes()
        if authenticated:
            assert self._key is not None
            wire = add_integrity(wire, self._key)
        tx = _Tx(kind, method, attrs, authenticated, wire, stale=stale, peer=peer,
                 channel=channel, lifetime=lifetime)
        self._txs[txid] = tx
        self._transmit(tx, now)

    def _transmit(self, tx: _Tx, now: float) -> None:
        tx.tries += 1
        if tx.tries < self.rc:
            tx.deadline = now + self.rto * 2 ** (tx.tries - 1)
        else:
            tx.deadline = now + self.rto * self.rm
        self._out.append(tx.wire)
