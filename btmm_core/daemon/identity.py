"""The host's inner identity: a ULA (RFC 4193) bound to its device key, and the names derived
from it (docs/architecture.md section 6).

The address is ``btmm_core.keyex.keys.ula_of(public key)``: ``fd`` + 15 bytes of a hash of
the device's X25519 public key. Every peer checks a published address against the published
key, and the key exchange proves the key, so no host can claim another host's address (or any
address outside fd00::/8). The address stays the same while the host moves (TCP connections
and SAs are bound to it) and changes only with the device key.

Earlier versions stored a random (or EUI-64, which leaked the MAC address) ULA in
``identity.json``; ``retire_legacy_identity`` removes that file once and says which address
replaced which. The ``interface_id`` setting is ignored (``Daemon`` warns about it).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

from btmm_core.keyex.keys import ula_of


@dataclass(frozen=True)
class HostIdentity:
    ula: ipaddress.IPv6Address

    @classmethod
    def of_key(cls, public: bytes) -> HostIdentity:
        """The identity bound to a device's X25519 public key."""
        return cls(ula_of(public))

    @property
    def interface_id(self) -> bytes:
        return self.ula.packed[8:]

    def autotunnel_label(self) -> str:
        """``AutoTunnel-XX-XX-XX-XX-XX-XX-XX-XX`` from the 8 interface-identifier bytes."""
        return "AutoTunnel-" + "-".join(f"{b:02X}" for b in self.interface_id)


def retire_legacy_identity(path: Path) -> str | None:
    """Remove the ``identity.json`` of an earlier version, if any; return the address it held
    (or a note that it was unreadable), for the log. The file holds no secret."""
    if not path.exists():
        return None
    try:
        old = str(ipaddress.IPv6Address(json.loads(path.read_text())["ula"]))
    except (OSError, ValueError, KeyError, TypeError):
        old = "an unreadable address"
    path.unlink(missing_ok=True)
    return old
