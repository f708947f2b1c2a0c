"""User accounts: one zone and one TSIG key per user, and the credentials file for their hosts.

Keys are hmac-sha256 with 256-bit secrets; hmac-md5 (what the original service used) only when
asked for with ``legacy=True``. The credentials file is a BIND key statement, so ``nsupdate -k``
reads it as it is; the ``# btmm`` comment lines tell btmm's host daemon the zone and server.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import time
from pathlib import Path

import dns.name

from btmm_core.dns.tsig import HMAC_MD5, HMAC_SHA256, TsigKey
from btmm_core.errors import ConfigError
from btmm_core.registry.model import Account
from btmm_core.registry.storage import Storage

_USER = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_user(user: str) -> str:
    if not _USER.match(user):
        raise ConfigError(
            f"user name {user!r} is not a single DNS label",
            hint="use 1-63 lower-case letters, digits and inner hyphens",
        )
    if user in RESERVED_USERS:
        raise ConfigError(
            f"user name {user!r} is reserved: the registry publishes its own {user}.DOMAIN",
            hint="choose another user name",
        )
    return user


#: Labels the registry publishes under the parent domain itself: its name server's default
#: name (ns.DOMAIN, with its address records). A user zone there would hide them.
RESERVED_USERS = frozenset({"ns"})


def check_user_free(user: str, parent: dns.name.Name, ns_name: dns.name.Name) -> None:
    """Refuse a user whose zone would contain the registry's own name server ``ns_name``."""
    zone = dns.name.from_text(user, origin=parent)
    if ns_name.is_subdomain(zone):
        raise ConfigError(
            f"user {user!r}: the zone {zone} hides the registry's name server {ns_name}",
            hint=f"choose another user name, or remove this one: btmm serve user remove {user}",
        )


def new_key(user: str, parent: dns.name.Name, *, legacy: bool = False) -> TsigKey:
    zone = dns.name.from_text(check_user(user), origin=parent)
    if legacy:
        return TsigKey(zone, HMAC_MD5, secrets.token_bytes(16), zone)
    return TsigKey(zone, HMAC_SHA256, secrets.token_bytes(32), zone)


def algorithm_text(key: TsigKey) -> str:
    return "hmac-md5" if key.algorithm == HMAC_MD5 else "hmac-sha256"


def credentials_text(account: Account, server: str) -> str:
    key = account.key
    secret = base64.b64encode(key.secret).decode()
    return (
        f"# btmm user: {account.user}\n"
        f"# btmm zone: {account.zone.to_text()}\n"
        f"# btmm server: {server}\n"
        f'key "{key.name.to_text()}" {{\n'
        f"\talgorithm {algorithm_text(key)};\n"
        f'\tsecret "{secret}";\n'
        f"}};\n"
    )


def write_credentials(path: Path, account: Account, server: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(credentials_text(account, server))
    os.replace(tmp, path)


def add_user(storage: Storage, user: str, parent: dns.name.Name, *, legacy: bool) -> Account:
    key = new_key(user, parent, legacy=legacy)
    account = Account(user, key.zone, key, time.time())
    storage.add_account(account)
    return account


def rotate_key(storage: Storage, user: str, parent: dns.name.Name, *, legacy: bool) -> Account:
    old = [a for a in storage.accounts() if a.user == user]
    if not old:
        raise ConfigError(f"no user {user!r}", hint="see 'btmm serve user list'")
    key = new_key(user, parent, legacy=legacy)
    storage.replace_key(user, key)
    return Account(user, old[0].zone, key, time.time())
