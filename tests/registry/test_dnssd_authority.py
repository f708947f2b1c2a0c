"""Device keys publishing wide-area DNS-SD (issue 16): a device may publish and withdraw its
own service instances and their PTRs, add the shared browse records, and nothing of another
device's. The UPDATEs are the daemon's own (``names/dnssd.py``)."""

from __future__ import annotations

import time

import dns.message
import dns.name
import dns.rcode
import dns.update
from registry_helpers import ask, make_core, sign
from test_devices import BOB, enrol

from btmm_core.dns.tsig import TsigKey
from btmm_core.names.dnssd import ServiceSpec, publish_update, withdraw_update
from btmm_core.registry.handler import RegistryCore

SSH = ServiceSpec("ssh", "tcp", 22, (("u", "bob"),))


def _setup() -> tuple[RegistryCore, TsigKey, TsigKey, float]:
    core, acc = make_core()
    now = time.time()
    laptop, *_ = enrol(core, acc["bob"].key, "laptop", now)
    desktop, *_ = enrol(core, acc["bob"].key, "desktop", now + 1)
    assert laptop is not None and desktop is not None
    return core, laptop, desktop, now + 2


def _send(core: RegistryCore, msg: dns.message.Message, key: TsigKey, now: float) -> int:
    return ask(core, sign(msg, key, int(now)), now).rcode()


def _names(core: RegistryCore) -> set[str]:
    return {n.relativize(BOB).to_text() + " " + str(t) for (n, t) in core.store.zones[BOB].rrsets}


def test_two_devices_publish_their_services_and_withdraw_only_their_own() -> None:
    core, laptop, desktop, now = _setup()
    assert _send(core, publish_update(BOB, "laptop", (SSH,), None, 3600), laptop, now) == 0
    assert _send(core, publish_update(BOB, "desktop", (SSH,), None, 3600), desktop, now + 1) == 0
    zone = core.store.zones[BOB]
    ptrs = zone.get(dns.name.from_text("_ssh._tcp", origin=BOB), 12)
    assert sorted(rd.target.to_text() for rd, _ in ptrs) == [  # type: ignore[attr-defined]
        "desktop._ssh._tcp." + BOB.to_text(), "laptop._ssh._tcp." + BOB.to_text()]
    assert {"b._dns-sd._udp 12", "lb._dns-sd._udp 12", "_services._dns-sd._udp 12",
            "laptop._ssh._tcp 33", "laptop._ssh._tcp 16"} <= _names(core)
    assert _send(core, withdraw_update(BOB, "laptop", (SSH,)), laptop, now + 2) == 0
    ptrs = zone.get(dns.name.from_text("_ssh._tcp", origin=BOB), 12)
    assert [rd.target.to_text() for rd, _ in ptrs] == [  # type: ignore[attr-defined]
        "desktop._ssh._tcp." + BOB.to_text()]
    assert "laptop._ssh._tcp 33" not in _names(core)
    assert "b._dns-sd._udp 12" in _names(core)  # shared: left to its lease


def _upd(*adds: tuple[str, str, str]) -> dns.update.UpdateMessage:
    u = dns.update.UpdateMessage(BOB)
    for name, rdtype, data in adds:
        u.add(name, 60, rdtype, data)
    return u


def test_a_device_cannot_touch_another_devices_service_records() -> None:
    core, laptop, desktop, now = _setup()
    assert _send(core, publish_update(BOB, "desktop", (SSH,), None, 3600), desktop, now) == 0
    inst = "desktop._ssh._tcp." + BOB.to_text()
    bad = [
        _upd(("desktop._ssh._tcp", "SRV", "0 0 2222 laptop." + BOB.to_text())),
        _upd(("_ssh._tcp", "PTR", inst)),
        _upd(("_ssh._tcp", "PTR", "evil._ssh._tcp." + BOB.to_text())),
        _upd(("_ssh._tcp", "TXT", '"x=1"')),
        _upd(("b._dns-sd._udp", "PTR", "example.com.")),
        _upd(("_services._dns-sd._udp", "PTR", "github.com.")),
        _upd(("_autotunnel._tcp", "PTR", "laptop._autotunnel._tcp." + BOB.to_text())),
    ]
    delete_ptr = dns.update.UpdateMessage(BOB)
    delete_ptr.delete("_ssh._tcp", "PTR", inst)
    delete_shared = dns.update.UpdateMessage(BOB)
    delete_shared.delete("b._dns-sd._udp")
    delete_type = dns.update.UpdateMessage(BOB)
    delete_type.delete("_ssh._tcp")
    for i, msg in enumerate([*bad, delete_ptr, delete_shared, delete_type]):
        assert _send(core, msg, laptop, now + 1 + i) == dns.rcode.REFUSED, msg
    assert _send(core, _upd(("laptop._ssh._tcp", "SRV", "0 0 22 laptop." + BOB.to_text()),
                            ("_ssh._tcp", "PTR", "laptop._ssh._tcp." + BOB.to_text())),
                 laptop, now + 20) == 0
