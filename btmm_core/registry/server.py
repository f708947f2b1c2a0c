"""The registry's asyncio driver: UDP, TCP (RFC 7766) and DNS over TLS (RFC 7858) listeners,
the lease timer and the account watcher. All protocol work is in ``RegistryCore`` and in the
plug-ins plugged into it (``registry/plugin.py``), which this driver runs alongside: it gives
them the responses clients send, the committed RRset changes, closed connections and their
timers, and sends what they return (from the UDP socket, or on the client's open connection).

TCP and TLS connections are bounded: at most ``max_connections`` at once and at most
``max_connections_per_client`` from one client (an IPv4 address or an IPv6 /64), ``idle_timeout``
seconds to send the next length prefix, ``read_timeout`` seconds to send a whole message. A
zero length or a message too short for a header closes the connection. Refused connections
are counted in ``RegistryServer.refused`` and logged once per client while it is at its limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import cast

import structlog

from btmm_core.aio import within
from btmm_core.dns.dso import is_dso
from btmm_core.registry.handler import RegistryCore, Transport
from btmm_core.registry.limits import client_prefix
from btmm_core.registry.model import RRsetChange
from btmm_core.registry.plugin import Outgoing, is_response
from btmm_core.registry.storage import DatabaseUnavailable

log = structlog.get_logger("btmm.registry")

#: Seconds between two looks at whether a plug-in still holds an idle connection.
HELD_RECHECK = 60.0
#: Seconds a stopping server waits for its cancelled connection and timer tasks to end.
CLOSE_GRACE = 5.0


@dataclass(frozen=True)
class Listen:
    host: str
    port: int
    tls_port: int | None = None
    tls: ssl.SSLContext | None = None
    max_connections: int = 256
    max_connections_per_client: int = 32
    idle_timeout: float = 10.0
    read_timeout: float = 5.0
    #: SO_REUSEPORT on every listener: several worker processes share the ports and the
    #: kernel spreads clients over them (by address and port: one client stays with one).
    reuse_port: bool = False


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: RegistryServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport is not a subclass of asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        forward = self.server.forward_updates
        if forward is not None and len(data) >= 12 and data[2] & 0xF8 == 0x28:
            # an UPDATE (QR clear, opcode 5): the writer worker answers it (``Forwarding``)
            forward.send(data, addr)
            return
        out = self.server.dispatch(data, Transport.UDP, addr)
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error", error=str(exc))


class Forwarding(asyncio.Protocol):
    """UDP UPDATEs from every worker to one (``btmm serve --workers`` on SQLite), so that they
    share its group commits: N workers each committing small groups in turn would fsync as
    often and hold the write lock longer (each catches up on the others' changes under it).

    A stream socket pair made before the workers fork, so nobody else can write to it (a
    datagram pair would do, but Linux queues only ``net.unix.max_dgram_qlen``, often 10,
    datagrams). The other workers write frames on one end (length, the client's address, the
    message), buffered by their event loop so a busy writer never blocks them; the writer
    worker reads the other end and answers each client from its own socket on the shared port,
    as if it had received the message. Only UDP: an UPDATE on a TCP connection is answered by
    the worker holding it, through the same write lock and catch-up.
    """

    _HEAD = struct.Struct("!HBH")

    def __init__(self, server: RegistryServer | None = None) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        #: UPDATEs not forwarded since start (the pair is gone: lost like a UDP datagram)
        self.dropped = 0

    @classmethod
    def frame(cls, data: bytes, addr: tuple[str, int]) -> bytes:
        host = addr[0].encode()
        return cls._HEAD.pack(1 + len(host) + 2 + len(data), len(host), addr[1]) + host + data

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is None or self.transport.is_closing():
            self.dropped += 1
            return
        self.transport.write(self.frame(data, addr))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buffer + data
        p = 0
        head = self._HEAD
        while len(buf) - p >= head.size:
            size, host_len, port = head.unpack_from(buf, p)
            end = p + 2 + size
            if end > len(buf):
                break
            host = buf[p + head.size : p + head.size + host_len].decode("ascii", "replace")
            message = buf[p + head.size + host_len : end]
            p = end
            if self.server is not None and len(message) >= 12:
                self.server.answer_forwarded(message, (host, port))
        self._buffer = buf[p:]


class RegistryServer:
    def __init__(self, core: RegistryCore, listen: Listen) -> None:
        self.core = core
        self.listen = listen
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._connections: set[asyncio.Task[None]] = set()
        #: Open TCP/TLS connections per client (``client_prefix``), and the clients that were
        #: refused since they last dropped below their limit (logged once each).
        self._per_client: dict[str, int] = {}
        self._refusing: set[str] = set()
        #: Connections closed at once: "total" (max_connections) and "per_client".
        self.refused = {"total": 0, "per_client": 0}
        self._wake = asyncio.Event()
        self.addresses: dict[str, tuple[str, int]] = {}
        #: Open TCP/TLS connections by (transport, "address#port"), for pushed messages (LLQ).
        self.streams: dict[tuple[Transport, str], asyncio.StreamWriter] = {}
        #: Pushed bytes a connection may leave unread before it is closed as stuck.
        self.max_stream_backlog = 1 << 20
        #: The last message pushed and its framed bytes (``send_stream``).
        self._framed: tuple[bytes, bytes] = (b"", b"")
        #: RRset changes the plug-ins have not heard of yet: given to them by ``_timers``
        #: (woken by every message), so that replies go out first and one burst of updates
        #: makes one batch.
        self._changes: list[RRsetChange] = []
        core.store.add_observer(self._changes.append)
        #: The storage's notice descriptor we watch (a database shared with other servers).
        self._notice_fd: int | None = None
        #: Whether the database is unreachable now (logged once per outage).
        self._db_down = False
        #: The open group's commit, scheduled when it opened (group commit: RegistryCore).
        self._group_timer: asyncio.TimerHandle | None = None
        #: Workers: this one's ends of the pairs UDP UPDATEs go through (``Forwarding``), and
        #: whether it is the writer that answers them; set by the composition root.
        self.forward_sockets: tuple[socket.socket, ...] = ()
        self.forward_writer = False
        #: The forwarding protocol of a worker that is not the writer (``start`` makes it).
        self.forward_updates: Forwarding | None = None

    def dispatch(self, data: bytes, transport: Transport, addr: tuple[str, int]) -> bytes | None:
        peer = f"{addr[0]}#{addr[1]}"
        try:
            plugins_read = is_response(data) or (transport == Transport.TLS and is_dso(data))
            if self.core.group_open and plugins_read:
                # the plug-ins read the zones, which are ahead of the disk until it commits
                self.flush_group()
            if transport == Transport.TLS and is_dso(data):
                dso = [p for p in self.core.plugins if p.dso]
                if dso:
                    now = time.time()
                    for plugin in dso:
                        self.push(plugin.receive_message(data, now, transport, peer))
                    self._wake.set()  # a session's timers may have moved
                    return None
            if is_response(data):
                now = time.time()
                for plugin in self.core.plugins:
                    self.push(plugin.receive_response(data, now, transport, peer))
                return None
            hits = self.core.cached_answers
            out = self.core.receive(data, time.time(), transport, peer)
            if transport == Transport.UDP and self.core.cached_answers != hits:
                return out  # from the answer cache: nothing changed, no timer to wake
            if self.core.group_open:
                if self.core.group_full:
                    self.flush_group()
                elif self._group_timer is None:
                    # After the loop read what else is ready: the updates that arrived
                    # together commit together, and nobody waits beyond the window.
                    self._group_timer = asyncio.get_running_loop().call_later(
                        self.core.group_window, self.flush_group
                    )
        except Exception:
            # A bug, not bad input: bad input is FORMERR inside the core. Keep serving.
            log.exception("internal error while handling a message", peer=peer)
            return None
        # A commit may have added a nearer lease deadline, or changes for the plug-ins; a
        # group's commit wakes the timers itself (they would commit it before it is whole).
        if not self.core.group_open:
            self._wake.set()
        return out

    def answer_forwarded(self, data: bytes, addr: tuple[str, int]) -> None:
        """Answer an UPDATE another worker forwarded, as if it came on our UDP socket."""
        out = self.dispatch(data, Transport.UDP, addr)
        if out is not None:
            with contextlib.suppress(OSError):
                self.send_udp(out, addr)

    def flush_group(self) -> None:
        """Commit the open group and send the answers it held (RegistryCore.flush)."""
        if self._group_timer is not None:
            self._group_timer.cancel()
            self._group_timer = None
        try:
            self.push(self.core.flush(time.time()))
        except Exception:
            log.exception("internal error while committing a group of updates")
        self._wake.set()  # changes for the plug-ins, maybe a nearer lease deadline

    def push(self, outgoing: list[Outgoing]) -> None:
        """Send what a plug-in returned; a message to a client that is gone is dropped."""
        for out in outgoing:
            if out.transport != Transport.UDP:
                # A connection that is gone already told the plug-ins; nothing to do here.
                if out.wire and not self.send_stream(out.transport, out.peer, out.wire):
                    log.debug("pushed message not sent: connection gone", peer=out.peer)
                if out.close:
                    self.abort_stream(out.transport, out.peer)
                continue
            host, port = out.peer.rsplit("#", 1)
            try:
                self.send_udp(out.wire, (host, int(port)))
            except OSError as e:
                log.debug("pushed message not sent", peer=out.peer, error=str(e))

    def send_udp(self, wire: bytes, addr: tuple[str, int]) -> bool:
        """Send a datagram from the UDP listener (LLQ events are unsolicited responses)."""
        if not self._udp:
            return False
        self._udp[0].sendto(wire, addr)
        return True

    def set_udp_receive_buffer(self, size: int) -> int:
        """Ask for ``size`` bytes of receive buffer on the UDP listener; returns what was granted.

        LLQ acknowledgements come in bursts (one update, thousands of watchers answering at
        once) faster than one Python thread reads them; the default buffer (rmem_default,
        ~200 KiB) then overflows and every lost acknowledgement costs a resend. As root,
        SO_RCVBUFFORCE may pass net.core.rmem_max; otherwise SO_RCVBUF is capped by it.
        """
        if not self._udp:
            return 0
        sock = self._udp[0].get_extra_info("socket")
        force = getattr(socket, "SO_RCVBUFFORCE", None)
        try:
            if force is None:
                raise PermissionError("no SO_RCVBUFFORCE")
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        # Linux reports twice the request (it counts its own bookkeeping in the buffer).
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)) // 2

    def send_stream(self, transport: Transport, peer: str, wire: bytes) -> bool:
        """Push a message on an open TCP/TLS connection (an LLQ event); False if it is gone.

        A client that does not read what is pushed is cut off rather than let the backlog
        grow without bound; its LLQs then end with the connection.
        """
        writer = self.streams.get((transport, peer))
        if writer is None or writer.is_closing():
            return False
        if writer.transport.get_write_buffer_size() > self.max_stream_backlog:
            log.warning("closing a connection that does not read pushed messages", peer=peer)
            writer.close()
            return False
        if wire is not self._framed[0]:
            # one change pushed to many sessions is one bytes object: frame it once
            self._framed = (wire, struct.pack("!H", len(wire)) + wire)
        writer.write(self._framed[1])
        return True

    def abort_stream(self, transport: Transport, peer: str) -> None:
        """Reset a connection at once (RFC 8490 5.3 "forcibly abort"): nothing more is read
        or sent on it; its reader ends and the plug-ins hear it closed."""
        writer = self.streams.get((transport, peer))
        if writer is not None and not writer.is_closing():
            writer.transport.abort()

    async def _next_prefix(self, reader: asyncio.StreamReader, kind: Transport, peer: str) -> bytes:
        # readexactly consumes nothing until all bytes are there, so a timeout loses no data.
        timeout = self.listen.idle_timeout
        while True:
            try:
                return await within(reader.readexactly(2), timeout)
            except TimeoutError:
                if not any(p.holds_connection(kind, peer) for p in self.core.plugins):
                    raise
                # Held by a plug-in with timers of its own (a DNS Push session, LLQs over
                # TCP): looked at again every HELD_RECHECK s, not every idle timeout (10,000
                # idle sessions cost ~1,000 timed-out waits a second, issue 18).
                timeout = max(timeout, HELD_RECHECK)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        lst = self.listen
        reuse = lst.reuse_port or None
        udp, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(self), local_addr=(lst.host, lst.port), reuse_port=reuse
        )
        self._udp.append(udp)
        self.addresses["udp"] = udp.get_extra_info("sockname")[:2]
        tcp = await asyncio.start_server(
            lambda r, w: self._client(r, w, Transport.TCP),
            lst.host,
            lst.port,
            limit=70000,
            reuse_port=reuse,
        )
        self._tcp.append(tcp)
        self.addresses["tcp"] = tcp.sockets[0].getsockname()[:2]
        if lst.tls is not None and lst.tls_port is not None:
            dot = await asyncio.start_server(
                lambda r, w: self._client(r, w, Transport.TLS),
                lst.host,
                lst.tls_port,
                ssl=lst.tls,
                ssl_handshake_timeout=lst.read_timeout,
                limit=70000,
                reuse_port=reuse,
            )
            self._tcp.append(dot)
            self.addresses["tls"] = dot.sockets[0].getsockname()[:2]
        self._tasks.append(asyncio.create_task(self._timers()))
        self._watch_notices()
        for sock in self.forward_sockets:
            fwd = Forwarding(self if self.forward_writer else None)
            await loop.connect_accepted_socket(lambda f=fwd: f, sock)  # type: ignore[misc]
            if not self.forward_writer:
                self.forward_updates = fwd
        log.info(
            "registry listening",
            event_loop=type(loop).__module__.split(".")[0],
            **{k: f"{h}#{p}" for k, (h, p) in self.addresses.items()},
        )

    async def _client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, kind: Transport
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        addr = writer.get_extra_info("peername") or ("?", 0)
        client = client_prefix(str(addr[0]))
        over = self._over_connection_limit(client)
        if over is not None:
            self.refused[over] += 1
            if client not in self._refusing:
                self._refusing.add(client)
                log.warning(
                    "connection refused", client=client, limit=over, refused=self.refused[over]
                )
            writer.close()
            return
        self._connections.add(task)
        self._per_client[client] = self._per_client.get(client, 0) + 1
        peer = f"{addr[0]}#{addr[1]}"
        self.streams[(kind, peer)] = writer
        try:
            while True:
                prefix = await self._next_prefix(reader, kind, peer)
                (length,) = struct.unpack("!H", prefix)
                if length < 12:
                    break
                data = await within(reader.readexactly(length), self.listen.read_timeout)
                out = self.dispatch(data, kind, addr)
                if out is not None:
                    writer.write(struct.pack("!H", len(out)) + out)
                    await within(writer.drain(), self.listen.read_timeout)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            self._connections.discard(task)
            left = self._per_client.pop(client, 1) - 1
            if left:
                self._per_client[client] = left
            self._refusing.discard(client)
            self.streams.pop((kind, peer), None)
            for plugin in self.core.plugins:
                try:
                    if plugin.connection_closed(kind, peer):
                        self._wake.set()  # what ended may have made room for others
                except Exception:
                    log.exception("connection close handler failed", peer=peer)
            writer.close()
            with contextlib.suppress(Exception):
                await within(writer.wait_closed(), 1.0)

    def _over_connection_limit(self, client: str) -> str | None:
        """Which connection limit a new connection from ``client`` would pass, or None."""
        if len(self._connections) >= self.listen.max_connections:
            return "total"
        if self._per_client.get(client, 0) >= self.listen.max_connections_per_client:
            return "per_client"
        return None

    def _watch_notices(self) -> None:
        """Watch the descriptor on which other servers' notices arrive, following it when
        the storage reconnects (the old one is still open when it is let go: see PgStorage)."""
        fd = self.core.store.storage.listen_fileno()
        if fd == self._notice_fd:
            return
        loop = asyncio.get_running_loop()
        if self._notice_fd is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(self._notice_fd)
        if fd is not None:
            loop.add_reader(fd, self._on_notice)
        self._notice_fd = fd

    def _on_notice(self) -> None:
        try:
            if self.core.store.sync_external():
                self._wake.set()  # the plug-ins hear of the changes on the next pass
        except DatabaseUnavailable as e:
            self._database_down(e)
        except Exception:
            log.exception("reading other servers' changes failed; retrying")
        self._watch_notices()

    def _database_down(self, e: DatabaseUnavailable) -> None:
        if not self._db_down:
            log.warning("registry database unreachable: updates get SERVFAIL", error=str(e))
        self._db_down = True

    async def _timers(self) -> None:
        store = self.core.store
        next_accounts = 0.0
        while True:
            now = time.time()
            if self.core.group_open:
                self.flush_group()  # expiry commits on its own: never before the group
            try:
                store.sync_external()
                if now >= next_accounts:
                    store.refresh_accounts()
                    next_accounts = now + 1.0
                self.core.tick(now)
                if self._db_down:
                    log.info("registry database reachable again")
                    self._db_down = False
            except DatabaseUnavailable as e:
                self._database_down(e)
            except Exception:
                log.exception("timer work failed; retrying in a second")
            self._watch_notices()
            self._run_plugins(now)
            deadlines = [self.core.next_deadline(), *(p.next_deadline() for p in self.core.plugins)]
            deadline = min((d for d in deadlines if d is not None), default=None)
            delay = 1.0 if deadline is None else min(max(deadline - time.time(), 0.0), 1.0)
            self._wake.clear()
            if delay == 0.0 or self._changes:
                await asyncio.sleep(0)  # let the sockets be read between two passes
                continue
            # asyncio.timeout, not wait_for: see Watcher._run (a lost cancellation).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    def _run_plugins(self, now: float) -> None:
        changes = list(self._changes)
        self._changes.clear()  # the list the store's observer appends to
        for plugin in self.core.plugins:
            try:
                if changes:
                    self.push(plugin.on_changes(changes, now))
                self.push(plugin.tick(now))
            except Exception:
                log.exception("plug-in timer work failed; retrying", plugin=type(plugin).__name__)

    async def close(self) -> None:
        if self.core.group_open:
            self.flush_group()
        if self._notice_fd is not None:
            asyncio.get_running_loop().remove_reader(self._notice_fd)
            self._notice_fd = None
        for t in self._tasks:
            t.cancel()
        for s in self._tcp:
            s.close()
        for u in self._udp:
            u.close()
        for c in list(self._connections):
            c.cancel()
        ending = [*self._tasks, *self._connections]
        if ending:
            _, stuck = await asyncio.wait(ending, timeout=CLOSE_GRACE)
            if stuck:
                # Each await in them honours a cancellation (aio.within), so this is a bug;
                # the process still exits, the log says where it stuck.
                log.error(
                    "tasks still running after cancel; stopping without them",
                    tasks=[t.get_coro().__qualname__ for t in stuck],  # type: ignore[union-attr]
                )
        for s in self._tcp:
            with contextlib.suppress(Exception):
                await within(s.wait_closed(), 2.0)
        if self.forward_updates is not None and self.forward_updates.transport is not None:
            self.forward_updates.transport.close()
        self.core.store.storage.close()
        log.info("registry stopped")
