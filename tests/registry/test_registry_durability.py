"""Durability of ``btmm serve``: lease deadlines survive restarts, and under SIGKILL every update
that was answered NOERROR is still there afterwards while the SOA serial never goes back."""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.update
import pytest
from registry_helpers import LiveRegistry, dnskey, live_registry, state_dir
from test_registry_live import account, dig_short

from btmm_core.dns.edns import UpdateLeaseOption

BOB = "bob.members.example."


@pytest.fixture(params=("sqlite", "postgresql"))
def database(request: pytest.FixtureRequest) -> str | None:
    """Each backend in turn: None is SQLite in the state directory."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("pg").create_database())


def _serial(reg: LiveRegistry, zone: str) -> int:
    q = dns.message.make_query(zone, "SOA")
    r = dns.query.udp(q, "127.0.0.1", port=reg.port, timeout=3)
    return int(r.answer[0][0].serial)


def _update(reg: LiveRegistry, user: str, name: str, lease: int | None) -> int:
    u = dns.update.UpdateMessage(f"{user}.members.example.")
    u.add(name, 60, "AAAA", "fd00::9")
    if lease is not None:
        u.use_edns(0, 0, 1232, options=[UpdateLeaseOption(lease)])
    u.use_tsig(dnskey(account(reg, user)))
    return int(dns.query.tcp(u, "127.0.0.1", port=reg.port, timeout=5).rcode())


def test_lease_deadlines_survive_restart_and_sigkill(database: str | None) -> None:
    with (
        state_dir() as state,
        live_registry(
            state,
            "--lease-min",
            "1",
            "--lease-max",
            "60",
            "--tls-port",
            "0",
            users=(("bob", False),),
            database=database,
        ) as reg,
    ):
        assert _update(reg, "bob", "forever", None) == dns.rcode.NOERROR
        assert _update(reg, "bob", "brief", 4) == dns.rcode.NOERROR
        assert _update(reg, "bob", "longer", 60) == dns.rcode.NOERROR
        serial = _serial(reg, BOB)
        reg.stop(signal.SIGKILL)
        time.sleep(5)  # "brief" runs out while the server is down
        reg.start()
        t0 = time.monotonic()
        gone = False
        # the first timer pass after start removes it; awaited with room for a busy machine
        while time.monotonic() - t0 < 15:
            if dig_short(reg, "bob", f"brief.{BOB}", "AAAA") == []:
                gone = True
                break
            time.sleep(0.2)
        assert gone, "a lease that ran out while the server was down was not honoured at start"
        assert dig_short(reg, "bob", f"forever.{BOB}", "AAAA") == ["fd00::9"]
        assert dig_short(reg, "bob", f"longer.{BOB}", "AAAA") == ["fd00::9"]
        assert _serial(reg, BOB) == serial + 1  # the expiry bumped it once
        # A clean restart keeps everything too.
        assert reg.stop(signal.SIGTERM) == 0
        reg.start()
        assert dig_short(reg, "bob", f"longer.{BOB}", "AAAA") == ["fd00::9"]
        assert "registry stopped" in reg.log()


def test_sigkill_loses_no_acknowledged_update_and_serial_never_goes_back(
    database: str | None,
) -> None:
    users = [f"u{i}" for i in range(4)]
    with (
        state_dir() as state,
        live_registry(
            state,
            "--tls-port",
            "0",
            "--log-level",
            "warning",
            users=tuple((u, False) for u in users),
            database=database,
        ) as reg,
    ):
        acked: dict[str, list[str]] = {u: [] for u in users}
        stop = threading.Event()
        errors: list[BaseException] = []

        def client(user: str) -> None:
            try:
                i = 0
                while not stop.is_set() and i < 5000:
                    name = f"r{i}"
                    i += 1
                    with contextlib.suppress(OSError, dns.exception.DNSException, EOFError):
                        if _update(reg, user, name, None) == dns.rcode.NOERROR:
                            acked[user].append(name)
                            continue
                    time.sleep(0.05)  # server down or refused: back off a little
            except BaseException as e:  # surfaced by the main thread
                errors.append(e)

        threads = [threading.Thread(target=client, args=(u,)) for u in users]
        for t in threads:
            t.start()
        kills = 0
        floor = {u: 0 for u in users}
        try:
            rng = random.Random(8945)
            for _ in range(4):
                time.sleep(rng.uniform(0.5, 1.5))
                for u in users:
                    floor[u] = max(floor[u], _serial(reg, f"{u}.members.example."))
                reg.stop(signal.SIGKILL)
                kills += 1
                time.sleep(0.2)
                reg.start()
                for u in users:
                    now = _serial(reg, f"{u}.members.example.")
                    assert now >= floor[u], f"serial of {u} went back from {floor[u]} to {now}"
                    floor[u] = now
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        assert not errors, errors
        assert kills == 4
        total = sum(len(v) for v in acked.values())
        print(f"acknowledged updates: {total} across {kills} SIGKILLs")
        assert total > 20, f"only {total} updates were acknowledged; the test proved little"
        for u in users:
            key = dnskey(account(reg, u))
            for name in acked[u]:
                q = dns.message.make_query(f"{name}.{u}.members.example.", "AAAA")
                q.use_tsig(key)
                r = dns.query.udp(q, "127.0.0.1", port=reg.port, timeout=3)
                assert r.rcode() == dns.rcode.NOERROR and r.answer, f"lost {name}.{u}"
            assert _serial(reg, f"{u}.members.example.") >= floor[u]
