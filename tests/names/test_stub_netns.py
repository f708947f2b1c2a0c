"""The stub resolver in the lab (issue 16): ordinary programs in a host namespace (dig,
``getent ahosts``, ping, a TCP client) resolve peers through ``btmm up``'s stub, whose
/etc/netns/<ns>/resolv.conf names it; no hosts block is written, so nothing else could answer.
A counting fake upstream in the namespace answers names outside the zone and shows that no
query for the zone (or its ULA reverse names) ever reaches it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from btmm_core.lab.netns import Lab, Netns
from btmm_core.lab.world import USER, build_world

pytestmark = pytest.mark.netns

STUB = "127.0.0.153"
UPSTREAM = "127.0.0.2"
ZONE = f"{USER}.members.example"

# A resolver that answers every A question with 192.0.2.99 and logs each question name.
FAKE_UPSTREAM = r"""
import socket, sys
import dns.message, dns.rrset
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
log = open(sys.argv[2], "a", buffering=1)
print("ready", flush=True)
for _ in range(10000):  # bounded
    data, addr = s.recvfrom(4096)
    q = dns.message.from_wire(data)
    log.write(q.question[0].name.to_text() + "\n")
    r = dns.message.make_response(q)
    if q.question[0].rdtype == 1:
        r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "192.0.2.99"))
    s.sendto(r.to_wire(), addr)
"""

TCP_SERVER = r"""
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 7016)); s.listen(4)
print("ready", flush=True)
for _ in range(4):
    c, _ = s.accept(); c.sendall(b"hello from desktop"); c.close()
"""

TCP_CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], 7016), timeout=5)
print(c.recv(100).decode())
"""


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab("btmmn") as lab:
        yield lab


def _getent(ns: Netns, name: str) -> list[str]:
    out = ns.run(["getent", "ahosts", name], check=False).stdout
    return sorted({line.split()[0] for line in out.splitlines() if line.strip()})


def _ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"


def test_programs_resolve_peers_through_the_stub_and_nothing_private_leaves(
    lab: Lab, tmp_path: Path
) -> None:
    extra = {"hosts_file": "", "upstream": f"{UPSTREAM}:53"}
    world = build_world(lab, nat=False, dataplanes=("python", "python"), host_extra=extra)
    laptop, desktop = world.hosts["laptop"].ns, world.hosts["desktop"].ns
    laptop.run(["ip", "addr", "add", f"{UPSTREAM}/8", "dev", "lo"], check=False)
    asked = tmp_path / "upstream.log"
    asked.touch()
    upstream = laptop.popen([sys.executable, "-c", FAKE_UPSTREAM, UPSTREAM, str(asked)],
                            stdout=subprocess.PIPE, text=True)
    _ready(upstream)
    server = desktop.popen([sys.executable, "-c", TCP_SERVER], stdout=subprocess.PIPE, text=True)
    _ready(server)
    for h in world.hosts.values():
        world.start_host(h)
    world.wait_tunnels(30)
    fqdn = f"desktop.{ZONE}"
    ula = (world.hosts["desktop"].status() or {})["host"]["ula"]
    world.wait_until(lambda: _getent(laptop, fqdn) == [ula], 5, "getent through the stub")

    dig = laptop.run(["dig", f"@{STUB}", "+short", fqdn, "AAAA"]).stdout.split()
    assert dig == [ula]
    # the reverse name of a peer's ULA is answered too, as ping prints it
    ptr = laptop.run(["dig", f"@{STUB}", "+short", "-x", ula]).stdout.split()
    assert ptr == [fqdn + "."]
    assert "1 received" in laptop.run(["ping", "-6", "-c", "1", "-W", "5", fqdn]).stdout
    got = laptop.run([sys.executable, "-c", TCP_CLIENT, fqdn]).stdout.strip()
    assert got == "hello from desktop"
    # a name of the zone the daemon does not know: NXDOMAIN from the stub, asked of nobody
    nx = laptop.run(["dig", f"@{STUB}", f"nohost.{ZONE}", "AAAA"]).stdout
    assert "status: NXDOMAIN" in nx
    tcp = laptop.run(["dig", "+tcp", f"@{STUB}", "+short", fqdn, "AAAA"]).stdout.split()
    assert tcp == [ula]
    # names outside the zone go to the upstream, and only they
    assert _getent(laptop, "outside.example") == ["192.0.2.99"]
    assert _getent(laptop, f"desktop.{ZONE}.evil.example") == ["192.0.2.99"]
    lines = asked.read_text().splitlines()
    assert "outside.example." in lines
    private = [n for n in lines if n.rstrip(".").endswith((ZONE, "d.f.ip6.arpa"))]
    assert private == [], f"private names reached the upstream: {private}"
    # malformed and oversized queries: FORMERR, and the stub keeps answering
    probe = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\n"
        # a header claiming one question, then one byte of a name: FORMERR
        f"s.sendto(bytes.fromhex('123401000001000000000000ff'), ('{STUB}', 53))\n"
        "print(s.recv(512)[3] & 15)\n"
        f"s.sendto(b'\\xab\\xcd' + b'\\x01' * 3000, ('{STUB}', 53))\n"
        "print(s.recv(512)[3] & 15)\n"
    )
    assert laptop.run([sys.executable, "-c", probe]).stdout.split() == ["1", "1"]
    assert laptop.run(["dig", f"@{STUB}", "+short", fqdn, "AAAA"]).stdout.split() == [ula]
    status = world.status_text(world.hosts["laptop"])
    assert f"names     stub {STUB}:53 via resolv.conf" in status

    # the peer leaves (clean shutdown withdraws its records), then comes back
    world.stop_host(world.hosts["desktop"])
    gone = world.wait_until(lambda: _getent(laptop, fqdn) == [], 2, "peer gone for getent",
                            interval=0.05)
    world.start_host(world.hosts["desktop"])
    world.wait_until(lambda: (world.hosts["desktop"].status() or {}).get("host", {}).get("lease")
                     is not None, 20, "desktop published")
    back = world.wait_until(lambda: _getent(laptop, fqdn) == [ula], 2, "peer back for getent",
                            interval=0.05)
    print(f"getent: peer gone after {gone:.2f} s, back {back:.2f} s after its publication")
    for p in (upstream, server):
        p.kill()
