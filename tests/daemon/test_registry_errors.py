"""The daemon's registry client against a live ``btmm serve`` on loopback: a publish works and
the common failures become clear errors (BADSIG, BADKEY, BADTIME, nobody answering)."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import dns.message
import dns.name
import dns.query
import dns.rdatatype
import pytest
from live_registry import free_port, live_registry

from btmm_core.daemon.dnsclient import RegistryClient
from btmm_core.daemon.identity import HostIdentity
from btmm_core.daemon.records import Publication, granted_lease, publish_update
from btmm_core.dns.keyfile import read_key
from btmm_core.dns.tsig import TsigKey
from btmm_core.errors import ClockSkew, CredentialsRejected, RegistryUnreachable

ROOT = Path(__file__).resolve().parents[2]
ZONE = dns.name.from_text("bob.members.example.")
ULA = ipaddress.IPv6Address("fd00:1:2:3:4:5:6:7")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    with live_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg.port, reg.account


def _pub() -> Publication:
    return Publication("laptop", ULA, HostIdentity(ULA).autotunnel_label(), "K" * 43 + "=",
                       ipaddress.IPv4Address("203.0.113.3"), 4500)


def _publish(port: int, key: TsigKey) -> dns.message.Message:
    client = RegistryClient(("127.0.0.1", port), key, timeout=1.0, tries=2)
    return asyncio.run(client.exchange(publish_update(ZONE, _pub(), None, 2000)))


def test_publish_is_granted_a_lease_and_readable(registry: tuple[int, Path]) -> None:
    port, creds = registry
    key = read_key(creds)
    resp = _publish(port, key)
    assert granted_lease(resp) == 2000
    client = RegistryClient(("127.0.0.1", port), key)
    got = asyncio.run(client.query(dns.name.from_text("laptop", origin=ZONE),
                                   dns.rdatatype.AAAA))
    assert got is not None and got[0].address == str(ULA)


def test_wrong_secret_is_badsig(registry: tuple[int, Path]) -> None:
    port, creds = registry
    key = read_key(creds)
    wrong = TsigKey(key.name, key.algorithm, bytes(32), key.zone)
    with pytest.raises(CredentialsRejected, match="BADSIG"):
        _publish(port, wrong)


def test_unknown_key_is_badkey(registry: tuple[int, Path]) -> None:
    port, creds = registry
    key = read_key(creds)
    stranger = TsigKey(dns.name.from_text("mallory.members.example."), key.algorithm,
                       base64.b64decode("c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"), key.zone)
    with pytest.raises(CredentialsRejected, match="BADKEY"):
        _publish(port, stranger)


def test_clock_skew_is_badtime(registry: tuple[int, Path]) -> None:
    port, creds = registry
    key = read_key(creds)
    skewed = time.time() - 3600  # an hour behind: far outside the 300 s fudge
    with mock.patch("dns.message.time.time", return_value=skewed), \
            pytest.raises(ClockSkew, match="BADTIME"):
        _publish(port, key)


def test_nobody_listening_is_unreachable(registry: tuple[int, Path]) -> None:
    _, creds = registry
    with pytest.raises(RegistryUnreachable, match="no answer"):
        _publish(free_port(), read_key(creds))
