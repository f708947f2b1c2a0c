"""The SA lifecycle on a virtual clock: two hosts, a model engine, a lossy network."""

from __future__ import annotations

import itertools

import pytest
from kx_helpers import A_ADDR, B_ADDR, WALL0, CountingRandom, key
from kx_sim import A_INNER, B_INNER, Network, Sim

from btmm_core.dataplane.api import Endpoint
from btmm_core.errors import ConfigError
from btmm_core.keyex.keys import derive_psk, ula_of
from btmm_core.keyex.noise import Handshaker, MessageType, Refused
from btmm_core.keyex.session import (
    InstallRx,
    InstallTx,
    RemovePeer,
    ResetPeer,
    RetireRx,
    SendControl,
    SessionConfig,
    SetEndpoint,
)


def test_first_handshake_installs_rx_before_tx_on_both_sides() -> None:
    sim = Sim()
    sim.connect("a")
    sim.run_until(1.0)
    assert sim.violations == []
    a_est, b_est = sim.established(sim.a), sim.established(sim.b)
    assert len(a_est) == len(b_est) == 1
    assert a_est[0][1].initiator and not b_est[0][1].initiator
    assert sim.a.engine.tx in sim.b.engine.rx and sim.b.engine.tx in sim.a.engine.rx
    # order on the responder: rx installed, then the response sent; tx only after the confirm
    kinds = [type(a) for _, a in sim.b.events]
    assert kinds.index(InstallRx) < kinds.index(SendControl) < kinds.index(InstallTx)
    kinds = [type(a) for _, a in sim.a.events if not isinstance(a, SendControl)]
    assert kinds.index(InstallRx) < kinds.index(InstallTx)


def test_rekeys_every_two_minutes_without_a_gap() -> None:
    sim = Sim()
    sim.connect("a", "b")
    sim.run_until(1000.0)
    assert sim.violations == []
    est = sim.established(sim.a)
    # one first handshake then one rekey per ~120 s (the initiator of the last one rekeys)
    assert 8 <= len(est) <= 9, [t for t, _ in est]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(est)]
    assert all(119.9 <= g <= 121.0 for g in gaps), gaps
    # never more than two receive SAs, never a key older than 180 s in use
    assert len(sim.a.engine.rx) <= 2 and len(sim.b.engine.rx) <= 2
    assert not [a for _, a in sim.a.events if isinstance(a, ResetPeer)]


def test_packet_budget_triggers_rekey_before_time() -> None:
    cfg = SessionConfig(rekey_after_messages=1000, reject_after_messages=2000)
    sim = Sim(cfg)
    sim.connect("a")
    sim.run_until(10.0)
    assert len(sim.established(sim.a)) == 1
    sim.a.kx.note_packets_out(B_INNER, 1500)
    sim.run_until(11.0)
    assert len(sim.established(sim.a)) == 2
    assert sim.violations == []


def test_reject_after_messages_stops_transmission() -> None:
    cfg = SessionConfig(rekey_after_messages=1000, reject_after_messages=2000)
    sim = Sim(cfg, network=lambda src, msg, now: None if now > 5 else 0.01)
    sim.connect("a")
    sim.run_until(10.0)
    sim.a.kx.note_packets_out(B_INNER, 2500)
    sim.run_until(11.0)
    assert sim.a.engine.tx is None
    assert any(isinstance(a, ResetPeer) for _, a in sim.a.events)


def test_peer_gone_retries_every_5s_rejects_at_180s_gives_up_after_90s() -> None:
    sim = Sim(network=lambda src, msg, now: None if now > 10 else 0.01)
    sim.connect("a")
    sim.run_until(400.0)
    inits = [t for t, src, m in sim.sent if src == "a" and m[0] == MessageType.INITIATION]
    rekey_inits = [t for t in inits if t > 10]
    assert rekey_inits[0] == pytest.approx(120.02, abs=0.01)  # established at 0.02
    gaps = [b - a for a, b in itertools.pairwise(rekey_inits)]
    assert all(5.0 <= g <= 5.34 for g in gaps), gaps
    assert rekey_inits[-1] < 210.0 + 5.34
    resets = [t for t, a in sim.a.events if isinstance(a, ResetPeer)]
    assert resets == [pytest.approx(180.02, abs=0.01)]
    assert sim.a.engine.tx is None and sim.a.engine.rx == []
    failed = sim.failures(sim.a)
    assert len(failed) == 1 and 210.0 <= failed[0][0] <= 215.4
    assert "no handshake answer" in failed[0][1].what
    # and afterwards it stays quiet until told to connect again
    assert not [t for t in inits if t > failed[0][0]]


