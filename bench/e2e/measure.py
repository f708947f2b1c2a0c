"""What the end-to-end bench measures and how: iperf3 runs through a system's tunnel, the CPU
time of the tunnel processes, interleaved repetitions, and the summary over them.

Tests per system: TCP with 1 and 4 streams, UDP with 64-byte and 1400-byte packets (sizes count
the whole inner IPv6 packet, as the codec bench does) at the highest offered rate that loses
< 1 %, found by a short bounded search, and the CPU time of the tunnel processes (user +
system, from /proc/<pid>/stat, both ends summed: 100 % = one core). The summary has medians
with min-max and ratios to wireguard-go and to plain veth. Parsing iperf3's JSON, the rate
search's steps and the summary are pure, for the tests.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.e2e import BenchError
from bench.e2e.systems import IPERF_PORT, Hosts, check_tools, system_lab, wait_iperf_server

#: ratios are given to these two (when they were measured)
REFERENCE, CEILING = "wireguard-go", "veth"
#: IPv6 + UDP headers: a UDP test packet of N bytes carries N - 48 bytes of iperf3 payload
IP6_UDP_HEADERS = 48
UDP_SIZES = (64, 1400)
LOSS_LIMIT = 0.01
#: iperf3 -w for the UDP tests (both ends' sockets; the kernel caps it at net.core.rmem_max):
#: on a shared 2-core machine the receiving iperf3 is often off-CPU for a few ms, and with the
#: default 208 KiB buffer its own socket, not the tunnel, would drop the packets
UDP_SOCKET_BUFFER = "4M"


@dataclass(frozen=True)
class Durations:
    """Seconds per iperf3 run and the number of probes of each UDP rate search. Whole
    seconds: iperf3 3.12 reads ``-t`` as an integer, and ``-t 0`` would mean "forever"."""

    tcp: int
    udp_probe: int
    udp_probes: int
    repetitions: int


FULL = Durations(tcp=10, udp_probe=2, udp_probes=5, repetitions=3)


QUICK = Durations(tcp=1, udp_probe=1, udp_probes=3, repetitions=1)


#: beyond its -t, an iperf3 client gets this long (connect, exchange results) before it is
#: killed; iperf3 3.12 refuses a second end condition (-k, -n) beside -t
IPERF_GRACE = 30
#: runs of one iperf3 measurement whose control connection fails before it gives up
CONTROL_ATTEMPTS = 3


@dataclass(frozen=True)
class TcpResult:
    streams: int
    seconds: float
    #: receiver's goodput (iperf3 sum_received)
    gbps: float
    retransmits: int
    #: tunnel processes, both ends, percent of one core (None: no tunnel process, plain veth)
    tunnel_cpu: float | None
    iperf_cpu_sender: float
    iperf_cpu_receiver: float


@dataclass(frozen=True)
class UdpProbe:
    #: offered rate in packets/s; 0 means iperf3 unlimited (-b 0)
    offered_pps: float
    sent_pps: float
    received_pps: float
    loss: float
    tunnel_cpu: float | None


@dataclass(frozen=True)
class UdpResult:
    size: int
    #: received packets/s of the fastest probe with loss < LOSS_LIMIT (0 if none was)
    pps: float
    #: the same in inner Gbit/s (whole inner IPv6 packets)
    gbps: float
    loss: float
    tunnel_cpu: float | None
    #: the unlimited probe was already below the loss limit: the iperf3 sender was the bound
    sender_limited: bool
    probes: tuple[UdpProbe, ...]


@dataclass(frozen=True)
class RunResult:
    system: str
    repetition: int
    tcp1: TcpResult
    tcp4: TcpResult
    udp: tuple[UdpResult, ...]


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


#: (key, label, unit, how to get the value from a RunResult; None: not measured in that run)
METRICS: tuple[tuple[str, str, str, Callable[[RunResult], float | None]], ...] = (
    ("tcp1_gbps", "TCP, 1 stream", "Gbit/s", lambda r: r.tcp1.gbps),
    ("tcp4_gbps", "TCP, 4 streams", "Gbit/s", lambda r: r.tcp4.gbps),
    ("udp64_kpps", "UDP 64 B, < 1 % loss", "kpps", lambda r: _udp(r, 64).pps / 1e3),
    ("udp1400_gbps", "UDP 1400 B, < 1 % loss", "Gbit/s", lambda r: _udp(r, 1400).gbps),
    ("tcp1_cpu", "tunnel CPU, TCP 1 stream", "% of a core", lambda r: r.tcp1.tunnel_cpu),
    ("tcp4_cpu", "tunnel CPU, TCP 4 streams", "% of a core", lambda r: r.tcp4.tunnel_cpu),
    ("udp64_cpu", "tunnel CPU, UDP 64 B", "% of a core", lambda r: _udp(r, 64).tunnel_cpu),
)


def _udp(r: RunResult, size: int) -> UdpResult:
    for u in r.udp:
        if u.size == size:
            return u
    raise KeyError(size)


def summarize(runs: Sequence[RunResult], systems: Sequence[str]) -> dict[str, Any]:
    """Medians with min-max per system and metric, and ratios of the medians to the
    reference (wireguard-go) and to the ceiling (veth) where those were measured."""
    summary: dict[str, Any] = {}
    for system in systems:
        mine = [r for r in runs if r.system == system]
        if not mine:
            continue
        summary[system] = {}
        for key, _, _, get in METRICS:
            values = [get(r) for r in mine if _has(r, key)]
            if values and len(values) == len(mine) and None not in values:
                summary[system][key] = asdict(Spread.of([v for v in values if v is not None]))
        for size in UDP_SIZES:
            # A lossless unlimited probe means iperf3's sender, not the path, set the figure.
            key = next(k for k, *_ in METRICS if k.startswith(f"udp{size}_") and "cpu" not in k)
            if key in summary[system]:
                summary[system][key]["sender_limited_runs"] = sum(
                    1 for r in mine for u in r.udp if u.size == size and u.sender_limited
                )
    for system, metrics in summary.items():
        for key, spread in metrics.items():
            if key.endswith("_cpu"):
                continue  # a ratio of CPU shares says nothing about speed
            for ref, name in ((REFERENCE, "vs_wireguard_go"), (CEILING, "vs_veth")):
                base = summary.get(ref, {}).get(key, {}).get("median")
                spread[name] = spread["median"] / base if base else None
        del system
    return summary


def _has(r: RunResult, key: str) -> bool:
    if key.startswith("udp64"):
        return any(u.size == 64 for u in r.udp)
    if key.startswith("udp1400"):
        return any(u.size == 1400 for u in r.udp)
    return True


def parse_tcp(report: dict[str, Any], streams: int, tunnel_cpu: float | None) -> TcpResult:
    if report.get("error"):
        raise BenchError(f"iperf3 TCP test failed: {report['error']}")
    end = report["end"]
    cpu = end.get("cpu_utilization_percent", {})
    return TcpResult(
        streams=streams,
        seconds=float(end["sum_received"]["seconds"]),
        gbps=float(end["sum_received"]["bits_per_second"]) / 1e9,
        retransmits=int(end["sum_sent"].get("retransmits", 0)),
        tunnel_cpu=tunnel_cpu,
        iperf_cpu_sender=float(cpu.get("host_total", 0.0)),
        iperf_cpu_receiver=float(cpu.get("remote_total", 0.0)),
    )


def parse_udp(report: dict[str, Any], offered_pps: float, tunnel_cpu: float | None) -> UdpProbe:
    if report.get("error"):
        raise BenchError(f"iperf3 UDP test failed: {report['error']}")
    end = report["end"]
    sent, recv = end["sum_sent"], end["sum_received"]
    seconds = float(recv["seconds"]) or float(sent["seconds"])
    if seconds <= 0:
        raise BenchError("iperf3 reported a UDP test of no duration")
    packets = int(sent["packets"])
    lost = max(0, int(recv["lost_packets"]))
    arrived = max(0, int(recv["packets"]) - lost)
    # Loss against what was sent: packets that never left the sender are not the tunnel's.
    loss = (packets - arrived) / packets if packets else 1.0
    return UdpProbe(
        offered_pps=offered_pps,
        sent_pps=packets / float(sent["seconds"] or seconds),
        received_pps=arrived / seconds,
        loss=max(0.0, loss),
        tunnel_cpu=tunnel_cpu,
    )


def first_ceiling(unlimited: UdpProbe) -> float:
    """The upper bound of the search after a lossy unlimited probe. The sender's rate is
    usually several times what a tunnel carries, and bisecting from there wastes probes far
    above its capacity; a tunnel may carry more at a moderate load than under overload
    (receive livelock), so the bound is twice what got through, not what got through."""
    if unlimited.received_pps <= 0:
        return unlimited.sent_pps
    return min(unlimited.sent_pps, 2 * unlimited.received_pps)


def next_rate(lo: float, hi: float, last: UdpProbe, final: bool) -> float:
    """The next offered rate of the search: bisect (geometrically, the bounds are often far
    apart) between the fastest lossless rate ``lo`` and the slowest lossy one ``hi``. With no
    lossless rate yet, aim just below what got through (the tunnel's rate under overload),
    and the final probe goes clearly below that, so that the search ends with a lossless
    figure whenever one is within reach."""
    if lo > 0:
        return float((lo * hi) ** 0.5)
    if last.received_pps <= 0:
        return hi * 0.25
    return min(hi, last.received_pps) * (0.7 if final else 0.9)


def _cpu_ticks(pids: Sequence[int]) -> int:
    """utime + stime of the processes (all their threads), in clock ticks."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which is in parentheses and may contain spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total


class CpuMeter:
    """CPU share of a set of processes over an interval (100.0 = one core busy)."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._ticks = 0
        self._start = 0.0

    def __enter__(self) -> CpuMeter:
        self._ticks = _cpu_ticks(self.pids)
        self._start = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.monotonic() - self._start
        self.ticks = _cpu_ticks(self.pids) - self._ticks

    @property
    def percent(self) -> float | None:
        if not self.pids:
            return None
        if self.elapsed <= 0:
            return 0.0
        return 100.0 * self.ticks / os.sysconf("SC_CLK_TCK") / self.elapsed


def _iperf(hosts: Hosts, args: list[str], seconds: int) -> tuple[dict[str, Any], float | None]:
    """Run one iperf3 client in a against the server in b for ``seconds``; its JSON report
    and the tunnel processes' CPU share over the run."""
    if seconds < 1:
        raise BenchError(f"an iperf3 run needs at least 1 s, not {seconds}")
    argv = ["iperf3", "-c", hosts.target, "-p", str(IPERF_PORT), "-J", "-t", str(seconds),
            "--connect-timeout", "5000", *args]  # fmt: skip
    for attempt in range(1, CONTROL_ATTEMPTS + 1):
        wait_iperf_server(hosts)  # it reopens its listener after each test
        with CpuMeter(hosts.tunnel_pids) as cpu:
            proc = hosts.a.run(argv, check=False, timeout=seconds + IPERF_GRACE)
        try:
            report: dict[str, Any] = json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise BenchError(
                f"iperf3 {' '.join(args)} gave no report (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-1000:]}\n{hosts.log_tails()}"
            ) from None
        error = str(report.get("error") or "")
        if not error:
            return report, cpu.percent
        again = "control" in error or "Connection refused" in error
        if not again or attempt == CONTROL_ATTEMPTS:
            raise BenchError(f"iperf3 {' '.join(args)}: {error}\n{hosts.log_tails()}")
        # iperf3's control connection (TCP, through the tunnel being flooded) was reset
        # before the results came, or refused or reset while the server was reopening its
        # listener after the previous test (``Hosts.iperf_listening``; seen once in a full
        # test run, right after a TCP test): this run measured nothing, so it is run again
        # once the server listens (a dead server is reported by that wait), and said
        print(f"iperf3 {' '.join(args)}: {error}; running it again ({attempt + 1} of "
              f"{CONTROL_ATTEMPTS})", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


def measure_tcp(hosts: Hosts, streams: int, seconds: int) -> TcpResult:
    report, cpu = _iperf(hosts, ["-P", str(streams)], seconds)
    return parse_tcp(report, streams, cpu)


def measure_udp(hosts: Hosts, size: int, durations: Durations) -> UdpResult:
    """The highest offered rate losing < 1 %: one unlimited probe, then a bounded bisection."""
    payload = size - IP6_UDP_HEADERS

    def probe(pps: float) -> UdpProbe:
        rate = "0" if pps <= 0 else str(max(1, int(pps * payload * 8)))
        args = ["-u", "-l", str(payload), "-b", rate, "-w", UDP_SOCKET_BUFFER]
        report, cpu = _iperf(hosts, args, durations.udp_probe)
        return parse_udp(report, pps, cpu)

    first = probe(0)
    probes = [first]
    lossless = [first] if first.loss < LOSS_LIMIT else []
    if not lossless:
        lo, hi, last = 0.0, first_ceiling(first), first
        for i in range(1, durations.udp_probes):
            rate = next_rate(lo, hi, last, final=i == durations.udp_probes - 1)
            last = probe(rate)
            probes.append(last)
            # The bounds move to the rate the sender reached: on a loaded machine iperf3
            # sometimes falls short of the offered rate, and then that is the rate tested.
            if last.loss < LOSS_LIMIT:
                lossless.append(last)
                lo = max(lo, min(rate, last.sent_pps))
            else:
                hi = min(hi, rate, max(last.sent_pps, lo))
    best = max(lossless, key=lambda p: p.received_pps) if lossless else None
    return UdpResult(
        size=size,
        pps=best.received_pps if best else 0.0,
        gbps=(best.received_pps * size * 8 / 1e9) if best else 0.0,
        loss=best.loss if best else min(p.loss for p in probes),
        tunnel_cpu=best.tunnel_cpu if best else None,
        sender_limited=first.loss < LOSS_LIMIT,
        probes=tuple(probes),
    )


Progress = Callable[[str], None]


def measure_system(
    system: str, repetition: int, durations: Durations, workdir: Path, step: Progress
) -> RunResult:
    with system_lab(system, workdir) as hosts:
        step(f"rep {repetition} {system}: TCP 1 stream")
        tcp1 = measure_tcp(hosts, 1, durations.tcp)
        step(f"rep {repetition} {system}: TCP 4 streams")
        tcp4 = measure_tcp(hosts, 4, durations.tcp)
        udp = []
        for size in UDP_SIZES:
            step(f"rep {repetition} {system}: UDP {size} B rate search")
            udp.append(measure_udp(hosts, size, durations))
        step(f"rep {repetition} {system}: done")
        return RunResult(system, repetition, tcp1, tcp4, tuple(udp))


def run(
    systems: Sequence[str], durations: Durations, step: Progress | None = None
) -> list[RunResult]:
    """Every system in every repetition, interleaved, each in a fresh lab."""
    check_tools(systems)
    runs: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="btmm-e2e-") as tmp:
        for rep in range(1, durations.repetitions + 1):
            for system in systems:
                workdir = Path(tmp) / f"{rep}-{system}"
                workdir.mkdir()
                runs.append(measure_system(system, rep, durations, workdir, step or _quiet))
    return runs


def _quiet(_: str) -> None:
    pass
