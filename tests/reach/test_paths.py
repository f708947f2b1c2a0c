"""The path manager (reach/paths.py) on a virtual clock: pairing, hole punching through a
simulated NAT, LAN paths, a path that dies, an upgrade, pacing bounds, and the security rule
that only an endpoint that answered an authenticated probe (or carried authenticated ESP) is
ever used."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reach_keys import WALL0
from reach_sim import ESP, TRAFFIC_INTERVAL, Host, Nat, Net, manager

from btmm_core.dataplane.api import Endpoint
from btmm_core.keyex.keys import derive_psk
from btmm_core.reach.candidates import Candidate, CandidateKind
from btmm_core.reach.paths import (
    PathConfig,
    PathDown,
    PathRecovered,
    PathStale,
    PathState,
    ReflexiveSeen,
    SendProbe,
    UsePath,
    form_pairs,
)
from btmm_core.reach.probe import ProbeReply, ProbeRequest, parse_probe

LAN, IPV6, MAPPED, REFLEXIVE, RELAY = (
    CandidateKind.LAN,
    CandidateKind.IPV6,
    CandidateKind.MAPPED,
    CandidateKind.REFLEXIVE,
    CandidateKind.RELAY,
)
ATTACKER = Endpoint("203.0.113.66", 4500)


def ep(host: str, port: int = 4500) -> Endpoint:
    return Endpoint(host, port)


# --- pairing --------------------------------------------------------------------------------


def test_pairs_best_first_deduplicated_by_family_and_capped() -> None:
    local = [Candidate(LAN, ep("192.168.1.10")), Candidate(REFLEXIVE, ep("198.51.100.1", 40000))]
    remote = [
        Candidate(REFLEXIVE, ep("198.51.100.2", 40001)),
        Candidate(RELAY, ep("192.0.2.9")),
        Candidate(MAPPED, ep("198.51.100.2", 40001)),  # same endpoint: the better kind wins
        Candidate(IPV6, ep("2001:db8::2")),  # no local IPv6 candidate: not paired
        Candidate(LAN, ep("192.168.1.10")),  # our own endpoint: never probed
        Candidate(LAN, ep("192.168.7.20")),
    ]
    pairs = form_pairs(local, remote, max_pairs=16)
    assert pairs == [
        Candidate(LAN, ep("192.168.7.20")),
        Candidate(MAPPED, ep("198.51.100.2", 40001)),
        Candidate(RELAY, ep("192.0.2.9")),
    ]
    assert form_pairs(local, remote, max_pairs=2) == pairs[:2]
    v6 = form_pairs([Candidate(IPV6, ep("2001:db8::1"))], remote, 16)
    assert v6 == [Candidate(IPV6, ep("2001:db8::2"))]
    # one text form per address
    local6 = [Candidate(IPV6, ep("2001:db8::1"))]
    assert form_pairs(local6, [Candidate(IPV6, ep("2001:0db8:0::2"))], 16) == v6


# --- scenarios on the simulated network -----------------------------------------------------


def two_homes(config: PathConfig | None = None) -> tuple[Net, Host, Host, Nat, Nat]:
    net = Net()
    nat_a, nat_b = Nat("198.51.100.1"), Nat("203.0.113.2")
    a = net.host("a", "192.168.1.10", "home-a", nat_a, manager("a", "b", config))
    b = net.host("b", "10.0.0.20", "home-b", nat_b, manager("b", "a", config))
    return net, a, b, nat_a, nat_b


def introduce(
    a: Host, b: Host, *, extra_a: tuple[Candidate, ...] = (), extra_b: tuple[Candidate, ...] = ()
) -> None:
    """Each learns the other's candidates (what DNS carries)."""
    ca, cb = a.candidates(*extra_a), b.candidates(*extra_b)
    a.pm.set_candidates(ca, cb)
    b.pm.set_candidates(cb, ca)


def test_hole_punching_between_two_nats() -> None:
    net, a, b, nat_a, nat_b = two_homes()
    introduce(a, b)
    net.start(a)
    net.run(0.3)  # the other side learns of us a little later
    net.start(b)
    net.run(5.0)
    assert [(p.endpoint, p.kind) for _, p in a.paths] == [(nat_b.map(b.addr), REFLEXIVE)]
    assert [(p.endpoint, p.kind) for _, p in b.paths] == [(nat_a.map(a.addr), REFLEXIVE)]
    assert a.paths[0][0] < 2.0 and b.paths[0][0] < 2.0
    assert a.pm.status().state == PathState.UP and a.pm.status().rtt == pytest.approx(0.02)
    assert ReflexiveSeen(nat_a.map(a.addr)) in [e for _, e in a.events]
    # the LAN candidates of the other home never answered; nothing was dropped as bad
    assert sum(a.pm.drops.values()) == 0 and sum(b.pm.drops.values()) == 0


