"""A whole Back to My Mac world in network namespaces, and ``btmm lab``.

Topology (``nat=True``, the default scenario)::

    registry + STUN (ns "inet", bridge br0: 203.0.113.1, STUN on .10/.11)
      |-- gw1 (203.0.113.2 | 192.168.1.1, nftables masquerade + miniupnpd) -- desktop 192.168.1.10
      |-- gw2 (203.0.113.3 | 192.168.2.1, ...)                               -- laptop  192.168.2.11
      `-- gw3 (203.0.113.4 | 192.168.3.1, ...)   "cafe" (``cafe=True``): a third network

With ``nat=False`` the desktop (203.0.113.21) and laptop (203.0.113.22) sit on the bridge
directly. Every process is the real command: ``btmm serve`` for the registry, ``btmm join`` and
``btmm up`` for each host, miniupnpd on each gateway. Each host enrols its own key as a user
would: the desktop with the account's credentials file, the laptop with a single-use invite
(``btmm serve user invite``), both from inside their namespace over the lab network. Each host
namespace gets its own hosts file and resolv.conf (/etc/netns/<ns>/, which ``ip netns exec``
mounts on /etc/), the latter naming the daemon's stub resolver, so names resolve inside the lab
only.

Scenarios (``btmm lab --scenario NAME``, ``build_world(scenario=NAME)``; ``SCENARIOS``):

============  =================================================  ===========================
name          topology                                           what it demonstrates
============  =================================================  ===========================
default       desktop behind gw1, laptop behind gw2, both        a tunnel over the mapped
              gateways map ports (miniupnpd, NAT-PMP/PCP)        path; ``--roam`` does what
                                                                 roam-home does
same-home     desktop .10 and laptop .11 on gw1's LAN, gw1       the LAN path: the gateway
              maps ports but does not hairpin (a packet to its   drops what its own LAN
              own public address from its LAN is not sent back)  sends to its public address
no-mapping    desktop behind gw1, laptop behind gw2, neither     a punched path: both
              gateway runs miniupnpd (plain masquerade)          publish only reflexive and
                                                                 LAN candidates
roam-home     default's homes; mid-transfer the laptop moves     the path moves from mapped
              from gw2 into the desktop's home gw1               to LAN under a running TCP
                                                                 connection
============  =================================================  ===========================

same-home, no-mapping and roam-home get their tunnel from the path probes in ``btmm up``
(issue 13): each host publishes its LAN, mapped and reflexive candidates, both probe every pair
and the handshake follows the best path that answered (LAN > mapped > punched).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from btmm_core.daemon.control import Op
from btmm_core.daemon.control_client import ask
from btmm_core.errors import BtmmError
from btmm_core.lab.nat import (
    MiniupnpdConfig,
    NatGateway,
    _child_env,
    _wait_udp_listening,
    make_gateway,
)
from btmm_core.lab.netns import Lab, LabError, Netns

DOMAIN = "members.example"
USER = "bob"
REGISTRY = "203.0.113.1"
STUN = ("203.0.113.10", "203.0.113.11")
SECRET = b"lab account secret: not for real use"


@dataclass(frozen=True)
class HomeSpec:
    """One home network: its gateway's WAN address, its LAN, whether the gateway maps ports."""

    name: str
    wan: str
    lan_prefix: str
    miniupnpd: bool = True


@dataclass(frozen=True)
class Scenario:
    """A topology and what it shows; see the table in the module docstring."""

    name: str
    demonstrates: str
    homes: tuple[HomeSpec, ...]
    desktop_home: str
    laptop_home: str
    roam_to: str | None = None  # the home the laptop moves into mid-transfer


GW1 = HomeSpec("gw1", "203.0.113.2", "192.168.1")
GW2 = HomeSpec("gw2", "203.0.113.3", "192.168.2")
CAFE = HomeSpec("gw3", "203.0.113.4", "192.168.3")

SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("default", "two homes whose gateways map a port: the mapped path",
             (GW1, GW2), "gw1", "gw2"),
    Scenario("same-home", "both hosts behind one gateway that does not hairpin: the LAN path",
             (GW1,), "gw1", "gw1"),
    Scenario("no-mapping", "two homes whose gateways map nothing (plain masquerade): "
             "a punched path", (replace(GW1, miniupnpd=False), replace(GW2, miniupnpd=False)),
             "gw1", "gw2"),
    Scenario("roam-home", "the laptop moves into the desktop's home mid-transfer: the path "
             "moves from mapped to LAN and the same TCP connection finishes",
             (GW1, GW2), "gw1", "gw2", roam_to="gw1"),
)}

# where `btmm lab --roam` (the default scenario) moves the laptop: into the desktop's home,
# the case a mapping alone never reached (issue 13; before it, the cafe gw3)
DEFAULT_ROAM_TO = "gw1"


