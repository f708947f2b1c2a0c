"""The registry's TURN credential query: a TXT question for ``_turn-credentials.<device>.<zone>``
carrying an empty EDNS option (RFC 6891; code 65322, from the local/experimental range, next to
enrolment's 65321) and signed with the device's own TSIG key (RFC 8945).

The option routes the question to the registry's credential plug-in
(``registry.turncreds``), which answers it with a fresh ``stun.turn.TurnOffer`` as TXT strings,
TTL 0, signed with the same key. Without the option the question is an ordinary lookup of a
name that does not exist (NXDOMAIN, or REFUSED for another account's key): the credentials are
never stored in a zone, so no answer cache and no other reader can see them.
"""

from __future__ import annotations

import dns.edns
import dns.message
import dns.name
import dns.rdatatype

TURN_CREDENTIALS_CODE = 65322
LABEL = "_turn-credentials"


def credentials_name(device: str, zone: dns.name.Name) -> dns.name.Name:
    return dns.name.from_text(f"{LABEL}.{device}", origin=zone)


def credentials_query(device: str, zone: dns.name.Name) -> dns.message.Message:
    """The (unsigned) query; the client signs it with the device key."""
    option = dns.edns.GenericOption(dns.edns.OptionType.make(TURN_CREDENTIALS_CODE), b"")
    return dns.message.make_query(credentials_name(device, zone), dns.rdatatype.TXT,
                                  use_edns=0, options=[option])