def _drop_first(kind: MessageType) -> tuple[list[float], Network]:
    dropped: list[float] = []

    def net(src: str, msg: bytes, now: float) -> float | None:
        if msg[0] == kind and not dropped:
            dropped.append(now)
            return None
        return 0.01

    return dropped, net


def test_lost_initiation_is_retried() -> None:
    _, net = _drop_first(MessageType.INITIATION)
    sim = Sim(network=net)
    sim.connect("a")
    sim.run_until(20.0)
    est = sim.established(sim.a)
    assert len(est) == 1 and 5.0 <= est[0][0] <= 5.4
    assert sim.violations == []


def test_lost_response_retry_replaces_responders_pending_sa() -> None:
    _, net = _drop_first(MessageType.RESPONSE)
    sim = Sim(network=net)
    sim.connect("a")
    sim.run_until(20.0)
    assert sim.violations == []
    assert len(sim.established(sim.a)) == 1
    # the first pending receive SA was retired explicitly before the second was installed
    b_rx = [a for _, a in sim.b.events if isinstance(a, InstallRx | RetireRx)]
    assert [type(a) for a in b_rx] == [InstallRx, RetireRx, InstallRx]
    assert b_rx[0].spi == b_rx[1].spi


def test_lost_confirm_is_repeated_and_responder_switches_then() -> None:
    dropped, net = _drop_first(MessageType.CONFIRM)
    sim = Sim(network=net)
    sim.connect("a")
    sim.run_until(30.0)
    assert dropped
    b_est = sim.established(sim.b)
    assert len(b_est) == 1
    assert 5.0 <= b_est[0][0] <= 5.4  # the repeat, one rekey_timeout later
    assert sim.violations == []
    session = sim.a.kx.session(B_INNER)
    assert session.unacked is None and session.current_rx == sim.b.engine.tx
    sim.run_until(600.0)
    assert sim.violations == []


def test_lost_ack_is_answered_again_without_a_second_switch() -> None:
    dropped, net = _drop_first(MessageType.CONFIRM_ACK)
    sim = Sim(network=net)
    sim.connect("a")
    sim.run_until(30.0)
    assert dropped
    assert len(sim.established(sim.b)) == 1
    confirms = [t for t, src, m in sim.sent if m[0] == MessageType.CONFIRM]
    acks = [t for t, src, m in sim.sent if m[0] == MessageType.CONFIRM_ACK]
    assert len(confirms) == len(acks) == 2
    session = sim.a.kx.session(B_INNER)
    assert session.unacked is None and session.current_rx == sim.b.engine.tx
    assert sim.violations == []


@pytest.mark.parametrize("seed", range(6))
def test_random_loss_and_delay_keep_make_before_break(seed: int) -> None:
    import random

    rng = random.Random(seed)
    cfg = SessionConfig(
        rekey_after_time=4.0, reject_after_time=12.0, rekey_timeout=1.0, rekey_attempt_time=30.0
    )

    def net(src: str, msg: bytes, now: float) -> float | None:
        return None if rng.random() < 0.1 else rng.uniform(0.001, 0.2)

    sim = Sim(cfg, network=net)
    sim.connect("a", "b")
    sim.run_until(600.0)
    assert sim.violations == []
    assert len(sim.established(sim.a)) >= 100
    assert not [a for _, a in sim.a.events + sim.b.events if isinstance(a, ResetPeer)]


