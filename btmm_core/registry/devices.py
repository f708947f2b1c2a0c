"""Device keys and invite tokens of an account (``btmm serve user invite/devices/revoke``).

A device key is made only by enrolment over the wire (dns/enrol.py), so its secret is
never in a file on the registry host besides the database. An invite is a TSIG key too
(hmac-sha256, 256 bits), stored with the role INVITE: it may enrol one device and nothing
else, and is deleted when used; after ``expires`` it is refused (and dropped from the list).
"""

from __future__ import annotations

import re
import secrets
import time

import dns.name

from btmm_core.dns.names import device_name_problem
from btmm_core.dns.tsig import HMAC_SHA256, KeyRole, TsigKey
from btmm_core.errors import ConfigError
from btmm_core.registry.model import DeviceKey
from btmm_core.registry.storage import Storage


def parse_duration(text: str) -> float:
    """"24h", "30m", "7d", "90s" or plain seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if m is None:
        raise ConfigError(f"{text!r} is not a duration", hint="e.g. 24h, 30m, 7d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _account(storage: Storage, user: str) -> dns.name.Name:
    for a in storage.accounts():
        if a.user == user:
            return a.zone
    raise ConfigError(f"no user {user!r}", hint="see 'btmm serve user list'")


def make_invite(
    storage: Storage, user: str, *, device: str | None, lifetime: float, now: float | None = None
) -> DeviceKey:
    zone = _account(storage, user)
    if device is not None:
        problem = device_name_problem(device)
        if problem is not None:
            raise ConfigError(f"device name {device!r}: {problem}")
    now = time.time() if now is None else now
    name = dns.name.from_text(f"_invite-{secrets.token_hex(6)}", origin=zone)
    key = TsigKey(
        name, HMAC_SHA256, secrets.token_bytes(32), zone, KeyRole.INVITE, device, now + lifetime
    )
    invite = DeviceKey(user, key, now)
    storage.add_invite(invite)
    return invite


def list_devices(storage: Storage, user: str, now: float | None = None) -> list[DeviceKey]:
    """The user's device keys and unexpired invites."""
    _account(storage, user)
    now = time.time() if now is None else now
    return [
        d for d in storage.devices(user)
        if d.key.role == KeyRole.DEVICE or d.key.expires is None or d.key.expires > now
    ]
