"""What single sign-on writes for ``sshd`` and ``ssh`` (sshd_config(5), sshd(8) "SSH_KNOWN_HOSTS
FILE FORMAT"), and the revocation records the registry publishes (docs/architecture.md section
12). Text in, text out: the daemon does the writing.

Revocations live at ``_btmm-revoked.<zone>``, one TXT per revoked device:
``"device=<name>" "sshca=<base64 Ed25519 key>" "revoked=<unix time>"``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from btmm_core.sso.certs import b64, openssh_public

BEGIN = "# BEGIN btmm (managed by btmm up; edits inside are lost)"
END = "# END btmm"
#: the first label of the zone name holding the revocations (a device name never starts
#: with ``_``: ``dns/names.py``)
REVOKED_LABEL = "_btmm-revoked"
#: a user name for the principals file: what a POSIX login name may be, nothing that could
#: leave the directory or carry sshd's ``%`` tokens
_USER = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
_PRINCIPAL = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def user_problem(name: str) -> str | None:
    if not _USER.match(name):
        return "not a local user name (lower-case letters, digits, _ . -, at most 32)"
    return None


def principal_problem(name: str) -> str | None:
    if not _PRINCIPAL.match(name):
        return "not a principal (letters, digits, _ . @ -, at most 64)"
    return None


@dataclass(frozen=True)
class SshdFiles:
    """Where the drop-in points ``sshd``."""

    host_certificate: Path
    trusted_user_cas: Path
    revoked_keys: Path
    principals_dir: Path


def dropin_text(files: SshdFiles) -> str:
    """The sshd drop-in. Directives take their first value in sshd_config, and Debian's
    main file includes sshd_config.d/*.conf at its top, so these win over later ones."""
    return (
        "# Written by `btmm up` (SSH single sign-on) and removed when it stops; do not edit.\n"
        f"HostCertificate {files.host_certificate}\n"
        f"TrustedUserCAKeys {files.trusted_user_cas}\n"
        f"RevokedKeys {files.revoked_keys}\n"
        f"AuthorizedPrincipalsFile {files.principals_dir}/%u\n"
    )


def trusted_cas_text(cas: Mapping[str, Ed25519PublicKey]) -> str:
    """TrustedUserCAKeys: one CA a line, commented with its device."""
    return "".join(f"{openssh_public(ca, f'btmm-ca:{dev}')}\n" for dev, ca in sorted(cas.items()))


def known_hosts_lines(
    cas: Mapping[str, tuple[tuple[str, ...], Ed25519PublicKey]],
    revoked: Iterable[Ed25519PublicKey],
) -> list[str]:
    """``@cert-authority`` per device, for that device's own names only, and ``@revoked``
    for revoked CAs. ``cas``: device -> (its names, its CA)."""
    lines = []
    for _dev, (names, ca) in sorted(cas.items()):
        lines.append(f"@cert-authority {','.join(names)} {openssh_public(ca)}")
    for ca in sorted(revoked, key=lambda k: openssh_public(k)):
        lines.append(f"@revoked * {openssh_public(ca)}")
    return lines


def replace_block(text: str, lines: list[str]) -> str:
    """``text`` with its btmm block replaced by ``lines`` (none: the block removed); the
    rest of the file is kept as it was."""
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
    if lines:
        out += [BEGIN, *lines, END]
    return "\n".join(out) + "\n" if out else ""


def principals_for(users: Mapping[str, str]) -> dict[str, str]:
    """Local user -> the principals file's text: the one principal mapped to that user."""
    return {user: f"{principal}\n" for user, principal in users.items()}


@dataclass(frozen=True)
class Revoked:
    device: str
    ca: bytes
    when: int


def revocation_strings(device: str, ca: bytes, when: int) -> list[str]:
    return [f"device={device}", f"sshca={b64(ca)}", f"revoked={when}"]


def parse_revocation(strings: Iterable[bytes]) -> Revoked | str:
    """One revocation TXT, or why it is not one (it is then ignored, logged)."""
    info: dict[str, str] = {}
    for s in strings:
        k, sep, v = s.decode("utf-8", "replace").partition("=")
        if sep:
            info[k] = v
    device = info.get("device", "")
    try:
        ca = base64.b64decode(info.get("sshca", ""), validate=True)
        when = int(info.get("revoked", "0"))
    except (binascii.Error, ValueError):
        return f"revocation of {device!r}: malformed sshca or revoked field"
    if len(ca) != 32:
        return f"revocation of {device!r}: sshca is not an Ed25519 key"
    return Revoked(device, ca, when)
