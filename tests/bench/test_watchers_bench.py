"""`bench.watchers` at a few watchers over two worker processes, both transports: every
scenario delivers every event, and each row and median carries the figures the issue asks for
(not their values: this machine is shared)."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys

from bench import REPO


def test_watchers_bench_runs_both_transports_and_reports_its_figures() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.watchers", "--watchers", "12", "--zones", "4",
         "--rate", "20", "--duration", "1", "--processes", "2", "--reps", "1"],
        capture_output=True, text=True, timeout=240, cwd=str(REPO),
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    rows = [r for r in lines if "median" not in r]
    medians = [r["median"] for r in lines if "median" in r]
    assert [(r["transport"], r["scenario"]) for r in rows] == [
        ("llq", "load"),
        ("llq", "fanout"),
        ("push", "load"),
        ("push", "fanout"),
    ]
    for r in rows:
        assert r["watchers"] == 12 and r["setup_s"] > 0 and r["server_rss_mib"] > 0
        assert r["server_cpu_s_setup"] >= 0 and r["loadgen_cpu_s_setup"] > 0
        # a key per watcher: the registry refuses no signature (no retries after 2 s)
        assert r["server_tsig_refusals"] == 0
        # every LLQ was cancelled when its watcher closed (the next phase starts empty)
        assert r["llqs_left_after_close"] == 0
        assert len(r["loadgen"]) == 2
        assert all(c["cpu_share"] >= 0 and c["cpu_s"] >= 0 for c in r["loadgen"])
        if r["scenario"] == "load":
            assert r["zones"] == 4 and r["updates"] > 0
            assert r["watchers_without_last_update"] == 0
            # every update reached its zone's 3 watchers (LLQ may merge, then fewer)
            assert r["deliveries"] + r["merged_or_missing"] == 3 * r["updates"]
            assert r["deliveries"] > 0
            assert 0 < r["latency_p50_ms"] <= r["latency_p99_ms"]
        else:
            assert r["delivered"] == 12 and r["missing"] == 0
            assert 0 < r["p50_ms"] <= r["last_ms"]
    assert [(m["transport"], m["scenario"]) for m in medians] == [
        ("llq", "load"),
        ("llq", "fanout"),
        ("push", "load"),
        ("push", "fanout"),
    ]
    for m in medians:
        assert m["reps"] == 1 and len(m["server_rss_mib_by_rep"]) == 1
        assert "loadgen_max_cpu_share" in m and "loadgen_cpu_s" in m


def test_light_watchers_read_and_acknowledge_as_the_real_clients_do() -> None:
    """``--light``: the LLQ acknowledgement built from the event's bytes is accepted by the
    server core, and the sequence numbers read from events and PUSHes are those sent."""
    sys.path.insert(0, str(REPO / "tests" / "llq"))
    sys.path.insert(0, str(REPO / "tests" / "push"))
    import dns.update
    from llq_helpers import Lab, update
    from push_helpers import BOB, LAPTOP, PushLab

    from bench.push import BASE
    from bench.watchers import light_llq_event, light_push
    from btmm_core.dns.dso import DSOMessage, Keepalive
    from btmm_core.dns.push import Subscribe
    from btmm_core.llq.fastwire import KeyWire
    from btmm_core.registry.handler import Transport

    lab = Lab.make()
    c = lab.client("127.0.0.1#40000")
    del lab.clients["127.0.0.1#40000"]
    for n in (5, 6):
        lab.signed_update(update("laptop", "AAAA", add=(str(ipaddress.IPv6Address(BASE + n)),)))
        event = lab.llq.llqs[c.llq_id].inflight
        assert event is not None
        got = light_llq_event(event.wire, KeyWire(lab.accounts["bob"].key).sign, int(lab.now))
        assert got is not None and got[0] == [n]
        lab.llq.receive_response(got[1], lab.now, Transport.UDP, "127.0.0.1#40000")
        assert lab.llq.llqs[c.llq_id].inflight is None and lab.llq.stats["acks"] == n - 4
    assert light_llq_event(b"\0" * 12, KeyWire(lab.accounts["bob"].key).sign, 0) is None

    push = PushLab.make()
    push.bind()
    push.send(DSOMessage(1, (Subscribe(LAPTOP, 28).tlv(),)).to_bytes())
    u = dns.update.UpdateMessage(BOB)
    u.add(LAPTOP, 300, "AAAA", str(ipaddress.IPv6Address(BASE + 9)))
    (out,) = push.update(u)
    assert light_push(out.wire) == [9]
    # a Keepalive response is not a PUSH: the real client reads it
    keepalive = DSOMessage(2, (Keepalive(15_000, 10_000).tlv(),), response=True).to_bytes()
    assert light_push(keepalive) is None
