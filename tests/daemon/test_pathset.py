"""The daemon's set of path managers (``daemon/pathset.py``), on a virtual clock: probe
messages reach the right peer's manager by sender id, engine counters become liveness
evidence, status says what ``btmm status`` shows, and only an answered probe moves a path."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from btmm_core.daemon.pathset import PathSet, Tagged, tunnel_state
from btmm_core.dataplane.api import Counters, Endpoint, PeerInfo
from btmm_core.keyex.keys import StaticKey, derive_psk
from btmm_core.reach.candidates import Candidate, CandidateKind
from btmm_core.reach.paths import PathDown, PathStale, PathState, SendProbe, UsePath

PSK = derive_psk(b"pathset test account")
WALL0 = 1_800_000_000.0


def key(name: str) -> StaticKey:
    return StaticKey.from_private(hashlib.sha256(b"static " + name.encode()).digest())


def rand(label: str) -> Callable[[int], bytes]:
    n = [0]

    def draw(k: int) -> bytes:
        n[0] += 1
        return hashlib.sha256(label.encode() + n[0].to_bytes(8, "big")).digest()[:k]

    return draw


A, B, C = key("a"), key("b"), key("c")
A_EP, B_EP, C_EP = (Endpoint("192.168.1.10", 4500), Endpoint("192.168.1.11", 4500),
                    Endpoint("192.168.1.12", 4500))
B_INNER, C_INNER, A_INNER = "fd00::b", "fd00::c", "fd00::a"


def lan(ep: Endpoint) -> Candidate:
    return Candidate(CandidateKind.LAN, ep)


def probes(out: list[Tagged]) -> list[tuple[str, SendProbe]]:
    return [(inner, o) for inner, o in out if isinstance(o, SendProbe)]


def pair() -> tuple[PathSet, PathSet]:
    a = PathSet(A, PSK, rand("a"))
    b = PathSet(B, PSK, rand("b"))
    a.set_local([lan(A_EP)], 0.0, WALL0)
    b.set_local([lan(B_EP)], 0.0, WALL0)
    return a, b


def test_a_probe_reaches_its_peers_manager_and_the_answer_chooses_the_path() -> None:
    a, b = pair()
    out_a = a.add(B_INNER, B.public, [lan(B_EP)], 0.0, WALL0)
    b.add(A_INNER, A.public, [lan(A_EP)], 0.0, WALL0)
    # a second peer of A's: the probe from B must not land in its manager
    a.add(C_INNER, C.public, [lan(C_EP)], 0.0, WALL0)
    sent = probes(out_a)
    assert sent and all(inner == B_INNER and o.destination == B_EP for inner, o in sent)
    replies = probes(b.receive(sent[0][1].data, A_EP, 0.01, WALL0))
    assert replies and replies[0][0] == A_INNER and replies[0][1].destination == A_EP
    out = a.receive(replies[0][1].data, B_EP, 0.02, WALL0)
    used = [(inner, o) for inner, o in out if isinstance(o, UsePath)]
    assert used == [(B_INNER, UsePath(B_EP, CandidateKind.LAN, used[0][1].rtt))]
    st = a.status(B_INNER, 1.02)
    assert st["path"] == "lan" and st["path_endpoint"] == "192.168.1.11:4500"
    assert st["rtt_ms"] == 20.0 and st["last_answer"] == 1.0 and st["path_state"] == "up"
    assert a.status(C_INNER, 1.0)["path"] is None
    assert a.state(B_INNER) == PathState.UP and a.state(C_INNER) == PathState.SEARCHING


def test_a_message_naming_no_peer_is_counted_and_dropped() -> None:
    a, _ = pair()
    a.add(B_INNER, B.public, [lan(B_EP)], 0.0, WALL0)
    c = PathSet(C, PSK, rand("c"))
    c.set_local([lan(C_EP)], 0.0, WALL0)
    sent = probes(c.add(A_INNER, A.public, [lan(A_EP)], 0.0, WALL0))
    assert a.receive(sent[0][1].data, C_EP, 0.01, WALL0) == []
    assert a.receive(b"\x06\0\0\0short", C_EP, 0.01, WALL0) == []
    assert a.drops["unknown_sender"] == 2


def test_a_forged_or_replayed_reply_moves_nothing() -> None:
    a, b = pair()
    sent = probes(a.add(B_INNER, B.public, [lan(B_EP)], 0.0, WALL0))
    b.add(A_INNER, A.public, [lan(A_EP)], 0.0, WALL0)
    reply = probes(b.receive(sent[0][1].data, A_EP, 0.01, WALL0))[0][1].data
    attacker = Endpoint("192.168.1.66", 4500)
    # from another address: not the endpoint the probe went to
    assert [o for _, o in a.receive(reply, attacker, 0.02, WALL0)
            if isinstance(o, UsePath)] == []
    forged = reply[:-16] + bytes(16)
    assert a.receive(forged, B_EP, 0.02, WALL0) == []
    assert a.status(B_INNER, 0.03)["path"] is None
    assert a.manager(B_INNER).drops["wrong_source"] == 1
    assert a.manager(B_INNER).drops["bad_mac"] == 1
    # the genuine one counts once; sent again it is unsolicited
    assert any(isinstance(o, UsePath) for _, o in a.receive(reply, B_EP, 0.03, WALL0))
    assert a.receive(reply, B_EP, 0.04, WALL0) == []
    assert a.manager(B_INNER).drops["unsolicited"] == 1


def info(inner: str, endpoint: Endpoint | None, packets_in: int, packets_out: int) -> PeerInfo:
    return PeerInfo(inner, endpoint, 1, (2,), Counters(packets_in=packets_in,
                                                       packets_out=packets_out))


def test_authenticated_esp_counts_as_an_answer_and_silence_goes_stale_then_down() -> None:
    a = PathSet(A, PSK, rand("a"))
    a.set_local([lan(A_EP)], 0.0, WALL0)
    a.add(B_INNER, B.public, [lan(B_EP)], 0.0, WALL0)
    # ESP from B (the engine counted packets in, and holds B's endpoint): the path is proven
    out = a.observe([info(B_INNER, B_EP, 5, 5)], 0.5)
    assert [o for _, o in out if isinstance(o, UsePath)] == [
        UsePath(B_EP, CandidateKind.LAN, None)]
    # traffic goes out, nothing comes back, every probe is lost: stale, then down, with why
    now, seen = 0.5, []
    packets_out = 5
    while now < 30.0:
        now += 0.1
        packets_out += 1
        out = a.observe([info(B_INNER, B_EP, 5, packets_out)], now)
        deadline = a.next_deadline()
        if deadline is not None and deadline <= now:
            out += a.tick(now, WALL0 + now)
        seen += [o for _, o in out if isinstance(o, PathStale | PathDown)]
        if any(isinstance(o, PathDown) for o in seen):
            break
    assert [type(o) for o in seen] == [PathStale, PathDown]
    st = a.status(B_INNER, now)
    assert st["path_state"] == "down" and "no authenticated packet" in str(st["why"])
    assert tunnel_state(True, a.state(B_INNER)) == "down"


def test_the_engine_is_brought_back_to_the_path_when_it_falls_quiet_elsewhere() -> None:
    """The engine follows the source of the peer's last authenticated packet, which a NAT
    may give a port of its own (its masquerade) while the path in use goes to the port it
    maps; when the NAT forgets that connection, we send into nothing. Once we send and hear
    nothing for ``quiet_after`` (1 s), the manager's path is said again, once a second."""
    a = PathSet(A, PSK, rand("a"))
    a.set_local([lan(A_EP)], 0.0, WALL0)
    a.add(B_INNER, B.public, [lan(B_EP)], 0.0, WALL0)
    out = a.observe([info(B_INNER, B_EP, 5, 5)], 0.5)
    assert [o for _, o in out if isinstance(o, UsePath)] == [
        UsePath(B_EP, CandidateKind.LAN, None)]
    nat = Endpoint("192.168.1.11", 38824)

    def used(t: float, packets_in: int, packets_out: int) -> list[UsePath]:
        return [o for _, o in a.observe([info(B_INNER, nat, packets_in, packets_out)], t)
                if isinstance(o, UsePath)]

    # the peer's packets come from the NAT's port: the engine roamed there, the path stays
    assert used(1.0, 6, 6) == []
    assert a.status(B_INNER, 1.0)["path_endpoint"] == "192.168.1.11:4500"
    # traffic both ways there: nothing to do
    assert used(1.5, 7, 7) == [] and used(2.0, 8, 8) == [] and used(2.6, 9, 9) == []
    # we keep sending, nothing comes back: after 1 s, the path once, and again a second later
    assert used(3.1, 9, 10) == []
    assert used(3.7, 9, 11) == [UsePath(B_EP, CandidateKind.LAN, None)]
    assert used(4.2, 9, 12) == []
    assert used(4.8, 9, 13) == [UsePath(B_EP, CandidateKind.LAN, None)]
    # not sending: nothing to bring back
    assert used(6.0, 9, 13) == []
    # the engine already there: nothing either
    assert [o for _, o in a.observe([info(B_INNER, B_EP, 9, 20)], 7.0)
            if isinstance(o, UsePath)] == []


