"""Name resolution for ordinary programs: a managed block in a hosts file (hosts(5)).

The block sits between two marker lines and is replaced as a whole; everything else in the
file is kept. The file is rewritten in place (not renamed over) because ``ip netns exec``
bind-mounts /etc/netns/<name>/hosts on /etc/hosts, and a rename onto a mount point fails.
"""

from __future__ import annotations

import fcntl
import ipaddress
from collections.abc import Mapping
from pathlib import Path

BEGIN = "# BEGIN btmm (managed by btmm up; edits inside are lost)"
END = "# END btmm"


def render_block(names: Mapping[str, ipaddress.IPv6Address]) -> list[str]:
    if not names:
        return []
    lines = [BEGIN]
    for fqdn, ula in sorted(names.items()):
        short = fqdn.rstrip(".")
        lines.append(f"{ula}\t{short}")
    lines.append(END)
    return lines


def replace_block(text: str, names: Mapping[str, ipaddress.IPv6Address]) -> str:
    """``text`` with its btmm block (if any) replaced by one for ``names`` (none: removed)."""
    out: list[str] = []
    inside = False
    for line in text.splitlines():
        if line.strip() == BEGIN:
            inside = True
            continue
        if inside:
            if line.strip() == END:
                inside = False
            continue
        out.append(line)
    out += render_block(names)
    return "\n".join(out) + "\n" if out else ""


def write_hosts(path: Path, names: Mapping[str, ipaddress.IPv6Address]) -> None:
    path.touch(exist_ok=True)
    with open(path, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        new = replace_block(f.read(), names)
        f.seek(0)
        f.write(new)
        f.truncate()