def test_one_side_alone_never_gets_through() -> None:
    net, a, b, _, _ = two_homes()
    introduce(a, b)
    net.start(a)  # b never probes: its NAT keeps a's probes out
    net.run(60.0)
    assert a.paths == [] and a.pm.status().state == PathState.SEARCHING
    assert not [d for d in net.delivered if d[1] == "b"]


def same_home(hairpin: bool = False) -> tuple[Net, Host, Host, Nat]:
    net = Net()
    nat = Nat("198.51.100.1", hairpin=hairpin)
    a = net.host("a", "192.168.1.10", "home", nat, manager("a", "b"))
    b = net.host("b", "192.168.1.20", "home", nat, manager("b", "a"))
    return net, a, b, nat


def test_same_home_uses_the_lan_without_hairpin() -> None:
    net, a, b, _ = same_home()
    introduce(a, b)
    net.start(a, b)
    net.run(5.0)
    assert [(p.endpoint, p.kind) for _, p in a.paths] == [(b.addr, LAN)]
    assert [(p.endpoint, p.kind) for _, p in b.paths] == [(a.addr, LAN)]
    assert a.paths[0][0] < 0.1


def test_a_lan_path_that_dies_is_left_before_it_is_declared_down() -> None:
    net, a, b, nat = same_home(hairpin=True)
    a.traffic = b.traffic = True
    introduce(a, b)
    net.start(a, b)
    net.run(40.0)
    assert (a.paths[-1][1].endpoint, a.paths[-1][1].kind) == (b.addr, LAN)
    # the LAN path breaks (say client isolation is switched on); the gateway still hairpins
    cut = net.now
    net.drop = lambda host, dst: dst.host.startswith("192.168.")
    net.run(cut + 20.0)
    for host, peer in ((a, b), (b, a)):
        stale = [(t, e) for t, e in host.events if isinstance(e, PathStale)]
        assert stale and stale[0][1].endpoint == peer.addr
        assert cut + 4.0 <= stale[0][0] <= cut + 6.5, stale
        assert "no authenticated packet" in stale[0][1].reason
        t_switch, switch = host.paths[-1]
        assert (switch.endpoint, switch.kind) == (nat.map(peer.addr), REFLEXIVE)
        assert t_switch <= stale[0][0] + 2.0
        # the search found the other path before the LAN path would have been given up
        assert not [e for _, e in host.events if isinstance(e, PathDown)]
        assert host.pm.status().state == PathState.UP


def test_a_path_with_no_other_goes_down_with_a_reason_and_comes_back() -> None:
    net, a, b, _ = same_home()
    a.traffic = b.traffic = True
    introduce(a, b)
    net.start(a, b)
    net.run(10.0)
    cut = net.now
    net.drop = lambda host, dst: True
    net.run(cut + 30.0)
    down = [(t, e) for t, e in a.events if isinstance(e, PathDown)]
    assert len(down) == 1 and cut + 9.0 <= down[0][0] <= cut + 11.5
    assert "probes lost" in down[0][1].reason
    assert a.pm.status().state == PathState.DOWN and a.pm.active is None
    net.drop = lambda host, dst: False
    back = net.now
    net.run(back + 70.0)  # the search backs off to at most a minute
    assert a.pm.status().state == PathState.UP
    assert a.paths[-1][0] > back and a.paths[-1][1].endpoint == b.addr


def test_a_quiet_path_stays_up_and_a_stale_one_recovers() -> None:
    net, a, b, _ = same_home()
    introduce(a, b)
    net.start(a, b)
    net.run(300.0)  # no traffic: the re-checks alone keep it up, nothing else happens
    assert a.pm.status().state == PathState.UP and len(a.paths) == 1
    assert not a.events[1:]  # only the first ReflexiveSeen
    lost = net.now
    net.drop = lambda host, dst: True
    while a.pm.status().state == PathState.UP:  # the next re-check goes unanswered
        assert net.now < lost + 40.0
        net.run(net.now + 0.1)
    assert a.pm.status().state == PathState.STALE
    net.drop = lambda host, dst: False
    net.run(net.now + 3.0)
    assert a.pm.status().state == PathState.UP
    assert isinstance(a.events[-1][1], PathRecovered) and len(a.paths) == 1


