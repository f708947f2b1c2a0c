"""Small kernel queries and route changes for the daemon (rtnetlink via pyroute2).

pyroute2's synchronous ``IPRoute`` must not run inside an event loop: the daemon calls the
route functions through ``asyncio.to_thread``.
"""

from __future__ import annotations

import errno
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from btmm_core.errors import TunError
from btmm_core.reach.candidates import LocalAddress

#: net_device_flags (linux/if.h)
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_RUNNING = 0x40
#: ifa_flags (linux/if_addr.h)
IFA_F_TEMPORARY = 0x01
IFA_F_DEPRECATED = 0x20


def local_ipv4_towards(address: str) -> str | None:
    """The source address the kernel would use towards ``address`` (no packet is sent), or
    None when there is no route (a link went down)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((address, 9))
            return str(s.getsockname()[0])
    except OSError:
        return None


def local_addresses() -> list[LocalAddress]:
    """Every IPv4 and IPv6 address of every interface, with the interface's state and (IPv6)
    whether the address is temporary or deprecated, in interface order, IPv4 first
    (``reach.candidates.gather`` picks the LAN and IPV6 candidates from them). Empty where
    netlink is unavailable: then the host publishes no local candidate, as before."""
    try:
        with IPRoute() as ipr:
            links = {
                link["index"]: (link.get_attr("IFLA_IFNAME") or "", int(link["flags"]))
                for link in ipr.get_links()
            }
            addrs = [*ipr.get_addr(family=socket.AF_INET), *ipr.get_addr(family=socket.AF_INET6)]
    except (OSError, NetlinkError):
        return []
    out: list[LocalAddress] = []
    for msg in sorted(addrs, key=lambda m: (int(m["index"]), int(m["family"]) != socket.AF_INET)):
        address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if not address:
            continue
        name, flags = links.get(int(msg["index"]), ("", 0))
        # IFA_FLAGS (32 bits) supersedes the header's 8-bit ifa_flags where present.
        ifa = int(msg.get_attr("IFA_FLAGS") or msg["flags"] or 0)
        out.append(LocalAddress(
            interface=name,
            address=str(address),
            up=flags & (IFF_UP | IFF_RUNNING) == IFF_UP | IFF_RUNNING,
            loopback=bool(flags & IFF_LOOPBACK),
            temporary=bool(ifa & IFA_F_TEMPORARY),
            deprecated=bool(ifa & IFA_F_DEPRECATED),
        ))
    return out


def set_routes(ifname: str, inners: list[str]) -> None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise TunError(f"no network device named {ifname!r}")
        for inner in inners:
            try:
                ipr.route("replace", dst=f"{inner}/128", oif=found[0])
            except NetlinkError as err:
                raise TunError(f"routing {inner}/128 via {ifname}: {err}") from err


def del_routes(ifname: str, inners: list[str]) -> None:
    """Remove the routes ``set_routes`` made (a route already gone is no error)."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return
        for inner in inners:
            try:
                ipr.route("del", dst=f"{inner}/128", oif=found[0])
            except NetlinkError as err:
                if err.code not in (errno.ESRCH, errno.ENOENT):
                    raise TunError(f"removing the route to {inner}/128: {err}") from err


# rtnetlink multicast groups (linux/rtnetlink.h): links, IPv4 addresses, IPv4 routes, IPv6
# addresses
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100


def netlink_monitor() -> socket.socket | None:
    """A non-blocking rtnetlink socket (RFC 3549) subscribed to link, IPv4 and IPv6 address
    and IPv4 route changes; readable whenever one happens. None where netlink is unavailable
    (the daemon then only polls)."""
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        s.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR))
    except (OSError, AttributeError):
        return None
    s.setblocking(False)
    return s


def drain(sock: socket.socket) -> int:
    """Read and discard queued notifications (their content is re-read from the kernel's
    current state, which is what matters); returns how many were read."""
    n = 0
    while True:
        try:
            sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return n
        except OSError:  # ENOBUFS: we missed some; the state is re-read anyway
            return n + 1
        n += 1
