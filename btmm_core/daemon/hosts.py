"""Name resolution for ordinary programs: a managed block in a hosts file (hosts(5)).

The block sits between two marker lines and is replaced as a whole; everything else in the
file is kept. The file is rewritten in place (not renamed over) because ``ip netns exec``
bind-mounts /etc/netns/<name>/hosts on /etc/hosts, and a rename onto a mount point fails.

Given the user's zone, only names ``<host label>.<zone>`` enter the block (``records.
peer_host_label``): whatever the registry publishes, it cannot make this host resolve a name
outside the zone (``github.com``) or inject hosts-file syntax.
"""

from __future__ import annotations

import fcntl
import ipaddress
from collections.abc import Mapping
from pathlib import Path

import dns.exception
import dns.name

from btmm_core.daemon.records import peer_host_label
from btmm_core.sso.files import BEGIN, END
from btmm_core.sso.files import replace_block as splice_block


def in_zone(fqdn: str, zone: str) -> bool:
    """Whether ``fqdn`` is a host of ``zone`` that may enter the block."""
    try:
        name = dns.name.from_text(fqdn)
    except dns.exception.DNSException:
        return False
    return peer_host_label(name, dns.name.from_text(zone)) is not None


def render_block(
    names: Mapping[str, ipaddress.IPv6Address], zone: str | None = None
) -> list[str]:
    if zone is not None:
        names = {n: a for n, a in names.items() if in_zone(n, zone)}
    if not names:
        return []
    lines = [BEGIN]
    for fqdn, ula in sorted(names.items()):
        short = fqdn.rstrip(".")
        lines.append(f"{ula}\t{short}")
    lines.append(END)
    return lines


def replace_block(
    text: str, names: Mapping[str, ipaddress.IPv6Address], zone: str | None = None
) -> str:
    """``text`` with its btmm block (if any) replaced by one for ``names`` (none: removed);
    with ``zone``, names that are not hosts of it are left out. The block is spliced the way
    the known-hosts block is (same markers, one implementation)."""
    return splice_block(text, render_block(names, zone)[1:-1])


def write_hosts(
    path: Path, names: Mapping[str, ipaddress.IPv6Address], zone: str | None = None
) -> None:
    path.touch(exist_ok=True)
    with open(path, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        new = replace_block(f.read(), names, zone)
        f.seek(0)
        f.write(new)
        f.truncate()
