"""The ``[services]`` table and the DNS-SD UPDATEs a host sends (RFC 6763; issue 16)."""

from __future__ import annotations

import dns.name
import dns.rdatatype
import dns.update
import pytest

from btmm_core.dns.edns import UpdateLeaseOption
from btmm_core.errors import ConfigError
from btmm_core.names.dnssd import (
    ServiceSpec,
    instance_name,
    parse_services,
    publish_update,
    service_rrsets,
    service_type,
    withdraw_update,
)

ZONE = dns.name.from_text("alice.members.example.")


def test_services_table() -> None:
    specs = parse_services({"ssh": 22, "smb": {"port": 445, "txt": {"path": "/srv"}},
                            "syslog": {"port": 514, "proto": "udp"}})
    assert specs == (ServiceSpec("smb", "tcp", 445, (("path", "/srv"),)),
                     ServiceSpec("ssh", "tcp", 22), ServiceSpec("syslog", "udp", 514))
    for bad in ({"ssh": 0}, {"ssh": "22"}, {"_ssh": 22}, {"ssh": {"port": 22, "proto": "sctp"}},
                {"ssh": {"port": 22, "txt": {"a=b": "c"}}}, {"ssh": {"port": 22, "x": 1}},
                {"a-very-long-service-name": 1}, {"ssh": True}):
        with pytest.raises(ConfigError):
            parse_services(bad)


def test_records_of_one_service() -> None:
    text = sorted(r.to_text() for r in service_rrsets(ZONE, "laptop", (ServiceSpec(
        "ssh", "tcp", 22, (("u", "alice"),)),)))
    z = ZONE.to_text()
    assert text == sorted([
        f"_ssh._tcp.{z} 60 IN PTR laptop._ssh._tcp.{z}",
        f"laptop._ssh._tcp.{z} 60 IN SRV 0 0 22 laptop.{z}",
        f'laptop._ssh._tcp.{z} 60 IN TXT "u=alice"',
        f"_services._dns-sd._udp.{z} 60 IN PTR _ssh._tcp.{z}",
        f"b._dns-sd._udp.{z} 60 IN PTR {z}",
        f"lb._dns-sd._udp.{z} 60 IN PTR {z}",
    ])
    # no TXT keys: one empty string (RFC 6763 section 6.1)
    (txt,) = [r for r in service_rrsets(ZONE, "laptop", (ServiceSpec("ssh", "tcp", 22),))
              if r.rdtype == dns.rdatatype.TXT]
    assert txt[0].strings == (b"",)


def _ops(upd: dns.update.UpdateMessage) -> list[str]:
    """Each update RR as "name class type"; class 255 deletes a name or RRset, 254 one RR."""
    return [f"{r.name.relativize(ZONE)} {r.deleting or r.rdclass} {r.rdtype}"
            for r in upd.update]


def test_updates_replace_on_first_publish_and_change_withdraw_removed() -> None:
    ssh, web = ServiceSpec("ssh", "tcp", 22), ServiceSpec("http", "tcp", 80)
    first = publish_update(ZONE, "laptop", (ssh,), None, 3600)
    assert "laptop._ssh._tcp 255 255" in _ops(first)  # delete the name, then add
    assert next(o for o in first.options if isinstance(o, UpdateLeaseOption)).lease == 3600
    refresh = publish_update(ZONE, "laptop", (ssh,), (ssh,), 3600)
    assert not [o for o in _ops(refresh) if " 255 " in o or " 254 " in o]  # adds only
    moved = publish_update(ZONE, "laptop", (ServiceSpec("ssh", "tcp", 2222),), (ssh,), 3600)
    assert "laptop._ssh._tcp 255 255" in _ops(moved)
    swapped = publish_update(ZONE, "laptop", (web,), (ssh, web), 3600)
    assert "laptop._ssh._tcp 255 255" in _ops(swapped) and "_ssh._tcp 254 12" in _ops(swapped)
    gone = withdraw_update(ZONE, "laptop", (ssh,))
    assert sorted(_ops(gone)) == ["_ssh._tcp 254 12", "laptop._ssh._tcp 255 255"]


def test_type_and_instance_names() -> None:
    assert service_type("ssh", ZONE).to_text() == "_ssh._tcp." + ZONE.to_text()
    assert service_type("_syslog._udp", ZONE).to_text() == "_syslog._udp." + ZONE.to_text()
    assert instance_name("laptop._ssh._tcp", ZONE).to_text() == (
        "laptop._ssh._tcp." + ZONE.to_text())
    with pytest.raises(ConfigError):
        instance_name("laptop", ZONE)
    with pytest.raises(ConfigError):
        instance_name("laptop._ssh._tcp.example.com.", ZONE)
