"""``btmm bench --e2e``: tunnels side by side, end to end, with iperf3 through each of them.

Two namespaces joined by a veth pair (outer 192.0.2.1/24 and 192.0.2.2/24); per system, a
tunnel between them and iperf3 across it. The systems:

- ``veth``: no tunnel, iperf3 straight over the veth pair (the ceiling),
- ``btmm-fast`` / ``btmm-python``: ``btmm tunnel`` with static SAs, ESP (RFC 4303) with
  AES-256-GCM (RFC 4106) in UDP (RFC 3948), one engine on both ends,
- ``wireguard-go``: Debian's userspace WireGuard, configured with ``wg set`` and ``ip``,
- ``openvpn``: OpenVPN 2.6 in user space (``--disable-dco``), peer to peer over UDP, TLS with
  self-signed certificates checked by ``--peer-fingerprint``; the data channel negotiates
  AES-256-GCM. (Static-key ``--secret`` mode cannot use GCM, so it is not comparable.)

Every tunnel carries IPv6 between ULA inner addresses with an inner MTU of 1420, so that the
same iperf3 traffic crosses each. Tests per system: TCP with 1 and 4 streams, UDP with 64-byte
and 1400-byte packets (sizes count the whole inner IPv6 packet, as the codec bench does) at the
highest offered rate that loses < 1 %, found by a short bounded search, and the CPU time of the
tunnel processes (user + system, from /proc/<pid>/stat, both ends summed: 100 % = one core).

The machine is shared and noisy (DESIGN.md §6): repetitions are interleaved (rep 1 of every
system, then rep 2, ...), and every system in every repetition gets a fresh lab, so that
nothing of one run (a full socket buffer, a stray process) leaks into the next. The report has
medians with min-max and ratios to wireguard-go and to plain veth. Every traffic source is
iperf3 with ``-t``, and every command runs with a timeout: nothing sends unbounded.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import queue
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from btmm_core.errors import BtmmError
from btmm_core.lab.netns import Lab, Netns

SYSTEMS = ("veth", "btmm-fast", "btmm-python", "wireguard-go", "openvpn")
#: ratios are given to these two (when they were measured)
REFERENCE, CEILING = "wireguard-go", "veth"

A_OUTER, B_OUTER = "192.0.2.1", "192.0.2.2"
INNER_MTU = 1420
#: inner /64 per system (ULA, RFC 4193); host a is ::1, host b is ::2
INNER_PREFIX = {
    "veth": "fd00:b7:e2e0::",
    "btmm-fast": "fd00:b7:e2e1::",
    "btmm-python": "fd00:b7:e2e1::",
    "wireguard-go": "fd00:b7:e2e2::",
    "openvpn": "fd00:b7:e2e3::",
}
BTMM_PORT, WG_PORT, OVPN_PORT, IPERF_PORT = 4500, 51820, 1194, 5201
#: IPv6 + UDP headers: a UDP test packet of N bytes carries N - 48 bytes of iperf3 payload
IP6_UDP_HEADERS = 48
UDP_SIZES = (64, 1400)
LOSS_LIMIT = 0.01
#: iperf3 -w for the UDP tests (both ends' sockets; the kernel caps it at net.core.rmem_max):
#: on a shared 2-core machine the receiving iperf3 is often off-CPU for a few ms, and with the
#: default 208 KiB buffer its own socket, not the tunnel, would drop the packets
UDP_SOCKET_BUFFER = "4M"

REPO = Path(__file__).resolve().parents[2]


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


class BenchError(BtmmError):
    """The end-to-end bench could not set up or measure a system."""


# ---------------------------------------------------------------------------------------------
# Results (pure data)


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


# ---------------------------------------------------------------------------------------------
# iperf3 output (pure: JSON text in, results out)


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


# ---------------------------------------------------------------------------------------------
# Processes and the lab


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


def _read_line(stream: Any, timeout: float) -> str | None:
    """One line from a pipe within ``timeout`` seconds (None if none came)."""
    box: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: box.put(stream.readline()), daemon=True).start()
    try:
        return box.get(timeout=timeout)
    except queue.Empty:
        return None


@dataclass
class Hosts:
    """The two namespaces of one system's lab, the tunnel processes and the iperf3 target."""

    lab: Lab
    a: Netns
    b: Netns
    workdir: Path
    target: str = ""
    tunnel_pids: list[int] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def log_tails(self, n: int = 1500) -> str:
        out = []
        for path in self.logs:
            with contextlib.suppress(OSError):
                out.append(f"--- {path.name}\n{path.read_text()[-n:]}")
        return "\n".join(out)


