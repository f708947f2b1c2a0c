"""DNS Push against a live ``btmm serve`` over real DNS over TLS (its self-signed certificate as
the trust anchor, the name checked): add, change, delete and lease expiry pushed; another user's
zone refused; a session closed when its keepalives stop; the watcher reconnecting after a
server restart and seeing what it missed; the ``_dns-push-tls._tcp`` SRV published."""

from __future__ import annotations

import asyncio
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
import dns.update
import pytest

from btmm_core.aio import within

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "registry"))

from registry_helpers import LiveRegistry, live_registry, state_dir

from btmm_core.dns.dso import DSOMessage, Keepalive, Rcode
from btmm_core.dns.edns import UpdateLeaseOption
from btmm_core.dns.keyfile import read_key
from btmm_core.dns.push import Subscribe
from btmm_core.dns.tsig import TsigKey
from btmm_core.push.client import Changes, PushState, StateChanged
from btmm_core.push.driver import PushWatcher

HOST = "127.0.0.1"
NS = "ns.members.example"
BOB = dns.name.from_text("bob.members.example.")
USERS = (("bob", False), ("alice", False))


@pytest.fixture(scope="module")
def reg() -> Iterator[LiveRegistry]:
    with (
        state_dir("btmm-push-") as state,
        live_registry(state, "--lease-min", "1", "--push-keepalive-max", "10", users=USERS) as r,
    ):
        yield r


def key_of(reg: LiveRegistry, user: str = "bob") -> TsigKey:
    return read_key(reg.keyfile(user))


def send_update(reg: LiveRegistry, u: dns.update.UpdateMessage) -> None:
    key = key_of(reg)
    u.use_tsig(dns.tsig.Key(key.name, key.secret, key.algorithm))
    r = dns.query.udp(u, HOST, port=reg.port, timeout=3)
    assert r.rcode() == dns.rcode.NOERROR, r


def aaaa(name: str, *, add: tuple[str, ...] = (), delete: tuple[str, ...] = (),
         lease: int | None = None) -> dns.update.UpdateMessage:  # fmt: skip
    u = dns.update.UpdateMessage(BOB)
    for d in delete:
        u.delete(name, "AAAA", d)
    for a in add:
        u.add(name, 300, "AAAA", a)
    if lease is not None:
        u.use_edns(0, 0, 1232, options=[UpdateLeaseOption(lease)])
    return u


def tls_context(reg: LiveRegistry) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(reg.state / "tls" / "dot-cert.pem"))


def watcher(reg: LiveRegistry, name: str, user: str | None = "bob") -> PushWatcher:
    return PushWatcher(
        (HOST, reg.tls_port),
        dns.name.from_text(name, origin=BOB),
        dns.rdatatype.AAAA,
        key=key_of(reg, user) if user else None,
        ssl_context=tls_context(reg),
        server_hostname=NS,
    )


async def next_change(w: PushWatcher, timeout: float) -> Changes:
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError("no change arrived")
        ev = await within(w.events.get(), left)
        if isinstance(ev, Changes):
            return ev


async def until_state(w: PushWatcher, state: PushState, timeout: float) -> StateChanged:
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


def test_add_change_delete_and_lease_expiry_are_pushed(reg: LiveRegistry) -> None:
    async def main() -> None:
        async with watcher(reg, "live") as w:
            first = await next_change(w, 5)  # the full answer after subscribing: empty
            assert first.full and rdatas(first) == ([], [])
            assert w.client.state == PushState.SUBSCRIBED
            await asyncio.to_thread(send_update, reg, aaaa("live", add=("fd00::1",)))
            assert rdatas(await next_change(w, 5)) == (["fd00::1"], [])
            await asyncio.to_thread(
                send_update, reg, aaaa("live", delete=("fd00::1",), add=("fd00::2",))
            )
            assert rdatas(await next_change(w, 5)) == (["fd00::2"], ["fd00::1"])
            await asyncio.to_thread(send_update, reg, aaaa("live", delete=("fd00::2",)))
            assert rdatas(await next_change(w, 5)) == ([], ["fd00::2"])
            await asyncio.to_thread(send_update, reg, aaaa("live", add=("fd00::3",), lease=1))
            assert rdatas(await next_change(w, 5)) == (["fd00::3"], [])
            ch = await next_change(w, 5)  # the registry's lease timer removes it
            assert not ch.full and rdatas(ch) == ([], ["fd00::3"])
            assert w.connections == 1

    asyncio.run(main())


def test_another_users_zone_and_an_unbound_session_are_refused(reg: LiveRegistry) -> None:
    async def main() -> None:
        for user in ("alice", None):
            async with watcher(reg, "live", user) as w:
                ev = await until_state(w, PushState.WAITING, 5)
                assert "subscription refused (REFUSED)" in ev.why, ev
                assert "reconnecting in 300.0 s" in ev.why, ev

    asyncio.run(main())


