"""ICMPv6 echo through the tunnel, for ``btmm ping`` (RFC 4443 section 4.1 and 4.2).

Why ICMPv6 echo to the peer's ULA rather than a path probe: a probe (``reach/probe.py``)
checks the outer path only, while an echo goes the way the user's own traffic goes: our kernel
routes it to the TUN device, the engine seals it on the peer's SA and sends it on the path in
use, the peer's engine opens it and the peer's kernel answers. An answer therefore proves the
whole tunnel both ways, and its round trip is what an application sees. ``btmm ping`` shows the
path beside it (kind, endpoint, the probes' own round trip) from the path manager.

The first half is the codec (pure); ``EchoSocket`` below is its asyncio driver: a raw ICMPv6
socket bound to the TUN device that lets only echo replies in (ICMP6_FILTER).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass

from btmm_core.aio import within

ECHO_REQUEST = 128
ECHO_REPLY = 129
#: Linux <netinet/icmp6.h>: the option (level IPPROTO_ICMPV6) and its 256-bit block mask
ICMP6_FILTER = 1
_HEADER = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence


@dataclass(frozen=True)
class Echo:
    """One echo message: the identifier and sequence number name it, ``data`` is echoed."""

    kind: int
    ident: int
    seq: int
    data: bytes

    def to_bytes(self) -> bytes:
        # the checksum covers a pseudo-header only the kernel knows the source of; a raw
        # ICMPv6 socket always fills it in (RFC 3542 section 3.1)
        return _HEADER.pack(self.kind, 0, 0, self.ident, self.seq) + self.data

    @classmethod
    def parse(cls, data: bytes) -> Echo | None:
        """An echo request or reply, or None for anything else (other types, short)."""
        if len(data) < _HEADER.size:
            return None
        kind, code, _, ident, seq = _HEADER.unpack_from(data)
        if kind not in (ECHO_REQUEST, ECHO_REPLY) or code != 0:
            return None
        return cls(kind, ident, seq, data[_HEADER.size:])


def reply_filter() -> bytes:
    """The ICMP6_FILTER value that blocks every type but echo reply (a set bit blocks)."""
    words = [0xFFFFFFFF] * 8
    words[ECHO_REPLY >> 5] &= ~(1 << (ECHO_REPLY & 31)) & 0xFFFFFFFF
    return struct.pack("=8I", *words)


class EchoSocket:
    """A raw ICMPv6 socket on the TUN device: send echo requests, await their replies."""

    def __init__(self, device: str) -> None:
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        try:
            self.sock.setblocking(False)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
            self.sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, reply_filter())
        except OSError:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    async def round_trips(self, target: str, ident: int, token: bytes, count: int,
                          interval: float, timeout: float) -> list[float | None]:
        """Send ``count`` requests ``interval`` apart and wait up to ``timeout`` after the
        last; the round trip of each (seconds), None where no reply came."""
        loop = asyncio.get_running_loop()
        sent: dict[int, float] = {}
        rtts: list[float | None] = [None] * count
        got = 0
        done = asyncio.Event()

        async def receive() -> None:
            nonlocal got
            while True:
                data, addr = await loop.sock_recvfrom(self.sock, 2048)
                now = loop.time()
                echo = Echo.parse(data)
                # another ping on this host sees our replies and we see its: ours carry our
                # identifier and token, from the peer we asked
                if (echo is None or echo.kind != ECHO_REPLY or echo.ident != ident
                        or echo.data != token or addr[0].split("%")[0] != target
                        or echo.seq not in sent or rtts[echo.seq - 1] is not None):
                    continue
                rtts[echo.seq - 1] = now - sent[echo.seq]
                got += 1
                if got == count:
                    done.set()

        receiver = asyncio.create_task(receive())
        try:
            for seq in range(1, count + 1):
                sent[seq] = loop.time()
                with contextlib.suppress(OSError):  # no route (yet): counted as lost
                    await loop.sock_sendto(self.sock,
                                           Echo(ECHO_REQUEST, ident, seq, token).to_bytes(),
                                           (target, 0))
                if seq < count:
                    await asyncio.sleep(interval)
            with contextlib.suppress(TimeoutError):
                await within(done.wait(), timeout)
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
        return rtts
