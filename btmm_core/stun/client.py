"""One STUN Binding transaction, sans-I/O (RFC 8489 section 6.2.1: retransmission over UDP;
6.3: receiving the response), and what two of them say about the NAT (RFC 4787 section 4.1).

``BindingTransaction(server, random_bytes)``: ``start(now)`` returns the request (a fresh
96-bit transaction id from ``random_bytes``); ``tick(now)`` returns a retransmission when one is
due; ``next_deadline()`` says when to call it; ``receive(data, source, now)`` returns the
server-reflexive address once the answer is in. Only a success or error response with our
transaction id, from the server we asked, counts: anything else is ignored, so an off-path
sender must guess 96 random bits to move our idea of our own address.

Retransmission, as 6.2.1 has it: RTO 500 ms, doubling; Rc = 7 transmissions (at 0, 0.5, 1.5,
3.5, 7.5, 15.5 and 31.5 s), then the transaction fails Rm x RTO = 8 s after the last one, at
39.5 s. The caller may shorten it (``rc``, ``rm``) where a user waits.

``mapping_behaviour`` compares the reflexive addresses one local socket got from two server
addresses: the same address and port means endpoint-independent mapping (the NAT reuses one
mapping for every destination, so a hole punched towards one peer serves all); different means
the mapping depends on the destination. Used by ``btmm netcheck``; ``btmm up`` runs the
transaction from the engine's socket for its REFLEXIVE candidate (daemon/host.py).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence

from btmm_core.errors import MalformedMessage
from btmm_core.stun.message import (
    TRANSACTION_ID_LEN,
    Message,
    MessageClass,
    Method,
    TransportAddress,
    binding_request,
    parse,
)

RTO = 0.5
RC = 7
RM = 16


class TransactionState(enum.Enum):
    IDLE = "idle"
    WAITING = "waiting"
    DONE = "done"  #: answered with a mapped address
    FAILED = "failed"  #: an error response, or an answer we cannot use
    TIMED_OUT = "timed out"


class BindingTransaction:
    def __init__(self, server: TransportAddress, random_bytes: Callable[[int], bytes], *,
                 rto: float = RTO, rc: int = RC, rm: int = RM,
                 software: str | None = None) -> None:
        if rc < 1 or rm < 1 or rto <= 0:
            raise ValueError("rto must be positive, rc and rm at least 1")
        self.server = server
        self._random_bytes = random_bytes
        self.rto, self.rc, self.rm = rto, rc, rm
        self.software = software
        self.state = TransactionState.IDLE
        self.transaction_id = b""
        self.tries = 0
        self.started: float | None = None
        self.answered: float | None = None
        self.mapped: TransportAddress | None = None
        self.error: str | None = None
        self.ignored = 0
        self._request = b""
        self._deadline: float | None = None

    def start(self, now: float) -> bytes:
        """The first transmission."""
        if self.state is not TransactionState.IDLE:
            raise RuntimeError("the transaction has already started")
        txid = self._random_bytes(TRANSACTION_ID_LEN)
        if len(txid) != TRANSACTION_ID_LEN:
            raise ValueError(f"random_bytes gave {len(txid)} bytes, not {TRANSACTION_ID_LEN}")
        self.transaction_id = txid
        self._request = binding_request(txid, software=self.software)
        self.state = TransactionState.WAITING
        self.started = now
        return self._transmit(now)

    def _transmit(self, now: float) -> bytes:
        self.tries += 1
        if self.tries < self.rc:
            self._deadline = now + self.rto * 2 ** (self.tries - 1)
        else:  # the last transmission: wait Rm x RTO for its answer, then give up
            self._deadline = now + self.rto * self.rm
        return self._request

    def next_deadline(self) -> float | None:
        """When ``tick`` has something to do; None unless waiting."""
        return self._deadline

    def tick(self, now: float) -> bytes | None:
        """A retransmission when one is due; past the last wait the transaction times out."""
        if self.state is not TransactionState.WAITING or self._deadline is None:
            return None
        if now < self._deadline:
            return None
        if self.tries >= self.rc:
            self.state = TransactionState.TIMED_OUT
            self._deadline = None
            assert self.started is not None
            self.error = (f"no answer from {self.server} after {self.tries} requests over "
                          f"{now - self.started:.1f} s")
            return None
        return self._transmit(now)

    def receive(self, data: bytes, source: TransportAddress, now: float) -> TransportAddress | None:
        """Our mapped address once the answer to this transaction arrives, else None."""
        if self.state is not TransactionState.WAITING or source != self.server:
            self.ignored += 1
            return None
        try:
            msg = parse(data)
        except MalformedMessage:
            self.ignored += 1
            return None
        if (msg.transaction_id != self.transaction_id or msg.method != Method.BINDING
                or msg.cls not in (MessageClass.SUCCESS, MessageClass.ERROR)):
            self.ignored += 1
            return None
        self._deadline = None
        self.answered = now
        return self._conclude(msg)

    def _conclude(self, msg: Message) -> TransportAddress | None:
        unknown = msg.unknown_required()
        if msg.cls is MessageClass.ERROR:
            said = str(msg.error) if msg.error is not None else "no ERROR-CODE"
            self._fail(f"{self.server} refused the Binding request: {said}")
            return None
        if unknown:  # 6.3.3: a success with what we cannot understand fails the transaction
            self._fail(f"{self.server} answered with unknown comprehension-required "
                       f"attributes {', '.join(f'{t:#06x}' for t in unknown)}")
            return None
        mapped = msg.xor_mapped or msg.mapped
        if mapped is None:
            self._fail(f"{self.server} answered without a mapped address")
            return None
        self.state = TransactionState.DONE
        self.mapped = mapped
        return mapped

    def _fail(self, why: str) -> None:
        self.state = TransactionState.FAILED
        self.error = why

    @property
    def finished(self) -> bool:
        return self.state not in (TransactionState.IDLE, TransactionState.WAITING)

    @property
    def rtt(self) -> float | None:
        """From the first request to the answer (retransmissions included)."""
        if self.started is None or self.answered is None:
            return None
        return self.answered - self.started


class MappingBehaviour(enum.Enum):
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    DEPENDS_ON_DESTINATION = "depends on destination"
    UNKNOWN = "unknown"  #: fewer than two answers
    NO_ANSWER = "no answer"


def mapping_behaviour(mapped: Sequence[TransportAddress | None]) -> MappingBehaviour:
    """The verdict from the reflexive addresses one socket got from different server
    addresses (None: that one did not answer)."""
    got = [m for m in mapped if m is not None]
    if not got:
        return MappingBehaviour.NO_ANSWER
    if len(got) < 2:
        return MappingBehaviour.UNKNOWN
    if all(m == got[0] for m in got):
        return MappingBehaviour.ENDPOINT_INDEPENDENT
    return MappingBehaviour.DEPENDS_ON_DESTINATION