def test_upgrade_from_punched_to_mapped_when_the_mapping_starts_answering() -> None:
    net, a, b, nat_a, nat_b = two_homes()
    mapped = Candidate(MAPPED, Endpoint(nat_b.public, 4500))  # published, not yet granted
    introduce(a, b, extra_b=(mapped,))
    net.start(a, b)
    net.run(20.0)
    assert [(p.endpoint, p.kind) for _, p in a.paths] == [(nat_b.map(b.addr), REFLEXIVE)]
    granted = net.now
    nat_b.forward(4500, b.addr)  # the gateway grants the mapping
    net.run(granted + 45.0)
    t, last = a.paths[-1]
    assert (last.endpoint, last.kind) == (mapped.endpoint, MAPPED)
    assert granted < t <= granted + 32.0  # found by the next re-check
    assert not [e for _, e in a.events if isinstance(e, (PathDown, PathStale))]
    # b still reaches a by its punched path (a has no mapping); it was never given up
    assert b.pm.status().state == PathState.UP
    assert b.pm.status().endpoint == nat_a.map(a.addr)
    assert not [e for _, e in b.events if isinstance(e, PathDown)]


def punched_with_traffic_from_a() -> tuple[Net, Host, Host, Nat, Nat]:
    """Two homes on a punched path; only a sends tunnel traffic (b is a TCP sink, say)."""
    net, a, b, nat_a, nat_b = two_homes()
    introduce(a, b)
    net.start(a, b)
    a.traffic = True
    net.run(10.0)
    assert a.pm.status().endpoint == nat_b.map(b.addr) and b.pm.status().state == PathState.UP
    return net, a, b, nat_a, nat_b


def test_a_receiver_whose_nat_drops_the_pinhole_reopens_it() -> None:
    net, a, b, _, nat_b = punched_with_traffic_from_a()
    cut = net.now
    nat_b.allowed.clear()  # b's gateway flushes its connection tracking: the pinhole is gone
    net.run(cut + 20.0)
    back = [t for t, who, _, data in net.delivered if who == "b" and data == ESP and t > cut]
    assert back, "a's traffic never reached b again"
    # b heard nothing for quiet_after, checked its path, and that probe re-opened the pinhole
    # from inside; a's probes could not have told it (they die at b's gateway); without the
    # check b would not send before its re-check, up to 30 s later
    cfg = PathConfig()
    first_check = min(t for t, s in b.sent if t > cut)
    assert first_check <= cut + cfg.quiet_after + TRAFFIC_INTERVAL + 0.01
    assert back[0] <= first_check + cfg.probe_interval + 0.1
    for host in (a, b):
        assert not [e for _, e in host.events if isinstance(e, (PathStale, PathDown))]
        assert host.pm.status().state == PathState.UP and len(host.paths) == 1


def test_a_peer_that_stops_sending_costs_one_answered_probe() -> None:
    net, a, b, _, _ = punched_with_traffic_from_a()
    a.traffic = False
    stop = net.now
    net.run(stop + 15.0)  # before the next re-check (30 s after the path was chosen)
    checks = [s for t, s in b.sent if t > stop and isinstance(parse_probe(s.data), ProbeRequest)]
    assert len(checks) == 1
    assert b.pm.status().state == PathState.UP and not b.events[1:]
    assert b.pm.status().last_heard is not None and b.pm.status().last_heard > stop


def test_the_path_in_use_takes_the_kind_it_is_now_published_under() -> None:
    net, a, b, _, nat_b = two_homes()
    introduce(a, b)
    net.start(a, b)
    net.run(5.0)
    punched = nat_b.map(b.addr)
    assert a.pm.status().endpoint == punched and a.pm.status().kind == REFLEXIVE
    # b's gateway starts mapping and grants the very port the pinhole used
    nat_b.forward(punched.port, b.addr)
    local = a.candidates()
    remote = [Candidate(LAN, b.addr), Candidate(MAPPED, punched)]
    out = a.pm.update_candidates(local, remote, net.now, WALL0 + net.now)
    assert out[0] == UsePath(punched, MAPPED, a.pm.status().rtt)  # no move: a new name
    net.apply(a, out)
    net.run(net.now + 5.0)
    assert a.pm.status().endpoint == punched and a.pm.status().kind == MAPPED
    assert [(p.endpoint, p.kind) for _, p in a.paths] == [(punched, REFLEXIVE), (punched, MAPPED)]
    assert not [e for _, e in a.events if isinstance(e, (PathStale, PathDown))]
    # the mapping goes away again, the pinhole stays: back to punched, still no move
    remote = [Candidate(LAN, b.addr), Candidate(REFLEXIVE, punched)]
    out = a.pm.update_candidates(local, remote, net.now, WALL0 + net.now)
    assert out[0] == UsePath(punched, REFLEXIVE, a.pm.status().rtt)


