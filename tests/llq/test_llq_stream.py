"""LLQ (RFC 8764 section 4) over TCP and DNS over TLS (RFC 7858) against a live ``btmm serve``:
setup and events on one connection, the connection's end ending the LLQ, kdig as an
independent client, ``btmm watch --transport tls``."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import ssl
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
import pytest
from llq_helpers import BOB, LAPTOP, live_registry, state_dir, update

from btmm_core.aio import within
from btmm_core.dns.keyfile import read_key
from btmm_core.dns.llq_option import LLQError, LLQOpcode, LLQOption, find_llq
from btmm_core.dns.tsig import TsigKey
from btmm_core.llq.client import Changes, ClientConfig, ClientState, StateChanged
from btmm_core.llq.driver import Watcher

HOST = "127.0.0.1"
NS = "ns.members.example"


@pytest.fixture(scope="module")
def reg() -> Iterator:  # type: ignore[type-arg]
    with (
        state_dir("btmm-llq-stream-") as state,
        live_registry(
            state,
            "--lease-min",
            "1",
            "--llq-lease-min",
            "4",
            # Short, so that the test sees an idle LLQ connection outlive it.
            "--tcp-idle-timeout",
            "1",
            users=(("bob", False),),
        ) as r,
    ):
        yield r


def key_of(reg) -> TsigKey:  # type: ignore[no-untyped-def]
    return read_key(reg.keyfile("bob"))


def send_update(reg, u: dns.message.Message) -> None:  # type: ignore[no-untyped-def]
    key = key_of(reg)
    u.use_tsig(dns.tsig.Key(key.name, key.secret, key.algorithm))
    r = dns.query.udp(u, HOST, port=reg.port, timeout=3)
    assert r.rcode() == dns.rcode.NOERROR, r


def tls_context(reg) -> ssl.SSLContext:  # type: ignore[no-untyped-def]
    # The registry's self-signed certificate is the trust anchor: the name is checked for real.
    return ssl.create_default_context(cafile=str(reg.state / "tls" / "dot-cert.pem"))


def watcher(reg, transport: str, name: dns.name.Name) -> Watcher:  # type: ignore[no-untyped-def]
    port = reg.tls_port if transport == "tls" else reg.port
    return Watcher(
        (HOST, port),
        name,
        dns.rdatatype.AAAA,
        key=key_of(reg),
        transport=transport,
        ssl_context=tls_context(reg) if transport == "tls" else None,
        server_hostname=NS,
    )


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


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_setup_and_add_change_delete_events_on_one_connection(reg, transport: str) -> None:  # type: ignore[no-untyped-def]
    label = f"s{transport}"
    name = dns.name.from_text(label, origin=BOB)
    send_update(reg, update(label, "AAAA", add=("fd00::10",)))

    async def main() -> None:
        async with watcher(reg, transport, name) as w:
            assert rdatas(await next_change(w, 5)) == (["fd00::10"], [])
            assert w.client.state == ClientState.ESTABLISHED and w.client.lease > 0
            # Longer than the registry's idle timeout (1 s): a connection holding an LLQ stays.
            await asyncio.sleep(2.5)
            steps = [
                (update(label, "AAAA", add=("fd00::11",)), (["fd00::11"], [])),
                (
                    update(label, "AAAA", delete=("fd00::10",), add=("fd00::12",)),
                    (["fd00::12"], ["fd00::10"]),
                ),
                (update(label, "AAAA", delete_all=True), ([], ["fd00::11", "fd00::12"])),
            ]
            for u, (added, removed) in steps:
                await asyncio.to_thread(send_update, reg, u)
                ch = await next_change(w, 3)
                got_added, got_removed = rdatas(ch)
                assert (sorted(got_added), sorted(got_removed)) == (added, removed)
            # All on the first connection: nothing was lost and set up again.
            assert w.connections == 1 and w.client.state == ClientState.ESTABLISHED

    asyncio.run(main())


def _frame(msg: dns.message.Message, key: TsigKey) -> bytes:
    msg.use_tsig(dns.tsig.Key(key.name, key.secret, key.algorithm))
    wire = msg.to_wire()
    return struct.pack("!H", len(wire)) + wire


def _read_frame(sock: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        return buf

    (length,) = struct.unpack("!H", exactly(2))
    return exactly(length)


def _llq_query(opt: LLQOption, msg_id: int) -> dns.message.Message:
    q = dns.message.make_query(LAPTOP, dns.rdatatype.AAAA, use_edns=0, options=[opt])
    q.flags = 0
    q.id = msg_id
    return q


def _exchange(sock: socket.socket, opt: LLQOption, key: TsigKey, msg_id: int) -> LLQOption:
    sock.sendall(_frame(_llq_query(opt, msg_id), key))
    answer = dns.message.from_wire(_read_frame(sock), keyring=False)
    options = find_llq(answer.options)
    # The ACK carries the answer: NXDOMAIN while the watched name has no records yet.
    assert answer.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN), answer
    assert len(options) == 1, answer
    return options[0]


def _establish(reg, key: TsigKey, base_id: int) -> tuple[socket.socket, LLQOption]:  # type: ignore[no-untyped-def]
    sock = socket.create_connection((HOST, reg.port), timeout=5)
    challenge = _exchange(sock, LLQOption(LLQOpcode.SETUP, 0, 0, 600), key, base_id)
    assert challenge.error == LLQError.NO_ERROR and challenge.llq_id != 0
    ack = _exchange(sock, LLQOption(LLQOpcode.SETUP, 0, challenge.llq_id, 600), key, base_id + 1)
    assert ack.error == LLQError.NO_ERROR and ack.llq_id == challenge.llq_id
    return sock, ack


def test_connection_close_removes_the_llq() -> None:
    """With room for one LLQ per client: a second setup is SERV-FULL until the first
    connection closes (without a cancel), then there is room again."""
    with (
        state_dir("btmm-llq-stream-") as state,
        live_registry(state, "--llq-max-per-client", "1", users=(("bob", False),)) as reg,
    ):
        key = key_of(reg)
        first, ack = _establish(reg, key, 100)
        try:
            # The LLQ is the connection's: a refresh of it from another connection is refused.
            with socket.create_connection((HOST, reg.port), timeout=5) as other:
                refresh = LLQOption(LLQOpcode.REFRESH, 0, ack.llq_id, 600)
                assert _exchange(other, refresh, key, 200).error == LLQError.NO_SUCH_LLQ
                full = _exchange(other, LLQOption(LLQOpcode.SETUP, 0, 0, 600), key, 201)
                assert full.error == LLQError.SERV_FULL
        finally:
            # A reset, not a cancel: only the connection's end can free the room.
            first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            first.close()
        deadline = time.monotonic() + 5
        while True:
            with socket.create_connection((HOST, reg.port), timeout=5) as again:
                got = _exchange(again, LLQOption(LLQOpcode.SETUP, 0, 0, 600), key, 300)
            if got.error == LLQError.NO_ERROR:
                assert got.llq_id != 0
                break
            assert got.error == LLQError.SERV_FULL
            assert time.monotonic() < deadline, "the closed connection's LLQ was not removed"
            time.sleep(0.1)


def test_refresh_and_cancel_over_the_connection(reg) -> None:  # type: ignore[no-untyped-def]
    key = key_of(reg)
    sock, ack = _establish(reg, key, 400)
    with sock:
        refreshed = _exchange(sock, LLQOption(LLQOpcode.REFRESH, 0, ack.llq_id, 900), key, 402)
        assert refreshed.error == LLQError.NO_ERROR and refreshed.lease == 900
        cancelled = _exchange(sock, LLQOption(LLQOpcode.REFRESH, 0, ack.llq_id, 0), key, 403)
        assert cancelled.error == LLQError.NO_ERROR and cancelled.lease == 0
        gone = _exchange(sock, LLQOption(LLQOpcode.REFRESH, 0, ack.llq_id, 900), key, 404)
        assert gone.error == LLQError.NO_SUCH_LLQ


def test_kdig_over_tcp_and_tls_gets_a_challenge(reg) -> None:  # type: ignore[no-untyped-def]
    key = key_of(reg)
    secret = base64.b64encode(key.secret).decode()
    setup = LLQOption(LLQOpcode.SETUP, 0, 0, 1200)
    for extra in (["+tcp", "-p", str(reg.port)], ["+tls", "-p", str(reg.tls_port)]):
        out = subprocess.run(
            [
                "kdig",
                f"@{HOST}",
                *extra,
                "+norec",
                f"+ednsopt=1:{setup.data().hex()}",
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
        _, opcode, error, llq_id, lease = struct.unpack("!HHHQI", bytes.fromhex(m.group(1)))
        assert (opcode, error, lease) == (LLQOpcode.SETUP, LLQError.NO_ERROR, 1200), out
        assert llq_id != 0


def test_btmm_watch_over_tls(reg) -> None:  # type: ignore[no-untyped-def]
    send_update(reg, update("clitls", "AAAA", add=("fd00::c1",)))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "btmm_core",
            "watch",
            "clitls.bob.members.example.",
            "AAAA",
            "--transport",
            "tls",
            "--port",
            str(reg.tls_port),
            "--tls-ca",
            str(Path(reg.state) / "tls" / "dot-cert.pem"),
            "--tls-name",
            NS,
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
        assert first.startswith("+ clitls.bob.members.example. 300 IN AAAA fd00::c1"), first
        send_update(reg, update("clitls", "AAAA", delete=("fd00::c1",), add=("fd00::c2",)))
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "- clitls.bob.members.example. 300 IN AAAA fd00::c1" in out, (out, err)
    assert "+ clitls.bob.members.example. 300 IN AAAA fd00::c2" in out, (out, err)
    assert "# established" in err


class Gate:
    """A TCP relay on loopback between a watcher and the registry that can be shut: while
    shut nothing listens on its port (a connection attempt is refused, not accepted and then
    closed, so the watcher counts no connection); a relayed connection ends with either side."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._relay, HOST, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def shut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        tasks = [asyncio.create_task(pipe(reader, up_w)), asyncio.create_task(pipe(up_r, writer))]
        self._pipes.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        up_w.close()
        writer.close()
        self._pipes.difference_update(tasks)

    async def close(self) -> None:
        await self.shut()
        for t in list(self._pipes):
            t.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)


