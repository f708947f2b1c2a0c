"""Two engines in network namespaces keyed by the handshake: ping6, then 100 MB over TCP across
several rekeys (short forced intervals), SHA-256 verified, and not one packet dropped for want of
a valid SA. Every engine pairing; an engine that is not built fails (never skips)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from e2e_helpers import (
    ping6,
    transfer,
    two_hosts,
)
from kx_runner import A_INNER, B_INNER, KEYS, host_runner

from btmm_core.lab.netns import Lab

pytestmark = pytest.mark.netns

PAIRS = [("python", "python"), ("fast", "fast"), ("fast", "python"), ("python", "fast")]
BIG = 100 * 1024 * 1024
#: upper bound on the transfer rate (bytes/s): at least 4 s of traffic, so time-driven rekeys
#: happen whatever the engine's speed (a bound for the test's shape, not a measurement)
RATE = 25 * 1024 * 1024
#: short forced lifetimes so that a transfer spans several rekeys whatever the engine's speed:
#: by time (3 s) and by packet budget (12000 packets, about 17 MB of full-size segments)
SESSION = {
    "rekey_after_time": 3.0,
    "reject_after_time": 9.0,
    "rekey_timeout": 1.0,
    "rekey_attempt_time": 20.0,
    "rekey_after_messages": 12_000,
    "reject_after_messages": 2**40,
}


@pytest.mark.parametrize("kinds", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_handshake_ping_and_100mb_across_rekeys(kinds: tuple[str, str], tmp_path: Path) -> None:
    secret = tmp_path / "account.secret"
    secret.write_bytes(b"a test account secret, 32 bytes!")

    with Lab() as lab:
        a, b = two_hosts(lab)
        ra = host_runner(a, "a", tmp_path, secret, SESSION, kind=kinds[0], poll_interval=0.05)
        rb = host_runner(b, "b", tmp_path, secret, SESSION, kind=kinds[1], poll_interval=0.05)
        try:
            for r, k in ((ra, KEYS["a"]), (rb, KEYS["b"])):
                ready = r.next(30, "ready")
                assert ready.get("ready") is True, ready
                assert ready["public"] == k.public_b64
            ra.wait_event("established", 30)
            rb.wait_event("established", 30)

            for src, dst in ((a, B_INNER), (b, A_INNER)):
                res = ping6(src, dst, count=3)
                assert res.returncode == 0, f"ping6 {dst} failed:\n{res.stdout}{res.stderr}"

            before = [ra.stats(), rb.stats()]
            try:
                result = transfer(a, b, B_INNER, BIG, rate=RATE, timeout=400)
            except AssertionError as err:
                raise AssertionError(
                    f"{err}\nstats: {json.dumps([ra.stats(), rb.stats()])}\n"
                    f"events a: {ra.events}\nevents b: {rb.events}"
                ) from None
            after = [ra.stats(), rb.stats()]
            assert result.sent["bytes"] == result.received["bytes"] == BIG
            assert result.sent["sha256"] == result.received["sha256"]

            # each handshake switches the transmit SA on both sides: count per side
            rekeys = [
                s1["sessions"][inner]["rekeys"] - s0["sessions"][inner]["rekeys"]
                for s0, s1, inner in zip(before, after, (B_INNER, A_INNER), strict=True)
            ]
            report = json.dumps({"before": before, "after": after}, indent=1)
            assert min(rekeys) >= 3, f"rekeys per side during the transfer: {rekeys}\n{report}"
            for s in after:
                drops = s["engine"]["drops"]
                assert drops.get("auth", 0) == 0, report
                assert drops.get("unknown_spi", 0) == 0, report
                assert s["driver_errors"] == 0, report
                # a response or confirm that arrives after its initiation was retried is stale
                # and refused as unknown_receiver; anything else means a broken handshake
                assert set(s["refused"]) <= {"unknown_receiver"}, report
                assert all(len(p["rx_spis"]) <= 2 for p in s["peers"]), report
            print(
                f"\n{kinds}: rekeys per side during 100 MB: {rekeys}; drops after: "
                f"{[x['engine']['drops'] for x in after]}; sessions: "
                f"{[x['sessions'] for x in after]}"
            )
        finally:
            codes = (ra.stop(), rb.stop())
            # pytest shows this only when the test fails
            print(
                f"--- a log ---\n{ra.log.read_text()[-4000:]}\n--- b log ---\n"
                f"{rb.log.read_text()[-4000:]}"
            )
        assert codes == (0, 0), (ra.log.read_text()[-2000:], rb.log.read_text()[-2000:])


@pytest.mark.parametrize("kinds", [("python", "python"), ("fast", "fast")], ids="-".join)
def test_transfers_both_ways_at_once_across_rekeys(kinds: tuple[str, str], tmp_path: Path) -> None:
    """Both sides send (and so both hit their packet budgets and rekey timers): crossing
    handshakes happen, and still no packet meets a missing or wrong SA."""
    size = 40 * 1024 * 1024
    secret = tmp_path / "account.secret"
    secret.write_bytes(b"a test account secret, 32 bytes!")
    session = {**SESSION, "rekey_after_messages": 5_000}
    with Lab() as lab:
        a, b = two_hosts(lab)
        ra = host_runner(a, "a", tmp_path, secret, session, kind=kinds[0])
        rb = host_runner(b, "b", tmp_path, secret, session, kind=kinds[1])
        try:
            assert ra.next(30, "ready")["ready"] and rb.next(30, "ready")["ready"]
            ra.wait_event("established", 30)
            rb.wait_event("established", 30)
            before = [ra.stats(), rb.stats()]
            results: dict[str, object] = {}

            def run(name: str, src: object, dst: object, addr: str, port: int) -> None:
                try:
                    results[name] = transfer(
                        src, dst, addr, size, rate=RATE / 2, port=port, timeout=400
                    )
                except BaseException as err:  # reported below, in the test's thread
                    results[name] = err

            threads = [
                threading.Thread(target=run, args=("a->b", a, b, B_INNER, 5101)),
                threading.Thread(target=run, args=("b->a", b, a, A_INNER, 5102)),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=450)
            after = [ra.stats(), rb.stats()]
            report = json.dumps({"before": before, "after": after})
            for name, res in results.items():
                assert not isinstance(res, BaseException), f"{name}: {res}\n{report}"
                assert res.sent["sha256"] == res.received["sha256"], name  # type: ignore[attr-defined]
                assert res.received["bytes"] == size, name  # type: ignore[attr-defined]
            assert len(results) == 2
            rekeys = [
                s1["sessions"][inner]["rekeys"] - s0["sessions"][inner]["rekeys"]
                for s0, s1, inner in zip(before, after, (B_INNER, A_INNER), strict=True)
            ]
            assert min(rekeys) >= 3, f"rekeys per side: {rekeys}\n{report}"
            for s in after:
                drops = s["engine"]["drops"]
                assert not drops.get("auth") and not drops.get("unknown_spi"), report
                assert s["driver_errors"] == 0, report
                assert set(s["refused"]) <= {"unknown_receiver"}, report
            print(
                f"\n{kinds}: both ways, rekeys per side {rekeys}, sessions "
                f"{[x['sessions'] for x in after]}"
            )
        finally:
            codes = (ra.stop(), rb.stop())
            print(
                f"--- a log ---\n{ra.log.read_text()[-6000:]}\n--- b log ---\n"
                f"{rb.log.read_text()[-6000:]}"
            )
        assert codes == (0, 0)
