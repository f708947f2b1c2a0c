"""Names the registry publishes itself (issue 11 item 7): no CNAME at a zone apex or at a
server-made name, no user whose zone would hide the registry's own name server."""

from __future__ import annotations

import subprocess
import sys
import time

import dns.name
import dns.rcode
import dns.rdatatype
import dns.update
import pytest
from registry_helpers import NS, PARENT, LiveRegistry, ask, free_port, make_core, sign, state_dir

from btmm_core.errors import ConfigError
from btmm_core.registry.accounts import check_user, check_user_free, new_key
from btmm_core.registry.model import Account
from btmm_core.registry.storage import SqliteStorage

NOW = 1_800_000_000.0
BOB = "bob.members.example."


@pytest.mark.parametrize("owner", [BOB, "_dns-update._udp", "_dns-llq._udp"])
def test_cname_at_the_apex_or_a_server_made_name_is_refused(owner: str) -> None:
    core, acc = make_core()
    zone = core.store.zones[dns.name.from_text(BOB)]
    before = (zone.serial, dict(zone.rrsets))
    u = dns.update.UpdateMessage(BOB)
    u.add(owner, 300, "CNAME", "elsewhere.example.")
    r = ask(core, sign(u, acc["bob"].key, int(NOW)), NOW)
    assert r.rcode() == dns.rcode.REFUSED
    assert (zone.serial, dict(zone.rrsets)) == before
    # the server's own records still answer
    name = dns.name.from_text(owner, origin=zone.name)
    rdtype = dns.rdatatype.NS if name == zone.name else dns.rdatatype.SRV
    q = dns.message.make_query(name, rdtype)
    r = ask(core, q.to_wire(), NOW + 1)
    assert [rs.rdtype for rs in r.answer] == [rdtype]


def test_cname_elsewhere_is_accepted_and_never_shares_a_name() -> None:
    core, acc = make_core()
    key = acc["bob"].key
    u = dns.update.UpdateMessage(BOB)
    u.add("laptop", 300, "AAAA", "fd00::1")
    u.add("www", 300, "CNAME", "laptop")
    assert ask(core, sign(u, key, int(NOW)), NOW).rcode() == dns.rcode.NOERROR
    # RFC 2136 3.4.2.2: a CNAME next to other data and other data next to a CNAME are ignored
    u = dns.update.UpdateMessage(BOB)
    u.add("laptop", 300, "CNAME", "other")
    u.add("www", 300, "TXT", '"x"')
    assert ask(core, sign(u, key, int(NOW) + 1), NOW + 1).rcode() == dns.rcode.NOERROR
    zone = core.store.zones[dns.name.from_text(BOB)]
    assert zone.stored_types(dns.name.from_text("laptop", origin=zone.name)) == {dns.rdatatype.AAAA}
    assert zone.stored_types(dns.name.from_text("www", origin=zone.name)) == {dns.rdatatype.CNAME}


def test_user_names_that_hide_the_registrys_name_server_are_refused() -> None:
    with pytest.raises(ConfigError, match="reserved"):
        check_user("ns")
    with pytest.raises(ConfigError, match="reserved"):
        new_key("ns", PARENT)
    check_user_free("bob", PARENT, NS)
    custom = dns.name.from_text("dns1.members.example.")
    with pytest.raises(ConfigError, match="hides the registry's name server"):
        check_user_free("dns1", PARENT, custom)
    deep = dns.name.from_text("a.infra.members.example.")
    with pytest.raises(ConfigError):
        check_user_free("infra", PARENT, deep)
    check_user_free("dns1", PARENT, dns.name.from_text("ns.elsewhere.example."))


def test_btmm_serve_user_add_refuses_ns_and_the_ns_name() -> None:
    with state_dir() as base:
        reg = LiveRegistry(base, 0, 0, ())
        r = reg.cli("user", "add", "ns")
        assert r.returncode != 0 and "hides the registry's name server" in r.stderr
        r = reg.cli("--ns-name", "dns1.members.example.", "user", "add", "dns1")
        assert r.returncode != 0 and "hides the registry's name server" in r.stderr
        assert reg.cli("user", "list").stdout == ""


def test_btmm_serve_refuses_to_start_with_a_user_that_hides_its_name_server() -> None:
    with state_dir() as base:
        # an account made before the name was reserved
        storage = SqliteStorage(base / "registry.sqlite")
        storage.ensure_zone(PARENT, None)
        zone = dns.name.from_text("ns", origin=PARENT)
        bob = new_key("bob", PARENT)
        storage.add_account(
            Account("ns", zone, type(bob)(zone, bob.algorithm, bob.secret, zone), time.time())
        )
        storage.close()
        reg = LiveRegistry(base, free_port(), 0, ())
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "btmm_core",
                "serve",
                "--port",
                str(reg.port),
                "--tls-port",
                "0",
            ],
            env=reg.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert r.returncode != 0
        assert "hides the registry's name server ns.members.example." in r.stderr
        assert "btmm serve user remove ns" in r.stderr
