"""LLQ (RFC 8764) against a live ``btmm serve`` on loopback: the asyncio watcher, kdig as an
independent client, server restart, a lossy relay, and 1,000 LLQs from one process."""

from __future__ import annotations

import asyncio
import random
import re
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.update
import pytest
from llq_helpers import LAPTOP, free_port, live_registry, state_dir, update

from btmm_core.aio import within
from btmm_core.dns.keyfile import read_key
from btmm_core.dns.llq_option import LLQError, LLQOpcode, LLQOption, find_llq
from btmm_core.dns.tsig import TsigKey
from btmm_core.llq.client import Changes, ClientConfig, ClientState, StateChanged
from btmm_core.llq.driver import Watcher

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def reg() -> Iterator:  # type: ignore[type-arg]
    with (
        state_dir("btmm-llq-") as state,
        live_registry(
            state,
            "--lease-min",
            "1",
            "--llq-lease-min",
            "4",
            "--llq-max-per-client",
            "3000",
            users=(("bob", False), ("alice", False)),
        ) as r,
    ):
        yield r


def key_of(reg, user: str = "bob") -> TsigKey:  # type: ignore[no-untyped-def]
    return read_key(reg.keyfile(user))


def dnspython_key(key: TsigKey) -> dns.tsig.Key:
    return dns.tsig.Key(key.name, key.secret, key.algorithm)


def send_update(reg, u: dns.message.Message, user: str = "bob") -> None:  # type: ignore[no-untyped-def]
    u.use_tsig(dnspython_key(key_of(reg, user)))
    r = dns.query.udp(u, HOST, port=reg.port, timeout=3)
    assert r.rcode() == dns.rcode.NOERROR, r


def ask(reg, q: dns.message.Message, user: str | None = "bob") -> dns.message.Message:  # type: ignore[no-untyped-def]
    if user:
        q.use_tsig(dnspython_key(key_of(reg, user)))
    return dns.query.udp(q, HOST, port=reg.port, timeout=3)


async def next_change(w: Watcher, timeout: float) -> Changes:
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError("no change arrived")
        ev = await within(w.events.get(), left)
        if isinstance(ev, Changes):
            return ev


async def until_state(w: Watcher, state: ClientState, timeout: float) -> StateChanged:
    """Wait for the watcher to report ``state``; returns that report (why it changed)."""
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"watcher still {w.client.state}, wanted {state}")
        ev = await within(w.events.get(), left)
        if isinstance(ev, StateChanged) and ev.state == state:
            return ev


def rdatas(ch: Changes) -> tuple[list[str], list[str]]:
    return [r.rdata.to_text() for r in ch.added], [r.rdata.to_text() for r in ch.removed]


def known(w: Watcher) -> set[str]:
    return {rd.to_text() for (_, _, rd) in w.client.known}


# ---- handshake and events -----------------------------------------------------------------


def test_events_for_add_change_delete_and_lease_expiry_within_one_second(reg) -> None:  # type: ignore[no-untyped-def]
    async def main() -> list[float]:
        key = key_of(reg)
        name = dns.name.from_text("events.bob.members.example.")
        latencies = []
        async with Watcher((HOST, reg.port), name, dns.rdatatype.AAAA, key=key) as w:
            await until_state(w, ClientState.ESTABLISHED, 5)
            steps = [
                (update("events", "AAAA", add=("fd00::1",)), (["fd00::1"], [])),
                (
                    update("events", "AAAA", delete=("fd00::1",), add=("fd00::2",)),
                    (["fd00::2"], ["fd00::1"]),
                ),
                (update("events", "AAAA", delete_all=True), ([], ["fd00::2"])),
            ]
            for u, expected in steps:
                t0 = time.monotonic()
                await asyncio.to_thread(send_update, reg, u)
                ch = await next_change(w, 1.0)
                latencies.append(time.monotonic() - t0)
                assert rdatas(ch) == expected
            await asyncio.to_thread(
                send_update, reg, update("events", "AAAA", add=("fd00::3",), lease=1)
            )
            assert rdatas(await next_change(w, 1.0)) == (["fd00::3"], [])
            # The server expires the record one second after the update: the removal follows.
            t0 = time.monotonic()
            ch = await next_change(w, 2.0)
            assert rdatas(ch) == ([], ["fd00::3"])
            assert time.monotonic() - t0 < 2.0
        return latencies

    latencies = asyncio.run(main())
    assert all(t < 1.0 for t in latencies), latencies


def test_watcher_gets_the_current_records_first(reg) -> None:  # type: ignore[no-untyped-def]
    send_update(reg, update("first", "AAAA", add=("fd00::a", "fd00::b")))

    async def main() -> Changes:
        name = dns.name.from_text("first.bob.members.example.")
        async with Watcher((HOST, reg.port), name, dns.rdatatype.AAAA, key=key_of(reg)) as w:
            return await next_change(w, 5)

    ch = asyncio.run(main())
    assert ch.full and sorted(rdatas(ch)[0]) == ["fd00::a", "fd00::b"]


