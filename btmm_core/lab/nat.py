"""A home network behind a real NAT gateway, in network namespaces.

Topology (``build_home_network``)::

    lan host            gateway (nftables masquerade, miniupnpd)          wan host
    192.168.7.10 --lan0-- 192.168.7.1 | 203.0.113.2 --wan0-- 203.0.113.10, .11 (STUN)

With ``double_nat=True`` a second masquerading gateway ("isp", carrier-grade NAT in shared
space 100.64.0.0/10) sits between the home gateway and the wan host.

Why a STUN responder: miniupnpd 2.3 treats documentation ranges (our lab's "internet") as
reserved and refuses to map ports on an interface that has one. Its ``ext_perform_stun`` option
asks a STUN server for the external address instead and checks that unsolicited traffic gets
through (four binding requests, three of them asking for an answer from another address or
port, RFC 5780 CHANGE-REQUEST). The responder here answers from the address and port asked for,
so a gateway with no NAT in front passes, and one behind another NAT does not.

``NatGateway`` is the reusable part: any lab can turn a namespace with two interfaces into a
masquerading gateway and start, restart or stop miniupnpd on it.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import select
import shutil
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import DEVNULL, Popen
from typing import Any

from btmm_core.lab.netns import Lab, LabError, Netns, _terminate

MINIUPNPD = "/usr/sbin/miniupnpd"
STUN_PORT = 3478
STUN_ALT_PORT = 3479
_MAGIC = 0x2112A442


# --- STUN responder (RFC 5389 binding, RFC 5780 CHANGE-REQUEST) -----------------------------

def stun_answer(request: bytes, source: tuple[str, int]) -> tuple[bytes, bool, bool] | None:
    """The binding success answer to ``request``, and whether to change IP and/or port.

    Returns None for anything that is not a binding request.
    """
    if len(request) < 20:
        return None
    mtype, length, cookie = struct.unpack_from("!HHI", request)
    if mtype != 0x0001 or 20 + length > len(request):
        return None
    tid = request[8:20]
    change_ip = change_port = False
    off = 20
    while off + 4 <= 20 + length:
        atype, alen = struct.unpack_from("!HH", request, off)
        if atype == 0x0003 and alen >= 4:
            flags = struct.unpack_from("!I", request, off + 4)[0]
            change_ip, change_port = bool(flags & 0x4), bool(flags & 0x2)
        off += 4 + alen + (-alen) % 4
    ip = ipaddress.IPv4Address(source[0])
    port = source[1]
    mapped = struct.pack("!BBH", 0, 1, port) + ip.packed
    xport = port ^ (_MAGIC >> 16)
    xaddr = int(ip) ^ _MAGIC
    xmapped = struct.pack("!BBHI", 0, 1, xport, xaddr)
    attrs = struct.pack("!HH", 0x0001, 8) + mapped
    if cookie == _MAGIC:
        attrs += struct.pack("!HH", 0x0020, 8) + xmapped
    return struct.pack("!HHI", 0x0101, len(attrs), cookie) + tid + attrs, change_ip, change_port


def serve_stun(primary: str, alternate: str, max_answers: int = 100_000,
               honor_change: bool = True) -> None:
    """Answer binding requests on primary/alternate address x STUN_PORT/STUN_ALT_PORT.

    ``honor_change=False`` drops requests that ask for an answer from elsewhere, which is what
    a gateway behind a filtering firewall or NAT sees: miniupnpd then disables forwarding.
    """
    socks: dict[tuple[str, int], socket.socket] = {}
    for addr in (primary, alternate):
        for port in (STUN_PORT, STUN_ALT_PORT):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((addr, port))
            socks[(addr, port)] = s
    other_ip = {primary: alternate, alternate: primary}
    other_port = {STUN_PORT: STUN_ALT_PORT, STUN_ALT_PORT: STUN_PORT}
    print(f"stun: listening on {primary} and {alternate}, ports {STUN_PORT}/{STUN_ALT_PORT}",
          flush=True)
    answered = 0
    while answered < max_answers:
        ready, _, _ = select.select(list(socks.values()), [], [])
        for s in ready:
            data, src = s.recvfrom(2048)
            answer = stun_answer(data, src)
            if answer is None:
                continue
            msg, change_ip, change_port = answer
            if (change_ip or change_port) and not honor_change:
                continue
            laddr, lport = s.getsockname()
            out = socks[(other_ip[laddr] if change_ip else laddr,
                         other_port[lport] if change_port else lport)]
            out.sendto(msg, src)
            answered += 1


# --- gateway ----------------------------------------------------------------------------------

@dataclass
class MiniupnpdConfig:
    """What the gateway's miniupnpd offers. NAT-PMP and PCP are one switch in miniupnpd."""

    natpmp: bool = True
    upnp: bool = False
    min_lifetime: int = 5
    max_lifetime: int = 86400
    stun_host: str | None = None
    allow_ports: str = "1024-65535"
    #: the external ports it grants (default: ``allow_ports``); a range without the port a
    #: host asks for makes miniupnpd grant another one
    external_ports: str | None = None


