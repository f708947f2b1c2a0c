"""Per-client LLQ limits count an IPv6 client per /64 (issue 11, item 8), sans-I/O.

A host usually holds a whole /64 and can send from any address in it: counted per address, it
could take as many LLQs as it picks addresses.
"""

from __future__ import annotations

import dns.message
import dns.name
import pytest
from llq_helpers import LAPTOP, Lab, parse, sign

from btmm_core.dns.llq_option import LLQError, LLQOpcode, LLQOption, find_llq
from btmm_core.llq.server import LLQConfig, client_of
from btmm_core.registry.handler import Transport


def ask(lab: Lab, opt: LLQOption, peer: str) -> LLQOption:
    q = dns.message.make_query(LAPTOP, "AAAA", use_edns=0, options=[opt])
    q.flags = 0
    wire = sign(q, lab.accounts["bob"].key, int(lab.now))
    (answer,) = find_llq(parse(lab.send(wire, lab.now, Transport.UDP, peer)).options)
    return answer


def establish(lab: Lab, peer: str) -> LLQError:
    challenge = ask(lab, LLQOption(LLQOpcode.SETUP, 0, 0, 3600), peer)
    if challenge.error:
        return LLQError(challenge.error)
    ack = ask(lab, LLQOption(LLQOpcode.SETUP, 0, challenge.llq_id, 3600), peer)
    return LLQError(ack.error)


def test_many_addresses_of_one_ipv6_64_share_one_limit() -> None:
    lab = Lab.make(LLQConfig(max_per_client=3))
    peers = [f"2001:db8:1:2::{i:x}#{5000 + i}" for i in range(1, 11)]
    results = [establish(lab, p) for p in peers]
    assert results[:3] == [LLQError.NO_ERROR] * 3
    assert set(results[3:]) == {LLQError.SERV_FULL}, "fresh addresses of the /64 evaded the limit"
    assert len(lab.llq.llqs) == 3
    # Another /64 has its own count; so has each IPv4 address.
    assert establish(lab, "2001:db8:1:3::1#5000") == LLQError.NO_ERROR
    assert establish(lab, "192.0.2.1#5000") == LLQError.NO_ERROR
    assert establish(lab, "192.0.2.2#5000") == LLQError.NO_ERROR
    # Cancelling one gives its /64 room again.
    first = next(iter(lab.llq.llqs.values()))
    assert ask(lab, LLQOption(LLQOpcode.REFRESH, 0, first.llq_id, 0), first.peer).error == 0
    assert establish(lab, "2001:db8:1:2::ff#5000") == LLQError.NO_ERROR
    assert establish(lab, "2001:db8:1:2::fe#5000") == LLQError.SERV_FULL


@pytest.mark.parametrize(
    ("peer", "client"),
    [
        ("192.0.2.7#53", "192.0.2.7"),
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd#53", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1#53", "2001:db8:1:2::/64"),
        ("fe80::1%eth0#53", "fe80::/64"),
        ("::ffff:192.0.2.7#53", "192.0.2.7"),
        ("updater#1", "updater"),
    ],
)
def test_client_of(peer: str, client: str) -> None:
    assert client_of(peer) == client