@dataclass
class Host:
    name: str
    ns: Netns
    workdir: Path
    config: Path
    proc: subprocess.Popen[Any] | None = None
    log: Path | None = None
    join_args: list[str] = field(default_factory=list)

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{USER}.{DOMAIN}"

    @property
    def control_socket(self) -> Path:
        return self.workdir / "state" / "control.sock"

    def status(self) -> dict[str, Any] | None:
        """``btmm status --json`` as of now, asked on the daemon's control socket (a path
        in the file system, so reachable from outside the host's namespace); None while no
        daemon answers."""
        try:
            return ask(self.control_socket, Op.STATUS)
        except BtmmError:
            return None

    def first_peer(self) -> dict[str, Any]:
        """The status of this host's first peer as of now; empty while it has none (or no
        daemon answers). The lab's two-host worlds have one peer each."""
        peers = (self.status() or {}).get("peers", [])
        return dict(peers[0]) if peers else {}


@dataclass
class Home:
    name: str
    gw: NatGateway
    lan_prefix: str  # "192.168.1"


@dataclass
class World:
    lab: Lab
    nat: bool
    workdir: Path
    inet: Netns
    registry: subprocess.Popen[Any] | None = None
    hosts: dict[str, Host] = field(default_factory=dict)
    homes: dict[str, Home] = field(default_factory=dict)
    location: dict[str, str] = field(default_factory=dict)
    _registry_args: list[str] = field(default_factory=list)

    def btmm(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "btmm_core.cli", *args]

    # -- building ------------------------------------------------------------------------

    def _attach(self, ns: Netns, ifname: str) -> None:
        port = f"p{len(self.inet_ports)}"
        self.lab.veth(ns, ifname, self.inet, port)
        self.inet.run(["ip", "link", "set", port, "master", "br0"])
        self.inet_ports.append(port)

    inet_ports: list[str] = field(default_factory=list)

    def registry_env(self) -> dict[str, str]:
        return {**_child_env(), "BTMM_REGISTRY_STATE": str(self.workdir / "registry"),
                "BTMM_REGISTRY_DOMAIN": DOMAIN}

    def serve_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``btmm serve ARGS`` on the registry's state (e.g. ``user revoke bob laptop``)."""
        return subprocess.run(self.btmm("serve", *args), env=self.registry_env(),
                              capture_output=True, text=True, timeout=60, check=False)

    def start_registry(self, *, lease_min: int, lease_max: int,
                       invites: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> None:
        env = self.registry_env()
        subprocess.run(self.btmm("serve", "user", "add", USER), check=True, env=env,
                       capture_output=True)
        for device in invites:
            subprocess.run(self.btmm("serve", "user", "invite", USER, "--device", device,
                                     "--expires", "1h", "--out", str(self.invite(device))),
                           check=True, env=env, capture_output=True)
        self._registry_args = ["--listen", REGISTRY, "--port", "53", "--tls-port", "0",
                               "--ns-address", REGISTRY, "--lease-min", str(lease_min),
                               "--lease-max", str(lease_max), "--event-loop", "asyncio",
                               *extra]
        self._launch_registry()

    def _launch_registry(self) -> None:
        log = open(self.workdir / "registry.log", "ab")  # noqa: SIM115 (owned by the process)
        self.registry = self.inet.popen(self.btmm("serve", *self._registry_args), stdout=log,
                                        stderr=log, stdin=subprocess.DEVNULL,
                                        env=self.registry_env())
        log.close()
        _wait_udp_listening(self.inet, 53, proc=self.registry)

    def restart_registry(self, *, kill: bool = True) -> None:
        """Stop ``btmm serve`` (SIGKILL: a crash; else SIGTERM) and start it again on the same
        state, as a supervisor would."""
        if self.registry is None:
            raise LabError("the registry is not running")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.registry.pid, 9 if kill else 15)
        self.registry.wait(timeout=15)
        with contextlib.suppress(ValueError):
            self.inet.procs.remove(self.registry)
        self._launch_registry()

    def add_home(self, name: str, wan: str, lan_prefix: str, *, behind_isp: bool = False,
                 miniupnpd: bool = True) -> Home:
        """A home gateway with its WAN on the internet bridge, or (``behind_isp``) behind a
        carrier-grade NAT in shared space 100.64.0.0/10 with no mapping protocol: double NAT.
        ``miniupnpd=False``: the gateway only masquerades (no PCP, NAT-PMP or UPnP)."""
        ns = self.lab.ns(name)
        wan_cidr, wan_gw = f"{wan}/24", REGISTRY
        if behind_isp:
            isp = self.lab.ns(f"{name}isp")
            self._attach(isp, "wan0")
            self.lab.veth(ns, "wan0", isp, "lan0")
            make_gateway(self.lab, isp, wan_if="wan0", wan_cidr=f"{wan}/24",
                         wan_gateway=REGISTRY, lan_if="lan0", lan_cidr="100.64.0.1/24")
            wan_cidr, wan_gw = "100.64.0.2/24", "100.64.0.1"
        else:
            self._attach(ns, "wan0")
        # hosts plug into a bridge on the LAN side (``plug``), so one can leave and come back
        ns.run(["ip", "link", "add", "lan0", "type", "bridge"])
        ns.run(["ip", "link", "set", "lan0", "up"])
        gw = make_gateway(self.lab, ns, wan_if="wan0", wan_cidr=wan_cidr,
                          wan_gateway=wan_gw, lan_if="lan0", lan_cidr=f"{lan_prefix}.1/24")
        home = Home(name, gw, lan_prefix)
        self.homes[name] = home
        if miniupnpd:
            self.start_mapping(name)
        return home

    def start_mapping(self, name: str, *, announce: bool = True,
                      external_ports: str | None = None) -> None:
        """Start miniupnpd (NAT-PMP and PCP) on home ``name``'s gateway, also while its hosts
        run: a gateway whose mapping service comes up late. ``announce=False`` drops its
        start-up announcements, so the hosts find it only by asking again;
        ``external_ports`` ("4501-4600") is what it grants instead of the port asked for."""
        gw = self.homes[name].gw
        if not announce:
            gw.silence_announcements()
        gw.start_miniupnpd(MiniupnpdConfig(natpmp=True, upnp=False, stun_host=STUN[0],
                                           external_ports=external_ports))

    def plug(self, host: Host, home: Home | None, index: int) -> None:
        """Connect ``host``'s eth0 to a home LAN (or, with None, to the internet bridge)."""
        host.ns.run(["ip", "link", "del", "eth0"], check=False)
        if home is None:
            self._attach(host.ns, "eth0")
            host.ns.run(["ip", "addr", "add", f"203.0.113.{20 + index}/24", "dev", "eth0"])
            self.location[host.name] = "internet"
            return
        port = f"h{index}{secrets_suffix()}"
        self.lab.veth(host.ns, "eth0", home.gw.ns, port)
        home.gw.ns.run(["ip", "link", "set", port, "master", "lan0"])
        host.ns.run(["ip", "addr", "add", f"{home.lan_prefix}.{10 + index}/24", "dev", "eth0"])
        host.ns.run(["ip", "route", "add", "default", "via", f"{home.lan_prefix}.1"])
        self.location[host.name] = home.name

    def pin_internet_neighbours(self) -> int:
        """Permanent ARP entries between everything on the lab internet (the registry's bridge
        and every host plugged there), in each of their namespaces; returns how many.

        The kernel keeps one ARP table for all namespaces, and past ``gc_thresh3`` entries
        (1024 by default) it creates no more ("neighbor table overflow"): 50 lab hosts that
        each probe every other need 2,500, and their packets were dropped (UDP send-buffer
        errors, paths going stale, hosts cut off from the registry for minutes). Machines of
        their own each have their own table; permanent entries do not count against the
        limit, so the lab stays close to that at any size."""
        found: list[tuple[Netns, str, list[tuple[str, str]]]] = []  # (ns, dev, [(ip, mac)])
        for ns, dev in [(self.inet, "br0"), *((h.ns, "eth0") for h in self.hosts.values()
                                              if self.location.get(h.name) == "internet")]:
            info = json.loads(ns.run(["ip", "-j", "-4", "addr", "show", "dev", dev]).stdout)
            mac = json.loads(ns.run(["ip", "-j", "link", "show", "dev", dev]).stdout)[0]["address"]
            found.append((ns, dev, [(a["local"], mac) for a in info[0]["addr_info"]]))
        pinned = 0
        for ns, dev, _ in found:
            lines = [f"neigh replace {ip} lladdr {mac} dev {dev} nud permanent"
                     for other, _, addrs in found if other is not ns for ip, mac in addrs]
            ns.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n")
            pinned += len(lines)
        return pinned

    def invite(self, device: str) -> Path:
        return self.workdir / f"{device}.invite"

    @property
    def account_key(self) -> Path:
        return self.workdir / "registry" / "credentials" / f"{USER}.key"

    def add_host(self, name: str, dataplane: str, *, lease: int, extra: dict[str, Any]) -> Host:
        """The host's namespace and files; ``join_host`` enrols it once it is plugged in."""
        ns = self.lab.ns(name)
        etc = Path("/etc/netns") / ns.name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost\n")
        # programs ask the daemon's stub resolver (``names/``, default 127.0.0.153); a name it
        # does not know fails at once, never waiting on the machine's own resolver (which the
        # lab cannot reach anyway): before the daemon starts nothing listens there
        (etc / "resolv.conf").write_text(
            "nameserver 127.0.0.153\noptions timeout:1 attempts:1\n")
        self.lab.on_close(lambda: shutil.rmtree(etc, ignore_errors=True))
        work = self.workdir / name
        work.mkdir()
        host = Host(name, ns, work, work / "btmm.toml")
        host.join_args = ["--config", str(host.config), "--secret-file",
                          str(self.workdir / "account.secret"), "--name", name, "--server",
                          f"{REGISTRY}:53", "--state-dir", str(work / "state"), "--dataplane",
                          dataplane, "--hosts-file", str(etc / "hosts"), "--set",
                          f"lease={lease}"]
        for k, v in extra.items():
            host.join_args += ["--set", f"{k}={v}"]
        self.hosts[name] = host
        return host

    def join_host(self, host: Host, credentials: Path, timeout: float = 20.0) -> None:
        """``btmm join`` inside the host's namespace: enrol its own key with the registry."""
        argv = host.ns.argv(self.btmm("join", "--credentials", str(credentials),
                                      *host.join_args))
        deadline = time.monotonic() + timeout
        while True:
            proc = subprocess.run(argv, env=_child_env(), capture_output=True, text=True,
                                  timeout=60, check=False)
            if proc.returncode == 0:
                return
            if "no answer" not in proc.stderr or time.monotonic() > deadline:
                raise LabError(f"btmm join on {host.name} failed: {proc.stderr.strip()[-1500:]}")
            # the gateway may still be coming up (no connection: nothing was enrolled)
            time.sleep(0.5)

    def start_host(self, host: Host, *args: str) -> None:
        """``btmm up`` in the host's namespace; ``args``: more options (``--metrics ...``)."""
        host.log = host.workdir / "daemon.log"
        log = open(host.log, "ab")  # noqa: SIM115 (owned by the process)
        host.proc = host.ns.popen(self.btmm("up", "--config", str(host.config), *args),
                                  stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                  env=_child_env())
        log.close()

    def stop_host(self, host: Host, *, kill: bool = False) -> None:
        if host.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(host.proc.pid, 9 if kill else 15)
        try:
            host.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(host.proc.pid, 9)
            host.proc.wait(timeout=5)
        with contextlib.suppress(ValueError):
            host.ns.procs.remove(host.proc)
        host.proc = None

    # -- waiting and measuring ------------------------------------------------------------

    def wait_tunnels(self, timeout: float, names: list[str] | None = None) -> float:
        """Seconds until every host has a tunnel up to every other host; LabError if not."""
        names = names or list(self.hosts)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            ok = True
            for n in names:
                st = self.hosts[n].status()
                self.check_alive(self.hosts[n])
                up = {p["name"].split(".")[0] for p in (st or {}).get("peers", [])
                      if p["tunnel"] == "up"}
                if not set(names) - {n} <= up:
                    ok = False
            if ok:
                return time.monotonic() - t0
            time.sleep(0.2)
        raise LabError(f"tunnels not up after {timeout} s", hint=self.tails())

    def wait_until(self, check: Callable[[], object], timeout: float, what: str,
                   interval: float = 0.2) -> float:
        """Seconds until ``check()`` is true, asked every ``interval``; LabError naming ``what``
        with the tail of every host's log if it is not true within ``timeout``."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if check():
                return time.monotonic() - t0
            time.sleep(interval)
        raise LabError(f"{what} not within {timeout} s", hint=self.tails())

    def check_alive(self, host: Host) -> None:
        if host.proc is not None and host.proc.poll() is not None:
            raise LabError(f"btmm up on {host.name} exited {host.proc.returncode}",
                           hint=self.tails())

    def tails(self, n: int = 15) -> str:
        out = []
        for h in self.hosts.values():
            if h.log and h.log.exists():
                lines = h.log.read_text(errors="replace").splitlines()[-n:]
                out.append(f"--- {h.name} ---\n" + "\n".join(lines))
        return "\n".join(out)

    def publish_services(self, host: Host, services: dict[str, tuple[int, dict[str, str]]]
                         ) -> None:
        """``[services]`` in the host's configuration (any earlier section replaced): published
        as wide-area DNS-SD at its next ``btmm up``. ``services``: type -> (port, TXT keys)."""
        text = host.config.read_text().split("\n[services]")[0].rstrip("\n")
        lines = ["", "[services]"]
        for kind, (port, txt) in services.items():
            keys = ", ".join(f"{k} = {json.dumps(v)}" for k, v in txt.items())
            lines.append(f"{kind} = {{ port = {port}, txt = {{ {keys} }} }}")
        host.config.write_text(text + "\n" + "\n".join(lines) + "\n")

    # -- SSH single sign-on (issue 20): a real sshd per host, in its namespace ----------------

    def ssh_dir(self, host: Host) -> Path:
        return host.workdir / "ssh"

    def enable_sso(self, host: Host, users: dict[str, str] | None = None) -> None:
        """Give the host an ed25519 sshd host key and a user key (for root), and turn on
        ``[sso]`` in its configuration with every file inside the host's work directory:
        the machine's own /etc/ssh is never touched."""
        d = self.ssh_dir(host)
        d.mkdir(exist_ok=True)
        for key in ("ssh_host_ed25519_key", "id_ed25519"):
            if not (d / key).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                                f"{key} of {host.name}", "-f", str(d / key)], check=True,
                               capture_output=True, timeout=30)
        table = ", ".join(f'"{u}" = "{p}"' for u, p in (users or {"root": USER}).items())
        with open(host.config, "a") as f:
            f.write(f"""
[sso]
enabled = true
users = {{{table}}}
host_key = "{d / 'ssh_host_ed25519_key.pub'}"
user_key = "{d / 'id_ed25519.pub'}"
sshd_dropin = "{d / 'sshd_config.d' / 'btmm.conf'}"
known_hosts = "{d / 'ssh_known_hosts'}"
sshd_pid_file = "{d / 'sshd.pid'}"
""")

    def start_sshd(self, host: Host, port: int = 22) -> subprocess.Popen[Any]:
        """OpenSSH's sshd in the host's namespace with its own configuration (which includes
        btmm's drop-in), in a UTS namespace of its own named after the host, so ``hostname``
        over ssh says which host answered."""
        d = self.ssh_dir(host)
        cfg = d / "sshd_config"
        cfg.write_text(
            f"Include {d / 'sshd_config.d' / 'btmm.conf'}\n"
            f"Port {port}\nListenAddress ::\nHostKey {d / 'ssh_host_ed25519_key'}\n"
            f"PidFile {d / 'sshd.pid'}\nAuthorizedKeysFile none\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            # the lab's files live under /tmp, which is world-writable
            "StrictModes no\nLogLevel VERBOSE\n")
        # the daemon writes its drop-in at start; sshd reads it when it starts (or on the
        # SIGHUP the daemon sends once sshd's pid file exists)
        dropin = d / "sshd_config.d" / "btmm.conf"
        deadline = time.monotonic() + 10
        while not dropin.exists():
            if time.monotonic() > deadline:
                raise LabError(f"btmm up on {host.name} wrote no sshd drop-in",
                               hint=self.tails())
            time.sleep(0.05)
        # sshd's privilege separation directory (an empty directory; the package ships none
        # until its service first runs)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        log = open(d / "sshd.log", "ab")  # noqa: SIM115 (owned by the process)
        proc = host.ns.popen(["unshare", "--uts", "sh", "-c",
                              f'hostname {host.name} && exec /usr/sbin/sshd -D -e -f "$0"',
                              str(cfg)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 10
        while not (d / "sshd.pid").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"sshd on {host.name} did not start",
                               hint=(d / "sshd.log").read_text(errors="replace")[-2000:])
            time.sleep(0.05)
        return proc

    def ssh(self, src: Host, dst: str, command: str, *, key: Path | None = None,
            port: int = 22, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        """``ssh root@DST COMMAND`` from ``src``'s namespace as a user would run it, with no
        password and no host-key question possible (BatchMode, StrictHostKeyChecking), the
        known hosts btmm wrote and the key beside which btmm put the certificate."""
        d = self.ssh_dir(src)
        return src.ns.run(
            ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
             "-o", "UserKnownHostsFile=/dev/null", "-o",
             f"GlobalKnownHostsFile={d / 'ssh_known_hosts'}", "-o", "IdentitiesOnly=yes",
             "-o", "ConnectTimeout=5", "-i", str(key or d / "id_ed25519"), "-p", str(port),
             f"root@{dst}", command], check=False, timeout=timeout)

    def status_text(self, host: Host) -> str:
        proc = host.ns.run(self.btmm("status", "--config", str(host.config)), check=False)
        return (proc.stdout or proc.stderr).rstrip()


def secrets_suffix() -> str:
    return os.urandom(2).hex()


def new_world(lab: Lab, *, nat: bool = True, workdir: Path | None = None,
              prefix: str = "btmm-world-") -> World:
    """The internet (bridge br0 with the registry's and the STUN server's addresses), the
    account secret and the STUN server: what every world starts with, no registry or host yet.
    Without ``workdir`` a temporary one is made and removed with the lab."""
    work = workdir or Path(tempfile.mkdtemp(prefix=prefix))
    if workdir is None:
        lab.on_close(lambda: shutil.rmtree(work, ignore_errors=True))
    inet = lab.ns("inet")
    inet.run(["ip", "link", "add", "br0", "type", "bridge"])
    inet.run(["ip", "link", "set", "br0", "up"])
    for addr in (REGISTRY, *STUN):
        inet.run(["ip", "addr", "add", f"{addr}/24", "dev", "br0"])
    world = World(lab, nat, work, inet)
    (work / "account.secret").write_bytes(SECRET)
    os.chmod(work / "account.secret", 0o600)
    inet.popen([sys.executable, "-m", "btmm_core.lab.nat", "stun", *STUN],
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
               env=_child_env())
    return world


def build_world(lab: Lab, *, nat: bool = True, dataplanes: tuple[str, str] = ("auto", "auto"),
                lease: int = 1800, lease_min: int = 1800, lease_max: int = 7200,
                host_extra: dict[str, Any] | None = None, cafe: bool = False,
                laptop_double_nat: bool = False, mapping: bool = True, same_home: bool = False,
                workdir: Path | None = None, scenario: str = "default",
                registry_args: tuple[str, ...] = ()) -> World:
    """Build the namespaces, start the registry and join both hosts (daemons not started).

    ``scenario`` (a key of ``SCENARIOS``) picks the homes and where each host plugs in; ``cafe``
    adds the cafe network gw3 to any of them. Only the default scenario has ``nat=False`` and
    ``laptop_double_nat``. ``mapping=False``: no gateway runs miniupnpd; ``same_home``: the
    laptop sits on the desktop's LAN (which does not hairpin); ``registry_args``: more options
    of ``btmm serve`` (``--turn-server ...``)."""
    spec = SCENARIOS[scenario]
    if scenario != "default" and (not nat or laptop_double_nat):
        raise LabError(f"scenario {scenario} is always NATed, with no carrier-grade NAT")
    world = new_world(lab, nat=nat, workdir=workdir)
    world.start_registry(lease_min=lease_min, lease_max=lease_max, invites=("laptop",),
                         extra=registry_args)
    # always-on tunnels unless a test asks for on-demand ones (``host_extra``): the lab's
    # scenarios wait for tunnels that nobody sends a packet through
    extra = {"resolve_interval": 5.0, "idle_timeout": 0, **(host_extra or {})}
    desktop = world.add_host("desktop", dataplanes[0], lease=lease, extra=extra)
    laptop = world.add_host("laptop", dataplanes[1], lease=lease, extra=extra)
    if nat:
        for home in (*spec.homes, *([CAFE] if cafe else [])):
            world.add_home(home.name, home.wan, home.lan_prefix,
                           miniupnpd=home.miniupnpd and mapping,
                           behind_isp=laptop_double_nat and home.name == spec.laptop_home)
        world.plug(desktop, world.homes[spec.desktop_home], 0)
        world.plug(laptop, world.homes[spec.desktop_home if same_home else spec.laptop_home], 1)
    else:
        world.plug(desktop, None, 1)
        world.plug(laptop, None, 2)
    # as a user would: the desktop with the account's key, the laptop with an invite
    world.join_host(desktop, world.account_key)
    world.join_host(laptop, world.invite("laptop"))
    return world


# -- transfer by name (sink in one namespace, source in another) ----------------------------

def _sink(port: int, out: IO[str]) -> None:
    with socket.create_server(("::", port), family=socket.AF_INET6) as srv:
        srv.settimeout(60)
        conn, _ = srv.accept()
        h = hashlib.sha256()
        n = 0
        conn.settimeout(60)
        with conn:
            while chunk := conn.recv(1 << 16):
                h.update(chunk)
                n += len(chunk)
        out.write(json.dumps({"bytes": n, "sha256": h.hexdigest()}) + "\n")


def _source(name: str, port: int, total: int, rate: float, out: IO[str]) -> None:
    addr = socket.getaddrinfo(name, port, socket.AF_INET6, socket.SOCK_STREAM)[0][4]
    block = hashlib.sha256(b"btmm lab").digest() * 2048  # 64 KiB, deterministic
    h = hashlib.sha256()
    sent = 0
    t0 = time.monotonic()
    with socket.create_connection((str(addr[0]), int(addr[1])), timeout=30) as s:
        while sent < total:
            chunk = block[: min(len(block), total - sent)]
            s.sendall(chunk)
            h.update(chunk)
            sent += len(chunk)
            if rate > 0:  # a bounded rate keeps a --roam transfer running long enough
                ahead = sent / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)
    dt = time.monotonic() - t0
    out.write(json.dumps({"bytes": sent, "sha256": h.hexdigest(), "seconds": dt,
                          "address": addr[0]}) + "\n")


