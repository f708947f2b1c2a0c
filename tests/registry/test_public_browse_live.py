"""``btmm serve --public-browse bob`` against standard unsigned clients (issue 16): dig and kdig
browse bob's services without a key, alice's zone stays closed, and any name inside a zone
answers an unsigned SOA query with the apex SOA."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from registry_helpers import LiveRegistry, live_registry, state_dir

BOB = "bob.members.example."
ALICE = "alice.members.example."


@pytest.fixture(scope="module")
def reg() -> Iterator[LiveRegistry]:
    with state_dir() as state, live_registry(state, "--public-browse", "bob",
                                             users=(("bob", False), ("alice", False))) as r:
        yield r


def run(cmd: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60,
                          check=False)


def publish(reg: LiveRegistry, zone: str, user: str) -> None:
    lines = [f"server 127.0.0.1 {reg.port}", f"zone {zone}",
             f"update add _ssh._tcp.{zone} 60 PTR laptop._ssh._tcp.{zone}",
             f"update add laptop._ssh._tcp.{zone} 60 SRV 0 0 22 laptop.{zone}",
             f'update add laptop._ssh._tcp.{zone} 60 TXT "u={user}"',
             f"update add b._dns-sd._udp.{zone} 60 PTR {zone}",
             f"update add laptop.{zone} 60 AAAA fd00::1", "send", ""]
    r = run(["nsupdate", "-t", "5", "-k", str(reg.keyfile(user))], "\n".join(lines))
    assert r.returncode == 0, r.stderr


def test_unsigned_dig_and_kdig_browse_an_opted_in_zone_only(reg: LiveRegistry) -> None:
    publish(reg, BOB, "bob")
    publish(reg, ALICE, "alice")
    port = str(reg.port)
    tools = (["dig", "@127.0.0.1", "-p", port, "+tries=1", "+time=3"],
             ["kdig", "@127.0.0.1", "-p", port, "+retry=0", "+timeout=3"])
    for tool in tools:
        def ask(name: str, rdtype: str, tool: list[str] = tool) -> str:
            return run([*tool, "+norec", "+short", name, rdtype]).stdout

        assert ask(f"b._dns-sd._udp.{BOB}", "PTR").split() == [BOB]
        assert ask(f"_ssh._tcp.{BOB}", "PTR").split() == [f"laptop._ssh._tcp.{BOB}"]
        assert ask(f"laptop._ssh._tcp.{BOB}", "SRV").split() == ["0", "0", "22", f"laptop.{BOB}"]
        assert ask(f"laptop._ssh._tcp.{BOB}", "TXT").strip() == '"u=bob"'
        assert ask(f"laptop.{BOB}", "AAAA") == ""  # the address stays behind the key
        assert ask(f"_ssh._tcp.{ALICE}", "PTR") == ""  # alice did not opt in
    full = run(["dig", "@127.0.0.1", "-p", port, "+norec", f"laptop.{BOB}", "AAAA"]).stdout
    assert "status: REFUSED" in full
    closed = run(["dig", "@127.0.0.1", "-p", port, "+norec", f"_ssh._tcp.{ALICE}", "PTR"]).stdout
    assert "status: REFUSED" in closed


@pytest.mark.parametrize("name", [f"laptop.{ALICE}", f"no.such.name.{ALICE}"])
def test_unsigned_soa_below_a_zone_apex_names_the_zone(reg: LiveRegistry, name: str) -> None:
    out = run(["dig", "@127.0.0.1", "-p", str(reg.port), "+norec", name, "SOA"]).stdout
    assert "status: NOERROR" in out and "ANSWER: 0" in out
    assert f"{ALICE}\t" in out.split("AUTHORITY SECTION:")[1]
