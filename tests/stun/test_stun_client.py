"""One Binding transaction on a virtual clock: the RFC 8489 6.2.1 schedule, what it accepts."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from btmm_core.stun.client import (
    BindingTransaction,
    MappingBehaviour,
    TransactionState,
    mapping_behaviour,
)
from btmm_core.stun.message import (
    Attribute,
    ErrorCode,
    Message,
    MessageClass,
    Method,
    TransportAddress,
    binding_success,
    error_response,
    parse,
)
from btmm_core.stun.responder import StunResponder

SERVER = TransportAddress("192.0.2.53", 3478)
ME = TransportAddress("198.51.100.7", 40123)


def _counter(n: int) -> bytes:
    return b"\xaa" * n


def _run(tx: BindingTransaction, until: float) -> list[float]:
    """Drive the transaction by its own deadlines; the times it sent a request."""
    sent = [0.0]
    tx.start(0.0)
    while (d := tx.next_deadline()) is not None and d <= until:
        if tx.tick(d) is not None:
            sent.append(d)
    return sent


def test_retransmission_schedule_and_timeout() -> None:
    tx = BindingTransaction(SERVER, _counter)
    sent = _run(tx, 1000.0)
    # 0, RTO, 3 RTO, 7 RTO ... with RTO 500 ms, Rc = 7 in all; then Rm x RTO = 8 s.
    assert sent == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert tx.state is TransactionState.TIMED_OUT and tx.next_deadline() is None
    assert tx.error == "no answer from 192.0.2.53:3478 after 7 requests over 39.5 s"
    assert tx.tick(2000.0) is None


def test_tick_before_the_deadline_sends_nothing() -> None:
    tx = BindingTransaction(SERVER, _counter)
    first = tx.start(10.0)
    assert tx.next_deadline() == 10.5
    assert tx.tick(10.49) is None
    assert tx.tick(10.5) == first  # the same request, same transaction id
    assert tx.next_deadline() == 11.5


def test_a_shorter_schedule() -> None:
    tx = BindingTransaction(SERVER, _counter, rc=4, rm=4)
    assert _run(tx, 100.0) == [0.0, 0.5, 1.5, 3.5]
    assert tx.state is TransactionState.TIMED_OUT and "over 5.5 s" in (tx.error or "")


def test_request_has_a_fresh_random_transaction_id() -> None:
    ids = iter([bytes([i]) * 12 for i in range(3)])
    txs = [BindingTransaction(SERVER, lambda n: next(ids)) for _ in range(3)]
    reqs = [parse(tx.start(0.0)) for tx in txs]
    assert [r.transaction_id for r in reqs] == [bytes([i]) * 12 for i in range(3)]
    assert all((r.method, r.cls) == (Method.BINDING, MessageClass.REQUEST) for r in reqs)
    with pytest.raises(ValueError, match="not 12"):
        BindingTransaction(SERVER, lambda n: b"short").start(0.0)
    with pytest.raises(RuntimeError):
        txs[0].start(1.0)


def test_answer_from_a_real_responder() -> None:
    tx = BindingTransaction(SERVER, _counter)
    req = tx.start(0.0)
    assert tx.tick(0.5) is not None  # one retransmission first
    answer = StunResponder().receive(req, ME, 0.6)
    assert answer is not None
    assert tx.receive(answer, SERVER, 0.7) == ME
    assert tx.state is TransactionState.DONE and tx.mapped == ME
    assert tx.rtt == pytest.approx(0.7) and tx.next_deadline() is None
    # a duplicate answer (to the retransmission) changes nothing
    assert tx.receive(answer, SERVER, 0.8) is None and tx.mapped == ME


def test_wrong_transaction_id_or_wrong_source_is_ignored() -> None:
    tx = BindingTransaction(SERVER, _counter)
    tx.start(0.0)
    other = bytes(12)
    forged = [
        (binding_success(other, TransportAddress("203.0.113.66", 1)), SERVER),
        (binding_success(tx.transaction_id, TransportAddress("203.0.113.66", 1)),
         TransportAddress("192.0.2.53", 3479)),  # right id, another port of the server
        (binding_success(tx.transaction_id, TransportAddress("203.0.113.66", 1)),
         TransportAddress("192.0.2.54", 3478)),
        (b"\x00\x01garbage", SERVER),
        (Message(Method.BINDING, MessageClass.REQUEST, tx.transaction_id).to_bytes(), SERVER),
        (Message(0x003, MessageClass.SUCCESS, tx.transaction_id,
                 xor_mapped=ME).to_bytes(), SERVER),
    ]
    for data, src in forged:
        assert tx.receive(data, src, 0.1) is None
    assert tx.state is TransactionState.WAITING and tx.ignored == len(forged)
    # still retransmitting on schedule, and the real answer still counts
    assert tx.tick(0.5) is not None
    assert tx.receive(binding_success(tx.transaction_id, ME), SERVER, 0.6) == ME


def test_error_response_fails_the_transaction() -> None:
    tx = BindingTransaction(SERVER, _counter)
    tx.start(0.0)
    err = error_response(Method.BINDING, tx.transaction_id, ErrorCode.UNKNOWN_ATTRIBUTE,
                         "Unknown Attribute", unknown=(0x0024,))
    assert tx.receive(err, SERVER, 0.2) is None
    assert tx.state is TransactionState.FAILED and tx.next_deadline() is None
    assert tx.error == "192.0.2.53:3478 refused the Binding request: 420 Unknown Attribute"


@pytest.mark.parametrize(("msg", "why"), [
    (lambda t: Message(Method.BINDING, MessageClass.SUCCESS, t), "without a mapped address"),
    (lambda t: Message(Method.BINDING, MessageClass.SUCCESS, t, xor_mapped=ME,
                       others=(Attribute(0x7777, b""),)),
     "unknown comprehension-required attributes 0x7777"),
])
def test_unusable_success_fails(msg: Callable[[bytes], Message], why: str) -> None:
    tx = BindingTransaction(SERVER, _counter)
    tx.start(0.0)
    assert tx.receive(msg(tx.transaction_id).to_bytes(), SERVER, 0.1) is None
    assert tx.state is TransactionState.FAILED and why in (tx.error or "")


def test_mapped_address_from_an_old_server_is_used() -> None:
    tx = BindingTransaction(SERVER, _counter)
    tx.start(0.0)
    old = Message(Method.BINDING, MessageClass.SUCCESS, tx.transaction_id, mapped=ME)
    assert tx.receive(old.to_bytes(), SERVER, 0.1) == ME


def test_mapping_behaviour() -> None:
    a, b = ME, TransportAddress("198.51.100.7", 40124)
    assert mapping_behaviour([a, a]) is MappingBehaviour.ENDPOINT_INDEPENDENT
    assert mapping_behaviour([a, b]) is MappingBehaviour.DEPENDS_ON_DESTINATION
    assert mapping_behaviour([a, None]) is MappingBehaviour.UNKNOWN
    assert mapping_behaviour([a]) is MappingBehaviour.UNKNOWN
    assert mapping_behaviour([None, None]) is MappingBehaviour.NO_ANSWER
    assert mapping_behaviour([]) is MappingBehaviour.NO_ANSWER


def test_constructor_refuses_a_nonsense_schedule() -> None:
    for kw in ({"rc": 0}, {"rm": 0}, {"rto": 0.0}):
        with pytest.raises(ValueError):
            BindingTransaction(SERVER, _counter, **kw)  # type: ignore[arg-type]


def test_ids_differ_with_a_real_random_source() -> None:
    ids = {BindingTransaction(SERVER, os.urandom).start(0.0)[8:20] for _ in range(50)}
    assert len(ids) == 50