def test_candidate_changes_restart_the_checks_and_removal_forgets_the_peer() -> None:
    a = PathSet(A, PSK, rand("a"))
    a.set_local([lan(A_EP)], 0.0, WALL0)
    a.add(B_INNER, B.public, [lan(B_EP)], 0.0, WALL0)
    assert a.set_remote(B_INNER, [lan(B_EP)], 5.0, WALL0) == []  # unchanged: nothing
    moved = Endpoint("192.168.1.99", 4500)
    assert {o.destination for _, o in probes(a.set_remote(B_INNER, [lan(moved)], 5.0, WALL0))
            } == {moved}
    assert probes(a.set_local([lan(A_EP), lan(Endpoint("10.0.0.5", 4500))], 6.0, WALL0))
    a.remove(B_INNER)
    assert B_INNER not in a and a.next_deadline() is None


def test_tunnel_state_is_up_only_while_the_path_answers() -> None:
    assert tunnel_state(False, PathState.UP) == "down"
    assert tunnel_state(True, PathState.UP) == "up"
    assert tunnel_state(True, PathState.STALE) == "stale"
    assert tunnel_state(True, PathState.SEARCHING) == "searching"


def test_the_set_deadline_is_always_its_managers_earliest() -> None:
    """``next_deadline`` and ``tick`` go by deadlines the set notes after each call into a
    manager (asking every manager on every wake cost idle CPU with the square of the
    peers); through probes, answers, traffic, silence and candidate changes the noted one
    stays the managers' own."""
    a, b = pair()
    a.add(C_INNER, C.public, [lan(C_EP)], 0.0, WALL0)
    b.add(A_INNER, A.public, [lan(A_EP)], 0.0, WALL0)
    pending = a.add(B_INNER, B.public, [lan(B_EP)], 0.0, WALL0)

    def truth() -> float | None:
        times = [t for inner in (B_INNER, C_INNER)
                 if (t := a.manager(inner).next_deadline()) is not None]
        return min(times, default=None)

    now, packets_out, checked = 0.0, 0, 0
    while now < 90.0:
        now += 0.05
        # B answers A's probes for the first 20 s, then falls silent
        for _, probe in probes(pending):
            if probe.destination == B_EP and now < 20.0:
                for _, reply in probes(b.receive(probe.data, A_EP, now, WALL0 + now)):
                    a.receive(reply.data, B_EP, now, WALL0 + now)
        pending = []
        if 10.0 < now < 40.0:  # traffic goes out (liveness expected)
            packets_out += 1
            pending += a.observe([info(B_INNER, B_EP, 5, packets_out)], now)
        if abs(now - 50.0) < 0.01:
            pending += a.set_remote(C_INNER, [lan(Endpoint("192.168.1.77", 4500))], now,
                                    WALL0 + now)
        assert a.next_deadline() == truth()
        deadline = a.next_deadline()
        if deadline is not None and deadline <= now:
            pending += a.tick(now, WALL0 + now)
            checked += 1
        assert a.next_deadline() == truth()
    assert checked > 50


