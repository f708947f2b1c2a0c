"""How the host's programs reach the stub resolver: systemd-resolved split DNS, a resolv.conf
that points at the stub already, or neither (then the daemon's hosts block is what they see).

systemd-resolved: the stub becomes the DNS server of the tunnel link, with ``~<zone>`` (and
``~d.f.ip6.arpa``, the ULA reverse zone) as routing-only domains and the link never the default
route, so resolved sends the zone's queries to the stub and nothing else
(resolvectl(1): ``dns``, ``domain``, ``default-route``, ``revert``). No file is edited.
"""

from __future__ import annotations

import enum
import ipaddress
import shutil
from pathlib import Path

import dns.name

from btmm_core.errors import ConfigError
from btmm_core.names.stub import ULA_REVERSE

#: The stub's default address. 127.0.0.53 and 127.0.0.54 are systemd-resolved's own stubs and
#: 127.0.0.1:53 is where dnsmasq, unbound or a local BIND usually listen; 127.0.0.153 is free on
#: common systems and still in 127/8, which Linux delivers to ``lo`` without configuration.
DEFAULT_STUB = "127.0.0.153:53"
RESOLVED_DIR = Path("/run/systemd/resolve")


class Wiring(enum.StrEnum):
    """How programs find the stub (shown in ``btmm status``)."""

    RESOLVED = "resolved"  # split DNS on the tunnel link
    RESOLV_CONF = "resolv.conf"  # resolv.conf names the stub already (e.g. the lab)
    HOSTS_FILE = "hosts-file"  # neither: programs see the hosts block only
    OFF = "off"  # no stub configured


def parse_stub(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` of the stub; only a loopback address, so the zone never answers the LAN."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        addr = ipaddress.ip_address(host)
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(port)
    except ValueError as exc:
        raise ConfigError(f"stub = {text!r} is not ADDRESS:PORT",
                          hint=f'e.g. stub = "{DEFAULT_STUB}", or "" for no stub') from exc
    if not addr.is_loopback:
        raise ConfigError(f"stub = {text!r}: the stub listens on loopback only",
                          hint="anything else would answer the zone's names to the network")
    return str(addr), int(port)


def parse_upstreams(text: str) -> list[tuple[str, int]]:
    """``upstream = "192.0.2.1, 192.0.2.2:5353"``: addresses with an optional port (53)."""
    out = []
    for item in text.replace(",", " ").split():
        host, port = item, 53
        if item.count(":") == 1 or item.startswith("["):
            h, _, p = item.rpartition(":")
            if not p.isdigit():
                raise ConfigError(f"upstream {item!r} is not ADDRESS[:PORT]")
            host, port = h.strip("[]"), int(p)
        try:
            ipaddress.ip_address(host)
        except ValueError as exc:
            raise ConfigError(f"upstream {item!r} is not an IP address",
                              hint="list resolvers by address, e.g. upstream = \"192.0.2.1\"") \
                from exc
        out.append((host, port))
    return out


def nameservers(resolv_conf: str) -> list[tuple[str, int]]:
    """The ``nameserver`` lines of a resolv.conf(5), port 53."""
    out = []
    for line in resolv_conf.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                out.append((str(ipaddress.ip_address(fields[1].split("%")[0])), 53))
            except ValueError:
                continue
    return out


def choose_upstreams(configured: str, resolv_conf: str,
                     stub: tuple[str, int]) -> list[tuple[str, int]]:
    """Where names outside the zone go: ``configured`` ("none": nowhere), else the host's
    resolv.conf nameservers; never the stub itself (a resolv.conf may point at it)."""
    if configured.strip() == "none":
        return []
    found = parse_upstreams(configured) if configured.strip() else nameservers(resolv_conf)
    return [u for u in found if u != stub]


def resolved_present() -> bool:
    return shutil.which("resolvectl") is not None and (RESOLVED_DIR / "resolv.conf").exists()


def resolvectl_commands(link: str, stub: tuple[str, int],
                        zone: dns.name.Name) -> list[list[str]]:
    """The resolvectl calls that route ``zone`` (and the ULA reverse zone) to the stub."""
    server = f"{stub[0]}:{stub[1]}"
    domains = [f"~{zone.to_text(omit_final_dot=True)}",
               f"~{ULA_REVERSE.to_text(omit_final_dot=True)}"]
    return [
        ["resolvectl", "dns", link, server],
        ["resolvectl", "domain", link, *domains],
        ["resolvectl", "default-route", link, "false"],
    ]


def points_at_stub(resolv_conf: str, stub: tuple[str, int]) -> bool:
    """Whether resolv.conf's first nameserver is the stub (libc asks only port 53)."""
    servers = nameservers(resolv_conf)
    return stub[1] == 53 and bool(servers) and servers[0][0] == stub[0]