def start_transfer(world: World, src: Host, dst: Host, total: int, *, rate: float = 0,
                   port: int = 5001) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    sink = dst.ns.popen([sys.executable, "-m", "btmm_core.lab.world", "sink", str(port)],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        env=_child_env())
    deadline = time.monotonic() + 10
    while not dst.ns.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout.strip():
        if time.monotonic() > deadline:
            raise LabError("the transfer sink did not start")
        time.sleep(0.05)
    source = src.ns.popen([sys.executable, "-m", "btmm_core.lab.world", "source", dst.fqdn,
                           str(port), str(total), str(rate)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=_child_env())
    return source, sink


def finish_transfer(source: subprocess.Popen[str], sink: subprocess.Popen[str],
                    timeout: float = 120) -> tuple[dict[str, Any], dict[str, Any]]:
    out_s, err_s = source.communicate(timeout=timeout)
    out_k, err_k = sink.communicate(timeout=timeout)
    if source.returncode or sink.returncode:
        raise LabError(f"transfer failed: source {source.returncode} {err_s.strip()[-800:]}; "
                       f"sink {sink.returncode} {err_k.strip()[-800:]}")
    return json.loads(out_s), json.loads(out_k)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["sink"]:
        _sink(int(args[1]), sys.stdout)
    elif args[:1] == ["source"]:
        _source(args[1], int(args[2]), int(args[3]), float(args[4]), sys.stdout)
    else:
        sys.stderr.write("usage: python -m btmm_core.lab.world sink PORT | source NAME PORT "
                         "BYTES RATE\n")
        raise SystemExit(2)


if __name__ == "__main__":
    main()


# -- `btmm lab` ------------------------------------------------------------------------------

def _say(text: str) -> None:
    print(text, flush=True)


def _pps(before: dict[str, Any] | None, after: dict[str, Any] | None, seconds: float) -> float:
    def out(st: dict[str, Any] | None) -> int:
        return sum(p["packets_out"] for p in (st or {}).get("peers", []))
    return (out(after) - out(before)) / seconds if seconds > 0 else 0.0


def _paths(world: World, host: Host) -> None:
    """The path each peer's tunnel uses, from ``btmm status --json`` (when it reports one)."""
    for p in (host.status() or {}).get("peers", []):
        if "path" not in p:
            continue
        rtt, where = p.get("rtt_ms"), p.get("path_endpoint")
        _say(f"  path {host.name} -> {p['name'].split('.')[0]}: {p['path'] or 'none'}"
             + (f" {where}" if where else "")
             + (f", rtt {rtt:.1f} ms" if isinstance(rtt, (int, float)) else "")
             + (f" ({p['path_state']})" if p.get("path_state") else "")
             + (f", handshake retries {p['handshake_retries']}"
                if "handshake_retries" in p else ""))


def _show(world: World, *hosts: Host) -> None:
    for h in hosts:
        _say(f"$ btmm status   # on {h.name} ({world.location[h.name]})")
        _say(world.status_text(h) + "\n")
    for h in hosts:
        _paths(world, h)


def first_ping(world: World, src: Host, dst: Host, timeout: float) -> float:
    """Seconds until ``src`` gets its first answer to a ping of ``dst`` by name (the name
    appears in src's hosts file once its daemon has read dst's records); LabError if none."""
    t0 = time.monotonic()
    while True:
        left = timeout - (time.monotonic() - t0)
        if left <= 0:
            raise LabError(f"no ping answer from {dst.fqdn} after {timeout} s",
                           hint=world.tails())
        # one process keeps sending (every 50 ms, bounded by -w) until the first answer
        proc = src.ns.run(["ping", "-6", "-n", "-q", "-c", "1", "-i", "0.05", "-w",
                           str(max(1, int(left))), dst.fqdn], check=False, timeout=left + 5)
        if proc.returncode == 0:
            return time.monotonic() - t0
        time.sleep(0.05)  # the name is not known yet: ping exits at once


def _roam(world: World, desktop: Host, laptop: Host, to: str) -> bool:
    """Move the laptop into home ``to`` during a transfer; True when it arrived intact."""
    rate = 2e6
    total = int(rate * 12)
    home = world.homes[to]
    where = "the desktop's home " if world.location[desktop.name] == to else ""
    _say(f"\nroaming: {total / 1e6:.0f} MB at {rate / 1e6:.0f} MB/s from the laptop;"
         f" after 4 s the laptop moves from home {world.location[laptop.name]} to {where}{to}")
    src, sink = start_transfer(world, laptop, desktop, total, rate=rate, port=5002)
    time.sleep(4)
    world.plug(laptop, home, 1)
    _say(f"  laptop now on {home.lan_prefix}.11 behind {to} ({home.gw.wan_address})")
    sent, got = finish_transfer(src, sink)
    ok = sent["sha256"] == got["sha256"] and sent["bytes"] == got["bytes"]
    _say(f"  the same TCP connection finished: {sent['bytes'] / 1e6:.0f} MB in "
         f"{sent['seconds']:.1f} s, SHA-256 {'matches' if ok else 'DIFFERS'}\n")
    _show(world, desktop, laptop)
    return bool(ok)


def _browse_step(world: World, src: Host, dst: Host) -> bool:
    """``btmm browse`` on ``src``: the account's services, wide-area DNS-SD read from the
    registry; True once ``dst``'s ssh service is listed."""
    _say(f"\nservices: {dst.name} publishes ssh (port 22) in [services]; the {src.name} browses "
         "the zone (DNS-SD over the registry, signed with its device key)")
    _say("  $ btmm browse")
    want = f"{dst.name}._ssh._tcp  {dst.fqdn}:22"
    deadline = time.monotonic() + 15
    while True:
        proc = src.ns.run(world.btmm("browse", "--config", str(src.config)), check=False)
        if want in proc.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for line in (proc.stdout.strip() or proc.stderr.strip() or "(nothing)").splitlines():
        _say(f"  {line}")
    return want in proc.stdout


def _ssh_step(world: World, src: Host, dst: Host) -> bool:
    """``ssh DST hostname`` from ``src`` with btmm's certificates (issue 20); True when the
    destination's sshd answered with its name, asking nothing."""
    world.start_sshd(dst)
    _say(f"\nssh: {src.name} -> {dst.name} by name, signed by each device's CA: no password, "
         "no host-key question (BatchMode=yes, StrictHostKeyChecking=yes)")
    _say(f"  $ ssh root@{dst.fqdn} hostname   # on the {src.name}")
    t0 = time.monotonic()
    while True:
        proc = world.ssh(src, dst.fqdn, "hostname")
        if proc.returncode == 0 or time.monotonic() - t0 > 15:
            break
        time.sleep(0.5)
    if proc.returncode != 0:
        _say(f"  ssh failed: {proc.stderr.strip()[-500:]}")
        return False
    _say(f"  {proc.stdout.strip()}")
    _say(f"  (after {time.monotonic() - t0:.1f} s)")
    return proc.stdout.strip() == dst.name


def run_lab(dataplane: str, keep: bool, roam: bool, size: int, scenario: str = "default") -> int:
    """Build the world, run it, report, tear it down. Returns the exit status."""
    spec = SCENARIOS[scenario]
    roam_to = spec.roam_to or (DEFAULT_ROAM_TO if roam else None)
    planes = {"mixed": ("fast", "python")}.get(dataplane, (dataplane, dataplane))
    with Lab("btmmlab") as lab:
        _say(f"building the world in namespaces {lab.prefix}-*: registry on the internet "
             "(203.0.113.1), "
             + ("two homes behind NAT gateways with miniupnpd" if scenario == "default" else
                f"scenario {scenario}: {spec.demonstrates}"))
        world = build_world(lab, nat=True, dataplanes=planes, scenario=scenario)
        desktop, laptop = world.hosts["desktop"], world.hosts["laptop"]
        for h in (desktop, laptop):
            world.enable_sso(h)
        world.publish_services(desktop, {"ssh": (22, {"u": "root"})})
        t0 = time.monotonic()
        for h in (desktop, laptop):
            world.start_host(h)
        try:
            ping = first_ping(world, laptop, desktop, 30)
            up = world.wait_tunnels(max(1.0, 30 - ping))
            _say(f"tunnels up {max(up, ping):.1f} s after `btmm up` started on both hosts; "
                 f"first ping by name answered after {ping:.1f} s\n")
            _show(world, desktop, laptop)
            before = laptop.status()
            _say(f"\ntransfer: laptop -> {desktop.fqdn}, {size / 1e6:.0f} MB over TCP")
            src, sink = start_transfer(world, laptop, desktop, size)
            sent, got = finish_transfer(src, sink)
            after = laptop.status()
            ok = sent["sha256"] == got["sha256"] and sent["bytes"] == got["bytes"]
            secs = sent["seconds"]
            _say(f"  {sent['bytes'] / 1e6:.0f} MB to {sent['address']} in {secs:.2f} s: "
                 f"{sent['bytes'] * 8 / secs / 1e6:.0f} Mbit/s, "
                 f"{_pps(before, after, secs):.0f} packets/s out of the laptop's tunnel; "
                 f"SHA-256 {'matches' if ok else 'DIFFERS'}")
            if not ok:
                return 1
            if roam_to and not _roam(world, desktop, laptop, roam_to):
                return 1
            if not _browse_step(world, laptop, desktop):
                return 1
            if not _ssh_step(world, laptop, desktop):
                return 1
            if keep:
                _say("left running for exploring (Ctrl-C tears it down), for example:")
                for h in (desktop, laptop):
                    _say(f"  ip netns exec {h.ns.name} btmm status --config {h.config}")
                _say(f"  ip netns exec {laptop.ns.name} ping -6 {desktop.fqdn}")
                while all(h.proc is not None and h.proc.poll() is None for h in (desktop, laptop)):
                    time.sleep(1)
        except LabError as err:
            _say(f"lab failed: {err.what}\n{err.hint or ''}")
            return 1
        except KeyboardInterrupt:
            _say("\ninterrupted")
        finally:
            _say(f"tearing down (ran {time.monotonic() - t0:.0f} s)")
            for h in (desktop, laptop):
                world.stop_host(h)
    return 0


def _lab_command() -> Any:
    import click

    @click.command("lab")
    @click.option("--scenario", type=click.Choice(list(SCENARIOS)), default="default",
                  show_default=True,
                  help="default: two homes that map ports; same-home: both hosts behind one "
                       "gateway; no-mapping: gateways without miniupnpd; roam-home: the laptop "
                       "moves into the desktop's home mid-transfer.")
    @click.option("--dataplane", type=click.Choice(["auto", "fast", "python", "mixed"]),
                  default="auto", show_default=True,
                  help="Engine of both hosts; mixed: fast on the desktop, python on the laptop.")
    @click.option("--keep", is_flag=True, help="Leave the world running until Ctrl-C.")
    @click.option("--roam", is_flag=True,
                  help="Move the laptop into the desktop's home in the middle of a transfer "
                       "(default scenario; roam-home always does).")
    @click.option("--megabytes", type=int, default=100, show_default=True,
                  help="Size of the transfer.")
    def lab(scenario: str, dataplane: str, keep: bool, roam: bool, megabytes: int) -> None:
        """Build a whole Back to My Mac world in network namespaces (registry, two homes behind
        NAT gateways running miniupnpd, a desktop and a laptop running `btmm up`), wait for the
        tunnels, show `btmm status`, transfer by name, print throughput, tear down."""
        if roam and scenario != "default":
            raise click.UsageError("--roam goes with the default scenario (roam-home always "
                                   "roams)")
        sys.exit(run_lab(dataplane, keep, roam, megabytes * 1_000_000, scenario))

    return lab


lab = _lab_command()