def test_crossing_initiations_resolve_to_one_handshake() -> None:
    sim = Sim()
    sim.connect("a", "b")  # both at t=0: the initiations cross
    sim.run_until(1.0)
    assert sim.violations == []
    a_est, b_est = sim.established(sim.a), sim.established(sim.b)
    assert len(a_est) == len(b_est) == 1
    assert a_est[0][1].initiator != b_est[0][1].initiator
    loser = (
        sim.a if sim.a.kx.handshaker.static.public > sim.b.kx.handshaker.static.public else sim.b
    )
    assert next(iter(loser.kx.sessions.values())).collisions == 1


def test_crossing_rekeys_under_jittery_delays_keep_make_before_break() -> None:
    import random

    rng = random.Random(7)
    cfg = SessionConfig(
        rekey_after_time=4.0,
        reject_after_time=9.0,
        rekey_timeout=1.0,
        rekey_attempt_time=30.0,
    )
    sim = Sim(cfg, network=lambda s, m, now: rng.uniform(0.001, 0.3))
    sim.connect("a", "b")
    sim.run_until(300.0)
    assert sim.violations == []
    assert len(sim.established(sim.a)) >= 60
    assert not [a for _, a in sim.a.events + sim.b.events if isinstance(a, ResetPeer)]


def test_keepalives_off_by_default_and_on_schedule_when_set() -> None:
    sim = Sim()
    sim.connect("a")
    sim.run_until(300.0)
    assert sim.a.engine.keepalives == [] and sim.b.engine.keepalives == []
    sim = Sim(SessionConfig(keepalive_interval=25.0))
    sim.connect("a")
    sim.run_until(300.0)
    ka = sim.a.engine.keepalives
    assert len(ka) == 11
    assert all(b - a == pytest.approx(25.0, abs=0.2) for a, b in itertools.pairwise(ka))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rekey_after_time": 120, "reject_after_time": 125},
        {"rekey_timeout": 0},
        {"keepalive_interval": 0},
        {"rekey_after_messages": 10, "reject_after_messages": 5},
    ],
)
def test_bad_session_config_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        SessionConfig(**kwargs)  # type: ignore[arg-type]


def test_removed_peer_loses_its_sas_and_is_refused() -> None:
    sim = Sim()
    sim.connect("a")
    sim.run_until(5.0)
    acts = sim.b.kx.remove_peer(A_INNER)
    assert acts == [RemovePeer(A_INNER)]
    assert sim.b.kx.next_deadline() is None  # no timers left for it
    sim.run_until(300.0)
    # a's rekeys now die at b: the key is unknown there, and a eventually gives up
    assert sim.b.kx.handshaker.refused["unknown_peer"] >= 1
    assert sim.failures(sim.a)


@pytest.mark.parametrize("late", [0.025, 0.3, 3.0])
def test_late_crossing_initiation_of_the_yielding_side_is_harmless(late: float) -> None:
    """Both sides start a rekey at once (both spent their packet budget). The side with the
    lower key yields, but its initiation is still in flight and reaches the other side only
    after that side's own handshake completed (before or after the confirm's ack)."""
    cfg = SessionConfig(rekey_after_messages=1000, reject_after_messages=2**40)
    sim0 = Sim(cfg)
    low = "b" if sim0.a.kx.handshaker.static.public > sim0.b.kx.handshaker.static.public else "a"

    def net(src: str, msg: bytes, now: float) -> float | None:
        if src == low and msg[0] == MessageType.INITIATION and 9 < now < 11:
            return late
        return 0.01

    sim = Sim(cfg, network=net)
    sim.connect("a")
    sim.run_until(10.0)
    sim.a.kx.note_packets_out(B_INNER, 1500)
    sim.b.kx.note_packets_out(A_INNER, 1500)
    sim.run_until(600.0)
    assert sim.violations == []
    assert not [a for _, a in sim.a.events + sim.b.events if isinstance(a, ResetPeer)]
    # and the rekey schedule goes on as usual: no side is left waiting for a confirm that
    # will never come
    est = [t for t, _ in sim.established(sim.a)]
    gaps = [b - a for a, b in itertools.pairwise(est)]
    assert max(gaps) <= 121.0, gaps


