"""Which names a device may have: one DNS label (RFC 1035 section 2.3.1, RFC 1123 section 2.1).

The rule is shared by ``btmm join`` (checked before the registry is asked) and the registry
(checked again when it enrols a device). Names that start like a tunnel endpoint
(``AutoTunnel-...``, see registry/authority.py) are left to those, so that a device's own name
and a tunnel endpoint never coincide.
"""

from __future__ import annotations

import re

#: The first label of a tunnel-endpoint name (compared case-insensitively, as DNS does).
TUNNEL_PREFIX = "autotunnel-"

_DEVICE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def device_name_problem(device: str) -> str | None:
    """Why ``device`` cannot be a device name (None: it can)."""
    if not _DEVICE.fullmatch(device):
        return "a device name is one DNS label: 1-63 lower-case letters, digits, inner hyphens"
    if device.startswith(TUNNEL_PREFIX):
        return f"names starting with {TUNNEL_PREFIX!r} are tunnel endpoints, not devices"
    return None