def _wait(check: Callable[[], bool], timeout: float, what: str, hosts: Hosts) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}\n{hosts.log_tails()}")


def _reachable(hosts: Hosts, timeout: float = 30.0) -> None:
    """Ping the far inner address until it answers (the first packets may start a handshake)."""

    def ping() -> bool:
        proc = hosts.a.run(["ping", "-6", "-c", "1", "-W", "1", hosts.target], check=False)
        return proc.returncode == 0

    _wait(ping, timeout, f"{hosts.target} to answer pings through the tunnel", hosts)


def _inner(system: str, host: int) -> str:
    return f"{INNER_PREFIX[system]}{host}"


def _log(hosts: Hosts, name: str) -> Any:
    path = hosts.workdir / name
    hosts.logs.append(path)
    return path.open("w")


def _up_veth(hosts: Hosts, system: str) -> None:
    for ns, host in ((hosts.a, 1), (hosts.b, 2)):
        ns.run(["ip", "-6", "addr", "add", f"{_inner(system, host)}/64", "dev", "eth0"])


def _up_btmm(hosts: Hosts, system: str) -> None:
    engine = system.removeprefix("btmm-")
    keys = [secrets.token_hex(36), secrets.token_hex(36)]  # AES-256 key + 4-byte salt, each way
    spis = [0x1000 + secrets.randbelow(1 << 20), 0x2000000 + secrets.randbelow(1 << 20)]
    ends = ((hosts.a, 1, B_OUTER, 0), (hosts.b, 2, A_OUTER, 1))
    procs = []
    for ns, host, far, tx in ends:
        config = {
            "dataplane": engine,
            "tun": "btmm0",
            "mtu": INNER_MTU,
            "address": f"{_inner(system, host)}/64",
            "listen_port": BTMM_PORT,
            "peers": [
                {
                    "inner": _inner(system, 3 - host),
                    "endpoint": f"{far}:{BTMM_PORT}",
                    "tx_spi": spis[tx],
                    "tx_key": keys[tx],
                    "rx_spi": spis[1 - tx],
                    "rx_key": keys[1 - tx],
                }
            ],
        }
        path = hosts.workdir / f"btmm-{host}.json"
        path.write_text(json.dumps(config))
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (
            os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else ""
        )
        # stdin stays open for the life of the lab: its end stops the tunnel by design.
        proc = ns.popen(
            [sys.executable, "-m", "btmm_core.cli", "tunnel", str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=_log(hosts, f"btmm-{host}.log"),
            text=True,
            env=env,
            cwd=str(REPO),
        )
        procs.append(proc)
        hosts.tunnel_pids.append(proc.pid)
    for proc in procs:
        line = _read_line(proc.stdout, 90.0)
        ready = json.loads(line) if line else {}
        if ready.get("ready") is not True or ready.get("engine") != engine:
            raise BenchError(f"btmm tunnel ({engine}) did not start: {line!r}\n{hosts.log_tails()}")


def _up_wireguard(hosts: Hosts, system: str) -> None:
    tag = secrets.token_hex(3)
    keys = []
    for _ in range(2):
        priv = _tool(["wg", "genkey"]).strip()
        keys.append((priv, _tool(["wg", "pubkey"], stdin=priv).strip()))
    devs = [f"wg{tag}a", f"wg{tag}b"]

    def forget_sockets() -> None:
        # wireguard-go's control sockets live in the host's /var/run, not in the namespace.
        for dev in devs:
            with contextlib.suppress(OSError):
                Path(f"/var/run/wireguard/{dev}.sock").unlink()

    hosts.lab.on_close(forget_sockets)
    for ns, dev in ((hosts.a, devs[0]), (hosts.b, devs[1])):
        proc = ns.popen(
            ["wireguard-go", "-f", dev], stdout=_log(hosts, f"{dev}.log"), stderr=subprocess.STDOUT
        )
        hosts.tunnel_pids.append(proc.pid)
    for dev in devs:
        sock = Path(f"/var/run/wireguard/{dev}.sock")
        _wait(sock.exists, 20.0, f"wireguard-go's control socket {sock}", hosts)
    ends = ((hosts.a, devs[0], 1, B_OUTER), (hosts.b, devs[1], 2, A_OUTER))
    for ns, dev, host, far in ends:
        key_path = hosts.workdir / f"{dev}.key"
        key_path.touch(mode=0o600)
        key_path.write_text(keys[host - 1][0] + "\n")
        ns.run(
            ["wg", "set", dev, "private-key", str(key_path), "listen-port", str(WG_PORT),
             "peer", keys[2 - host][1], "endpoint", f"{far}:{WG_PORT}",
             "allowed-ips", f"{_inner(system, 3 - host)}/128"]
        )  # fmt: skip
        ns.run(["ip", "-6", "addr", "add", f"{_inner(system, host)}/64", "dev", dev])
        ns.run(["ip", "link", "set", dev, "mtu", str(INNER_MTU), "up"])


def _self_signed(name: str) -> tuple[bytes, bytes, str]:
    """A throwaway EC key and self-signed certificate (PEM) and its SHA-256 fingerprint."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return (
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        cert.public_bytes(serialization.Encoding.PEM),
        cert.fingerprint(hashes.SHA256()).hex(":").upper(),
    )


def _up_openvpn(hosts: Hosts, system: str) -> None:
    tag = secrets.token_hex(3)
    certs = [_self_signed("btmm-bench-a"), _self_signed("btmm-bench-b")]
    ends = ((hosts.a, 1, A_OUTER, B_OUTER), (hosts.b, 2, B_OUTER, A_OUTER))
    logs = []
    for ns, host, here, far in ends:
        key, cert, _ = certs[host - 1]
        key_path, cert_path = hosts.workdir / f"ovpn{host}.key", hosts.workdir / f"ovpn{host}.crt"
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
        cert_path.write_bytes(cert)
        # Host b takes the TLS server role; peer to peer (no --server/--client pool), so
        # --ifconfig-ipv6 gives both ends their inner address directly.
        role = ["--tls-server", "--dh", "none"] if host == 2 else ["--tls-client"]
        argv = [
            "openvpn", "--dev", f"ov{tag}{host}", "--dev-type", "tun", "--disable-dco",
            "--proto", "udp", "--local", here, "--lport", str(OVPN_PORT),
            "--remote", far, str(OVPN_PORT),
            *role, "--cert", str(cert_path), "--key", str(key_path),
            "--peer-fingerprint", certs[2 - host][2],
            "--data-ciphers", "AES-256-GCM",
            "--ifconfig-ipv6", f"{_inner(system, host)}/64", _inner(system, 3 - host),
            "--tun-mtu", str(INNER_MTU), "--verb", "3",
        ]  # fmt: skip
        log = hosts.workdir / f"openvpn-{host}.log"
        logs.append(log)
        proc = ns.popen(argv, stdout=_log(hosts, log.name), stderr=subprocess.STDOUT)
        hosts.tunnel_pids.append(proc.pid)

    def ready() -> bool:
        return all("Initialization Sequence Completed" in p.read_text() for p in logs)

    _wait(ready, 30.0, "both OpenVPN ends to complete their TLS handshake", hosts)
    for log in logs:
        if "cipher 'AES-256-GCM'" not in log.read_text():
            raise BenchError(f"OpenVPN did not negotiate AES-256-GCM\n{hosts.log_tails()}")


BRING_UP: dict[str, Callable[[Hosts, str], None]] = {
    "veth": _up_veth,
    "btmm-fast": _up_btmm,
    "btmm-python": _up_btmm,
    "wireguard-go": _up_wireguard,
    "openvpn": _up_openvpn,
}
TOOLS = {
    "veth": ("ip", "iperf3", "ping"),
    "btmm-fast": ("ip", "iperf3", "ping"),
    "btmm-python": ("ip", "iperf3", "ping"),
    "wireguard-go": ("ip", "iperf3", "ping", "wireguard-go", "wg"),
    "openvpn": ("ip", "iperf3", "ping", "openvpn"),
}
PACKAGES = {"wireguard-go": "wireguard-go", "wg": "wireguard-tools", "openvpn": "openvpn"}


def _tool(argv: list[str], stdin: str | None = None) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise BenchError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def check_tools(systems: Sequence[str]) -> None:
    """Fail before any lab exists when a tool a chosen system needs is missing."""
    missing = sorted({t for s in systems for t in TOOLS[s] if shutil.which(t) is None})
    if missing:
        packages = sorted({PACKAGES.get(t, t) for t in missing})
        raise BenchError(
            f"missing tools for the chosen systems: {', '.join(missing)}",
            hint=f"install the Debian packages {' '.join(packages)} (see .ci/apt-packages), "
            "or leave those systems out with --systems",
        )
    if any(s.startswith("btmm-") for s in systems):
        from btmm_core.dataplane import resolve_kind

        for s in systems:
            if s.startswith("btmm-"):
                resolve_kind(s.removeprefix("btmm-"))  # EngineUnavailable says how to build it


@contextlib.contextmanager
def system_lab(system: str, workdir: Path) -> Iterator[Hosts]:
    """A fresh two-namespace lab with ``system`` up and an iperf3 server listening in b."""
    with Lab("e2e") as lab:
        a, b = lab.ns("a"), lab.ns("b")
        lab.veth(a, "eth0", b, "eth0")
        a.run(["ip", "addr", "add", f"{A_OUTER}/24", "dev", "eth0"])
        b.run(["ip", "addr", "add", f"{B_OUTER}/24", "dev", "eth0"])
        hosts = Hosts(lab, a, b, workdir, target=_inner(system, 2))
        BRING_UP[system](hosts, system)
        _reachable(hosts)
        b.popen(
            ["iperf3", "-s", "-p", str(IPERF_PORT)],
            stdout=_log(hosts, "iperf3-server.log"),
            stderr=subprocess.STDOUT,
        )

        def listening() -> bool:
            out = b.run(["ss", "-Hltn", f"sport = :{IPERF_PORT}"], check=False).stdout
            return bool(out.strip())

        _wait(listening, 10.0, "the iperf3 server to listen", hosts)
        yield hosts


def _iperf(hosts: Hosts, args: list[str], seconds: int) -> tuple[dict[str, Any], float | None]:
    """Run one iperf3 client in a against the server in b for ``seconds``; its JSON report
    and the tunnel processes' CPU share over the run."""
    if seconds < 1:
        raise BenchError(f"an iperf3 run needs at least 1 s, not {seconds}")
    argv = ["iperf3", "-c", hosts.target, "-p", str(IPERF_PORT), "-J", "-t", str(seconds),
            "--connect-timeout", "5000", *args]  # fmt: skip
    with CpuMeter(hosts.tunnel_pids) as cpu:
        proc = hosts.a.run(argv, check=False, timeout=seconds + IPERF_GRACE)
    try:
        report: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise BenchError(
            f"iperf3 {' '.join(args)} gave no report (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-1000:]}\n{hosts.log_tails()}"
        ) from None
    if report.get("error"):
        raise BenchError(f"iperf3 {' '.join(args)}: {report['error']}\n{hosts.log_tails()}")
    return report, cpu.percent


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


# ---------------------------------------------------------------------------------------------
# The run


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


def to_json(
    runs: Sequence[RunResult], systems: Sequence[str], durations: Durations
) -> dict[str, Any]:
    return {
        "bench": "btmm end-to-end (iperf3 through each tunnel between two namespaces)",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "versions": _versions(systems),
        "settings": {
            **asdict(durations),
            "systems": list(systems),
            "inner_mtu": INNER_MTU,
            "udp_sizes": list(UDP_SIZES),
            "loss_limit": LOSS_LIMIT,
            "udp_socket_buffer": UDP_SOCKET_BUFFER,
            "udp_search": "probe 1 unlimited (-b 0); then at most udp_probes - 1 more: just "
            "below the rate that got through until one loses < loss_limit, then geometric "
            "bisection up to twice that rate; a final probe at 0.7 of what got through at the "
            "last lossy rate if none was lossless yet",
            "openvpn_mode": "p2p TLS (self-signed, --peer-fingerprint), AES-256-GCM, UDP, no DCO",
        },
        "units": {
            "gbps": "Gbit/s; TCP: iperf3 receiver goodput; UDP: whole inner IPv6 packets",
            "pps": "packets/s received, at the fastest offered rate with loss < loss_limit",
            "cpu": "CPU time of the tunnel processes of both ends (user + system) over the "
            "test, percent of one core; kernel work outside them (softirq) is not counted",
            "sizes": "UDP sizes count the whole inner IPv6 packet (40 + 8 header bytes)",
        },
        "summary": summarize(runs, systems),
        "runs": [asdict(r) for r in runs],
    }


def _versions(systems: Sequence[str]) -> dict[str, str]:
    commands = {
        "iperf3": ["iperf3", "--version"],
        "wireguard-go": ["wireguard-go", "--version"],
        "openvpn": ["openvpn", "--version"],
    }
    wanted = ["iperf3"] + [s for s in systems if s in commands]
    out = {}
    if any(s.startswith("btmm-") for s in systems):
        out["btmm"] = _btmm_version()
    for name in wanted:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            proc = subprocess.run(commands[name], capture_output=True, text=True, timeout=10)
            first = (proc.stdout or proc.stderr).strip().splitlines()
            out[name] = first[0] if first else ""
    return out


def _btmm_version() -> str:
    """The commit measured, whether the Rust sources differ from it, and when the extension
    was built: the engine changes under active work, and a figure must say what it measured."""
    parts = []

    def git(*args: str) -> str:
        argv = ["git", "-C", str(REPO), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "btmm_fast")
        parts.append(f"commit {head}" + (" (btmm_fast/ modified)" if dirty else ""))
    for so in sorted((REPO / "btmm_core").glob("_fast*.so")):
        built = datetime.datetime.fromtimestamp(so.stat().st_mtime, datetime.UTC)
        parts.append(f"{so.name} built {built.isoformat(timespec='seconds')}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Presentation


def table(report: dict[str, Any]) -> Any:
    """Metrics down, systems across: median, min-max, and the ratios to wireguard-go and
    plain veth under each number."""
    from rich.table import Table

    summary = report["summary"]
    t = Table(
        title="End to end through each tunnel (iperf3, two namespaces, one veth pair)",
        caption=f"median (min-max) of {report['settings']['repetitions']} interleaved "
        "repetitions; x wg: ratio to wireguard-go; % veth: share of plain veth; "
        "* sender-bound in n: in n runs iperf3's sender, not the path, set the UDP figure",
    )
    t.add_column("metric")
    for system in summary:
        t.add_column(system, justify="right")
    for key, label, unit, _ in METRICS:
        digits = 0 if key.endswith(("_cpu", "_kpps")) else 2
        cells = []
        for system, metrics in summary.items():
            m = metrics.get(key)
            if m is None:
                cells.append("-")
                continue
            lines = [f"{m['median']:.{digits}f}", f"({m['min']:.{digits}f}-{m['max']:.{digits}f})"]
            ratios = []
            if m.get("vs_wireguard_go") is not None and system != REFERENCE:
                ratios.append(f"{m['vs_wireguard_go']:.2f}x wg")
            if m.get("vs_veth") is not None and system != CEILING:
                ratios.append(f"{100 * m['vs_veth']:.0f}% veth")
            if m.get("sender_limited_runs"):
                ratios.append(f"* sender-bound in {m['sender_limited_runs']}")
            cells.append("\n".join(lines + ratios))
        t.add_row(f"{label}\n{unit}", *cells, end_section=True)
    return t


def chart(report: dict[str, Any], path: Path) -> None:
    """Bars of the medians with min-max whiskers, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    systems = list(summary)
    fig, axes = plt.subplots(2, 4, figsize=(18, 8.5))
    flat = list(axes.flat)
    colors = [f"C{i}" for i in range(10)]  # matplotlib's default cycle, one per system
    for ax, (key, label, unit, _) in zip(flat, METRICS, strict=False):
        shown = [s for s in systems if key in summary[s]]
        med = [summary[s][key]["median"] for s in shown]
        low = [summary[s][key]["median"] - summary[s][key]["min"] for s in shown]
        high = [summary[s][key]["max"] - summary[s][key]["median"] for s in shown]
        bars = ax.bar(
            range(len(shown)), med, yerr=[low, high], capsize=4,
            color=[colors[systems.index(s) % len(colors)] for s in shown],
        )  # fmt: skip
        marks = ["*" if summary[s][key].get("sender_limited_runs") else "" for s in shown]
        ax.bar_label(
            bars, labels=[f"{v:.3g}{m}" for v, m in zip(med, marks, strict=True)], padding=2,
            fontsize=8,
        )  # fmt: skip
        ax.set_xticks(range(len(shown)), shown, rotation=25, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_ylabel(unit)
        ax.margins(y=0.15)
    for ax in flat[len(METRICS) :]:
        ax.axis("off")
    flat[-1].text(
        0.0, 0.5,
        f"{report['date']}\nkernel {report['machine']['kernel']}, "
        f"{report['machine']['cpus']} CPUs\n"
        f"median of {report['settings']['repetitions']} interleaved repetitions,\n"
        "whiskers: min-max\ninner MTU 1420, IPv6 inside every tunnel\n"
        "*: in some runs the iperf3 sender, not the path,\n   set the UDP figure",
        fontsize=9, va="center",
    )  # fmt: skip
    fig.suptitle("btmm end-to-end bench: iperf3 through each tunnel")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(
    systems: Sequence[str],
    quick: bool,
    repetitions: int | None,
    as_json: bool,
    output: Path | None,
    chart_path: Path | None,
    tcp_seconds: int | None = None,
) -> dict[str, Any]:
    """Run, then print (table or JSON) and write the JSON and the chart. The shared body of
    ``btmm bench --e2e`` and ``bench/e2e.py``."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    durations = QUICK if quick else FULL
    if repetitions or tcp_seconds:
        durations = Durations(
            tcp=tcp_seconds or durations.tcp,
            udp_probe=durations.udp_probe,
            udp_probes=durations.udp_probes,
            repetitions=repetitions or durations.repetitions,
        )
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise BenchError(f"unknown systems {unknown}", hint=f"choose from {', '.join(SYSTEMS)}")
    # Progress goes to stderr so that --json output stays clean on stdout.
    console = Console(stderr=True)
    steps_per_run = 2 + len(UDP_SIZES) + 1
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console, transient=as_json,
    ) as progress:  # fmt: skip
        task = progress.add_task(
            "starting", total=steps_per_run * len(systems) * durations.repetitions
        )
        started = False

        def step(what: str) -> None:
            nonlocal started
            if started:
                progress.advance(task)
            started = True
            progress.update(task, description=what)

        runs = run(systems, durations, step)
        progress.update(task, completed=progress.tasks[0].total, description="finished")
    report = to_json(runs, systems, durations)
    text = json.dumps(report, indent=2)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
    if chart_path:
        chart_path.parent.mkdir(parents=True, exist_ok=True)
        chart(report, chart_path)
    if as_json:
        print(text)
    else:
        Console().print(table(report))
        for name, path in (("JSON", output), ("chart", chart_path)):
            if path:
                Console().print(f"{name}: {path}")
    return report


DEFAULT_OUTPUT = REPO / "bench" / "results" / "e2e.json"
DEFAULT_CHART = REPO / "bench" / "results" / "e2e.png"


def parse_systems(text: str) -> list[str]:
    """``all`` or a comma-separated list of SYSTEMS, kept in the canonical order."""
    if text.strip() == "all":
        return list(SYSTEMS)
    chosen = {s.strip() for s in text.split(",") if s.strip()}
    unknown = sorted(chosen - set(SYSTEMS))
    if unknown or not chosen:
        raise BenchError(
            f"unknown systems {unknown}" if unknown else "no system chosen",
            hint=f"give `all` or a comma-separated list of {', '.join(SYSTEMS)}",
        )
    return [s for s in SYSTEMS if s in chosen]


def cli_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options of ``bench/e2e.py`` (``btmm bench --e2e`` has --quick, --repetitions,
    --json and --systems of them)."""
    import click

    for option in reversed(
        [
            click.option("--systems", default="all", show_default=True,
                         help=f"Comma-separated subset of: {', '.join(SYSTEMS)}."),
            click.option("--quick", is_flag=True,
                         help="1 repetition, 1 s TCP runs, 2 short UDP probes: a smoke run."),
            click.option("--repetitions", type=click.IntRange(1, 50), default=None,
                         help=f"Interleaved rounds (default {FULL.repetitions}, "
                         f"{QUICK.repetitions} with --quick)."),
            click.option("--tcp-seconds", type=click.IntRange(1, 120), default=None,
                         help=f"Seconds per TCP run (default {FULL.tcp:g}, "
                         f"{QUICK.tcp:g} with --quick)."),
            click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
                         default=None, help="Where the JSON goes (default: "
                         "bench/results/e2e.json, nowhere with --quick)."),
            click.option("--chart", "chart_path", type=click.Path(dir_okay=False, path_type=Path),
                         default=None, help="Where the PNG goes (default: "
                         "bench/results/e2e.png, nowhere with --quick)."),
            click.option("--json", "as_json", is_flag=True,
                         help="Print the JSON report on stdout instead of the table."),
        ]
    ):  # fmt: skip
        fn = option(fn)
    return fn


def _command() -> Any:
    import click

    @click.command("e2e")
    @cli_options
    def e2e(
        systems: str, quick: bool, repetitions: int | None, tcp_seconds: int | None,
        output: Path | None, chart_path: Path | None, as_json: bool,
    ) -> None:  # fmt: skip
        """Measure iperf3 through btmm (both engines), wireguard-go and OpenVPN, beside plain
        veth, in two fresh network namespaces per run (needs root)."""
        try:
            if not quick:  # a smoke run must not overwrite the figures of a real one
                output = output or DEFAULT_OUTPUT
                chart_path = chart_path or DEFAULT_CHART
            main(parse_systems(systems), quick, repetitions, as_json, output, chart_path,
                 tcp_seconds)  # fmt: skip
        except BtmmError as err:
            raise click.ClickException(str(err)) from err

    return e2e


def script() -> None:
    """Entry point of ``bench/e2e.py``."""
    _command()()