@pytest.mark.parametrize("seed", range(8))
def test_traffic_both_ways_random_loss_keeps_make_before_break(seed: int) -> None:
    """Both sides send, so both spend packet budgets at about the same time: crossing
    rekeys all the time, under random loss and delay."""
    import random

    rng = random.Random(1000 + seed)
    cfg = SessionConfig(
        rekey_after_time=30.0,
        reject_after_time=60.0,
        rekey_timeout=1.0,
        rekey_attempt_time=20.0,
        rekey_after_messages=1000,
        reject_after_messages=2**40,
    )

    def net(src: str, msg: bytes, now: float) -> float | None:
        return None if rng.random() < 0.05 else rng.uniform(0.001, 0.4)

    sim = Sim(cfg, network=net)
    sim.connect("a", "b")
    sent = {"a": 0, "b": 0}
    for step in range(300):
        for name, inner in (("a", B_INNER), ("b", A_INNER)):
            sent[name] += rng.randint(200, 400)
            sim.host(name).kx.note_packets_out(inner, sent[name])
        sim.run_until(step * 2.0 + 2.0)
    assert sim.violations == []
    assert not [a for _, a in sim.a.events + sim.b.events if isinstance(a, ResetPeer)]
    # budgets are noted every 2 s, so about one rekey per two or three notes
    assert len(sim.established(sim.a)) >= 60


def test_add_peer_refuses_an_address_not_bound_to_the_key() -> None:
    """Issue 11, item 1: a peer's inner address is derived from its key; no other is taken."""
    sim = Sim()
    c = key("c")
    kx = sim.a.kx
    for claimed in ("2001:db8::53", B_INNER, "fd00::c", "not an address"):
        with pytest.raises(ConfigError, match=r"bound to its key|not an IPv6"):
            kx.add_peer(c.public, claimed)
    assert c.public not in kx.sessions and c.public not in kx.handshaker.peers
    kx.add_peer(c.public, str(ula_of(c.public)))  # the bound address is accepted


THIEF = Endpoint("203.0.113.66", 4500)


def test_stolen_device_key_neither_moves_the_endpoint_nor_locks_out_the_peer() -> None:
    """Issue 11, item 6: someone with a's device key but not the account secret sends b an
    initiation from its own address, stamped 25 s ahead, just before a's rekey is due."""
    sim = Sim()
    sim.connect("a")
    sim.run_until(110.0)
    assert len(sim.established(sim.a)) == 1
    thief = Handshaker(key("a"), derive_psk(b"some other account's secret"), CountingRandom("t"))
    thief.add_peer(key("b").public)
    forged = thief.initiate(key("b").public, 0x6666, sim.now, WALL0 + sim.now + 25)
    acts = sim.b.kx.receive(forged, THIEF, sim.now, WALL0 + sim.now)
    # b answers to where the initiation came from, but does not take it as a's endpoint
    assert [a.destination for a in acts if isinstance(a, SendControl)] == [THIEF]
    assert not [a for a in acts if isinstance(a, SetEndpoint)], acts
    assert sim.b.kx.session(A_INNER).endpoint == A_ADDR
    for act in acts:
        if not isinstance(act, SendControl):
            sim.b.engine.apply(act, sim.now)
    (answer,) = [a.message for a in acts if isinstance(a, SendControl)]
    assert isinstance(thief.receive(answer, B_ADDR, sim.now, WALL0 + sim.now), Refused)
    # a's rekey (due at 120 s, stamped before the thief's timestamp) is still accepted
    sim.run_until(300.0)
    assert len(sim.established(sim.a)) == 3 and len(sim.established(sim.b)) == 3
    assert sim.b.kx.handshaker.refused["replay"] == 0
    assert sim.b.kx.session(A_INNER).endpoint == A_ADDR
    assert not [a for _, a in sim.b.events if isinstance(a, SetEndpoint)]
    assert sim.violations == []
