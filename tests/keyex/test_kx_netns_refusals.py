"""Over a real network (two namespaces, the pure-Python engine): hosts that must not get a
tunnel do not get one, and the refusals are counted; a peer that comes up late is reached on
demand once traffic wants it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_helpers import A_OUTER, A_ROAMED, B_OUTER, PORT, env, ping6, two_hosts
from kx_runner import A_INNER, B_INNER, KEYS, Runner, host_runner

from btmm_core.keyex.keys import load_or_create, ula_of
from btmm_core.lab.netns import Lab

pytestmark = pytest.mark.netns

HERE = Path(__file__).resolve().parent

SESSION = {
    "rekey_after_time": 3.0,
    "reject_after_time": 9.0,
    "rekey_timeout": 0.5,
    "rekey_attempt_time": 3.0,
}


def _secret(path: Path, text: bytes) -> Path:
    path.write_bytes(text)
    return path


def _no_tunnel(ra: Runner, rb: Runner, a: object, b: object) -> None:
    fa, fb = ra.wait_event("failed", 30), rb.wait_event("failed", 30)
    assert "no handshake answer" in fa["what"] and "no handshake answer" in fb["what"]
    assert not [e for e in ra.events + rb.events if e["event"] == "established"]
    for r in (ra, rb):
        st = r.stats()
        assert all(p["tx_spi"] is None for p in st["peers"]), st
    res = ping6(a, B_INNER, count=1)
    assert res.returncode != 0, "a tunnel came up where none may"


def test_wrong_account_secret_gets_no_tunnel(tmp_path: Path) -> None:
    sa = _secret(tmp_path / "a.secret", b"the account secret of one user")
    sb = _secret(tmp_path / "b.secret", b"the account secret of another!")
    with Lab() as lab:
        a, b = two_hosts(lab)
        ra = host_runner(a, "a", tmp_path, sa, SESSION)
        rb = host_runner(b, "b", tmp_path, sb, SESSION)
        try:
            assert ra.next(30, "ready")["ready"] and rb.next(30, "ready")["ready"]
            _no_tunnel(ra, rb, a, b)
            # each side answered the other's initiations (IKpsk2 learns of the PSK in message 2)
            # and refused every answer to its own
            for r in (ra, rb):
                refused = r.stats()["refused"]
                assert refused.get("decrypt_failed", 0) >= 2, refused
                assert set(refused) <= {"decrypt_failed", "unknown_receiver"}, refused
        finally:
            assert (ra.stop(), rb.stop()) == (0, 0)


def test_untrusted_device_key_gets_no_tunnel(tmp_path: Path) -> None:
    other = load_or_create(tmp_path / "other.key")  # b trusts this key, not a's
    secret = _secret(tmp_path / "secret", b"one account secret for both")
    with Lab() as lab:
        a, b = two_hosts(lab)
        ra = host_runner(a, "a", tmp_path, secret, SESSION)
        rb = host_runner(
            b, "b", tmp_path, secret, SESSION,
            peer_public=other.public_b64, peer_inner=str(ula_of(other.public)),
        )
        try:
            assert ra.next(30, "ready")["ready"] and rb.next(30, "ready")["ready"]
            _no_tunnel(ra, rb, a, b)
            # b authenticates a's static key and finds it is not the one it trusts; a drops
            # b's initiations at mac1, which b keyed with the wrong public key
            ref_a, ref_b = ra.stats()["refused"], rb.stats()["refused"]
            assert ref_b.get("unknown_peer", 0) >= 2 and set(ref_b) == {"unknown_peer"}, ref_b
            assert ref_a.get("bad_mac1", 0) >= 2 and set(ref_a) == {"bad_mac1"}, ref_a
        finally:
            assert (ra.stop(), rb.stop()) == (0, 0)


def test_late_peer_is_reached_on_demand_after_giving_up(tmp_path: Path) -> None:
    secret = _secret(tmp_path / "secret", b"one account secret for both")
    with Lab() as lab:
        a, b = two_hosts(lab)
        ra = host_runner(a, "a", tmp_path, secret, SESSION)
        rb: Runner | None = None
        try:
            assert ra.next(30, "ready")["ready"]
            assert "no handshake answer" in ra.wait_event("failed", 30)["what"]
            # b comes up passive: it neither initiates nor has traffic of its own
            rb = host_runner(b, "b", tmp_path, secret, SESSION, connect=False)
            assert rb.next(30, "ready")["ready"]
            # a's traffic to b is dropped for want of an SA, which brings the session up
            deadline = time.monotonic() + 30
            while ping6(a, B_INNER, count=1).returncode != 0:
                assert time.monotonic() < deadline, "no tunnel on demand within 30 s"
            est = ra.wait_event("established", 10)
            assert est["initiator"] is True
            assert ping6(a, B_INNER, count=3).returncode == 0
        finally:
            codes = [ra.stop()] + ([rb.stop()] if rb is not None else [])
            assert codes == [0] * len(codes)


def test_responder_under_load_hands_out_cookies_and_peer_still_connects(tmp_path: Path) -> None:
    secret = _secret(tmp_path / "secret", b"one account secret for both")
    # b calls itself loaded after 3 DHs within a second, for 2 s
    loaded = {"load_threshold": 3, "load_hold": 2.0}
    with Lab() as lab:
        a, b = two_hosts(lab)
        a.run(["ip", "addr", "add", f"{A_ROAMED}/24", "dev", "eth0"])
        rb = host_runner(b, "b", tmp_path, secret, SESSION, connect=False, handshake=loaded)
        ra: Runner | None = None
        try:
            assert rb.next(30, "ready")["ready"]
            # a stranger floods b with initiations that pass mac1 (it knows b's public key)
            attack = a.popen(
                [
                    sys.executable,
                    str(HERE / "kx_attacker.py"),
                    A_ROAMED,
                    "5555",
                    B_OUTER,
                    str(PORT),
                    KEYS["b"].public_b64,
                    "80",
                    "0.1",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env(),
            )
            # a starts once b is loaded (it answers the flood with cookies), however long the
            # attacker took to start on a busy machine
            deadline = time.monotonic() + 30
            while rb.stats()["refused"].get("cookie_required", 0) < 1:
                assert attack.poll() is None, attack.communicate()
                assert time.monotonic() < deadline, "b never came under load"
                time.sleep(0.05)
            ra = host_runner(a, "a", tmp_path, secret, SESSION)
            assert ra.next(30, "ready")["ready"]
            est = ra.wait_event("established", 30)
            assert est["initiator"] is True
            assert ping6(a, B_INNER, count=3).returncode == 0
            out, err = attack.communicate(timeout=60)
            assert attack.returncode == 0, err
            report = json.loads(out)
            st_b = rb.stats()
            refused = st_b["refused"]
            # the stranger got cookie replies instead of DH work once b was loaded, and its
            # DH-ed initiations were refused as unknown peers
            assert report["cookie_replies"] >= 10, (report, st_b)
            assert refused.get("unknown_peer", 0) >= 3, st_b
            assert refused.get("cookie_required", 0) >= report["cookie_replies"], st_b
            # the genuine peer was asked for a cookie too, and got through with it
            assert ra.stats()["cookies_received"] >= 1, st_b
            assert set(refused) <= {"unknown_peer", "cookie_required", "unknown_receiver"}, st_b
        finally:
            codes = [rb.stop()] + ([ra.stop()] if ra is not None else [])
            assert codes == [0] * len(codes)


def _pair(
    tmp_path: Path, lab: Lab, session: dict[str, object]
) -> tuple[Runner, Runner, object, object]:
    secret = _secret(tmp_path / "secret", b"one account secret for both")
    a, b = two_hosts(lab)
    ra = host_runner(a, "a", tmp_path, secret, session)
    rb = host_runner(b, "b", tmp_path, secret, session)
    assert ra.next(30, "ready")["ready"] and rb.next(30, "ready")["ready"]
    ra.wait_event("established", 30)
    rb.wait_event("established", 30)
    return ra, rb, a, b


@pytest.mark.parametrize("interval", [None, 0.5])
def test_keepalives_only_when_configured(tmp_path: Path, interval: float | None) -> None:
    with Lab() as lab:
        ra, rb, _, _ = _pair(tmp_path, lab, {**SESSION, "keepalive_interval": interval})
        try:
            t0 = time.monotonic()
            before = rb.stats()["engine"]["keepalives_in"]
            if interval is None:
                time.sleep(3.0)  # what is checked is an absence: a window in which none came
                assert rb.stats()["engine"]["keepalives_in"] == before
            else:
                # a schedule, not a speed: some arrive (awaited, however busy the machine),
                # and no more than the schedule allows in the time it took
                deadline = t0 + 30
                while (got := rb.stats()["engine"]["keepalives_in"] - before) < 2:
                    assert time.monotonic() < deadline, "no keepalives"
                    time.sleep(0.1)
                elapsed = time.monotonic() - t0
                assert got <= elapsed / interval + 2, (got, elapsed)
        finally:
            assert (ra.stop(), rb.stop()) == (0, 0)


def test_rekeys_follow_a_roaming_peer(tmp_path: Path) -> None:
    with Lab() as lab:
        ra, rb, a, b = _pair(tmp_path, lab, SESSION)
        try:
            assert ping6(a, B_INNER, count=2).returncode == 0
            # a moves to another outer address; b learns it from a's next authenticated packet
            a.run(["ip", "addr", "add", f"{A_ROAMED}/24", "dev", "eth0"])
            a.run(["ip", "addr", "del", f"{A_OUTER}/24", "dev", "eth0"])
            assert ping6(a, B_INNER, count=2).returncode == 0
            assert ping6(b, A_INNER, count=2).returncode == 0
            n_a, n_b = len(ra.events), len(rb.events)
            # several rekeys after the move (3 s lifetimes), in both roles, and no failure
            deadline = time.monotonic() + 30
            while len([e for e in rb.events[n_b:] if e["event"] == "established"]) < 3:
                assert time.monotonic() < deadline, rb.events
                rb.wait_event("established", 10)
            assert not [e for e in ra.events[n_a:] + rb.events[n_b:] if e["event"] == "failed"]
            assert ping6(a, B_INNER, count=2).returncode == 0
            st = rb.stats()
            drops = st["engine"]["drops"]
            assert not drops.get("auth") and not drops.get("unknown_spi"), drops
            assert [p["endpoint"] for p in st["peers"]] == [f"{A_ROAMED}:{PORT}"], st
            assert rb.stats()["sessions"][A_INNER]["failures"] == 0
        finally:
            assert (ra.stop(), rb.stop()) == (0, 0)