def test_a_peer_without_a_tunnel_is_idle_and_its_next_check_moves_with_it() -> None:
    """The engine's view says whether a peer has a tunnel (an SA, or packets held for one):
    an idle peer's LAN path is re-checked after ``idle_recheck_interval``, and the set's
    noted deadline follows when that changes."""
    a, b = pair()
    out = a.add(B_INNER, B.public, [lan(B_EP)], 0.0, WALL0)
    b.add(A_INNER, A.public, [lan(A_EP)], 0.0, WALL0)
    for _, probe in probes(out):
        for _, reply in probes(b.receive(probe.data, A_EP, 0.01, WALL0)):
            a.receive(reply.data, B_EP, 0.02, WALL0)
    assert a.state(B_INNER) == PathState.UP
    a.tick(1.5, WALL0 + 1.5)  # the round of checks ends
    manager = a.manager(B_INNER)
    assert a.next_deadline() == manager.next_deadline() == 31.5
    no_tunnel = PeerInfo(B_INNER, None, None, (), Counters())
    a.observe([no_tunnel], 2.0)
    assert manager.idle and a.next_deadline() == 1.5 + manager.config.idle_recheck_interval
    held = PeerInfo(B_INNER, None, None, (), Counters(), held=1)  # a packet waits for it
    a.observe([held], 40.0)
    assert not manager.idle and a.next_deadline() == 40.0  # checked 38.5 s ago: now
