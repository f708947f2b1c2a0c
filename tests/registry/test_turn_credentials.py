"""TURN credentials from the registry (registry/turncreds.py): only the device's own key, for
its own name, gets an offer; every other request is refused and counted; the offer's password
is the one coturn (use-auth-secret) computes from the shared secret."""

from __future__ import annotations

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import pytest
from registry_helpers import make_core, parse, sign
from test_devices import enrol

from btmm_core.dns.enrol import EnrolClient
from btmm_core.dns.tsig import TsigKey
from btmm_core.dns.turn_option import credentials_name, credentials_query
from btmm_core.registry.handler import RegistryCore, Transport
from btmm_core.registry.turncreds import TurnConfig, TurnCredentials
from btmm_core.stun.turn import TurnOffer, rest_password

NOW = 1_800_000_000.0
BOB = dns.name.from_text("bob.members.example.")
ALICE = dns.name.from_text("alice.members.example.")
CONFIG = TurnConfig("turn.members.example", 3478, b"shared-secret", 3600)


def setup() -> tuple[RegistryCore, TurnCredentials, dict[str, TsigKey]]:
    core, accounts = make_core()
    plugin = TurnCredentials(CONFIG)
    core.plug(plugin)
    keys: dict[str, TsigKey] = {"bob": accounts["bob"].key, "alice": accounts["alice"].key}
    for user, device in (("bob", "laptop"), ("bob", "desk"), ("alice", "phone")):
        signer = accounts[user].key
        if user == "bob":
            key, *_ = enrol(core, signer, device, NOW)
        else:  # alice's device: enrolled with her account key into her zone
            client = EnrolClient(ALICE, device)
            wire = sign(client.request(), signer, int(NOW))
            mac = parse(wire).tsig[0].mac  # type: ignore[index]
            key = client.finish(parse(core.receive(wire, NOW, Transport.UDP, "t")), mac)
        assert key is not None
        keys[device] = key
    return core, plugin, keys


def ask(core: RegistryCore, msg: dns.message.Message, key: TsigKey | None) -> dns.message.Message:
    wire = msg.to_wire() if key is None else sign(msg, key, int(NOW))
    return parse(core.receive(wire, NOW, Transport.UDP, "t"))


def test_a_device_gets_its_own_offer() -> None:
    core, plugin, keys = setup()
    answer = ask(core, credentials_query("laptop", BOB), keys["laptop"])
    assert answer.rcode() == dns.rcode.NOERROR and answer.tsig is not None
    [rrset] = answer.answer
    assert rrset.name == credentials_name("laptop", BOB) and rrset.ttl == 0
    [txt] = rrset
    offer = TurnOffer.from_txt([s.decode() for s in txt.strings])  # type: ignore[attr-defined]
    assert offer.username == f"{int(NOW) + 3600}:laptop.bob.members.example"
    assert offer.password == rest_password(b"shared-secret", offer.username)
    assert (offer.host, offer.port, offer.expiry) == ("turn.members.example", 3478,
                                                      int(NOW) + 3600)
    assert plugin.stats == {"issued": 1}


@pytest.mark.parametrize("signer,device,zone,reason", [
    ("desk", "laptop", BOB, "another name"),  # a sibling device of the same account
    ("phone", "laptop", BOB, "another name"),  # another user's device
    ("bob", "laptop", BOB, "not a device key"),  # the account key itself
    (None, "laptop", BOB, "unsigned"),
])
def test_everyone_else_is_refused_and_counted(signer: str | None, device: str,
                                              zone: dns.name.Name, reason: str) -> None:
    core, plugin, keys = setup()
    answer = ask(core, credentials_query(device, zone), None if signer is None else keys[signer])
    assert answer.rcode() == dns.rcode.REFUSED and not answer.answer
    assert plugin.stats == {reason: 1}


def test_without_the_option_the_name_does_not_exist() -> None:
    core, plugin, keys = setup()

    def q() -> dns.message.Message:
        return dns.message.make_query(credentials_name("laptop", BOB), dns.rdatatype.TXT)

    assert ask(core, q(), keys["laptop"]).rcode() == dns.rcode.NXDOMAIN
    assert ask(core, q(), keys["phone"]).rcode() == dns.rcode.REFUSED  # not her zone
    # asked twice (the second one could come from the answer cache): still nothing
    assert ask(core, q(), keys["laptop"]).rcode() == dns.rcode.NXDOMAIN
    assert not plugin.stats
    # and after that, the signed query with the option still gets its own fresh offer
    assert ask(core, credentials_query("laptop", BOB), keys["laptop"]).answer


def test_a_bad_signature_never_reaches_the_plugin() -> None:
    core, plugin, keys = setup()
    forged = TsigKey(keys["laptop"].name, keys["laptop"].algorithm, b"\x00" * 32, BOB)
    answer = ask(core, credentials_query("laptop", BOB), forged)
    assert answer.rcode() == dns.rcode.NOTAUTH and not answer.answer
    assert not plugin.stats


def test_config_is_checked() -> None:
    with pytest.raises(ValueError):
        TurnConfig("h", 3478, b"", 3600)
    with pytest.raises(ValueError):
        TurnConfig("h", 3478, b"s", 10)
