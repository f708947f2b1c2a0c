"""STUN in ``btmm serve``'s configuration: the options, the ``_stun._udp`` SRV the zones
synthesize (only when STUN is on), and the responder the composition starts."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import dns.name
import dns.rdatatype
import pytest

from btmm_core.aio import within
from btmm_core.registry.storage import SqliteStorage
from btmm_core.registry.zones import Zone, ZoneConfig
from btmm_core.serve import compose
from btmm_core.serve.cli import _config
from btmm_core.serve.config import ServeConfig, StorageConfig, StunConfig, ZoneNames
from btmm_core.stun.message import TransportAddress, binding_request, parse

PARENT = dns.name.from_text("members.example.")
NS = dns.name.from_text("ns.members.example.")
BOB = dns.name.from_text("bob.members.example.")
STUN_NAME = dns.name.from_text("_stun._udp.bob.members.example.")


def _zone(stun_port: int | None) -> Zone:
    return Zone(BOB, "bob", 1, ZoneConfig(PARENT, NS, (), 53, stun_port=stun_port))


def test_stun_srv_only_when_stun_is_on() -> None:
    on = _zone(3478)
    [(srv, ttl)] = on.get(STUN_NAME, dns.rdatatype.SRV)
    assert (srv.priority, srv.weight, srv.port, srv.target, ttl) == (0, 0, 3478, NS, 3600)
    assert on.is_public(STUN_NAME, dns.rdatatype.SRV)  # discovery needs no key
    assert on.is_protected(STUN_NAME, dns.rdatatype.SRV)  # no update may change it
    off = _zone(None)
    assert off.get(STUN_NAME, dns.rdatatype.SRV) == []
    assert not off.is_public(STUN_NAME, dns.rdatatype.SRV)
    assert not off.name_exists(STUN_NAME)
    # the parent zone gets none
    parent = Zone(PARENT, None, 1, ZoneConfig(PARENT, NS, (), 53, stun_port=3478))
    assert parent.get(dns.name.from_text("_stun._udp", origin=PARENT), dns.rdatatype.SRV) == []


def _options(**over: object) -> dict[str, object]:
    o: dict[str, object] = dict(
        domain="members.example", ns_name=None, ns_address=(), public_port=None,
        state_dir=Path("/nonexistent"), db=None, database=None, listen="127.0.0.1", port=53,
        tcp_idle_timeout=10.0, max_connections=256, max_connections_per_client=32,
        tls_port=0, tls_cert=None, tls_key=None, fudge=300, lease_min=1800, lease_max=7200,
        no_lease="permanent", default_lease=5400, update_max_rrs=300, update_key_rate=0.0,
        update_key_burst=10, llq_lease_min=900, llq_lease_max=7200, llq_max_total=20000,
        llq_max_per_client=256, llq_max_unacked=1000, log_level="info", event_loop="asyncio",
        stun_port=3478, stun_alt_port=0, no_stun=False, public_browse=(), no_push=False,
        push_keepalive_max=3600, push_max_total=100_000, push_max_per_client=20_000,
        push_max_per_session=1024, workers=1,
    )
    o.update(over)
    return o


def test_options_make_the_stun_config() -> None:
    c = _config(_options())
    assert c.stun == StunConfig(True, 3478, 0) and c.stun.ports == (3478,)
    assert c.zone_config().stun_port == 3478
    c = _config(_options(stun_port=5000, stun_alt_port=5001))
    assert c.stun.ports == (5000, 5001) and c.zone_config().stun_port == 5000
    c = _config(_options(no_stun=True))
    assert c.stun.ports == () and c.zone_config().stun_port is None


def test_options_make_the_push_config_and_its_srv() -> None:
    c = _config(_options(tls_port=853, push_keepalive_max=10, push_max_per_session=5))
    assert c.serves_push and c.zone_config().push_port == 853
    assert c.push.keepalive_max_ms == 10_000 and c.push.max_per_session == 5
    assert _config(_options(tls_port=853, no_push=True)).zone_config().push_port is None
    assert _config(_options(tls_port=0)).zone_config().push_port is None  # no DoT, no Push
    with pytest.raises(ValueError, match="at least 10 s"):
        _config(_options(tls_port=853, push_keepalive_max=9))


@pytest.mark.parametrize(("port", "alt", "error"), [
    (0, 0, "--stun-port 0"), (70000, 0, "--stun-port 70000"), (3478, 3478, "must differ"),
    (3478, -1, "--stun-alt-port -1"),
])
def test_bad_stun_ports_are_refused(port: int, alt: int, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        StunConfig(True, port, alt)
    StunConfig(False, port, alt)  # off: the ports do not matter


def test_compose_starts_the_responder_on_the_listen_address(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = ServeConfig(ZoneNames(PARENT), StorageConfig(tmp_path),
                         stun=StunConfig(True, port, 0))
    SqliteStorage(config.storage.db_path).close()
    registry = compose.compose(config, None)
    assert registry.stun is not None
    off = compose.compose(ServeConfig(ZoneNames(PARENT), StorageConfig(tmp_path),
                                      stun=StunConfig(False)), None)
    assert off.stun is None

    async def exchange() -> bytes:
        assert registry.stun is not None
        await registry.stun.start()
        try:
            loop = asyncio.get_running_loop()
            got: asyncio.Future[bytes] = loop.create_future()

            class P(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                    got.set_result(data)

            t, _ = await loop.create_datagram_endpoint(P, local_addr=("127.0.0.1", 0))
            t.sendto(binding_request(b"\x05" * 12), ("127.0.0.1", port))
            try:
                return await within(got, 10)
            finally:
                t.close()
        finally:
            registry.stun.close()

    answer = parse(asyncio.run(exchange()))
    assert answer.xor_mapped is not None and answer.xor_mapped.host == "127.0.0.1"
    assert isinstance(answer.xor_mapped, TransportAddress)
    assert answer.software is not None and answer.software.startswith("btmm ")
    assert registry.stun.responder.stats.answered == 1


def test_public_browse_option_reaches_the_zone_config() -> None:
    assert _config(_options()).zone_config().public_browse == frozenset()
    c = _config(_options(public_browse=("bob", "alice")))
    assert c.zone_config().public_browse == frozenset({"bob", "alice"})
