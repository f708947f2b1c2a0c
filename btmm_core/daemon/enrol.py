"""``btmm join``'s exchange with the registry: get this device's own key (dns/enrol.py).

The account key or an invite token signs one UPDATE; the answer (signed with the same key)
lets both sides derive the device key, which never crosses the network. Only the device key is
stored on the host.
"""

from __future__ import annotations

import socket

import dns.rcode

from btmm_core.daemon.dnsclient import RegistryClient
from btmm_core.dns.enrol import EnrolClient
from btmm_core.dns.keyfile import KeyFile
from btmm_core.dns.names import device_name_problem
from btmm_core.dns.tsig import KeyRole, TsigKey
from btmm_core.errors import (
    ConfigError,
    CredentialsRejected,
    RegistryError,
    RegistryUnreachable,
)


def server_from_key_file(kf: KeyFile) -> tuple[str, int] | None:
    """The registry address a key file names (``# btmm server: HOST port N``), resolved."""
    if not kf.server:
        return None
    parts = kf.server.split()
    host = parts[0].rstrip(".")
    port = int(parts[2]) if len(parts) >= 3 and parts[1] == "port" and parts[2].isdigit() \
        else 53
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as e:
        raise ConfigError(
            f"cannot resolve the registry {host} named in the credentials file: {e}",
            hint="pass --server HOST:PORT",
        ) from e
    return str(info[0][4][0]), port


async def enrol_device(
    server: tuple[str, int], signer: TsigKey, device: str, *, replace: bool = False,
    timeout: float = 10.0,
) -> TsigKey:
    """This device's new key, agreed with the registry at ``server``."""
    problem = device_name_problem(device)
    if problem is not None:
        raise ConfigError(f"{device!r} cannot be a device name: {problem}",
                          hint="pass another --name")
    if signer.role == KeyRole.DEVICE:
        raise ConfigError(
            f"{signer.name} is a device key: it cannot enrol devices",
            hint="use the account's credentials file or an invite from "
            "`btmm serve user invite`",
        )
    if signer.role == KeyRole.INVITE and replace:
        raise ConfigError("an invite cannot replace an enrolled device",
                          hint="use the account's credentials file with --replace")
    client = EnrolClient(signer.zone, device, replace=replace)
    # One try over TCP: a request whose answer was lost cannot be sent again (the invite is
    # spent, the name enrolled), so it is not left to UDP retries.
    registry = RegistryClient(server, signer, timeout=timeout, tries=1)
    host, port = server
    try:
        resp, mac = await registry.exchange_signed(client.request(), check_rcode=False,
                                                   tcp=True)
    except CredentialsRejected as e:
        what = "invite" if signer.role == KeyRole.INVITE else "account key"
        raise CredentialsRejected(
            f"the registry at {host}:{port} did not accept the {what} {signer.name}: {e.what}",
            hint="an invite works once and only until it expires: ask for a new one "
            "(`btmm serve user invite`); an account key may have been rotated",
        ) from e
    except RegistryUnreachable as e:
        raise RegistryUnreachable(
            e.what, hint="check --server and that `btmm serve` runs and is reachable over TCP; "
            "if the registry did enrol the device before the connection broke, run `btmm join "
            "--replace` with the account key (`btmm serve user devices` shows it)",
        ) from e
    rcode = resp.rcode()
    zone = signer.zone.to_text()
    if rcode == dns.rcode.YXDOMAIN:
        raise RegistryError(
            f"a device named {device} is enrolled in {zone} already",
            hint="choose another --name, or re-enrol it with `btmm join --replace` and the "
            "account's credentials file (`btmm serve user devices` lists the devices)",
        )
    if rcode == dns.rcode.REFUSED:
        raise RegistryError(
            f"the registry refused to enrol {device} in {zone}",
            hint="an invite may be for another device name or expired; the registry's log "
            "says why",
        )
    if rcode != dns.rcode.NOERROR:
        raise RegistryError(
            f"the registry answered {dns.rcode.to_text(rcode)} to the enrolment of {device} "
            f"in {zone}",
            hint="check that the credentials file belongs to this registry",
        )
    return client.finish(resp, mac)
