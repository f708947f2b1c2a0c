"""The daemon's registry client against an in-process registry core on loopback: one forged
(unsigned) BADKEY is not believed, a BADKEY on every try is; an UPDATE too big for UDP goes by
TCP; a BADTIME from our own requests crossing is signed again."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
import sys
import time
from pathlib import Path

import dns.message
import dns.name
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "registry"))

from registry_helpers import make_core

from btmm_core.daemon.dnsclient import UDP_REQUEST_MAX, RegistryClient
from btmm_core.daemon.identity import HostIdentity
from btmm_core.daemon.records import Publication, publish_update
from btmm_core.dataplane.api import Endpoint
from btmm_core.dns.tsig import TsigError, append_tsig, sign
from btmm_core.errors import ClockSkew, CredentialsRejected, RegistryUnreachable
from btmm_core.reach.candidates import Candidate, CandidateKind
from btmm_core.registry.handler import RegistryCore, Transport

ZONE = dns.name.from_text("bob.members.example.")
ULA = ipaddress.IPv6Address("fd00::5")


def forged_badkey(request: bytes) -> bytes:
    """What an off-path attacker can send: the request turned into an unsigned BADKEY answer."""
    (qid, flags) = struct.unpack("!HH", request[:4])
    head = struct.pack("!HHHHHH", qid, flags | 0x8000 | 9, 1, 0, 0, 0)
    end = 12
    while request[end]:
        end += 1 + request[end]
    question = request[12 : end + 5]
    msg = dns.message.from_wire(request, keyring=False)
    assert msg.tsig is not None
    return append_tsig(head + question, key=None, key_name=msg.tsig.name,
                       algorithm=msg.tsig[0].algorithm, request_mac=msg.tsig[0].mac,
                       time_signed=msg.tsig[0].time_signed, fudge=300, error=TsigError.BADKEY)


class Server(asyncio.DatagramProtocol):
    def __init__(self, core: RegistryCore, forge: int) -> None:
        self.core = core
        self.forge = forge
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        if self.forge:
            self.forge -= 1
            self.transport.sendto(forged_badkey(data), addr)
            return
        out = self.core.receive(data, time.time(), Transport.UDP, addr[0])
        if out is not None:
            self.transport.sendto(out, addr)


async def publish(forge: int) -> None:
    core, accounts = make_core()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: Server(core, forge), local_addr=("127.0.0.1", 0))
    try:
        port = transport.get_extra_info("sockname")[1]
        client = RegistryClient(("127.0.0.1", port), accounts["bob"].key, timeout=1.0, tries=3)
        pub = Publication("laptop", ULA, HostIdentity(ULA).autotunnel_label(), "K" * 43 + "=",
                          ipaddress.IPv4Address("203.0.113.3"), 4500)
        await client.exchange(publish_update(ZONE, pub, None, 2000))
    finally:
        transport.close()


def test_one_forged_badkey_is_not_believed() -> None:
    asyncio.run(publish(forge=1))


def test_each_try_waits_twice_as_long_as_the_one_before(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry too busy to answer within the wait is not sent the next try sooner: the
    waits double (1, 2, 4 s here); then the error says so."""
    _, accounts = make_core()
    waits: list[float] = []

    async def silent(self: RegistryClient, wire: bytes, msg: dns.message.Message, mac: bytes,
                     sent: int, wait: float) -> dns.message.Message:
        waits.append(wait)
        raise TimeoutError("no answer")

    monkeypatch.setattr(RegistryClient, "_udp", silent)
    client = RegistryClient(("127.0.0.1", 53), accounts["bob"].key, timeout=1.0, tries=3)
    with pytest.raises(RegistryUnreachable, match="after 3 tries"):
        asyncio.run(client.query(dns.name.from_text("laptop", origin=ZONE), 28))
    assert waits == [1.0, 2.0, 4.0]
    assert client.failures == 1


def test_badkey_on_every_try_is_fatal_and_says_what_to_do() -> None:
    with pytest.raises(CredentialsRejected, match="BADKEY") as info:
        asyncio.run(publish(forge=3))
    assert info.value.hint is not None and "btmm join" in info.value.hint


async def publish_big() -> tuple[int, int]:
    """A publication with eight candidates replacing eight others is larger than one UDP
    request may be: it goes by TCP at once (and the registry takes it)."""
    core, accounts = make_core()
    loop = asyncio.get_running_loop()
    udp = Server(core, 0)
    datagrams = 0

    def count(data: bytes, addr: tuple[str, int]) -> None:
        nonlocal datagrams
        datagrams += 1
        Server.datagram_received(udp, data, addr)

    udp.datagram_received = count  # type: ignore[method-assign]
    transport, _ = await loop.create_datagram_endpoint(lambda: udp, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    streams = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal streams
        streams += 1
        (n,) = struct.unpack("!H", await reader.readexactly(2))
        out = core.receive(await reader.readexactly(n), time.time(), Transport.TCP, "test")
        assert out is not None
        writer.write(struct.pack("!H", len(out)) + out)
        await writer.drain()
        writer.close()

    tcp = await asyncio.start_server(serve, "127.0.0.1", port)
    try:
        client = RegistryClient(("127.0.0.1", port), accounts["bob"].key, timeout=1.0, tries=2)

        def pub(first: int, n: int = 8) -> Publication:
            return Publication(
                "laptop", ULA, HostIdentity(ULA).autotunnel_label(), "K" * 43 + "=",
                ipaddress.IPv4Address("203.0.113.3"), 4500,
                candidates=tuple(Candidate(CandidateKind.LAN, Endpoint(f"10.0.0.{i}", 4500))
                                 for i in range(first, first + n)))

        msg = publish_update(ZONE, pub(10), pub(1), 2000)
        assert len(msg.to_wire(max_size=65535)) > UDP_REQUEST_MAX
        await client.exchange(msg)
        await client.exchange(publish_update(ZONE, pub(1, 2), pub(10), 2000))  # by UDP
    finally:
        tcp.close()
        transport.close()
    return datagrams, streams


def test_an_update_too_big_for_udp_goes_by_tcp() -> None:
    datagrams, streams = asyncio.run(publish_big())
    assert (datagrams, streams) == (1, 1)


async def query_after_a_later_stamp(ahead: int) -> dns.message.Message:
    """Another task of ours signed a request ``ahead`` seconds later than now, and it reached
    the registry first; then the client's own query, signed now."""
    core, accounts = make_core()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: Server(core, 0), local_addr=("127.0.0.1", 0))
    try:
        key = accounts["bob"].key
        later = dns.message.make_query(ZONE, "SOA")
        wire, _ = sign(later.to_wire(), key, time_signed=int(time.time()) + ahead, fudge=300)
        assert core.receive(wire, time.time(), Transport.UDP, "127.0.0.1") is not None
        port = transport.get_extra_info("sockname")[1]
        client = RegistryClient(("127.0.0.1", port), key, timeout=1.0, tries=1)
        query = dns.message.make_query(ZONE, "SOA")
        return await client.exchange(query)
    finally:
        transport.close()


def test_a_badtime_from_our_own_later_request_is_signed_again_in_the_next_second() -> None:
    resp = asyncio.run(query_after_a_later_stamp(1))
    assert resp.rcode() == 0 and resp.answer


def test_a_badtime_that_signing_again_cannot_cure_is_still_reported() -> None:
    with pytest.raises(ClockSkew, match="BADTIME"):
        asyncio.run(query_after_a_later_stamp(4))  # a clock ahead by 4 s shares our key
