"""Retransmission schedules on a virtual clock, source filtering, and the epoch rules."""

from __future__ import annotations

import ipaddress
import itertools
import struct

import pytest

from btmm_core.portmap import natpmp, pcp
from btmm_core.portmap.epoch import EpochRule, EpochTracker, natpmp_epoch_valid, pcp_epoch_valid
from btmm_core.portmap.retry import (
    NATPMP_SCHEDULE,
    PCP_SCHEDULE,
    Exchange,
    ExchangeState,
    RetrySchedule,
)

GW = ("192.168.7.1", 5351)


def _run_to_exhaustion(ex: Exchange[object]) -> list[float]:
    """Drive the exchange on a virtual clock; returns the send times."""
    now = 0.0
    sends = [now]
    ex.start(now)
    for _ in range(100):
        deadline = ex.next_deadline()
        assert deadline is not None
        now = deadline
        if ex.tick(now) is None:
            break
        sends.append(now)
    assert ex.state is ExchangeState.EXHAUSTED
    return sends


def test_natpmp_schedule_250ms_doubling_nine_tries() -> None:
    ex: Exchange[object] = Exchange(b"x", GW, lambda d: d, NATPMP_SCHEDULE)
    sends = _run_to_exhaustion(ex)
    assert len(sends) == 9
    gaps = [b - a for a, b in itertools.pairwise(sends)]
    assert gaps == [0.25 * 2**i for i in range(8)]
    assert sends[-1] == pytest.approx(63.75)


def test_pcp_schedule_jitter_and_cap() -> None:
    rands = iter([0.0, 1.0, 0.5, 0.5])
    ex: Exchange[object] = Exchange(b"x", GW, lambda d: d, PCP_SCHEDULE, lambda: next(rands))
    sends = _run_to_exhaustion(ex)
    gaps = [b - a for a, b in itertools.pairwise(sends)]
    assert gaps == pytest.approx([3.0 * 0.9, 6.0 * 1.1, 12.0])
    assert len(sends) == PCP_SCHEDULE.max_tries
    capped = RetrySchedule(initial=3.0, max_tries=20, max_interval=1024.0, jitter=0.1)
    assert capped.interval(15, 0.5) == 1024.0


def test_timer_before_deadline_sends_nothing() -> None:
    ex: Exchange[object] = Exchange(b"x", GW, lambda d: d, NATPMP_SCHEDULE)
    ex.start(10.0)
    assert ex.tick(10.1) is None
    assert ex.state is ExchangeState.WAITING
    assert ex.tick(10.25) == b"x"
    assert ex.tries == 2


def test_answers_only_from_the_gateway() -> None:
    req = natpmp.MapRequest(natpmp.Opcode.MAP_UDP, 4500, 4500)
    ex = Exchange(req.encode(), GW, natpmp.answer_parser(req), NATPMP_SCHEDULE)
    ex.start(0.0)
    good = struct.pack("!BBHIHHI", 0, 129, 0, 1, 4500, 4500, 60)
    assert ex.receive(good, ("192.168.7.66", 5351)) is None
    assert ex.receive(good, ("192.168.7.1", 5350)) is None
    assert ex.receive(b"\x00", GW) is None  # malformed: ignored, still waiting
    assert ex.state is ExchangeState.WAITING and len(ex.ignored) == 3
    assert ex.receive(good, GW) is not None
    assert ex.state is ExchangeState.DONE
    assert ex.tick(100.0) is None
    assert ex.receive(good, GW) is None  # one answer per exchange


def test_pcp_exchange_ignores_wrong_nonce_then_accepts() -> None:
    req = pcp.map_request(nonce=b"n" * 12, client_address=ipaddress.IPv4Address("192.168.7.10"),
                          internal_port=1, suggested_external_port=1, lifetime=60)
    ex = Exchange(req.encode(), GW, pcp.answer_parser(req), PCP_SCHEDULE)
    ex.start(0.0)
    assert req.map is not None
    other = pcp.MapData(b"m" * 12, 17, 1, 1, req.map.external_address)
    bad = pcp.encode_response(pcp.Response(pcp.Opcode.MAP, 0, 60, 1, other))
    good = pcp.encode_response(pcp.Response(pcp.Opcode.MAP, 0, 60, 1, req.map))
    assert ex.receive(bad, GW) is None
    assert ex.receive(good, GW) is not None


def test_start_twice_is_an_error() -> None:
    ex: Exchange[object] = Exchange(b"x", GW, lambda d: d, NATPMP_SCHEDULE)
    ex.start(0.0)
    with pytest.raises(RuntimeError):
        ex.start(1.0)


# --- epoch rules ---------------------------------------------------------------------------

def test_natpmp_epoch_rule() -> None:
    # 100 s passed on the client: expect at least 100 + 87.5 - 2.
    assert natpmp_epoch_valid(100, 0.0, 200, 100.0)
    assert natpmp_epoch_valid(100, 0.0, 186, 100.0)
    assert not natpmp_epoch_valid(100, 0.0, 185, 100.0)
    assert not natpmp_epoch_valid(100, 0.0, 3, 100.0)  # rebooted
    assert natpmp_epoch_valid(100, 0.0, 99, 1.0)  # quantization slack
    assert not natpmp_epoch_valid(100, 0.0, 97, 0.5)  # backwards beyond the slack


def test_pcp_epoch_rule() -> None:
    assert pcp_epoch_valid(100, 0.0, 200, 100.0)
    assert pcp_epoch_valid(100, 0.0, 99, 0.0)  # one second backwards is tolerated
    assert not pcp_epoch_valid(100, 0.0, 98, 0.0)
    assert not pcp_epoch_valid(100, 0.0, 150, 100.0)  # server too slow
    assert not pcp_epoch_valid(100, 0.0, 400, 100.0)  # server too fast
    assert pcp_epoch_valid(100, 0.0, 196, 100.0)  # within 2 s + 1/16 drift


@pytest.mark.parametrize("rule", list(EpochRule))
def test_tracker_detects_restart(rule: EpochRule) -> None:
    t = EpochTracker(rule)
    assert not t.observe(5000, 0.0)  # first answer: nothing to compare
    assert not t.observe(5010, 10.0)
    assert t.observe(2, 20.0)  # gateway restarted: epoch back near zero
    assert not t.observe(12, 30.0)  # and then consistent again
    t.reset()
    assert not t.observe(0, 40.0)