def test_an_answer_too_large_for_udp_comes_over_tcp_and_events_follow(reg) -> None:  # type: ignore[no-untyped-def]
    """80 AAAA do not fit the 1232-byte datagram: the watcher stays on UDP for the events
    and reads the current answer over TCP (a daemon joining an account of 100 hosts saw no
    peer for half a minute when it took the events only)."""
    many = tuple(f"fd00::{i:x}" for i in range(1, 81))
    send_update(reg, update("many", "AAAA", add=many))

    async def main() -> tuple[Changes, Changes, int]:
        name = dns.name.from_text("many.bob.members.example.")
        async with Watcher((HOST, reg.port), name, dns.rdatatype.AAAA, key=key_of(reg)) as w:
            first = await next_change(w, 5)
            await asyncio.to_thread(send_update, reg, update("many", "AAAA", add=("fd00::aa",)))
            return first, await next_change(w, 2), w.connections

    first, event, connections = asyncio.run(main())
    assert first.full and sorted(rdatas(first)[0]) == sorted(many)
    assert not event.full and rdatas(event) == (["fd00::aa"], [])
    assert connections == 0  # the LLQ itself never left UDP


# ---- refusals -------------------------------------------------------------------------------


def test_spoofed_setups_leave_no_state() -> None:
    with (
        state_dir("btmm-llq-") as state,
        live_registry(state, "--llq-max-total", "1", users=(("bob", False),)) as r,
    ):
        key = key_of(r)
        # Setups that never answer the challenge, from many source ports.
        for i in range(50):
            q = dns.message.make_query(
                LAPTOP, "AAAA", use_edns=0, options=[LLQOption(LLQOpcode.SETUP, 0, 0, 900)]
            )
            q.id = i  # distinct: an equal id in the same second would be a replayed MAC
            resp = ask(r, q)
            (opt,) = find_llq(resp.options)
            assert opt.error == LLQError.NO_ERROR and opt.llq_id != 0

        async def main() -> tuple[ClientState, ClientState, str]:
            a = Watcher((HOST, r.port), LAPTOP, dns.rdatatype.AAAA, key=key)
            b = Watcher((HOST, r.port), LAPTOP, dns.rdatatype.AAAA, key=key)
            async with a:
                await until_state(a, ClientState.ESTABLISHED, 5)
                async with b:
                    refused = await until_state(b, ClientState.POLLING, 5)
                    return a.client.state, b.client.state, refused.why

        a_state, b_state, why = asyncio.run(main())
        # max-total 1: 50 unanswered challenges took no room; the second real LLQ is refused.
        assert a_state == ClientState.ESTABLISHED
        assert b_state == ClientState.POLLING and why == "server full"


def test_wrong_id_gets_no_such_llq(reg) -> None:  # type: ignore[no-untyped-def]
    for op in (LLQOpcode.REFRESH, LLQOpcode.SETUP):
        q = dns.message.make_query(
            LAPTOP, "AAAA", use_edns=0, options=[LLQOption(op, 0, 0x1234567890ABCDEF, 900)]
        )
        r = ask(reg, q)
        (opt,) = find_llq(r.options)
        assert r.rcode() == dns.rcode.NOERROR
        assert opt.error == LLQError.NO_SUCH_LLQ and opt.opcode == op


def test_unsigned_llq_into_private_zone_is_refused(reg) -> None:  # type: ignore[no-untyped-def]
    q = dns.message.make_query(
        LAPTOP, "AAAA", use_edns=0, options=[LLQOption(LLQOpcode.SETUP, 0, 0, 900)]
    )
    r = ask(reg, q, user=None)
    assert r.rcode() == dns.rcode.REFUSED and not find_llq(r.options)
    q = dns.message.make_query(
        LAPTOP, "AAAA", use_edns=0, options=[LLQOption(LLQOpcode.SETUP, 0, 0, 900)]
    )
    r = ask(reg, q, user="alice")
    assert r.rcode() == dns.rcode.REFUSED and not find_llq(r.options)


# ---- kdig -----------------------------------------------------------------------------------