def test_upgrade_by_rtt_within_one_kind() -> None:
    pm = manager("a", "b")
    near, far = ep("192.168.1.20"), ep("192.168.2.20")
    local = [Candidate(LAN, ep("192.168.1.10"))]
    pm.set_candidates(local, [Candidate(LAN, far), Candidate(LAN, near)])
    peer = manager("b", "a")
    out = pm.start(0.0, WALL0)
    probes = {o.destination: o.data for o in out if isinstance(o, SendProbe)}

    def answer(dest: Endpoint, at: float) -> list[object]:
        reply = peer.receive(probes[dest], ep("192.168.1.10"), at, WALL0 + at)
        data = next(o.data for o in reply if isinstance(o, SendProbe))
        return list(pm.receive(data, dest, at, WALL0 + at))

    assert UsePath(far, LAN, 0.1) in answer(far, 0.1)
    out = pm.tick(0.2, WALL0 + 0.2)
    probes = {o.destination: o.data for o in out if isinstance(o, SendProbe)}
    assert set(probes) == {near}  # far answered: only near is still being probed
    assert answer(near, 0.28) == []  # 80 ms is not clearly better than 100 ms
    now = 0.28
    while near not in probes or far not in probes:  # until the re-check probes both again
        deadline = pm.next_deadline()
        assert deadline is not None and now < deadline < 40.0
        now = deadline
        out = pm.tick(now, WALL0 + now)
        probes = {o.destination: o.data for o in out if isinstance(o, SendProbe)}
    assert now >= 30.0
    assert answer(near, now + 0.01)[-1] == UsePath(near, LAN, pytest.approx(0.07125))


# --- pacing ---------------------------------------------------------------------------------


def checks(host: Host, after: float, until: float) -> list[float]:
    """When ``host`` sent probe requests in (after, until]."""
    return [t for t, s in host.sent
            if after < t <= until and isinstance(parse_probe(s.data), ProbeRequest)]


def test_a_check_on_the_path_in_use_triggers_none_back_while_ours_are_fresh() -> None:
    net, a, b, _ = same_home()
    introduce(a, b)
    net.start(a)
    net.run(10.0)  # b learns of a 10 s later: their re-checks never coincide
    net.start(b)
    net.run(320.0)
    # one check each every re-check interval (30 s, plus the second the round waits for
    # answers); each answered, and not doubled by a check back at every check of the other
    for host in (a, b):
        times = checks(host, 20.0, 320.0)
        assert len(times) in (9, 10), times
        assert all(u - t > PathConfig().recheck_interval for t, u in itertools.pairwise(times))
        assert host.pm.status().state == PathState.UP and len(host.paths) == 1


def test_an_idle_peer_on_a_quiet_path_is_checked_every_five_minutes_and_when_it_opens() -> None:
    cfg = PathConfig()
    net, a, b, _ = same_home()
    introduce(a, b)
    net.start(a, b)
    net.run(5.0)
    for host in (a, b):
        assert host.pm.set_idle(True, net.now)
        assert not host.pm.set_idle(True, net.now)  # no news
    net.run(905.0)
    for host in (a, b):
        times = checks(host, 5.0, 905.0)
        assert len(times) == 3, times  # not 29
        assert all(u - t >= cfg.idle_recheck_interval for t, u in itertools.pairwise(times))
        assert host.pm.status().state == PathState.UP and len(host.paths) == 1
    net.run(1000.0)
    assert checks(a, 905.0, 1000.0) == []
    # a's tunnel opens: its path was checked 96 s ago, more than recheck_interval: now
    assert a.pm.set_idle(False, net.now)
    net.run(1000.5)
    assert checks(a, 1000.0 - 1e-9, 1000.5) == [1000.0]
    assert a.pm.status().last_heard == pytest.approx(1000.0 + 2 * 0.01)
    net.run(1050.0)  # and from then on every recheck_interval
    assert len(checks(a, 1000.5, 1050.0)) == 1 and checks(b, 1000.5, 1050.0) == []


