"""Open or attach a Linux TUN device from Python (layer 3, no packet information header).

Kernel interface: Documentation/networking/tuntap.rst — open ``/dev/net/tun`` and bind the file
descriptor to a device with the ``TUNSETIFF`` ioctl (``IFF_TUN | IFF_NO_PI``: every read and
write is exactly one IP packet). The same call creates the device or attaches to an existing
persistent one with that name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct

from btmm_core.errors import PermissionNeeded, TunError

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
SIOCSIFMTU = 0x8922
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFNAMSIZ = 16
# struct ifreq: 16-byte name, then a union of which we use a short (flags) or an int (MTU).
_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")
_IFREQ_MTU = struct.Struct(f"{IFNAMSIZ}si20x")


def _name_bytes(name: str) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw:
        raise TunError(
            f"invalid TUN device name {name!r}", hint=f"use 1 to {IFNAMSIZ - 1} ASCII characters"
        )
    return raw


def open_tun(name: str, *, nonblocking: bool = True) -> tuple[int, str]:
    """Create (or attach to) the TUN device ``name``; return the file descriptor and the name
    the kernel gave it (a name containing ``%d`` lets the kernel pick the number)."""
    req = _IFREQ.pack(_name_bytes(name), IFF_TUN | IFF_NO_PI)
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise TunError(
            f"{TUN_PATH} does not exist", hint="load the tun kernel module (modprobe tun)"
        ) from exc
    except PermissionError as exc:
        raise PermissionNeeded(
            f"cannot open {TUN_PATH}: {exc.strerror}", hint="run as root or with CAP_NET_ADMIN"
        ) from exc
    try:
        res = fcntl.ioctl(fd, TUNSETIFF, req)
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EPERM:
            raise PermissionNeeded(
                f"creating TUN device {name!r} was refused",
                hint="run as root or with CAP_NET_ADMIN, or attach to a persistent device "
                "owned by this user",
            ) from exc
        raise TunError(
            f"TUNSETIFF for {name!r} failed: {exc.strerror}",
            hint="the name may belong to a device that is not a TUN device, or be busy",
        ) from exc
    if nonblocking:
        os.set_blocking(fd, False)
    return fd, _IFREQ.unpack(res)[0].rstrip(b"\0").decode()


def tun_name_of(fd: int) -> str:
    """The name of the TUN device an open file descriptor is attached to."""
    try:
        res = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
    except (OSError, ValueError) as exc:  # ValueError: a negative descriptor
        raise TunError(
            f"file descriptor {fd} is not an attached TUN device: "
            f"{getattr(exc, 'strerror', None) or exc}",
            hint="pass a descriptor returned by TUNSETIFF on /dev/net/tun",
        ) from exc
    name_raw, flags = _IFREQ.unpack(res)
    if flags & IFF_TUN == 0 or flags & IFF_NO_PI == 0:
        raise TunError(
            f"file descriptor {fd} is a TAP device or carries packet information headers",
            hint="open it with IFF_TUN | IFF_NO_PI",
        )
    return str(name_raw.rstrip(b"\0").decode())


def set_mtu(name: str, mtu: int) -> None:
    """Set the MTU of a network device (SIOCSIFMTU)."""
    req = _IFREQ_MTU.pack(_name_bytes(name), mtu)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s.fileno(), SIOCSIFMTU, req)
        except OSError as exc:
            raise TunError(
                f"cannot set the MTU of {name} to {mtu}: {exc.strerror}",
                hint="IPv6 needs an MTU of at least 1280; setting it needs CAP_NET_ADMIN",
            ) from exc


def set_up(name: str) -> None:
    """Bring a network device up (SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, _IFREQ.pack(_name_bytes(name), 0))
            flags = _IFREQ.unpack(res)[1]
            fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, _IFREQ.pack(_name_bytes(name), flags | IFF_UP))
        except OSError as exc:
            raise TunError(
                f"cannot bring {name} up: {exc.strerror}", hint="this needs CAP_NET_ADMIN"
            ) from exc


def close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