def test_push_srv_is_published_without_a_signature(reg: LiveRegistry) -> None:
    q = dns.message.make_query("_dns-push-tls._tcp.bob.members.example.", "SRV")
    r = dns.query.udp(q, HOST, port=reg.port, timeout=3)
    assert r.rcode() == dns.rcode.NOERROR
    (srv,) = r.answer[0]
    assert srv.port == reg.tls_port and srv.target.to_text() == "ns.members.example."


def frame(wire: bytes) -> bytes:
    return struct.pack("!H", len(wire)) + wire


def read_message(sock: ssl.SSLSocket) -> bytes:
    head = b""
    while len(head) < 2:
        chunk = sock.recv(2 - len(head))
        if not chunk:
            raise ConnectionError("closed")
        head += chunk
    (n,) = struct.unpack("!H", head)
    body = b""
    while len(body) < n:
        chunk = sock.recv(n - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return body


def test_session_is_closed_when_keepalives_stop(reg: LiveRegistry) -> None:
    raw = socket.create_connection((HOST, reg.tls_port), timeout=5)
    with tls_context(reg).wrap_socket(raw, server_hostname=NS) as s:
        s.sendall(frame(DSOMessage(1, (Keepalive(15_000, 3_600_000).tlv(),)).to_bytes()))
        answer = DSOMessage.parse(read_message(s))
        assert answer.rcode == Rcode.NOERROR
        # asked for an hour, granted what --push-keepalive-max allows
        assert Keepalive.from_tlv(answer.tlvs[0]).interval_ms == 10_000
        public = dns.name.from_text("_dns-update._udp.bob.members.example.")
        s.sendall(frame(DSOMessage(2, (Subscribe(public, 33).tlv(),)).to_bytes()))
        assert DSOMessage.parse(read_message(s)).rcode == Rcode.NOERROR
        DSOMessage.parse(read_message(s))  # the initial PUSH
        silent_from = time.monotonic()
        s.settimeout(40)
        with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
            read_message(s)  # nothing more: the server aborts after twice the interval
        # not before: a subscribed session is never "inactive", only keepalive-timed
        assert time.monotonic() - silent_from >= 19


def test_watcher_reconnects_after_a_server_restart_and_sees_the_missed_change() -> None:
    with (
        state_dir("btmm-push-restart-") as state,
        live_registry(state, users=(("bob", False),)) as reg,
    ):
        send_update(reg, aaaa("restart", add=("fd00::1",)))

        async def main() -> None:
            async with watcher(reg, "restart") as w:
                assert rdatas(await next_change(w, 5)) == (["fd00::1"], [])  # initial PUSH
                assert rdatas(await next_change(w, 5)) == ([], [])  # the full answer agrees
                await asyncio.to_thread(reg.stop)  # SIGTERM: a Retry Delay, then the end
                await until_state(w, PushState.WAITING, 5)
                await asyncio.to_thread(reg.start)
                await asyncio.to_thread(
                    send_update, reg, aaaa("restart", delete=("fd00::1",), add=("fd00::2",))
                )
                # The watcher may resubscribe before or after the update: either its full
                # answer shows the change, or that answer is unchanged and a PUSH follows.
                # Events are queued while the core moves on: wait for the resync's full answer.
                seen: list[Changes] = []
                while not any(ch.full for ch in seen) or {
                    r.rdata.to_text() for r in w.client_records()
                } != {"fd00::2"}:
                    seen.append(await next_change(w, 30))
                while not w.events.empty():
                    ev = w.events.get_nowait()
                    if isinstance(ev, Changes):
                        seen.append(ev)
                added = [a for ch in seen for a in rdatas(ch)[0]]
                removed = [r for ch in seen for r in rdatas(ch)[1]]
                assert (added, removed) == (["fd00::2"], ["fd00::1"]), seen
                assert w.client.state == PushState.SUBSCRIBED and w.connections == 2

        asyncio.run(main())


def test_btmm_watch_with_transport_push(reg: LiveRegistry) -> None:
    send_update(reg, aaaa("clipush", add=("fd00::c1",)))
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "btmm_core", "watch", "clipush.bob.members.example.", "AAAA",
            "--transport", "push", "--port", str(reg.tls_port),
            "--tls-ca", str(reg.state / "tls" / "dot-cert.pem"), "--tls-name", NS,
            "-k", str(reg.keyfile("bob")), "--count", "3", "--timeout", "20",
        ],
        env=reg.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("+ clipush.bob.members.example. 300 IN AAAA fd00::c1"), first
        send_update(reg, aaaa("clipush", delete=("fd00::c1",), add=("fd00::c2",)))
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "- clipush.bob.members.example. 300 IN AAAA fd00::c1" in out, (out, err)
    assert "+ clipush.bob.members.example. 300 IN AAAA fd00::c2" in out, (out, err)
    assert "# subscribed" in err