def test_an_idle_peer_on_a_punched_path_is_still_checked_every_30_s() -> None:
    net, a, b, _, _ = two_homes()
    introduce(a, b)
    net.start(a, b)
    net.run(5.0)
    assert a.pm.status().kind == REFLEXIVE
    for host in (a, b):
        host.pm.set_idle(True, net.now)
    net.run(130.0)  # the pinholes in both NATs must not time out
    rounds = [u for t, u in itertools.pairwise([0.0, *checks(a, 5.0, 130.0)]) if u - t > 5.0]
    assert len(rounds) == 4, rounds
    assert a.pm.status().state == PathState.UP and b.pm.status().state == PathState.UP


def test_probes_over_ten_minutes_with_nothing_answering_stay_bounded() -> None:
    cfg = PathConfig()
    net, a, b, _, _ = two_homes(cfg)
    many = tuple(Candidate(MAPPED, ep("192.0.2.1", 5000 + i)) for i in range(40))
    introduce(a, b, extra_b=many)
    assert len(a.pm.pairs) == cfg.max_pairs
    net.start(a)
    net.run(600.0)
    times = [t for t, _ in a.sent]
    # attempts at 0, then backoff 1, 2, 4, ..., 60 s: fewer than 18 attempts in 10 minutes
    per_attempt = cfg.max_pairs * cfg.probes_per_attempt
    assert len(times) <= 18 * per_attempt, len(times)
    assert len(times) >= 10 * per_attempt  # and it does keep trying
    for t in times:  # never more than the bucket allows in any second
        assert sum(1 for u in times if t <= u < t + 1.0) <= cfg.probe_burst + cfg.probe_rate
    gaps = sorted(u - t for t, u in itertools.pairwise(times))
    assert gaps[-1] == pytest.approx(60.0, abs=1.5)  # the backoff reached its ceiling
    assert a.pm.next_deadline() is not None and a.pm.next_deadline() > net.now - 60.0


def test_every_probe_is_in_preference_order_within_an_attempt() -> None:
    pm = manager("a", "b")
    local = [Candidate(LAN, ep("192.168.1.10"))]
    remote = [
        Candidate(REFLEXIVE, ep("203.0.113.2", 40000)),
        Candidate(LAN, ep("192.168.1.20")),
        Candidate(MAPPED, ep("203.0.113.2", 4500)),
    ]
    pm.set_candidates(local, remote)
    out = pm.start(0.0, WALL0)
    assert [o.destination.port for o in out if isinstance(o, SendProbe)] == [4500, 4500, 40000]
    assert next(o.destination.host for o in out if isinstance(o, SendProbe)) == "192.168.1.20"


# --- security: only what answered an authenticated probe --------------------------------


def test_forged_replies_move_nothing() -> None:
    pm = manager("a", "b")
    target = ep("192.168.1.20")
    pm.set_candidates([Candidate(LAN, ep("192.168.1.10"))], [Candidate(LAN, target)])
    out = pm.start(0.0, WALL0)
    req = parse_probe(next(o.data for o in out if isinstance(o, SendProbe)))
    assert isinstance(req, ProbeRequest)
    b_keys = manager("b", "a").keys
    # a reply with the right txid but without the key: a zero MAC, a MAC from another account
    forged = ProbeReply(b_keys.own_id, req.txid, ATTACKER)
    other = manager("b", "a", psk=derive_psk(b"another account's secret!!")).keys
    for data in (forged.to_bytes(), forged.sealed(other.mac_key).to_bytes()):
        assert pm.receive(data, target, 0.01, WALL0) == []
    # the right key but a txid we never sent
    unsolicited = ProbeReply(b_keys.own_id, bytes(12), ATTACKER).sealed(b_keys.mac_key)
    assert pm.receive(unsolicited.to_bytes(), target, 0.01, WALL0) == []
    assert pm.drops == {"bad_mac": 2, "unsolicited": 1}
    assert pm.active is None and pm.status().state == PathState.SEARCHING


