"""Wide-area DNS-SD in the lab (issue 16): the desktop's ``[services]`` published with a lease,
seen by ``btmm browse`` / ``btmm resolve`` on the laptop and by dig at the registry; a watch
follows withdrawal (clean stop), a change (another port after a restart) and lease expiry
(the host killed)."""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from btmm_core.lab.netns import Lab, LabError
from btmm_core.lab.world import REGISTRY, USER, World, build_world

pytestmark = pytest.mark.netns

ZONE = f"{USER}.members.example"
LEASE = 10


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab("btmms") as lab:
        yield lab


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    q: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            q.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return q


def _expect(q: queue.Queue[str], want: str, timeout: float, world: World) -> float:
    t0 = time.monotonic()
    seen = []
    while (left := timeout - (time.monotonic() - t0)) > 0:
        try:
            line = q.get(timeout=left)
        except queue.Empty:
            break
        seen.append(line)
        if line == want:
            return time.monotonic() - t0
    raise AssertionError(f"{want!r} not within {timeout} s; saw {seen}\n{world.tails()}")


def _services(world: World, port: int) -> None:
    world.publish_services(world.hosts["desktop"], {"ssh": (port, {"u": "alice"})})


def _dig(world: World, name: str, rdtype: str) -> list[str]:
    creds = world.workdir / "registry" / "credentials" / f"{USER}.key"
    out = world.inet.run(["dig", f"@{REGISTRY}", "-k", str(creds), "+short", "+norecurse",
                          name, rdtype]).stdout
    return sorted(line for line in out.splitlines() if line)


def test_services_published_changed_withdrawn_and_expired(lab: Lab) -> None:
    world = build_world(lab, nat=False, lease=LEASE, lease_min=LEASE, lease_max=60)
    _services(world, 22)
    laptop = world.hosts["laptop"]
    for h in world.hosts.values():
        world.start_host(h)
    world.wait_tunnels(30)

    def cli(command: str, *args: str) -> list[str]:
        return world.btmm(command, "--config", str(laptop.config), *args)

    line22 = f"desktop._ssh._tcp  desktop.{ZONE}:22  u=alice"
    deadline = time.monotonic() + 10
    while True:
        out = laptop.ns.run(cli("browse", "ssh"), check=False).stdout
        if out.strip() == line22 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert out.strip() == line22, out + world.tails()
    # every type the zone lists
    assert laptop.ns.run(cli("browse")).stdout.strip() == line22
    res = laptop.ns.run(cli("resolve", "desktop._ssh._tcp")).stdout
    ula = (world.hosts["desktop"].status() or {})["host"]["ula"]
    assert "port  22" in res and f"addr  {ula}" in res and "txt   u=alice" in res, res
    # a standard client: dig at the registry (signed with the account key)
    assert _dig(world, f"_ssh._tcp.{ZONE}", "PTR") == [f"desktop._ssh._tcp.{ZONE}."]
    assert _dig(world, f"desktop._ssh._tcp.{ZONE}", "SRV") == [f"0 0 22 desktop.{ZONE}."]
    assert _dig(world, f"desktop._ssh._tcp.{ZONE}", "TXT") == ['"u=alice"']
    assert _dig(world, f"b._dns-sd._udp.{ZONE}", "PTR") == [f"{ZONE}."]
    assert _dig(world, f"_services._dns-sd._udp.{ZONE}", "PTR") == [f"_ssh._tcp.{ZONE}."]
    # any DNS client on the laptop browses through the stub (asked of the registry, signed)
    via_stub = laptop.ns.run(["dig", "@127.0.0.153", "+short", f"_ssh._tcp.{ZONE}", "PTR"])
    assert via_stub.stdout.split() == [f"desktop._ssh._tcp.{ZONE}."]
    via_stub = laptop.ns.run(["dig", "+short", f"desktop._ssh._tcp.{ZONE}", "SRV"])
    assert via_stub.stdout.split() == ["0", "0", "22", f"desktop.{ZONE}."]
    # TTL no longer than the lease
    ttl = world.inet.run(["dig", f"@{REGISTRY}", "-k", str(world.account_key), "+noall",
                          "+answer", f"desktop._ssh._tcp.{ZONE}", "SRV"]).stdout.split()[1]
    assert int(ttl) <= LEASE

    watch = laptop.ns.popen(cli("browse", "ssh", "--watch", "--timeout", "50"),
                            stdout=subprocess.PIPE, text=True)
    lines = _lines(watch)
    _expect(lines, "+ " + line22, 10, world)
    world.stop_host(world.hosts["desktop"])  # clean: withdrawn
    _expect(lines, "- desktop._ssh._tcp", 5, world)
    _services(world, 2222)
    world.start_host(world.hosts["desktop"])
    _expect(lines, f"+ desktop._ssh._tcp  desktop.{ZONE}:2222  u=alice", 15, world)
    world.stop_host(world.hosts["desktop"], kill=True)  # dies: its lease runs out
    took = _expect(lines, "- desktop._ssh._tcp", LEASE + 8, world)
    print(f"expired {took:.1f} s after the kill (lease {LEASE} s)")
    watch.kill()
    watch.wait()


