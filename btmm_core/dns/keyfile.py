"""Key files: a BIND key statement (so ``nsupdate -k FILE`` and ``dig -k FILE`` read it) with
``# btmm ...`` comment lines that tell btmm what the key is for. The key is a TSIG key
(RFC 8945: a name, an algorithm, a shared secret). Every key file is read and written here,
and so is the host daemon's account secret (``write_secret``).

Three kinds, told apart by the comments: the account key (``btmm serve user add``), an invite
token (``btmm serve user invite``: ``# btmm invite:``) and a device key (``btmm join``:
``# btmm device:``). Every kind names its zone (``# btmm zone:``); a file without that line is
an old account credentials file, whose key is named after the zone.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.name

from btmm_core.dns.tsig import HMAC_MD5, HMAC_SHA256, KeyRole, TsigKey
from btmm_core.errors import ConfigError

_KEY = re.compile(
    r'key\s+"?(?P<name>[^"\s{]+)"?\s*\{\s*algorithm\s+"?(?P<alg>[A-Za-z0-9.-]+)"?\s*;\s*'
    r'secret\s+"(?P<secret>[A-Za-z0-9+/=]+)"\s*;\s*\}\s*;',
    re.S,
)
_COMMENT = re.compile(r"^#\s*btmm\s+([a-z]+):\s*(.*?)\s*$", re.M)


@dataclass(frozen=True)
class KeyFile:
    key: TsigKey
    user: str | None = None
    #: what ``# btmm server:`` says, e.g. "ns.members.example. port 53" (None: not said)
    server: str | None = None


def algorithm_text(key: TsigKey) -> str:
    return "hmac-md5" if key.algorithm == HMAC_MD5 else "hmac-sha256"


def key_file_text(key: TsigKey, *, user: str | None = None, server: str | None = None) -> str:
    lines = []
    if user is not None:
        lines.append(f"# btmm user: {user}")
    lines.append(f"# btmm zone: {key.zone.to_text()}")
    if key.role == KeyRole.DEVICE:
        lines.append(f"# btmm device: {key.device}")
    elif key.role == KeyRole.INVITE:
        lines.append(f"# btmm invite: {key.device or '*'}")
        if key.expires is not None:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(key.expires))
            lines.append(f"# btmm expires: {stamp} ({int(key.expires)})")
    if server is not None:
        lines.append(f"# btmm server: {server}")
    secret = base64.b64encode(key.secret).decode()
    lines += [
        f'key "{key.name.to_text()}" {{',
        f"\talgorithm {algorithm_text(key)};",
        f'\tsecret "{secret}";',
        "};",
    ]
    return "\n".join(lines) + "\n"


def parse_key_file(text: str, source: str) -> KeyFile:
    m = _KEY.search(text)
    if m is None:
        raise ConfigError(
            f"{source} holds no key statement",
            hint='expected key "NAME" { algorithm hmac-sha256; secret "BASE64"; };',
        )
    algorithms = {"hmac-sha256": HMAC_SHA256, "hmac-md5": HMAC_MD5}
    alg = algorithms.get(m["alg"].lower().rstrip("."))
    if alg is None:
        raise ConfigError(
            f"{source}: algorithm {m['alg']} is not supported (hmac-sha256, hmac-md5)"
        )
    comments = dict(_COMMENT.findall(text))
    try:
        name = dns.name.from_text(m["name"])
        zone = dns.name.from_text(comments["zone"]) if "zone" in comments else name
        secret = base64.b64decode(m["secret"], validate=True)
    except (dns.exception.DNSException, binascii.Error) as e:
        raise ConfigError(f"{source}: unreadable key statement: {e}") from e
    role, device, expires = KeyRole.ACCOUNT, None, None
    if "device" in comments:
        role, device = KeyRole.DEVICE, comments["device"]
    elif "invite" in comments:
        role = KeyRole.INVITE
        device = None if comments["invite"] in ("", "*") else comments["invite"]
        stamp = re.search(r"\((\d+)\)", comments.get("expires", ""))
        expires = float(stamp.group(1)) if stamp else None
    key = TsigKey(name, alg, secret, zone, role, device, expires)
    return KeyFile(key, comments.get("user"), comments.get("server"))


def read_key_file(path: Path) -> KeyFile:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read key file {path}: {e}") from e
    return parse_key_file(text, str(path))


def read_key(path: Path) -> TsigKey:
    """The TSIG key of a key file (an account key, an invite or a device key)."""
    return read_key_file(path).key


def write_key_file(path: Path, text: str) -> None:
    """Write a key file 0600 (atomically; the directory is created 0700 if missing)."""
    write_secret(path, text.encode())


def write_secret(path: Path, data: bytes, *, private_dir: bool = False) -> None:
    """Write ``data`` 0600, atomically; the directory is created 0700 if missing.

    ``private_dir``: make an existing directory 0700 too, for a directory that holds nothing
    but secrets (the host daemon's state directory); a directory the user named for one key
    file (``btmm serve user invite --out``) is left as it is.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if private_dir:
        os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
