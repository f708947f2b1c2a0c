"""The host's inner identity: a ULA (RFC 4193) and the names derived from it (DESIGN.md §2).

Layout: ``fd`` + 40-bit random global ID + 16-bit subnet ID (the "7 random bytes" of the
design), then a 64-bit interface identifier. The identifier is either random (the default: an
EUI-64 (RFC 4291 appendix A) from the MAC would let anyone who sees the address learn the
hardware) or the modified EUI-64 of a MAC address. Everything is generated once and persisted,
so the address stays the same while the host moves: TCP connections and SAs are bound to it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from btmm_core.errors import ConfigError


@dataclass(frozen=True)
class HostIdentity:
    ula: ipaddress.IPv6Address

    @property
    def interface_id(self) -> bytes:
        return self.ula.packed[8:]

    def autotunnel_label(self) -> str:
        """``AutoTunnel-XX-XX-XX-XX-XX-XX-XX-XX`` from the 8 interface-identifier bytes."""
        return "AutoTunnel-" + "-".join(f"{b:02X}" for b in self.interface_id)


def eui64_from_mac(mac: str) -> bytes:
    """Modified EUI-64 (RFC 4291 appendix A): ff:fe in the middle, universal/local bit flipped."""
    parts = mac.replace("-", ":").split(":")
    if len(parts) != 6:
        raise ConfigError(f"{mac!r} is not a MAC address", hint="write it as aa:bb:cc:dd:ee:ff")
    try:
        raw = bytes(int(p, 16) for p in parts)
    except ValueError as exc:
        raise ConfigError(f"{mac!r} is not a MAC address") from exc
    return bytes([raw[0] ^ 0x02]) + raw[1:3] + b"\xff\xfe" + raw[3:]


def make_ula(prefix7: bytes, interface_id: bytes) -> ipaddress.IPv6Address:
    if len(prefix7) != 7 or len(interface_id) != 8:
        raise ConfigError("a ULA needs a 7-byte global+subnet ID and an 8-byte interface ID")
    return ipaddress.IPv6Address(b"\xfd" + prefix7 + interface_id)


def primary_mac() -> str | None:
    """The MAC of the first non-loopback interface with one, for ``interface_id = "eui64"``."""
    base = Path("/sys/class/net")
    for dev in sorted(base.iterdir()) if base.exists() else []:
        try:
            mac = (dev / "address").read_text().strip()
        except OSError:
            continue
        if dev.name != "lo" and mac and mac != "00:00:00:00:00:00" and len(mac) == 17:
            return mac
    return None


def load_or_create_identity(path: Path, mode: str = "random") -> HostIdentity:
    """Read the persisted identity, or make one (``mode`` ``random`` or ``eui64``) and store it.

    Once stored it is never regenerated: changing ``mode`` later has no effect unless the file
    is removed, because a new address would break every peer's idea of this host.
    """
    if path.exists():
        try:
            data = json.loads(path.read_text())
            return HostIdentity(ipaddress.IPv6Address(data["ula"]))
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(
                f"identity file {path} is damaged: {exc}",
                hint="remove it to make a new identity (peers will see a new address)",
            ) from exc
    if mode == "random":
        iid = secrets.token_bytes(8)
    elif mode == "eui64":
        mac = primary_mac()
        if mac is None:
            raise ConfigError("interface_id = \"eui64\" but no interface has a MAC address",
                              hint='use interface_id = "random"')
        iid = eui64_from_mac(mac)
    else:
        raise ConfigError(f"interface_id {mode!r} is neither \"random\" nor \"eui64\"")
    ident = HostIdentity(make_ula(secrets.token_bytes(7), iid))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"ula": str(ident.ula), "interface_id": mode}) + "\n")
    os.replace(tmp, path)
    return ident
