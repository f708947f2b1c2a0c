"""How each system of the end-to-end bench is brought up between two namespaces.

Two namespaces joined by a veth pair (outer 192.0.2.1/24 and 192.0.2.2/24, and 2001:db8:e2e::1/64
and ::2/64); per system, a tunnel between them:

- ``veth``: no tunnel, iperf3 straight over the veth pair (the ceiling),
- ``btmm-fast`` / ``btmm-python``: ``btmm tunnel`` with static SAs, ESP (RFC 4303) with
  AES-256-GCM (RFC 4106) in UDP (RFC 3948), one engine on both ends, over the IPv4 underlay,
- ``btmm-fast-ipv6`` / ``btmm-python-ipv6``: the same over the IPv6 underlay (each end's
  endpoint is the other's 2001:db8:e2e:: address; the same dual-stack socket),
- ``wireguard-go``: Debian's userspace WireGuard, configured with ``wg set`` and ``ip``,
- ``openvpn``: OpenVPN 2.6 in user space (``--disable-dco``), peer to peer over UDP, TLS with
  self-signed certificates checked by ``--peer-fingerprint``; the data channel negotiates
  AES-256-GCM. (Static-key ``--secret`` mode cannot use GCM, so it is not comparable.)

Every tunnel carries IPv6 between ULA inner addresses with an inner MTU of 1418 (btmm's default,
the largest that fits a 1500-byte path over IPv6 with btmm's ESP), so that the same iperf3
traffic crosses each; an iperf3 server listens in b.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import queue
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import REPO
from bench.e2e import BenchError
from btmm_core.dataplane.api import DEFAULT_MTU
from btmm_core.lab.netns import Lab, Netns

SYSTEMS = (
    "veth",
    "btmm-fast",
    "btmm-fast-ipv6",
    "btmm-python",
    "btmm-python-ipv6",
    "wireguard-go",
    "openvpn",
)
A_OUTER, B_OUTER = "192.0.2.1", "192.0.2.2"
A_OUTER6, B_OUTER6 = "2001:db8:e2e::1", "2001:db8:e2e::2"
INNER_MTU = DEFAULT_MTU
#: inner /64 per system (ULA, RFC 4193); host a is ::1, host b is ::2
INNER_PREFIX = {
    "veth": "fd00:b7:e2e0::",
    "btmm-fast": "fd00:b7:e2e1::",
    "btmm-python": "fd00:b7:e2e1::",
    "btmm-fast-ipv6": "fd00:b7:e2e1::",
    "btmm-python-ipv6": "fd00:b7:e2e1::",
    "wireguard-go": "fd00:b7:e2e2::",
    "openvpn": "fd00:b7:e2e3::",
}
BTMM_PORT, WG_PORT, OVPN_PORT, IPERF_PORT = 4500, 51820, 1194, 5201


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

    def iperf_listening(self) -> bool:
        """Whether the iperf3 server in b has its control listener open. A persistent
        iperf3 server closes it after each test and opens it again for the next (esnet/iperf
        pull request 2066 describes the window), so a client that comes at once may be
        refused, or reset while queued on the closing listener."""
        out = self.b.run(["ss", "-Hltn", f"sport = :{IPERF_PORT}"], check=False).stdout
        return bool(out.strip())

    def log_tails(self, n: int = 1500) -> str:
        out = []
        for path in self.logs:
            with contextlib.suppress(OSError):
                out.append(f"--- {path.name}\n{path.read_text()[-n:]}")
        return "\n".join(out)


def wait_iperf_server(hosts: Hosts, timeout: float = 10.0) -> None:
    """Until the iperf3 server listens; BenchError after ``timeout`` seconds."""
    _wait(hosts.iperf_listening, timeout, "the iperf3 server to listen", hosts)


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


def _read_line(stream: Any, timeout: float) -> str | None:
    """One line from a pipe within ``timeout`` seconds (None if none came)."""
    box: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: box.put(stream.readline()), daemon=True).start()
    try:
        return box.get(timeout=timeout)
    except queue.Empty:
        return None


def _up_veth(hosts: Hosts, system: str) -> None:
    for ns, host in ((hosts.a, 1), (hosts.b, 2)):
        ns.run(["ip", "-6", "addr", "add", f"{_inner(system, host)}/64", "dev", "eth0"])


def _up_btmm(hosts: Hosts, system: str) -> None:
    engine = system.removeprefix("btmm-").removesuffix("-ipv6")
    keys = [secrets.token_hex(36), secrets.token_hex(36)]  # AES-256 key + 4-byte salt, each way
    spis = [0x1000 + secrets.randbelow(1 << 20), 0x2000000 + secrets.randbelow(1 << 20)]
    if system.endswith("-ipv6"):
        ends = ((hosts.a, 1, f"[{B_OUTER6}]", 0), (hosts.b, 2, f"[{A_OUTER6}]", 1))
    else:
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
    "btmm-fast-ipv6": _up_btmm,
    "btmm-python-ipv6": _up_btmm,
    "wireguard-go": _up_wireguard,
    "openvpn": _up_openvpn,
}


TOOLS = {
    "veth": ("ip", "iperf3", "ping"),
    "btmm-fast": ("ip", "iperf3", "ping"),
    "btmm-python": ("ip", "iperf3", "ping"),
    "btmm-fast-ipv6": ("ip", "iperf3", "ping"),
    "btmm-python-ipv6": ("ip", "iperf3", "ping"),
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
                # EngineUnavailable says how to build it
                resolve_kind(s.removeprefix("btmm-").removesuffix("-ipv6"))


@contextlib.contextmanager
def system_lab(system: str, workdir: Path) -> Iterator[Hosts]:
    """A fresh two-namespace lab with ``system`` up and an iperf3 server listening in b."""
    with Lab("e2e") as lab:
        a, b = lab.ns("a"), lab.ns("b")
        lab.veth(a, "eth0", b, "eth0")
        a.run(["ip", "addr", "add", f"{A_OUTER}/24", "dev", "eth0"])
        b.run(["ip", "addr", "add", f"{B_OUTER}/24", "dev", "eth0"])
        a.run(["ip", "-6", "addr", "add", f"{A_OUTER6}/64", "dev", "eth0", "nodad"])
        b.run(["ip", "-6", "addr", "add", f"{B_OUTER6}/64", "dev", "eth0", "nodad"])
        hosts = Hosts(lab, a, b, workdir, target=_inner(system, 2))
        BRING_UP[system](hosts, system)
        _reachable(hosts)
        b.popen(
            ["iperf3", "-s", "-p", str(IPERF_PORT)],
            stdout=_log(hosts, "iperf3-server.log"),
            stderr=subprocess.STDOUT,
        )

        wait_iperf_server(hosts)
        yield hosts


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