@dataclass
class NatGateway:
    """A namespace that forwards lan_if -> wan_if with nftables masquerade (and miniupnpd)."""

    lab: Lab
    ns: Netns
    wan_if: str
    lan_if: str
    wan_address: str
    lan_address: str
    lan_network: str
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="btmm-nat-")))
    miniupnpd: Popen[Any] | None = None
    config: MiniupnpdConfig | None = None

    def enable_nat(self) -> None:
        self.ns.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        # miniupnpd (nftables backend) adds its rules to chains it expects to exist: a filter
        # chain for forwarding and two nat chains. The base chains here jump into them.
        # Like a home router, the WAN side takes only replies addressed to the gateway itself
        # (and STUN answers, which miniupnpd's check of unsolicited traffic needs, RFC 5780):
        # an unsolicited datagram must be dropped, not answered, or its connection-tracking
        # entry would hold the very port a LAN host's outgoing packet to that sender needs,
        # and the NAT would give that packet another port (a hole punch across two Linux
        # gateways would then never meet)
        rules = f"""
table inet filter {{
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "{self.wan_if}" ct state established,related accept
        iifname "{self.wan_if}" udp sport {{ {STUN_PORT}, {STUN_ALT_PORT} }} accept
        iifname "{self.wan_if}" drop
    }}
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "{self.lan_if}" oifname "{self.wan_if}" accept
        # hosts of one LAN talk through its bridge: switched, never filtered (with
        # br_netfilter loaded, bridged IPv4 would otherwise meet this chain's drop)
        iifname "{self.lan_if}" oifname "{self.lan_if}" accept
        jump miniupnpd
    }}
    chain miniupnpd {{
    }}
}}
table inet nat {{
    chain prerouting {{
        type nat hook prerouting priority -100; policy accept;
        jump prerouting_miniupnpd
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        jump postrouting_miniupnpd
        oifname "{self.wan_if}" masquerade
    }}
    chain prerouting_miniupnpd {{
    }}
    chain postrouting_miniupnpd {{
    }}
}}
"""
        self.ns.run(["nft", "-f", "-"], input=rules)

    def _write_config(self, cfg: MiniupnpdConfig) -> Path:
        lines = [
            f"ext_ifname={self.wan_if}",
            f"listening_ip={self.lan_if}",
            "port=0",
            f"enable_natpmp={'yes' if cfg.natpmp else 'no'}",
            f"enable_upnp={'yes' if cfg.upnp else 'no'}",
            "secure_mode=yes",
            "system_uptime=no",
            "notify_interval=60",
            f"min_lifetime={cfg.min_lifetime}",
            f"max_lifetime={cfg.max_lifetime}",
            f"uuid=3c2d3b9e-8f5a-4f4e-9c1d-{os.getpid() % 10**12:012d}",
            "upnp_table_name=filter",
            "upnp_nat_table_name=nat",
            "upnp_forward_chain=miniupnpd",
            "upnp_nat_chain=prerouting_miniupnpd",
            "upnp_nat_postrouting_chain=postrouting_miniupnpd",
            f"lease_file={self.workdir / 'leases'}",
        ]
        if cfg.stun_host:
            lines += ["ext_perform_stun=yes", f"ext_stun_host={cfg.stun_host}",
                      f"ext_stun_port={STUN_PORT}"]
        net = self.lan_network
        lines += [f"allow {cfg.external_ports or cfg.allow_ports} {net} {cfg.allow_ports}",
                  "deny 0-65535 0.0.0.0/0 0-65535"]
        path = self.workdir / "miniupnpd.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start_miniupnpd(self, cfg: MiniupnpdConfig, wait: float = 15.0) -> None:
        """Start miniupnpd in the foreground (-d) and wait until it listens."""
        if self.miniupnpd is not None:
            raise LabError("miniupnpd already runs on this gateway; stop it first")
        if not (cfg.natpmp or cfg.upnp):
            raise LabError("a miniupnpd with NAT-PMP/PCP and UPnP both off does nothing",
                           hint="build the network with miniupnpd=None instead")
        self.config = cfg
        conf = self._write_config(cfg)
        log = open(self.workdir / "miniupnpd.log", "ab")  # noqa: SIM115 (owned by the process)
        self.miniupnpd = self.ns.popen(
            [MINIUPNPD, "-d", "-f", str(conf), "-P", str(self.workdir / "miniupnpd.pid")],
            stdout=log, stderr=log, stdin=DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + wait
        want = "Listening for NAT-PMP/PCP" if cfg.natpmp else "HTTP listening"
        while time.monotonic() < deadline:
            if self.miniupnpd.poll() is not None:
                raise LabError(
                    f"miniupnpd exited {self.miniupnpd.returncode}: {self.log()[-2000:]}")
            if want in self.log():
                return
            time.sleep(0.1)
        raise LabError(f"miniupnpd did not come up in {wait} s: {self.log()[-2000:]}")

    def stop_miniupnpd(self) -> None:
        if self.miniupnpd is not None:
            _terminate(self.miniupnpd)
            with contextlib.suppress(ValueError):
                self.ns.procs.remove(self.miniupnpd)
            self.miniupnpd = None

    def restart_miniupnpd(self, *, lose_state: bool = True) -> None:
        """Stop and start miniupnpd: a new epoch.

        miniupnpd leaves its nftables rules in place when it exits and reloads its lease file
        when it starts, so a plain restart keeps the mappings. ``lose_state`` makes it a
        reboot: the rules and the lease file go too.
        """
        cfg = self.config or MiniupnpdConfig()
        self.stop_miniupnpd()
        if lose_state:
            self.clear_mappings()
            (self.workdir / "leases").unlink(missing_ok=True)
        self.start_miniupnpd(cfg)

    def silence_announcements(self) -> None:
        """Drop what the gateway sends to UDP port 5350 (the NAT-PMP and PCP announcements,
        RFC 6886 section 3.2.1, RFC 6887 section 14.1.3): a gateway whose mapping service
        starts without telling its LAN, so hosts find it only by asking again."""
        self.ns.run(["nft", "-f", "-"], input="""
table inet lab_quiet {
    chain output {
        type filter hook output priority 0; policy accept;
        udp dport 5350 drop
    }
}
""")

    def clear_mappings(self) -> None:
        """Empty miniupnpd's chains (what a router reboot does to its NAT table)."""
        for table, chain in (("filter", "miniupnpd"), ("nat", "prerouting_miniupnpd"),
                             ("nat", "postrouting_miniupnpd")):
            self.ns.run(["nft", "flush", "chain", "inet", table, chain])

    def log(self) -> str:
        path = self.workdir / "miniupnpd.log"
        return path.read_text(errors="replace") if path.exists() else ""


def make_gateway(
    lab: Lab, ns: Netns, *, wan_if: str, wan_cidr: str, wan_gateway: str, lan_if: str,
    lan_cidr: str,
) -> NatGateway:
    """Address an existing namespace's two interfaces and make it a masquerading gateway."""
    ns.run(["ip", "addr", "add", wan_cidr, "dev", wan_if])
    ns.run(["ip", "addr", "add", lan_cidr, "dev", lan_if])
    ns.run(["ip", "route", "add", "default", "via", wan_gateway])
    lan_net = str(ipaddress.IPv4Interface(lan_cidr).network)
    gw = NatGateway(
        lab, ns, wan_if, lan_if, wan_cidr.split("/")[0], lan_cidr.split("/")[0], lan_net
    )
    lab.on_close(lambda: shutil.rmtree(gw.workdir, ignore_errors=True))
    gw.enable_nat()
    return gw


@dataclass
class HomeNetwork:
    lab: Lab
    lan: Netns
    gateway: NatGateway
    wan: Netns
    lan_address: str
    stun_address: str
    stun_alt_address: str
    isp: NatGateway | None = None
    stun: Popen[Any] | None = None


WAN_HOST = "203.0.113.10"
WAN_HOST_ALT = "203.0.113.11"
GATEWAY_WAN = "203.0.113.2"
ISP_LAN = "100.64.0.1"
HOME_WAN_BEHIND_ISP = "100.64.0.2"
LAN_GATEWAY = "192.168.7.1"
LAN_HOST = "192.168.7.10"


def build_home_network(
    lab: Lab, *, miniupnpd: MiniupnpdConfig | None = None, double_nat: bool = False,
    upstream_filters: bool = False,
) -> HomeNetwork:
    """LAN host -> home gateway (-> ISP gateway) -> WAN host with a STUN responder.

    ``miniupnpd=None`` starts no mapping daemon at all (a gateway with no protocol).
    ``upstream_filters`` makes the STUN responder act as if unsolicited traffic were filtered
    before the gateway, so miniupnpd refuses every mapping.
    """
    wan = lab.ns("wan")
    gw_ns = lab.ns("gw")
    lan = lab.ns("lan")
    isp: NatGateway | None = None
    if double_nat:
        isp_ns = lab.ns("isp")
        lab.veth(isp_ns, "wan0", wan, "eth0")
        lab.veth(gw_ns, "wan0", isp_ns, "lan0")
        isp = make_gateway(lab, isp_ns, wan_if="wan0", wan_cidr=f"{GATEWAY_WAN}/24",
                           wan_gateway=WAN_HOST, lan_if="lan0", lan_cidr=f"{ISP_LAN}/24")
        home_wan, home_gw = f"{HOME_WAN_BEHIND_ISP}/24", ISP_LAN
    else:
        lab.veth(gw_ns, "wan0", wan, "eth0")
        home_wan, home_gw = f"{GATEWAY_WAN}/24", WAN_HOST
    lab.veth(lan, "eth0", gw_ns, "lan0")
    wan.run(["ip", "addr", "add", f"{WAN_HOST}/24", "dev", "eth0"])
    wan.run(["ip", "addr", "add", f"{WAN_HOST_ALT}/24", "dev", "eth0"])
    gateway = make_gateway(lab, gw_ns, wan_if="wan0", wan_cidr=home_wan, wan_gateway=home_gw,
                           lan_if="lan0", lan_cidr=f"{LAN_GATEWAY}/24")
    lan.run(["ip", "addr", "add", f"{LAN_HOST}/24", "dev", "eth0"])
    lan.run(["ip", "route", "add", "default", "via", LAN_GATEWAY])
    net = HomeNetwork(lab, lan, gateway, wan, LAN_HOST, WAN_HOST, WAN_HOST_ALT, isp)
    net.stun = wan.popen(
        [sys.executable, "-m", "btmm_core.lab.nat", "stun", WAN_HOST, WAN_HOST_ALT,
         *(["--ignore-change"] if upstream_filters else [])],
        stdout=DEVNULL, stderr=DEVNULL, stdin=DEVNULL, env=_child_env(),
    )
    _wait_udp_listening(wan, STUN_PORT)
    if miniupnpd is not None:
        if miniupnpd.stun_host is None:
            miniupnpd.stun_host = WAN_HOST
        gateway.start_miniupnpd(miniupnpd)
    return net


def _child_env() -> dict[str, str]:
    """Our environment, with this source tree importable even if btmm is not installed."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else f"{root}:{path}"}


def _wait_udp_listening(ns: Netns, port: int, wait: float = 60.0,
                        proc: Popen[Any] | None = None) -> None:
    """Until something listens on UDP ``port`` in ``ns``; LabError after ``wait`` seconds, or
    at once when ``proc`` (the server expected there) exited. The deadline is generous: a
    Python server starting beside dozens of others on a loaded 2-core machine took over 10
    s (a full test run failed on it while a 30-host bench ran)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        out = ns.run(["ss", "-Hlnu", f"sport = :{port}"], check=False).stdout
        if out.strip():
            return
        if proc is not None and proc.poll() is not None:
            raise LabError(f"the server meant to listen on UDP {port} in {ns.name} exited "
                           f"with status {proc.returncode}")
        time.sleep(0.05)
    raise LabError(f"nothing listens on UDP {port} in {ns.name} after {wait} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m btmm_core.lab.nat")
    sub = parser.add_subparsers(dest="cmd", required=True)
    stun = sub.add_parser("stun", help="run the lab's STUN responder")
    stun.add_argument("primary")
    stun.add_argument("alternate")
    stun.add_argument("--ignore-change", action="store_true",
                      help="drop CHANGE-REQUEST probes, like a filtering upstream")
    args = parser.parse_args(argv)
    if args.cmd == "stun":
        serve_stun(args.primary, args.alternate, honor_change=not args.ignore_change)


if __name__ == "__main__":
    main()