def test_watcher_reconnects_after_a_server_restart_and_sees_the_missed_change() -> None:
    """The change is made while the watcher cannot reach the restarted server (the gate is
    shut), so it is missed for certain and must come from the full answer of the new setup.
    Without the gate this failed once under load: the watcher's retry reached the restarted
    server before the test's update did, and the change came as an ordinary event."""
    with (
        state_dir("btmm-llq-stream-") as state,
        live_registry(state, "--llq-lease-min", "4", users=(("bob", False),)) as reg,
    ):
        name = dns.name.from_text("restart", origin=BOB)
        send_update(reg, update("restart", "AAAA", add=("fd00::1",)))

        async def main() -> None:
            gate = Gate((HOST, reg.port))
            await gate.open()
            w = Watcher(
                (HOST, gate.port),
                name,
                dns.rdatatype.AAAA,
                key=key_of(reg),
                transport="tcp",
                config=ClientConfig(poll_interval=1.0),
            )
            try:
                async with w:
                    assert rdatas(await next_change(w, 5)) == (["fd00::1"], [])
                    await gate.shut()  # the connection open now stays, new ones are refused
                    await asyncio.to_thread(reg.stop)
                    await until_state(w, ClientState.SETUP, 5)  # the connection's end was seen
                    await asyncio.to_thread(reg.start)
                    await asyncio.to_thread(
                        send_update,
                        reg,
                        update("restart", "AAAA", delete_all=True, add=("fd00::2",)),
                    )
                    await gate.open()
                    ch = await next_change(w, 30)
                    assert ch.full and rdatas(ch) == (["fd00::2"], ["fd00::1"])
                    assert w.client.state == ClientState.ESTABLISHED and w.connections == 2
            finally:
                await gate.close()

        asyncio.run(main())