def _kdig(reg, opt: LLQOption, source_port: int) -> tuple[str, LLQOption]:  # type: ignore[no-untyped-def]
    key = key_of(reg)
    import base64

    secret = base64.b64encode(key.secret).decode()
    out = subprocess.run(
        [
            "kdig",
            f"@{HOST}",
            "-p",
            str(reg.port),
            "+norec",
            "+notcp",
            # A challenge is bound to the client's address and port: keep the port.
            "-b",
            f"{HOST}#{source_port}",
            f"+ednsopt=1:{opt.data().hex()}",
            "-y",
            f"hmac-sha256:{key.name.to_text()}:{secret}",
            LAPTOP.to_text(),
            "AAAA",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    m = re.search(r"Option \(1\): ([0-9A-Fa-f]{36})\b", out)
    assert m, out
    version, opcode, error, llq_id, lease = struct.unpack("!HHHQI", bytes.fromhex(m.group(1)))
    return out, LLQOption(opcode, error, llq_id, lease, version)


def test_kdig_sends_a_setup_gets_a_challenge_and_completes_it(reg) -> None:  # type: ignore[no-untyped-def]
    send_update(reg, update("laptop", "AAAA", add=("fd00::77",)))
    port = free_port()
    out, challenge = _kdig(reg, LLQOption(LLQOpcode.SETUP, 0, 0, 1200), port)
    assert "NOERROR" in out
    assert challenge.opcode == LLQOpcode.SETUP and challenge.error == LLQError.NO_ERROR
    assert challenge.llq_id != 0 and challenge.lease == 1200
    out, ack = _kdig(reg, LLQOption(LLQOpcode.SETUP, 0, challenge.llq_id, 1200), port)
    assert ack.llq_id == challenge.llq_id and ack.error == LLQError.NO_ERROR
    assert "fd00::77" in out
    # kdig does not stay to acknowledge events; cancel so the server stops resending.
    out, cancel = _kdig(reg, LLQOption(LLQOpcode.REFRESH, 0, challenge.llq_id, 0), port)
    assert cancel.error == LLQError.NO_ERROR and cancel.lease == 0
    # From another port the same id is not this client's LLQ.
    _, other = _kdig(reg, LLQOption(LLQOpcode.SETUP, 0, challenge.llq_id, 1200), free_port())
    assert other.error == LLQError.NO_SUCH_LLQ


# ---- btmm watch -----------------------------------------------------------------------------


def test_btmm_watch_prints_changes(reg) -> None:  # type: ignore[no-untyped-def]
    send_update(reg, update("cli", "AAAA", add=("fd00::c1",)))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "btmm_core",
            "watch",
            "cli.bob.members.example.",
            "AAAA",
            "--port",
            str(reg.port),
            "-k",
            str(reg.keyfile("bob")),
            "--count",
            "3",
            "--timeout",
            "20",
        ],
        env=reg.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("+ cli.bob.members.example. 300 IN AAAA fd00::c1"), first
        send_update(reg, update("cli", "AAAA", delete=("fd00::c1",), add=("fd00::c2",)))
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert sorted(out.splitlines()) == [
        "+ cli.bob.members.example. 300 IN AAAA fd00::c2",
        "- cli.bob.members.example. 300 IN AAAA fd00::c1",
    ]
    assert "# established" in err


# ---- restart --------------------------------------------------------------------------------


def test_server_restart_clients_notice_and_recover_all_changes() -> None:
    with (
        state_dir("btmm-llq-") as state,
        live_registry(state, "--llq-lease-min", "4", users=(("bob", False),)) as r,
    ):
        key = key_of(r)

        async def main() -> tuple[set[str], list[str]]:
            name = dns.name.from_text("moving.bob.members.example.")
            cfg = ClientConfig(lease=4, poll_interval=1.0)
            async with Watcher((HOST, r.port), name, dns.rdatatype.AAAA, key=key, config=cfg) as w:
                await until_state(w, ClientState.ESTABLISHED, 5)
                await asyncio.to_thread(send_update, r, update("moving", "AAAA", add=("fd00::1",)))
                await next_change(w, 2)
                await asyncio.to_thread(r.stop)
                await asyncio.to_thread(r.start)
                # Changes made after the restart, which the old LLQ can never carry.
                await asyncio.to_thread(
                    send_update, r, update("moving", "AAAA", delete=("fd00::1",), add=("fd00::2",))
                )
                whys: list[str] = []
                end = time.monotonic() + 20
                while known(w) != {"fd00::2"} and time.monotonic() < end:
                    try:
                        ev = await within(w.events.get(), 1)
                    except TimeoutError:
                        continue
                    if isinstance(ev, StateChanged):
                        whys.append(ev.why)
                return known(w), whys

        final, whys = asyncio.run(main())
        assert final == {"fd00::2"}
        assert any("no such LLQ" in y or "no answer" in y for y in whys), whys


# ---- loss -----------------------------------------------------------------------------------


class LossyRelay(asyncio.DatagramProtocol):
    """A UDP relay on loopback that drops ``loss`` of the datagrams in each direction.

    Each client gets its own upstream socket, so the server sees one peer per client.
    """

    def __init__(self, server: tuple[str, int], loss: float, seed: int) -> None:
        self.server = server
        self.loss = loss
        self.rng = random.Random(seed)
        self.transport: asyncio.DatagramTransport | None = None
        self.upstream: dict[tuple[str, int], asyncio.DatagramTransport] = {}
        self.waiting: dict[tuple[str, int], list[bytes]] = {}
        self.tasks: set[asyncio.Future[None]] = set()
        self.dropped = {"up": 0, "down": 0}
        self.passed = {"up": 0, "down": 0}

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport

    def _lose(self, direction: str) -> bool:
        if self.rng.random() < self.loss:
            self.dropped[direction] += 1
            return True
        self.passed[direction] += 1
        return False

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        up = self.upstream.get(addr)
        if up is None:
            if addr in self.waiting:
                self.waiting[addr].append(data)
            else:
                self.waiting[addr] = [data]
                self.tasks.add(asyncio.ensure_future(self._open(addr)))
            return
        if not self._lose("up"):
            up.sendto(data)

    async def _open(self, addr: tuple[str, int]) -> None:
        relay = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, _: tuple[str, int]) -> None:
                if relay.transport is not None and not relay._lose("down"):
                    relay.transport.sendto(data, addr)

        loop = asyncio.get_running_loop()
        up, _ = await loop.create_datagram_endpoint(Back, remote_addr=self.server)
        self.upstream[addr] = up
        for data in self.waiting.pop(addr):
            if not self._lose("up"):
                up.sendto(data)

    def close(self) -> None:
        for up in self.upstream.values():
            up.close()
        if self.transport is not None:
            self.transport.close()


