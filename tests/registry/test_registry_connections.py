"""TCP/TLS connection slots per client (issue 11 item 8): one address (an IPv6 /64) may hold
at most ``max_connections_per_client`` of them; more are closed at once, counted and logged."""

from __future__ import annotations

import asyncio
import struct

import dns.message
import dns.rcode
import pytest
from registry_helpers import PARENT, make_core

from btmm_core.aio import within
from btmm_core.registry.limits import client_prefix
from btmm_core.registry.server import Listen, RegistryServer


@pytest.mark.parametrize(
    ("address", "client"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2::5", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::5", "2001:db8:1:3::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("fe80::1%eth0", "fe80::/64"),
        ("?", "?"),
    ],
)
def test_clients_are_addresses_and_ipv6_slash_64s(address: str, client: str) -> None:
    assert client_prefix(address) == client


async def _soa(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    q = dns.message.make_query(PARENT, "SOA").to_wire()
    writer.write(struct.pack("!H", len(q)) + q)
    (n,) = struct.unpack("!H", await within(reader.readexactly(2), 10))
    return dns.message.from_wire(await within(reader.readexactly(n), 10)).rcode()


async def _closed_at_once(host: str, port: int, source: str) -> bool:
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    try:
        return await within(reader.read(1), 10) == b""
    finally:
        writer.close()


def test_connections_beyond_the_per_client_limit_are_closed_counted_and_logged(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def main() -> None:
        core, _ = make_core()
        server = RegistryServer(
            core, Listen("127.0.0.1", 0, max_connections_per_client=2, idle_timeout=60)
        )
        await server.start()
        host, port = server.addresses["tcp"]
        try:
            held = [await asyncio.open_connection(host, port) for _ in range(2)]
            for r, w in held:
                assert await _soa(r, w) == dns.rcode.NOERROR
            assert await _closed_at_once(host, port, "127.0.0.1")
            assert await _closed_at_once(host, port, "127.0.0.1")
            assert server.refused == {"total": 0, "per_client": 2}
            # another client is served
            r2, w2 = await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0))
            assert await _soa(r2, w2) == dns.rcode.NOERROR
            w2.close()
            # a slot freed is a slot usable again
            held[0][1].close()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while server._per_client.get("127.0.0.1") != 1:
                assert loop.time() < deadline, server._per_client
                await asyncio.sleep(0.01)
            r3, w3 = await asyncio.open_connection(host, port)
            assert await _soa(r3, w3) == dns.rcode.NOERROR
            w3.close()
            held[1][1].close()
        finally:
            await server.close()

    asyncio.run(main())
    out = capsys.readouterr()
    assert (out.out + out.err).count("connection refused") == 1
