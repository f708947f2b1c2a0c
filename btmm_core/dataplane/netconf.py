"""Configure a tunnel's TUN device over netlink (rtnetlink, RFC 3549) with pyroute2.

The engine opens the TUN device; this module gives it what the kernel needs to route inner
IPv6 traffic into it: link up, the MTU, the host's inner address, and one /128 route per peer
(the engine routes by inner destination, docs/architecture.md decision 5). It acts on the network
namespace of the calling process, so a tunnel started with ``ip netns exec`` configures its
own namespace.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
from collections.abc import Iterable
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from btmm_core.errors import PermissionNeeded, TunError

#: IPv6 needs at least this link MTU (RFC 8200 §5)
IPV6_MIN_MTU = 1280


def _fail(what: str, err: NetlinkError) -> TunError | PermissionNeeded:
    if err.code in (errno.EPERM, errno.EACCES):
        return PermissionNeeded(f"{what}: not permitted", hint="run as root or grant CAP_NET_ADMIN")
    return TunError(f"{what}: {err.args[-1] if err.args else err} (errno {err.code})")


def _quiet_ipv6(ifname: str) -> None:
    """Stop the kernel from sending router solicitations and DAD probes into the tunnel.

    Those packets have link-local or multicast destinations that no peer owns, so the engine
    would only count them as ``no_route`` drops and hide real routing mistakes.
    """
    conf = Path("/proc/sys/net/ipv6/conf") / ifname
    for key, value in (("router_solicitations", "0"), ("accept_dad", "0"), ("accept_ra", "0")):
        path = conf / key
        if path.exists():
            # Best effort: a read-only /proc (some containers) leaves the defaults, which only
            # adds noise to the no_route counter.
            with contextlib.suppress(OSError):
                path.write_text(value)


def configure_tun(
    ifname: str,
    *,
    mtu: int,
    address: ipaddress.IPv6Interface | str,
    peers: Iterable[str] = (),
) -> None:
    """Bring ``ifname`` up with ``mtu``, add ``address`` and a /128 route per peer inner address.

    Idempotent: an address or route that is already there is left as it is, so a tunnel can be
    restarted on a persistent TUN device.
    """
    if mtu < IPV6_MIN_MTU:
        raise TunError(
            f"MTU {mtu} is below the IPv6 minimum", hint=f"use an MTU of at least {IPV6_MIN_MTU}"
        )
    iface = ipaddress.IPv6Interface(address)
    routes = [ipaddress.IPv6Address(p) for p in peers]
    _quiet_ipv6(ifname)
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise TunError(
                f"no network device named {ifname!r}",
                hint="the engine creates the TUN device; open the engine before configuring it",
            )
        index = found[0]
        try:
            ipr.link("set", index=index, mtu=mtu)
            ipr.link("set", index=index, state="up")
        except NetlinkError as err:
            raise _fail(f"setting {ifname} up with MTU {mtu}", err) from err
        try:
            ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        except NetlinkError as err:
            if err.code != errno.EEXIST:
                raise _fail(f"adding {iface} to {ifname}", err) from err
        for peer in routes:
            try:
                ipr.route("replace", dst=f"{peer}/128", oif=index)
            except NetlinkError as err:
                raise _fail(f"routing {peer}/128 via {ifname}", err) from err