def test_ten_percent_loss_both_ways_every_change_reaches_the_clients() -> None:
    with (
        state_dir("btmm-llq-") as state,
        live_registry(state, "--llq-lease-min", "6", users=(("bob", False),)) as r,
    ):
        key = key_of(r)

        async def main() -> tuple[list[set[str]], set[str], dict[str, int]]:
            loop = asyncio.get_running_loop()
            relay_t, relay = await loop.create_datagram_endpoint(
                lambda: LossyRelay((HOST, r.port), 0.10, seed=8764), local_addr=(HOST, 0)
            )
            relay_addr = relay_t.get_extra_info("sockname")[:2]
            name = dns.name.from_text("lossy.bob.members.example.")
            cfg = ClientConfig(lease=6, poll_interval=2.0)
            watchers = [
                Watcher(relay_addr, name, dns.rdatatype.AAAA, key=key, config=cfg) for _ in range(5)
            ]
            try:
                for w in watchers:
                    await w.start()
                expected: set[str] = set()
                for i in range(30):
                    if i % 3 == 2:
                        gone = sorted(expected)[0]
                        u = update("lossy", "AAAA", delete=(gone,))
                        expected.discard(gone)
                    else:
                        addr = f"fd00::{i + 1:x}"
                        u = update("lossy", "AAAA", add=(addr,))
                        expected.add(addr)
                    await asyncio.to_thread(send_update, r, u)
                    await asyncio.sleep(0.2)
                end = time.monotonic() + 40
                while time.monotonic() < end and any(known(w) != expected for w in watchers):
                    await asyncio.sleep(0.2)
                return [known(w) for w in watchers], expected, dict(relay.dropped)
            finally:
                for w in watchers:
                    await w.close()
                relay.close()

        finals, expected, dropped = asyncio.run(main())
        assert dropped["up"] > 0 and dropped["down"] > 0
        for final in finals:
            assert final == expected


# ---- load -----------------------------------------------------------------------------------


def test_one_thousand_llqs_one_update_reaches_all(reg) -> None:  # type: ignore[no-untyped-def]
    n = 1000

    async def main() -> int:
        key = key_of(reg)
        name = dns.name.from_text("crowd.bob.members.example.")
        cfg = ClientConfig(lease=3600)
        watchers = [
            Watcher((HOST, reg.port), name, dns.rdatatype.AAAA, key=key, config=cfg)
            for _ in range(n)
        ]
        try:
            for i in range(0, n, 100):
                await asyncio.gather(*(w.start() for w in watchers[i : i + 100]))
            end = time.monotonic() + 120
            while time.monotonic() < end:
                if all(w.client.state == ClientState.ESTABLISHED for w in watchers):
                    break
                await asyncio.sleep(0.2)
            assert all(w.client.state == ClientState.ESTABLISHED for w in watchers)
            await asyncio.to_thread(send_update, reg, update("crowd", "AAAA", add=("fd00::42",)))
            end = time.monotonic() + 60
            while time.monotonic() < end:
                got = sum(known(w) == {"fd00::42"} for w in watchers)
                if got == n:
                    break
                await asyncio.sleep(0.1)
            return sum(known(w) == {"fd00::42"} for w in watchers)
        finally:
            await asyncio.gather(*(w.close() for w in watchers))

    assert asyncio.run(main()) == n
