"""Which router is N hops away? A TTL-limited UDP probe and the kernel's ICMP error queue.

Used to diagnose double NAT when the gateway will not say its external address (miniupnpd 2.3
answers "network failure" rather than report a private one): the router two hops out answers a
TTL-2 datagram with ICMP time exceeded (RFC 792), and the kernel queues it, with the router's
address, on the sending socket when IP_RECVERR is on (Linux ip(7)); no raw socket or root needed.
The default target is in TEST-NET-1 (RFC 5737): the probe dies at hop 2, long before any host.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import struct
import time
from dataclasses import dataclass

DEFAULT_PROBE_TARGET = "192.0.2.1"
PROBE_PORT = 33434  # traceroute's customary base port
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
SO_EE_ORIGIN_ICMP = 2
ICMP_DEST_UNREACH = 3
ICMP_TIME_EXCEEDED = 11
_EE = struct.Struct("=IBBBBII")


@dataclass(frozen=True)
class IcmpError:
    origin: int
    icmp_type: int
    icmp_code: int
    offender: str | None


def parse_extended_error(data: bytes) -> IcmpError | None:
    """Decode a ``struct sock_extended_err`` followed by the offender's ``sockaddr_in``."""
    if len(data) < _EE.size:
        return None
    _errno, origin, icmp_type, icmp_code, _pad, _info, _data = _EE.unpack_from(data)
    offender = None
    off = _EE.size
    if len(data) >= off + 8 and struct.unpack_from("=H", data, off)[0] == socket.AF_INET:
        offender = socket.inet_ntoa(data[off + 4:off + 8])
    return IcmpError(origin, icmp_type, icmp_code, offender)


def _probe(target: str, ttl: int, tries: int, timeout: float) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        s.connect((target, PROBE_PORT))
        poller = select.poll()
        poller.register(s, select.POLLERR | select.POLLIN)
        for _ in range(tries):
            # An error from the previous probe may surface here; it stays queued for recvmsg.
            with contextlib.suppress(OSError):
                s.send(b"btmm hop probe")
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                if not poller.poll(int(left * 1000) + 1):
                    continue
                try:
                    _, ancdata, _, _ = s.recvmsg(512, 512, socket.MSG_ERRQUEUE)
                except BlockingIOError:
                    continue
                except OSError:
                    break
                for level, ctype, cdata in ancdata:
                    if level != socket.IPPROTO_IP or ctype != IP_RECVERR:
                        continue
                    err = parse_extended_error(cdata)
                    if err is None or err.origin != SO_EE_ORIGIN_ICMP:
                        continue
                    if err.icmp_type == ICMP_TIME_EXCEEDED:
                        return err.offender
                    if err.icmp_type == ICMP_DEST_UNREACH:
                        return None  # the target itself is within ``ttl`` hops
    return None


async def hop_address(target: str, ttl: int = 2, tries: int = 3,
                      timeout: float = 1.0) -> str | None:
    """The address of the router ``ttl`` hops towards ``target``, or None if none answered."""
    return await asyncio.to_thread(_probe, target, ttl, tries, timeout)
