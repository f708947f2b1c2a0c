"""The on-demand tunnel core (daemon/ondemand.py) on a virtual clock, and the key exchange's
``idle`` (keyex/session.py) that closes a session for it."""

from __future__ import annotations

import os

import pytest

from btmm_core.daemon.ondemand import (
    Close,
    OnDemand,
    OnDemandConfig,
    Open,
    Reject,
    TunnelState,
)
from btmm_core.dataplane.api import Endpoint
from btmm_core.errors import ConfigError
from btmm_core.keyex.keys import StaticKey, ula_of
from btmm_core.keyex.noise import Handshaker
from btmm_core.keyex.session import ClearTx, InstallTx, KeyExchange, SendControl

PEER = "fd00::2"
WALL0 = 1_800_000_000.0


def core(idle: float = 300.0, connect: float = 15.0) -> OnDemand:
    od = OnDemand(OnDemandConfig(idle, connect))
    od.add(PEER)
    return od


def test_first_packet_opens_once_and_the_sa_makes_it_up() -> None:
    od = core()
    assert od.state(PEER) is TunnelState.IDLE and od.next_deadline() is None
    assert od.wanted(PEER, 10.0) == [Open(PEER)]
    assert od.wanted(PEER, 10.5) == []  # one opening at a time
    assert od.state(PEER) is TunnelState.OPENING
    assert od.next_deadline() == 25.0
    od.observe(PEER, has_tx=True, traffic=1, now=10.2)
    assert od.state(PEER) is TunnelState.UP
    assert od.next_deadline() == 310.2
    assert od.status(PEER, 11.2) == {"state": "up", "opens": 1, "closes": 0, "rejects": 0,
                                     "idle_for": 1.0}


def test_idle_for_the_timeout_closes_and_traffic_keeps_it_open() -> None:
    od = core(idle=60.0)
    od.wanted(PEER, 0.0)
    od.observe(PEER, True, 2, 1.0)
    od.observe(PEER, True, 5, 50.0)  # traffic: the timer starts again
    assert od.tick(100.0) == []
    od.observe(PEER, True, 5, 100.0)  # no new packet
    assert od.next_deadline() == 110.0
    assert od.tick(109.9) == []
    assert od.tick(110.0) == [Close(PEER)]
    assert od.state(PEER) is TunnelState.IDLE and od.next_deadline() is None
    # the next packet opens it again
    assert od.wanted(PEER, 120.0) == [Open(PEER)]
    assert od.status(PEER, 120.0)["closes"] == 1


def test_an_opening_that_takes_too_long_is_rejected_and_may_be_tried_again() -> None:
    od = core(connect=15.0)
    od.wanted(PEER, 0.0)
    od.observe(PEER, False, 0, 5.0)
    assert od.tick(14.9) == []
    assert od.tick(15.0) == [Reject(PEER)]
    assert od.state(PEER) is TunnelState.IDLE
    assert od.tick(100.0) == []
    assert od.wanted(PEER, 101.0) == [Open(PEER)]
    assert od.status(PEER, 101.0)["rejects"] == 1
    assert od.counts(PEER) == (2, 0, 1)


def test_a_tunnel_the_peer_opened_is_up_and_closes_when_idle() -> None:
    od = core(idle=30.0)
    od.observe(PEER, True, 0, 3.0)
    assert od.state(PEER) is TunnelState.UP
    assert od.tick(33.0) == [Close(PEER)]


def test_an_sa_lost_behind_our_back_is_idle_and_reopens() -> None:
    od = core()
    od.wanted(PEER, 0.0)
    od.observe(PEER, True, 1, 1.0)
    od.observe(PEER, False, 1, 2.0)  # reset (expired key)
    assert od.state(PEER) is TunnelState.IDLE
    assert od.wanted(PEER, 3.0) == [Open(PEER)]


def test_always_on_never_closes_but_reports_state() -> None:
    od = core(idle=0.0)
    assert not od.config.on_demand
    od.observe(PEER, True, 0, 0.0)
    assert od.tick(1e9) == [] and od.next_deadline() is None
    assert od.status(PEER, 5.0)["state"] == "up"


def test_unknown_peers_and_removal() -> None:
    od = core()
    assert od.wanted("fd00::9", 0.0) == [] and od.observe("fd00::9", True, 1, 0.0) == []
    od.wanted(PEER, 0.0)
    od.remove(PEER)
    assert od.tick(100.0) == [] and od.state(PEER) is TunnelState.IDLE


@pytest.mark.parametrize("idle,connect", [(-1.0, 15.0), (300.0, 0.0)])
def test_bad_timeouts_are_refused(idle: float, connect: float) -> None:
    with pytest.raises(ConfigError):
        OnDemandConfig(idle, connect)


def _pair() -> tuple[KeyExchange, KeyExchange, str, str]:
    ka, kb = StaticKey.generate(), StaticKey.generate()
    psk = bytes(32)
    a = KeyExchange(Handshaker(ka, psk, os.urandom))
    b = KeyExchange(Handshaker(kb, psk, os.urandom))
    ia, ib = str(ula_of(ka.public)), str(ula_of(kb.public))
    a.add_peer(kb.public, ib, Endpoint("192.0.2.2", 4500))
    b.add_peer(ka.public, ia, Endpoint("192.0.2.1", 4500))
    return a, b, ia, ib


def _run(a: KeyExchange, b: KeyExchange, first: list[object], now: float) -> list[object]:
    """Carry control messages between a and b until none is left; every action seen."""
    seen: list[object] = []
    queue = [(a, x) for x in first]
    src = {id(a): Endpoint("192.0.2.1", 4500), id(b): Endpoint("192.0.2.2", 4500)}
    while queue:
        owner, act = queue.pop(0)
        seen.append(act)
        if isinstance(act, SendControl):
            other = b if owner is a else a
            queue += [(other, x) for x in other.receive(act.message, src[id(owner)], now,
                                                         WALL0 + now)]
    return seen


def test_key_exchange_idle_clears_tx_keeps_rx_and_a_new_packet_reopens() -> None:
    a, b, _, ib = _pair()
    seen = _run(a, b, a.connect(ib, 0.0, WALL0), 0.0)
    assert any(isinstance(x, InstallTx) for x in seen)
    s = a.by_inner[ib]
    assert s.tx is not None and s.rx
    assert a.idle(ib) == [ClearTx(ib)]
    assert s.tx is None and not s.want and s.rx  # receive SAs stay
    # nothing restarts by itself
    assert a.tick(1.0, WALL0 + 1) == []
    # the next opening is a fresh handshake
    seen = _run(a, b, a.connect(ib, 2.0, WALL0 + 2), 2.0)
    assert any(isinstance(x, InstallTx) for x in seen) and s.tx is not None


def test_key_exchange_idle_gives_up_a_pending_handshake() -> None:
    a, _, _, ib = _pair()
    assert a.connect(ib, 0.0, WALL0)  # an initiation nobody answers
    assert a.by_inner[ib].busy()
    a.idle(ib)
    assert not a.by_inner[ib].busy()
    assert a.next_deadline() is None or a.tick(10.0, WALL0 + 10) == []
