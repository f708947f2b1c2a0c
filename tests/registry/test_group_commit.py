"""Group commit (issue 17): updates that arrive together are planned in order on the zones in
memory, written in one transaction, and each is answered only after that transaction
committed. Sans-I/O, with a fake clock; commits are counted by the storage, not timed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.update
import pytest
from registry_helpers import make_core, parse, sign

from btmm_core.aio import within
from btmm_core.dns.edns import UpdateLeaseOption
from btmm_core.registry.handler import Transport
from btmm_core.registry.model import RRsetChange
from btmm_core.registry.server import Listen, RegistryServer
from btmm_core.registry.storage import MemoryStorage, SqliteStorage

NOW = 1_800_000_000.0
BOB = "bob.members.example."


def _add(name: str, address: str, *, absent: bool = False) -> dns.update.UpdateMessage:
    u = dns.update.UpdateMessage(BOB)
    if absent:
        u.absent(name)
    u.add(name, 60, "AAAA", address)
    u.use_edns(0, 0, 1232, options=[UpdateLeaseOption(3600)])
    return u


def _grouped(storage: MemoryStorage | SqliteStorage | None = None):  # type: ignore[no-untyped-def]
    core, acc = make_core(storage or MemoryStorage())
    core.group_commit = True
    return core, acc


def test_answers_wait_for_the_commit_and_updates_see_the_ones_before_them() -> None:
    storage = MemoryStorage()
    core, acc = _grouped(storage)
    key = acc["bob"].key
    seen: list[RRsetChange] = []
    core.store.add_observer(seen.append)
    before = storage.commits
    first = core.receive(sign(_add("a", "fd00::1"), key, int(NOW)), NOW, Transport.UDP, "p1")
    # the second one's prerequisite (name absent) fails on the first one's staged record
    second = core.receive(
        sign(_add("a", "fd00::2", absent=True), key, int(NOW)), NOW, Transport.UDP, "p2"
    )
    third = core.receive(sign(_add("b", "fd00::3"), key, int(NOW)), NOW, Transport.UDP, "p3")
    ask = dns.message.make_query("a." + BOB, "AAAA")
    query = core.receive(sign(ask, key, int(NOW)), NOW, Transport.UDP, "p4")
    assert (first, second, third, query) == (None, None, None, None)
    assert core.group_open and storage.commits == before and not seen
    assert core.next_deadline() == NOW  # window 0: due at once
    out = core.flush(NOW + 0.001)
    assert storage.commits == before + 1
    assert [o.peer for o in out] == ["p1", "p2", "p3", "p4"]
    rcodes = [parse(o.wire).rcode() for o in out]
    assert rcodes == [dns.rcode.NOERROR, dns.rcode.YXDOMAIN, dns.rcode.NOERROR,
                      dns.rcode.NOERROR]
    assert parse(out[0].wire).options[0].lease == 3600  # type: ignore[attr-defined]
    assert [rd.to_text() for rd in parse(out[3].wire).answer[0]] == ["fd00::1"]
    assert {str(e.name) for e in seen} == {"a." + BOB, "b." + BOB}
    assert not core.group_open and core.grouped_updates == 3 and core.groups == 1


def test_a_failed_group_commit_is_servfail_for_all_and_forgets_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = MemoryStorage()
    core, acc = _grouped(storage)
    key = acc["bob"].key
    serial = core.store.zones[dns.name.from_text(BOB)].serial

    def broken(changes: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(storage, "commit_group", broken)
    for n in range(3):
        core.receive(sign(_add(f"h{n}", "fd00::1"), key, int(NOW)), NOW, Transport.UDP, f"p{n}")
    ask = dns.message.make_query("h0." + BOB, "AAAA")
    core.receive(sign(ask, key, int(NOW)), NOW, Transport.UDP, "q")
    out = core.flush(NOW)
    rcodes = [parse(o.wire).rcode() for o in out]
    assert rcodes == [dns.rcode.SERVFAIL] * 3 + [dns.rcode.NXDOMAIN]
    assert not parse(out[0].wire).options  # no lease granted for what was not stored
    assert core.store.zones[dns.name.from_text(BOB)].serial == serial
    monkeypatch.undo()
    # the store is usable again: a later group commits
    assert core.receive(sign(_add("h9", "fd00::9"), key, int(NOW) + 1), NOW + 1,
                        Transport.UDP, "p") is None
    assert parse(core.flush(NOW + 1)[0].wire).rcode() == dns.rcode.NOERROR


def test_a_window_holds_the_group_until_its_deadline_or_until_full() -> None:
    core, acc = _grouped()
    core.group_window, core.group_max = 0.002, 3
    key = acc["bob"].key
    core.receive(sign(_add("a", "fd00::1"), key, int(NOW)), NOW, Transport.UDP, "p1")
    assert core.next_deadline() == NOW + 0.002 and not core.group_full
    core.receive(sign(_add("b", "fd00::1"), key, int(NOW)), NOW + 0.001, Transport.UDP, "p2")
    assert core.next_deadline() == NOW + 0.002  # the first update's window, not extended
    core.receive(sign(_add("c", "fd00::1"), key, int(NOW)), NOW + 0.001, Transport.UDP, "p3")
    assert core.group_full
    with pytest.raises(RuntimeError):
        core.tick(NOW + 0.001)  # expiry commits on its own: never past an open group
    assert len(core.flush(NOW + 0.001)) == 3
    assert core.next_deadline() == NOW + 3600  # the leases only


def test_one_sqlite_transaction_for_a_group(tmp_path: Path) -> None:
    storage = SqliteStorage(tmp_path / "registry.db")
    commits: list[float] = []
    storage.commit_observer = commits.append
    core, acc = _grouped(storage)
    key = acc["bob"].key
    for n in range(20):
        core.receive(sign(_add(f"h{n}", "fd00::1"), key, int(NOW)), NOW, Transport.UDP, f"p{n}")
    out = core.flush(NOW)
    assert len(commits) == 1
    assert [parse(o.wire).rcode() for o in out] == [dns.rcode.NOERROR] * 20
    storage.close()
    again = SqliteStorage(tmp_path / "registry.db")
    names = {str(r.name) for r in again.load().records}
    assert {f"h{n}.{BOB}" for n in range(20)} <= names
    again.close()


def test_concurrent_updates_to_a_live_server_share_commits(tmp_path: Path) -> None:
    """N updates sent at once over UDP to a RegistryServer: all NOERROR, fewer than N
    transactions (counted by the storage's commit hook)."""
    storage = SqliteStorage(tmp_path / "registry.db")
    commits: list[float] = []
    storage.commit_observer = commits.append
    core, acc = _grouped(storage)
    key = acc["bob"].key
    n = 40

    async def run() -> list[int]:
        server = RegistryServer(core, Listen("127.0.0.1", 0))
        await server.start()
        host, port = server.addresses["udp"]
        loop = asyncio.get_running_loop()
        replies: dict[int, int] = {}
        done = loop.create_future()

        class Client(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                r = parse(data)
                replies[r.id] = r.rcode()
                if len(replies) == n and not done.done():
                    done.set_result(None)

        transport, _ = await loop.create_datagram_endpoint(
            Client, remote_addr=(host, port)
        )
        wires = []
        for i in range(n):
            u = _add(f"c{i}", "fd00::1")
            u.id = i  # replies are told apart by ID: 40 random ones collide 1 time in 80
            wires.append(sign(u, key, int(time.time())))
        for w in wires:  # all sent before the server reads any: one bounded burst
            transport.sendto(w)
        try:
            await within(done, 20)
        finally:
            transport.close()
            await server.close()
        return list(replies.values())

    rcodes = asyncio.run(run())
    assert rcodes == [dns.rcode.NOERROR] * n
    assert 1 <= len(commits) < n


def test_memory_ahead_of_a_failed_commit_is_reloaded_later_if_not_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The commit fails and so does the reload right after it (the disk is gone): the staged
    record stays in memory only until the timers' next ``sync_external``."""
    storage = MemoryStorage()
    core, acc = _grouped(storage)
    name = dns.name.from_text("gone." + BOB)

    def broken(*args: object) -> None:
        raise OSError("disk gone")

    core.receive(sign(_add("gone", "fd00::1"), acc["bob"].key, int(NOW)), NOW, Transport.UDP, "p")
    monkeypatch.setattr(storage, "commit_group", broken)
    monkeypatch.setattr(storage, "load", broken)
    out = core.flush(NOW)
    assert parse(out[0].wire).rcode() == dns.rcode.SERVFAIL
    zone = core.store.zones[dns.name.from_text(BOB)]
    assert zone.get(name, dns.rdatatype.AAAA)  # could not be reloaded yet
    monkeypatch.undo()
    core.store.sync_external()
    assert not core.store.zones[dns.name.from_text(BOB)].get(name, dns.rdatatype.AAAA)
