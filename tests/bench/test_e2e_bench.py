"""The end-to-end bench (`python3 -m bench.e2e`, `btmm bench --e2e`): its pure parts on recorded
iperf3 reports, then one `--quick` run through every system that checks the report's structure and
that each system moved traffic. Never a speed threshold: the machine is shared."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import REPO, env

from bench import RESULTS
from bench.e2e import measure as m
from bench.e2e import report
from bench.e2e.systems import SYSTEMS, parse_systems
from btmm_core.errors import BtmmError

# Shapes of iperf3 3.12 -J reports, trimmed to the fields the bench reads.
TCP_REPORT: dict[str, Any] = {
    "end": {
        "sum_sent": {"seconds": 10.0, "bits_per_second": 2.1e9, "retransmits": 42},
        "sum_received": {"seconds": 10.01, "bits_per_second": 2.0e9},
        "cpu_utilization_percent": {"host_total": 55.5, "remote_total": 33.3},
    }
}


def udp_report(sent: int, received: int, lost: int, seconds: float = 2.0) -> dict[str, Any]:
    return {
        "end": {
            "sum_sent": {"seconds": seconds, "packets": sent, "lost_packets": 0},
            "sum_received": {"seconds": seconds, "packets": received, "lost_packets": lost},
        }
    }


def test_parse_tcp_takes_the_receiver_goodput() -> None:
    r = m.parse_tcp(TCP_REPORT, 4, 61.0)
    assert (r.streams, r.gbps, r.retransmits, r.tunnel_cpu) == (4, 2.0, 42, 61.0)
    assert (r.iperf_cpu_sender, r.iperf_cpu_receiver) == (55.5, 33.3)


def test_parse_udp_counts_loss_against_what_was_sent() -> None:
    # iperf3's receiver counts sequence gaps as lost; packets - lost arrived.
    p = m.parse_udp(udp_report(sent=1000, received=1000, lost=20), 500.0, None)
    assert p.loss == pytest.approx(0.02)
    assert p.received_pps == pytest.approx(980 / 2.0)
    assert p.sent_pps == pytest.approx(500.0)
    assert p.offered_pps == 500.0 and p.tunnel_cpu is None


def test_parse_reports_errors() -> None:
    with pytest.raises(BtmmError, match="unable to connect"):
        m.parse_tcp({"error": "unable to connect to server"}, 1, None)
    with pytest.raises(BtmmError, match="no duration"):
        m.parse_udp(udp_report(10, 10, 0, seconds=0.0), 0.0, None)


class _ScriptedIperf:
    """Hosts whose iperf3 client prints the given reports, one per run."""

    def __init__(self, reports: list[dict[str, Any]]) -> None:
        self.reports = reports
        self.runs = 0
        self.a = self
        self.target = "fd00::2"
        self.tunnel_pids: list[int] = []

    def run(self, argv: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        report = self.reports[self.runs]
        self.runs += 1
        return subprocess.CompletedProcess(argv, 1 if "error" in report else 0,
                                           json.dumps(report), "")

    def iperf_listening(self) -> bool:
        return self.listening

    listening = True

    def log_tails(self) -> str:
        return "(logs)"


RESET = {"error": "unable to receive control message: Connection reset by peer"}
REFUSED = {"error": "unable to connect to server: Connection refused"}


def test_a_reset_control_connection_runs_the_measurement_again() -> None:
    hosts = _ScriptedIperf([RESET, TCP_REPORT])
    report, _ = m._iperf(hosts, ["-P", "1"], 1)  # type: ignore[arg-type]
    assert report == TCP_REPORT and hosts.runs == 2


def test_a_client_refused_while_the_server_reopens_its_listener_runs_again() -> None:
    hosts = _ScriptedIperf([REFUSED, TCP_REPORT])
    report, _ = m._iperf(hosts, ["-P", "1"], 1)  # type: ignore[arg-type]
    assert report == TCP_REPORT and hosts.runs == 2


def test_a_server_that_stopped_listening_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    hosts = _ScriptedIperf([REFUSED, TCP_REPORT])
    hosts.listening = False
    monkeypatch.setattr("bench.e2e.systems.time.sleep", lambda _: None)
    clock = itertools.count()  # a second per look: the 10 s wait ends after ten looks
    monkeypatch.setattr("bench.e2e.systems.time.monotonic", lambda: float(next(clock)))
    with pytest.raises(BtmmError, match="the iperf3 server to listen"):
        m._iperf(hosts, [], 1)  # type: ignore[arg-type]
    assert hosts.runs == 0


def test_other_iperf3_errors_and_repeated_resets_are_not_hidden() -> None:
    hosts = _ScriptedIperf([{"error": "unable to connect to server: No route to host"}])
    with pytest.raises(BtmmError, match="unable to connect"):
        m._iperf(hosts, [], 1)  # type: ignore[arg-type]
    assert hosts.runs == 1
    hosts = _ScriptedIperf([REFUSED] * m.CONTROL_ATTEMPTS)
    with pytest.raises(BtmmError, match="Connection refused"):
        m._iperf(hosts, [], 1)  # type: ignore[arg-type]
    assert hosts.runs == m.CONTROL_ATTEMPTS
    hosts = _ScriptedIperf([RESET] * m.CONTROL_ATTEMPTS)
    with pytest.raises(BtmmError, match="control message"):
        m._iperf(hosts, [], 1)  # type: ignore[arg-type]
    assert hosts.runs == m.CONTROL_ATTEMPTS


def _probe(received: float) -> m.UdpProbe:
    return m.UdpProbe(0.0, received * 2, received, 0.5, None)


def test_rate_search_steps() -> None:
    # Nothing lossless yet: just below what got through, never above the lossy rate.
    assert m.next_rate(0.0, 100_000.0, _probe(40_000.0), final=False) == pytest.approx(36_000)
    assert m.next_rate(0.0, 30_000.0, _probe(40_000.0), final=False) == pytest.approx(27_000)
    # The last probe goes clearly below, so that the search ends with a lossless figure.
    assert m.next_rate(0.0, 36_000.0, _probe(30_000.0), final=True) == pytest.approx(21_000)
    assert m.next_rate(0.0, 36_000.0, _probe(0.0), final=True) == pytest.approx(9_000)
    # Bracketed: bisect, geometrically.
    assert m.next_rate(20_000.0, 80_000.0, _probe(1.0), final=False) == pytest.approx(40_000)


def test_rate_search_ceiling() -> None:
    # Overloaded: the search stays within twice what got through, or what was sent.
    assert m.first_ceiling(m.UdpProbe(0.0, 200_000.0, 30_000.0, 0.85, None)) == 60_000.0
    assert m.first_ceiling(m.UdpProbe(0.0, 50_000.0, 30_000.0, 0.4, None)) == 50_000.0
    assert m.first_ceiling(m.UdpProbe(0.0, 50_000.0, 0.0, 1.0, None)) == 50_000.0


def _run(system: str, rep: int, tcp1: float, kpps: float) -> m.RunResult:
    cpu = None if system == "veth" else 50.0
    tcp = m.TcpResult(1, 10.0, tcp1, 0, cpu, 10.0, 10.0)
    udp = tuple(
        m.UdpResult(size, kpps * 1e3, kpps * 1e3 * size * 8 / 1e9, 0.0, cpu, False, ())
        for size in m.UDP_SIZES
    )
    return m.RunResult(system, rep, tcp, tcp, udp)


def test_summary_medians_spreads_and_ratios() -> None:
    runs = [
        _run("veth", 1, 10.0, 100.0),
        _run("wireguard-go", 1, 0.3, 30.0),
        _run("btmm-fast", 1, 2.0, 90.0),
        _run("veth", 2, 12.0, 120.0),
        _run("wireguard-go", 2, 0.5, 40.0),
        _run("btmm-fast", 2, 3.0, 60.0),
        _run("veth", 3, 11.0, 110.0),
        _run("wireguard-go", 3, 0.4, 50.0),
        _run("btmm-fast", 3, 2.4, 75.0),
    ]
    s = m.summarize(runs, ["veth", "btmm-fast", "wireguard-go"])
    fast = s["btmm-fast"]["tcp1_gbps"]
    assert (fast["median"], fast["min"], fast["max"]) == (2.4, 2.0, 3.0)
    assert fast["vs_wireguard_go"] == pytest.approx(2.4 / 0.4)
    assert fast["vs_veth"] == pytest.approx(2.4 / 11.0)
    assert s["btmm-fast"]["udp64_kpps"]["median"] == 75.0
    # No tunnel process for plain veth: no CPU figure, rather than a misleading zero.
    assert "tcp1_cpu" not in s["veth"] and s["btmm-fast"]["tcp1_cpu"]["median"] == 50.0
    assert "vs_veth" not in s["btmm-fast"]["tcp1_cpu"]
    assert s["btmm-fast"]["udp64_kpps"]["sender_limited_runs"] == 0


def test_parse_systems() -> None:
    assert parse_systems("all") == list(SYSTEMS)
    assert parse_systems("openvpn, veth") == ["veth", "openvpn"]  # canonical order
    with pytest.raises(BtmmError, match="unknown systems"):
        parse_systems("veth,ipsec")


def test_cpu_meter_sees_this_process_work() -> None:
    import os

    with m.CpuMeter([os.getpid()]) as meter:
        total = 0
        for i in range(3_000_000):  # bounded busy loop: CPU time to measure
            total += i
    assert total > 0 and meter.percent is not None and meter.percent > 0
    with m.CpuMeter([]) as none:
        pass
    assert none.percent is None


def test_version_outside_a_git_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A source tarball has no .git: the report says so instead of failing.
    monkeypatch.setattr(report, "REPO", tmp_path)
    assert report._btmm_version() == "commit unknown (not a git checkout)"
    monkeypatch.setattr(report, "REPO", REPO)
    assert report._btmm_version().startswith("commit ")
    assert "unknown" not in report._btmm_version()


def test_a_quick_run_is_not_saved() -> None:
    # Refused before any lab exists: a smoke run must not replace the published figures.
    proc = subprocess.run(
        [sys.executable, "-m", "bench.e2e", "--quick", "--save"],
        capture_output=True, text=True, timeout=60, env=env(), cwd=str(REPO),
    )  # fmt: skip
    assert proc.returncode == 2 and "--save" in proc.stderr, proc.stderr


def _results_state() -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in RESULTS.iterdir()} if RESULTS.exists() else {}


@pytest.mark.netns
def test_quick_run_every_system(tmp_path: Path) -> None:
    out, png = tmp_path / "e2e.json", tmp_path / "e2e.png"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.e2e", "--quick", "--json",
         "--output", str(out), "--chart", str(png)],
        capture_output=True, text=True, timeout=600, env=env(), cwd=str(REPO),
    )  # fmt: skip
    # the error's own line first: the logs the bench appends after it run to many kilobytes
    said = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 0, "\n".join(said) + "\n...\n" + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["settings"]["systems"] == list(SYSTEMS)
    assert report["settings"]["repetitions"] == 1
    assert [r["system"] for r in report["runs"]] == list(SYSTEMS)
    for r in report["runs"]:
        where = r["system"]
        for tcp in (r["tcp1"], r["tcp4"]):
            assert tcp["gbps"] > 0, (where, tcp)
        assert [u["size"] for u in r["udp"]] == list(m.UDP_SIZES)
        for u in r["udp"]:
            # a busy machine may lose over the limit at every one of the 3 quick probes: then
            # the search reports no rate (pps 0) and the least loss seen, never a lossy rate
            assert (u["pps"] > 0) == (u["loss"] < m.LOSS_LIMIT), (where, u)
            assert u["gbps"] == pytest.approx(u["pps"] * u["size"] * 8 / 1e9)
            assert 1 <= len(u["probes"]) <= m.QUICK.udp_probes
        if where == "veth":
            assert r["tcp1"]["tunnel_cpu"] is None
        else:  # the tunnel processes did the work, so they used CPU
            assert r["tcp1"]["tunnel_cpu"] > 0, r["tcp1"]
    summary = report["summary"]
    assert list(summary) == list(SYSTEMS)
    for system, metrics in summary.items():
        assert metrics["tcp1_gbps"]["median"] > 0
        assert metrics["udp64_kpps"]["median"] >= 0
        ratio = metrics["tcp1_gbps"]["vs_wireguard_go"]
        assert ratio == pytest.approx(
            metrics["tcp1_gbps"]["median"] / summary["wireguard-go"]["tcp1_gbps"]["median"]
        ), system


@pytest.mark.netns
def test_btmm_bench_e2e_option_prints_the_table() -> None:
    before = _results_state()
    proc = subprocess.run(
        [sys.executable, "-m", "btmm_core.cli", "bench", "--e2e", "--quick",
         "--systems", "veth,btmm-fast"],
        capture_output=True, text=True, timeout=300, env=env(), cwd=str(REPO),
    )  # fmt: skip
    # the error's own line first: the logs the bench appends after it run to many kilobytes
    said = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 0, "\n".join(said) + "\n...\n" + proc.stderr[-3000:]
    assert "TCP, 1 stream" in proc.stdout and "btmm-fast" in proc.stdout
    assert "openvpn" not in proc.stdout
    assert _results_state() == before  # printed, nothing written into the repository