def test_a_genuine_reply_from_another_source_or_replayed_moves_nothing() -> None:
    a, b = manager("a", "b"), manager("b", "a")
    a_addr, b_addr = ep("192.168.1.10"), ep("192.168.1.20")
    a.set_candidates([Candidate(LAN, a_addr)], [Candidate(LAN, b_addr)])
    out = a.start(0.0, WALL0)
    probe = next(o.data for o in out if isinstance(o, SendProbe))
    reply = next(o.data for o in b.receive(probe, a_addr, 0.01, WALL0) if isinstance(o, SendProbe))
    # an on-path attacker races a copy of the genuine reply from its own address
    assert a.receive(reply, ATTACKER, 0.015, WALL0) == []
    assert a.drops == {"wrong_source": 1} and a.active is None
    # the genuine one still counts, for the endpoint the probe went to
    assert a.receive(reply, b_addr, 0.02, WALL0)[-1] == UsePath(b_addr, LAN, pytest.approx(0.02))
    # replayed, from anywhere: dropped, the path stays
    assert a.receive(reply, b_addr, 0.03, WALL0) == []
    assert a.receive(reply, ATTACKER, 0.04, WALL0) == []
    assert a.drops == {"wrong_source": 1, "unsolicited": 2}
    assert a.status().endpoint == b_addr


def test_a_replayed_request_is_not_answered_and_a_raced_one_moves_nothing() -> None:
    net, a, b, _ = same_home()
    introduce(a, b)
    net.start(b)
    net.run(0.05)
    request = next(d for d in net.delivered if d[1] == "a")[3]
    # off-path attacker replays a's view of b's request: answered once already, so refused
    net.inject(a, ATTACKER, request)
    net.run(0.1)
    assert a.pm.drops["replay"] == 1
    assert not [s for _, s in a.sent if s.destination == ATTACKER]
    # a fresh request that the attacker copies and races from its own address gets a reply
    # and a check of that address, which the attacker cannot answer: never used
    net2, a2, b2, _ = same_home()
    introduce(a2, b2)
    net2.drop = lambda host, dst: host is b2 and dst == a2.addr  # only the attacker's copy
    net2.start(b2)
    net2.run(0.001)
    fresh = next(s.data for _, s in b2.sent if s.destination == a2.addr)
    net2.inject(a2, ATTACKER, fresh)
    net2.drop = lambda host, dst: False
    net2.run(0.01)
    assert [s for _, s in a2.sent if s.destination == ATTACKER]  # answered, and checked
    net2.start(a2)
    net2.run(30.0)
    assert all(p.endpoint != ATTACKER for _, p in a2.paths)
    assert a2.pm.status().endpoint == b2.addr


def test_stale_and_future_requests_are_refused() -> None:
    a, b = manager("a", "b"), manager("b", "a")
    a.set_candidates([Candidate(LAN, ep("192.168.1.10"))], [Candidate(LAN, ep("192.168.1.20"))])
    out = a.start(0.0, WALL0 - 3600)  # a's clock is an hour behind
    probe = next(o.data for o in out if isinstance(o, SendProbe))
    assert b.receive(probe, ep("192.168.1.10"), 0.01, WALL0) == []
    assert b.drops == {"stale": 1}


def test_authenticated_esp_makes_an_unpublished_endpoint_usable() -> None:
    pm = manager("a", "b")
    pm.set_candidates([Candidate(LAN, ep("192.168.1.10"))], [Candidate(MAPPED, ep("203.0.113.2"))])
    pm.start(0.0, WALL0)
    roamed = ep("203.0.113.2", 61000)
    assert pm.note_authenticated_packet(roamed, 0.5) == [UsePath(roamed, REFLEXIVE, None)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([ATTACKER, ep("192.168.1.20")]))
def test_receive_never_raises_and_random_bytes_move_nothing(data: bytes, source: Endpoint) -> None:
    pm = manager("a", "b")
    pm.set_candidates([Candidate(LAN, ep("192.168.1.10"))], [Candidate(LAN, ep("192.168.1.20"))])
    pm.start(0.0, WALL0)
    out = pm.receive(data, source, 0.01, WALL0)
    assert out == [] and pm.active is None and sum(pm.drops.values()) == 1


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=46), st.integers(min_value=1, max_value=255))
def test_an_altered_genuine_reply_moves_nothing(index: int, flip: int) -> None:
    a, b = manager("a", "b"), manager("b", "a")
    a_addr, b_addr = ep("192.168.1.10"), ep("192.168.1.20")
    a.set_candidates([Candidate(LAN, a_addr)], [Candidate(LAN, b_addr)])
    probe = next(o.data for o in a.start(0.0, WALL0) if isinstance(o, SendProbe))
    reply = bytearray(
        next(o.data for o in b.receive(probe, a_addr, 0.01, WALL0) if isinstance(o, SendProbe))
    )
    reply[index] ^= flip
    assert a.receive(bytes(reply), b_addr, 0.02, WALL0) == [] and a.active is None