# A private system bus for avahi-daemon and avahi-browse: the machine's own bus (if any) is
# never touched, and anyone on this bus may own and call anything (it lives in a temporary
# directory for one test).
BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

# Wide-area browsing only (RFC 6763 over unicast DNS): avahi asks the resolv.conf servers (the
# daemon's stub in a lab namespace) and publishes nothing itself.
AVAHI_CONFIG = """[server]
use-ipv4=yes
use-ipv6=yes
enable-dbus=yes
browse-domains={zone}
[wide-area]
enable-wide-area=yes
[publish]
disable-publishing=yes
[reflector]
enable-reflector=no
"""


def test_avahi_browses_the_zone_through_the_stub(lab: Lab) -> None:
    """avahi's wide-area browsing (a standard DNS-SD client) on the laptop finds the desktop's
    service through the laptop's stub resolver, which asks the registry with a signed query:
    the name, the port, the TXT and the desktop's ULA."""
    world = build_world(lab, nat=False)
    _services(world, 22)
    laptop = world.hosts["laptop"]
    for h in world.hosts.values():
        world.start_host(h)
    world.wait_tunnels(30)
    ula = (world.hosts["desktop"].status() or {})["host"]["ula"]

    work = world.workdir / "avahi"
    work.mkdir()
    socket = work / "system_bus_socket"
    (work / "bus.conf").write_text(BUS_CONFIG.format(socket=socket))
    (work / "avahi-daemon.conf").write_text(AVAHI_CONFIG.format(zone=ZONE))
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={socket}"}
    out = open(work / "out.log", "w")  # noqa: SIM115 (owned by the processes)
    laptop.ns.popen(["dbus-daemon", "--nofork", "--nopidfile", "--config-file",
                     str(work / "bus.conf")], stdout=out, stderr=out, env=env)
    world.wait_until(socket.exists, 10, "the private D-Bus socket")
    # avahi-daemon writes its pid under /run/avahi-daemon: a private /run (its own mount
    # namespace) keeps it off the machine's
    laptop.ns.popen(["unshare", "--mount", "sh", "-c",
                     "mount -t tmpfs tmpfs /run && exec avahi-daemon --no-chroot "
                     f"--no-drop-root --no-rlimits -f {work / 'avahi-daemon.conf'}"],
                    stdout=out, stderr=out, env=env)
    want = ["desktop", "_ssh._tcp", ZONE, f"desktop.{ZONE}", ula, "22", '"u=alice"']
    found: list[str] = []

    def browsed() -> bool:
        proc = subprocess.run(
            laptop.ns.argv(["avahi-browse", "--parsable", "--resolve", "--terminate",
                            "--no-db-lookup", "--domain", ZONE, "_ssh._tcp"]),
            capture_output=True, text=True, timeout=30, check=False, env=env)
        found[:] = proc.stdout.splitlines()
        # '=;iface;proto;name;type;domain;host;address;port;txt' for a resolved service
        return any(line.startswith("=;") and line.split(";")[3:] == want for line in found)

    try:
        world.wait_until(browsed, 30, "avahi-browse resolving desktop._ssh._tcp")
    except LabError as err:
        out.flush()
        raise AssertionError(f"{err}\navahi-browse: {found}\nbus and avahi-daemon:\n"
                             f"{(work / 'out.log').read_text()[-3000:]}") from None
    finally:
        out.close()
    print("avahi-browse:", next(line for line in found if line.startswith("=;")))
