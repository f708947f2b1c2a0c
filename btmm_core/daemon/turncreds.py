"""TURN credentials for this device, from its registry (``registry/turncreds.py`` serves them).

One TSIG-signed query with the device's own key (``dns/turn_option.py``); the answer, signed
with the same key and checked by ``RegistryClient``, is a ``TurnOffer``. A registry without a
TURN server configured answers NXDOMAIN: ``TurnError`` says so.
"""

from __future__ import annotations

import dns.rdatatype

from btmm_core.daemon.dnsclient import RegistryClient
from btmm_core.dns.turn_option import credentials_name, credentials_query
from btmm_core.errors import MalformedMessage, TurnError
from btmm_core.stun.turn import TurnOffer

NO_RELAY_HINT = ("the registry's operator enables relaying with `btmm serve --turn-server "
                 "HOST:PORT --turn-secret-file PATH` (coturn with use-auth-secret)")


async def fetch_offer(client: RegistryClient) -> TurnOffer:
    """Time-limited credentials for the registry's TURN server; raises ``TurnError`` (none
    offered, or an answer that is not an offer) or ``RegistryError``."""
    key = client.key
    if key.device is None:
        raise TurnError("TURN credentials are handed to devices, and this key is an account "
                        "key", hint="run `btmm join` to enrol this host as a device")
    name = credentials_name(key.device, key.zone)
    answer = await client.exchange(credentials_query(key.device, key.zone))
    for rrset in answer.answer:
        if rrset.name == name and rrset.rdtype == dns.rdatatype.TXT:
            for rd in rrset:
                try:
                    return TurnOffer.from_txt([s.decode() for s in rd.strings])
                except (MalformedMessage, UnicodeDecodeError) as e:
                    raise TurnError(f"the registry's TURN offer is malformed: {e}") from None
    raise TurnError("the registry offers no TURN relay", hint=NO_RELAY_HINT)
