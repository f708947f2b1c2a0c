"""``btmm up``: the host daemon's asyncio wiring (docs/architecture.md section 4).

No protocol logic lives here: records are built in ``records``, the LLQ client, the port
mapping renewal and the key exchange are their own packages. This module decides *when*:
publish at start and before the lease runs out (and at once when the external endpoint
changes), follow the browse list and each peer's endpoint records by LLQ, ask the registry's
STUN server for the tunnel port's reflexive address, run the path checks of every peer
(``daemon/pathset.py``) and point its session where they say, keep one key-exchange session per
peer, watch addresses and routes, keep the hosts block, and answer ``btmm status``, ``btmm
ping`` and ``btmm down`` on the control socket (``control_server.py``) with the state of now.

With ``[tunnel] idle_timeout`` > 0 (the default) tunnels are on demand (``daemon/ondemand.py``):
no handshake at peer discovery; the engine holds the first packets for a peer and reports
``PeerWanted``, which opens the tunnel; one with no packet for ``idle_timeout`` is closed, and
an opening that takes longer than ``connect_timeout`` answers the held packets with ICMPv6
unreachable. ``idle_timeout = 0`` keeps every tunnel up, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.message
import dns.name
import dns.rdatatype
import dns.resolver
import dns.rrset
import structlog
from prometheus_client import CollectorRegistry

from btmm_core import __version__
from btmm_core.aio import within
from btmm_core.daemon.config import Config
from btmm_core.daemon.control import Op, PingArgs, Request
from btmm_core.daemon.control_server import ControlServer
from btmm_core.daemon.dnsclient import RegistryClient, RRsets
from btmm_core.daemon.echo import EchoSocket
from btmm_core.daemon.hosts import write_hosts
from btmm_core.daemon.identity import HostIdentity, retire_legacy_identity
from btmm_core.daemon.metrics import DaemonCollector
from btmm_core.daemon.naming import Names
from btmm_core.daemon.netutil import (
    del_routes,
    drain,
    local_addresses,
    local_ipv4_towards,
    netlink_monitor,
    set_routes,
)
from btmm_core.daemon.ondemand import (
    Close,
    OnDemand,
    OnDemandAction,
    OnDemandConfig,
    Open,
    Reject,
)
from btmm_core.daemon.pathset import PathSet, Tagged, tunnel_state
from btmm_core.daemon.records import (
    CandidateRead,
    PeerRecords,
    Publication,
    address_types,
    browse_name,
    candidate_refs,
    candidate_srv_name,
    granted_lease,
    host_name,
    left_candidate_targets,
    peer_from_answers,
    peer_host_label,
    publish_update,
    read_candidates,
    srv_fingerprint,
    srv_name,
    verify_peer,
    withdraw_update,
)
from btmm_core.daemon.relay import Relay
from btmm_core.daemon.services import ServicePublisher
from btmm_core.daemon.sso import Sso
from btmm_core.daemon.turncreds import fetch_offer
from btmm_core.dataplane import open_engine
from btmm_core.dataplane.api import (
    ControlPacket,
    Endpoint,
    Engine,
    EngineConfig,
    PeerInfo,
    StunPacket,
)
from btmm_core.dataplane.netconf import configure_tun
from btmm_core.dns.keyfile import read_key
from btmm_core.dns.tsig import KeyRole
from btmm_core.errors import (
    BtmmError,
    ClockSkew,
    ConfigError,
    CredentialsRejected,
    PeerRefused,
    RegistryError,
    TurnError,
)
from btmm_core.keyex.driver import KeyExchangeDriver, Report
from btmm_core.keyex.keys import derive_psk, load_or_create
from btmm_core.keyex.noise import Handshaker
from btmm_core.keyex.session import Established, KeyExchange, SessionConfig
from btmm_core.llq.client import Changes, ClientConfig, StateChanged
from btmm_core.llq.driver import Watcher
from btmm_core.metrics.exporter import MetricsServer
from btmm_core.portmap.addresses import is_behind_nat
from btmm_core.portmap.client import PortMapClient, default_gateway
from btmm_core.portmap.renewal import EventKind, MappingEvent, MappingRenewal
from btmm_core.reach.candidates import Candidate, CandidateKind, LocalAddress, gather
from btmm_core.reach.paths import (
    PATH_NAMES,
    PathDown,
    PathRecovered,
    PathStale,
    ReflexiveSeen,
    SendProbe,
    UsePath,
)
from btmm_core.sso.files import REVOKED_LABEL, Revoked, parse_revocation
from btmm_core.stun.client import BindingTransaction
from btmm_core.stun.message import TransportAddress

log = structlog.get_logger("btmm.daemon")

#: STUN (RFC 8489) towards the registry: its default port, how often to ask again, and a
#: shorter transaction than 6.2.1's default (requests at 0, 0.5, 1.5, 3.5, 7.5 s, given up at
#: 11.5 s): the next network change or interval asks again anyway
STUN_PORT = 3478
STUN_INTERVAL = 300.0
#: STUN rounds while a peer has no direct path (the relay, or none)
RELAY_STUN_INTERVAL = 20.0
STUN_RC = 5
STUN_RM = 8
#: how often the engine's per-peer counters are read while a tunnel is up or opening: the
#: path managers' liveness evidence, the on-demand idle timers' evidence of use and the key
#: exchange's packet budget
COUNTERS_POLL = 0.5
#: how often while no tunnel is up or opening (no SA: no counter can move); opening one wakes
#: the poll at once
COUNTERS_IDLE_POLL = 5.0
#: reads of hosts' records at once when many are new together (the browse list of a device
#: joining an account): each read is three round trips to the registry, and one after another
#: the 99 of an account of 100 took 11 s
READS_AT_ONCE = 8


@dataclass
class Peer:
    records: PeerRecords
    added_at: float
    established_at: float | None = None
    handshakes: int = 0
    last_failure: str | None = None
    watchers: list[Watcher] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: event-loop time of the last full read of its records
    read_at: float = 0.0
    #: its candidate SRV at that read (``srv_fingerprint``); None: it published none
    candidate_srv: frozenset[str] | None = None


@dataclass
class _Reading:
    """A read of one host's records in progress (``Daemon._resolve``)."""

    task: asyncio.Task[None] | None = None
    #: someone asked while it ran: read once more when it ends
    again: bool = False


@dataclass
class NetState:
    local_address: str | None = None
    gateway: str | None = None
    external: tuple[str, int] | None = None
    mapping: str = "none"
    mapping_error: str | None = None
    #: the mapping failed: publish identity records without an endpoint
    unreachable: bool = False
    #: the interfaces' addresses, where LAN and IPV6 candidates come from
    local: tuple[LocalAddress, ...] = ()
    #: the server-reflexive endpoint of the engine's port (STUN, RFC 8489); None until the
    #: registry's STUN server answered
    reflexive: Endpoint | None = None
    #: where the STUN server is, and what the last Binding transaction came to
    stun_server: Endpoint | None = None
    stun_error: str | None = None
    #: a peer-reflexive endpoint a peer saw our probes come from: our REFLEXIVE candidate
    #: while STUN has none
    peer_reflexive: Endpoint | None = None


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # this device's own key; its file names the zone (an old account-key file: the key's
        # name is the zone)
        self.key = read_key(cfg.credentials)
        self.zone: dns.name.Name = self.key.zone
        if self.key.role == KeyRole.ACCOUNT:
            log.warning("this host holds the account key, which may change every host's "
                        "records; give it its own key with `btmm join` (an invite from "
                        "`btmm serve user invite`)", credentials=str(cfg.credentials))
        self.static = load_or_create(cfg.key_file)
        self.identity = self._identity()
        secret = cfg.secret_file.read_bytes().strip()
        self.psk = derive_psk(secret)
        self.sso: Sso | None = None
        #: hosts of the browse list that are not peers (yet): when each was last read, and
        #: those whose read failed (asked again every round, not only at ``reread_interval``)
        self._unknown_read_at: dict[dns.name.Name, float] = {}
        self._unknown_failed: set[dns.name.Name] = set()
        #: the browse list as last read, and the zone's serial when a resolver round last
        #: checked every peer without an error (``_resolver``): while the serial stays, nothing
        #: in the zone changed and the round asks nothing per peer
        self._listed: set[dns.name.Name] | None = None
        self._checked_serial: int | None = None
        #: reads of hosts' records in progress, so that callers at the same time share them
        self._reading: dict[dns.name.Name, _Reading] = {}
        if cfg.sso_enabled:
            self.sso = Sso(cfg, self.zone, self.static.private, self.static.public, secret,
                           str(self.identity.ula))
        self.engine: Engine | None = None
        self.kx: KeyExchange | None = None
        self.driver: KeyExchangeDriver | None = None
        self.registry: RegistryClient | None = None
        self.net = NetState()
        self.peers: dict[dns.name.Name, Peer] = {}
        self.published: Publication | None = None
        self.lease: int | None = None
        self.published_at: float | None = None
        self.publish_error: str | None = None
        self.llq_state = "idle"
        self.started = time.time()
        self._republish = asyncio.Event()
        self._portmap: MappingRenewal | None = None
        self._portmap_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._browse: Watcher | None = None
        self._rng = random.SystemRandom()
        self.paths = PathSet(self.static, self.psk, os.urandom)
        self.paths.peer_reflexive_kind = self._peer_reflexive_kind
        self.ondemand = OnDemand(OnDemandConfig(float(cfg.idle_timeout),
                                                float(cfg.connect_timeout)))
        self._ondemand_wake = asyncio.Event()
        self._counters_wake = asyncio.Event()
        self._paths_wake = asyncio.Event()
        self._stun_wake = asyncio.Event()
        self._stun: BindingTransaction | None = None
        self._stun_done = asyncio.Event()
        self.fatal: BtmmError | None = None
        self._stop: asyncio.Event | None = None
        self.names = Names(cfg, self.zone)
        self.services = ServicePublisher(cfg, self.zone)
        self.control: ControlServer | None = None
        #: how often each peer's tunnel was pointed at a path (``UsePath``), for the metrics
        self.path_changes: Counter[str] = Counter()
        #: what the clean shutdown did, for a ``down`` request waiting on it
        self._stopped: asyncio.Future[dict[str, Any]] | None = None
        #: the TURN relay (daemon/relay.py), when the registry offers one
        self.relay: Relay | None = None
        self.relay_error: str | None = None
        #: the publication on the wire and its exchange: a stop in the middle of it waits for
        #: the answer before withdrawing (the registry may apply it after a withdrawal sent at
        #: once, e.g. a TCP publish it reads after the withdrawal's datagram, and then we would
        #: not know what to withdraw: ``published`` is set only by the answer)
        self._publishing: tuple[Publication, asyncio.Task[dns.message.Message]] | None = None

    # -- set up ------------------------------------------------------------------------

    def _identity(self) -> HostIdentity:
        """Our ULA, bound to the device key; say so once where an older version chose one."""
        ident = HostIdentity.of_key(self.static.public)
        old = retire_legacy_identity(self.cfg.identity_file)
        if old is not None and old != str(ident.ula):
            log.warning("this host's address is now derived from its device key", old=old,
                        new=str(ident.ula), removed=str(self.cfg.identity_file),
                        hint="peers learn the new address from the published records; update "
                        "anything that used the old one")
        if self.cfg.interface_id:
            log.warning("interface_id is no longer used: the address is derived from the "
                        "device key", hint=f"remove interface_id from [host] in {self.cfg.path}")
        return ident

    def open(self) -> None:
        """Open the engine and address the TUN device (before the event loop: pyroute2's
        synchronous IPRoute must not run inside it)."""
        cfg = self.cfg
        self.engine = open_engine(
            EngineConfig(tun_name=cfg.tun, listen=Endpoint("::", cfg.port), mtu=cfg.mtu),
            None if cfg.dataplane == "auto" else cfg.dataplane,
        )
        try:
            configure_tun(self.engine.tun_name, mtu=cfg.mtu, address=f"{self.identity.ula}/128")
        except BaseException:
            self.engine.stop()
            raise
        session = SessionConfig(keepalive_interval=cfg.keepalive or None)
        self.kx = KeyExchange(Handshaker(self.static, self.psk, os.urandom), session)

    async def _find_registry(self) -> tuple[str, int]:
        configured = self.cfg.server_address()
        if configured is not None:
            return configured
        # RFC 2136 has no discovery: a DNS-SD style SRV under the user's zone
        # (docs/architecture.md section 6)
        qname = dns.name.from_text("_dns-update._udp", origin=self.zone)
        try:
            ans = await asyncio.to_thread(dns.resolver.resolve, qname, "SRV")
            srv = sorted(ans, key=lambda r: (r.priority, -r.weight))[0]
            a = await asyncio.to_thread(dns.resolver.resolve, srv.target, "A")
            return str(a[0].address), int(srv.port)
        except dns.exception.DNSException as exc:
            raise ConfigError(
                f"cannot find the registry: no SRV {qname} ({exc})",
                hint=f'set server = "HOST:PORT" under [registry] in {self.cfg.path}',
            ) from exc

    # -- main --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, metrics: tuple[str, int] | None = None) -> None:
        """Run until ``stop`` is set; ``metrics``: serve Prometheus metrics there (a loopback
        HOST, PORT; ``metrics/exporter.py``)."""
        assert self.engine is not None and self.kx is not None
        self._stop = stop
        # first, so that `btmm status` and `btmm down` work from the start and another
        # daemon on the same state is found before anything is touched
        self._stopped = asyncio.get_running_loop().create_future()
        self.control = ControlServer(self.cfg.control_path, self.on_control)
        await self.control.start()
        with contextlib.suppress(OSError):
            # written every second by versions before the control socket; it would only show
            # the past now
            self.cfg.legacy_status_file.unlink()
        exporter = None
        try:
            if metrics is not None:
                registry = CollectorRegistry(auto_describe=False)
                registry.register(DaemonCollector(self))
                exporter = MetricsServer(registry, *metrics)
                await exporter.start()
            await self._run(stop)
        finally:
            if exporter is not None:
                await exporter.close()
            if not self._stopped.done():
                self._stopped.set_result({"withdrawn": None, "peers_dropped": 0,
                                          "error": None if self.fatal is None
                                          else self.fatal.what})
            # last: a `down` waiting on ``_stopped`` is answered before the socket goes
            await self.control.close()

    async def _run(self, stop: asyncio.Event) -> None:
        assert self.engine is not None and self.kx is not None
        server = await self._find_registry()
        self.registry = RegistryClient(server, self.key)
        self.engine.start()
        on_demand = self.ondemand.config.on_demand
        self.driver = KeyExchangeDriver(self.engine, self.kx, on_report=self._on_report,
                                        on_stun=self._on_stun,
                                        on_path_message=self._on_path_message,
                                        poll_interval=None,  # _counters_loop reads them
                                        on_peer_wanted=self._on_peer_wanted if on_demand
                                        else None)
        self.driver.start()
        log.info("daemon starting", host=self.cfg.host, zone=self.zone.to_text(),
                 ula=str(self.identity.ula), registry=f"{server[0]}:{server[1]}",
                 port=self.engine.local_port, public=self.static.public_b64)
        self._write_hosts()  # replaces a block a crashed run may have left
        try:
            if self.sso is not None:
                try:
                    self.sso.start(time.time())
                except OSError as err:
                    # the tunnels matter more than ssh: carry on, say so in the status
                    self.sso.state.error = f"cannot write the SSH files: {err}"
                    log.error("SSH single sign-on not set up", error=str(err),
                              hint="check [sso] paths and that btmm runs as root")
                self._spawn(self._sso_loop(), "sso")
            if on_demand:
                self.names.on_lookup = self._on_name_lookup
            await self.names.start(self.engine.tun_name, self.registry.query)
            await self._check_network(first=True)
            self._spawn(self._publisher(), "publisher")
            self._spawn(self.services.run(self.registry), "services")
            self._spawn(self._netcheck(), "netcheck")
            self._spawn(self._resolver(), "resolver")
            self._spawn(self._stun_loop(), "stun")
            self._spawn(self._counters_loop(), "counters")
            self._spawn(self._path_loop(), "paths")
            self._spawn(self._relay_loop(), "relay")
            self._spawn(self._ondemand_loop(), "ondemand")
            self._browse = Watcher(server, browse_name(self.zone), dns.rdatatype.PTR,
                                   key=self.key, config=ClientConfig(lease=self.cfg.llq_lease))
            await self._browse.start()
            self._spawn(self._follow(self._browse, self._on_browse, "browse"), "browse")
            await stop.wait()
        finally:
            await self._shutdown()
        if self.fatal is not None:
            raise self.fatal

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except CredentialsRejected as err:
                # BADKEY/BADSIG: revoked or a wrong key; retrying cannot help (BADTIME never
                # gets here: it is retried where it happens)
                log.error("stopping", error=err.what, hint=err.hint)
                self.fatal = err
                assert self._stop is not None
                self._stop.set()
            except Exception:
                log.exception("daemon task failed; stopping", task=name)
                self.fatal = BtmmError(f"internal error in {name}; see the log above")
                assert self._stop is not None
                self._stop.set()

        self._tasks.append(asyncio.create_task(guarded(), name=name))

    async def _shutdown(self) -> None:
        withdrawn: bool | None = None
        dropped = len(self.peers)
        reads = [r.task for r in self._reading.values() if r.task is not None]
        for t in [*self._tasks, *reads]:
            t.cancel()
        for t in [*self._tasks, *reads]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        peers, self.peers = list(self.peers.values()), {}
        await self._release_peers(peers)
        if peers:
            log.info("peers removed", count=len(peers), why="shutting down")
        if self._browse is not None:
            with contextlib.suppress(Exception):
                await within(self._browse.close(), 2.0)
        await self.services.withdraw(self.registry)
        held = await self._finish_publishing()
        if held and self.registry is not None:
            try:
                for pub in held:
                    await self.registry.exchange(withdraw_update(self.zone, pub))
                log.info("records withdrawn")
                withdrawn = True
            except BtmmError as err:
                withdrawn = False
                log.warning("could not withdraw records; they expire with their lease",
                            error=str(err))
        if self._portmap is not None:
            await self._stop_portmap(delete=True)
        if self.relay is not None:
            self.relay.close()
        if self.driver is not None:
            self.driver.close()
        await self.names.close()
        if self.cfg.hosts_file is not None:
            with contextlib.suppress(OSError):
                write_hosts(self.cfg.hosts_file, {})
        if self.sso is not None:
            try:
                self.sso.stop()
            except OSError as err:
                log.warning("could not remove the sshd drop-in", error=str(err),
                            path=str(self.cfg.sso_sshd_dropin))
        log.info("daemon stopped")
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result({"withdrawn": withdrawn, "peers_dropped": dropped,
                                      "error": None if self.fatal is None else self.fatal.what})

    # -- publishing --------------------------------------------------------------------

    def _publication(self) -> Publication | None:
        # nothing before the gateway answered or STUN did: a lone private address is worth
        # publishing only with something peers outside the home can reach
        if (self.net.external is None and not self.net.unreachable
                and self._reflexive() is None):
            return None
        addr, port = self.net.external if self.net.external is not None else (None, None)
        ssh_ca, ssh_bind = self.sso.published() if self.sso is not None else ("", "")
        return Publication(
            host=self.cfg.host, ula=self.identity.ula,
            autotunnel=self.identity.autotunnel_label(), public_key=self.static.public_b64,
            external_address=None if addr is None else ipaddress.IPv4Address(addr),
            external_port=port, version=__version__, candidates=self._candidates(),
            ssh_ca=ssh_ca, ssh_bind=ssh_bind,
        )

    def _candidates(self) -> tuple[Candidate, ...]:
        """Where peers could reach this host's engine: its LAN addresses, its global IPv6
        addresses (the engine's socket is dual-stack), the mapping (or its own public address)
        and the reflexive endpoint (STUN's, or else what a peer saw our probes come from).
        Published for the peers' path checks, and our side of our own."""
        if self.engine is None:
            return ()
        ext = self.net.external
        found = gather(self.net.local, self.engine.local_port,
                       mapped=None if ext is None else Endpoint(*ext),
                       reflexive=self._reflexive(), tunnel=self.engine.tun_name, ipv6=True)
        relayed = None if self.relay is None else self.relay.relayed
        return found if relayed is None else (*found, Candidate(CandidateKind.RELAY, relayed))

    def _reflexive(self) -> Endpoint | None:
        return self.net.reflexive or self.net.peer_reflexive

    async def _publish_once(self, pub: Publication) -> None:
        assert self.registry is not None
        left: tuple[dns.name.Name, ...] = ()
        if self.published is None:
            # the first publish of this run: a crashed run may have left candidate addresses
            try:
                srv = await self.registry.query(candidate_srv_name(pub.host, self.zone),
                                                dns.rdatatype.SRV)
                left = left_candidate_targets(srv, pub.host, self.zone)
            except BtmmError as err:
                log.debug("could not read what an earlier run published", error=str(err))
        msg = publish_update(self.zone, pub, self.published, self.cfg.lease, left)
        exchange = asyncio.create_task(self.registry.exchange(msg))
        self._publishing = (pub, exchange)
        # shielded: cancelling the publisher (a stop) leaves the exchange to finish
        try:
            resp = await asyncio.shield(exchange)
        except BtmmError:
            self._publishing = None
            raise
        self._publishing = None
        changed = pub != self.published
        self.published = pub
        self.lease = granted_lease(resp) or self.cfg.lease
        self.published_at = time.time()
        self.publish_error = None
        if changed:
            log.info("records published", lease=self.lease,
                     endpoint=None if pub.external_port is None
                     else f"{pub.external_address}:{pub.external_port}",
                     candidates=[_candidate_text(c) for c in pub.candidates])
        else:
            log.debug("records refreshed", lease=self.lease)

    async def _finish_publishing(self) -> tuple[Publication, ...]:
        """Wait for the answer to a publish the stop interrupted (bounded by the registry
        client's own tries), so that the withdrawal follows it; what to withdraw: what the
        registry holds, or, with no answer, what it may hold (either publication)."""
        if self._publishing is None:
            return () if self.published is None else (self.published,)
        pub, exchange = self._publishing
        self._publishing = None
        try:
            await exchange
        except BtmmError:
            # refused, or applied without our hearing it: withdraw both (deleting what is
            # not there is harmless)
            return tuple(p for p in (self.published, pub) if p is not None)
        self.published = pub
        return (pub,)

    async def _publisher(self) -> None:
        backoff = 1.0
        while True:
            # cleared before reading the endpoint: a change during the exchange publishes again
            self._republish.clear()
            pub = self._publication()
            wait: float | None = None
            if pub is not None:
                try:
                    await self._publish_once(pub)
                    backoff = 1.0
                    assert self.lease is not None
                    wait = self.lease * self.cfg.refresh_fraction * (1 - 0.05 * self._rng.random())
                except CredentialsRejected:
                    raise
                except ClockSkew as err:
                    # never fatal: a clock that is off (or one request of ours stamped later
                    # than this one) is retried with a capped backoff and shown in the status
                    self.publish_error = str(err)
                    log.error("clock skew: publishing refused (BADTIME); retrying",
                              skew=err.skew, error=err.what, hint=err.hint, retry_in=backoff)
                    wait, backoff = backoff, min(backoff * 2, 60.0)
                except RegistryError as err:
                    self.publish_error = str(err)
                    log.warning("publishing failed; retrying", error=err.what, hint=err.hint,
                                retry_in=backoff)
                    wait, backoff = backoff, min(backoff * 2, 30.0)
            with contextlib.suppress(TimeoutError):
                await within(self._republish.wait(), wait)

    # -- network -----------------------------------------------------------------------

    async def _check_network(self, first: bool = False) -> None:
        try:
            await self._check_network_once(first)
        finally:
            self._paths_wake.set()  # the path managers see our candidates as they are now

    async def _check_network_once(self, first: bool) -> None:
        assert self.registry is not None and self.engine is not None
        addresses = tuple(await asyncio.to_thread(local_addresses))
        if addresses != self.net.local:
            self.net.local = addresses
            self._candidates_changed()  # the LAN candidates may have changed
        local = local_ipv4_towards(self.registry.server[0])
        gateway = self.cfg.gateway or default_gateway()
        if not first and (local, gateway) == (self.net.local_address, self.net.gateway):
            return
        log.info("network", local=local, gateway=gateway, before=self.net.local_address)
        self.net.local_address, self.net.gateway = local, gateway
        # what a peer saw belongs to the old network; STUN asks again at once
        self.net.peer_reflexive = None
        self._stun_wake.set()
        await self._stop_portmap(delete=False)
        self.net.unreachable = False
        if local is None:
            self.net.external = None
            self.net.mapping = "no route to the registry"
            return
        if self.cfg.portmap == "off" or not is_behind_nat(local):
            self.net.mapping = "not needed (public address)" if self.cfg.portmap == "auto" \
                else "off"
            self.net.mapping_error = None
            self._set_external((local, self.engine.local_port))
            return
        if gateway is None:
            self.net.mapping = "failed"
            self.net.mapping_error = "no default gateway to ask for a port mapping"
            self._set_external((local, self.engine.local_port))
            return
        self.net.mapping = "requesting"
        client = PortMapClient(gateway, local_address=local)
        self._portmap = MappingRenewal(client, self.engine.local_port)
        await self._portmap.start()
        self._portmap_task = asyncio.create_task(self._portmap_events(self._portmap))
        # nothing is published until the gateway answers: a private address helps no peer
        self.net.external = None

    def _candidates_changed(self) -> None:
        """Our addresses, mapping, reflexive or relayed endpoint may have changed: publish
        again, and let the path managers see the new local candidates now."""
        self._republish.set()
        self._paths_wake.set()

    def _set_external(self, ext: tuple[str, int]) -> None:
        if ext != self.net.external:
            self.net.external = ext
            self._candidates_changed()
            self._poke_peers()

    async def _stop_portmap(self, *, delete: bool) -> None:
        if self._portmap_task is not None:
            self._portmap_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._portmap_task
            self._portmap_task = None
        if self._portmap is not None:
            pm, self._portmap = self._portmap, None
            with contextlib.suppress(BtmmError, OSError, TimeoutError):
                await within(pm.stop(delete=delete), 5.0)

    async def _portmap_events(self, renewal: MappingRenewal) -> None:
        while True:
            ev: MappingEvent = await renewal.events.get()
            if ev.kind == EventKind.FAILED:
                self.net.mapping = "failed"
                self.net.mapping_error = ev.reason
                log.error("no port mapping: peers cannot reach this host first",
                          reason=ev.reason)
                if not self.net.unreachable:
                    # publish who we are without an endpoint: peers accept our handshakes
                    # and answer to where they come from (their NAT lets the answers in)
                    self.net.unreachable = True
                    self.net.external = None
                    self._candidates_changed()
                continue
            if ev.mapping is None or ev.kind == EventKind.DELETED:
                continue
            m = ev.mapping
            self.net.unreachable = False
            self.net.mapping = f"{m.protocol} via {m.gateway}, {m.lifetime} s"
            self.net.mapping_error = None
            if ev.kind != EventKind.RENEWED:
                log.info("port mapping", kind=ev.kind.value,
                         external=f"{m.external_address}:{m.external_port}", reason=ev.reason)
            self._set_external((str(m.external_address), m.external_port))

    async def _netcheck(self) -> None:
        # rtnetlink notifications (a link, an IPv4 address or route changed) wake the check at
        # once; the periodic check is the fallback where netlink is unavailable
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        sock = netlink_monitor()

        def readable() -> None:
            assert sock is not None
            drain(sock)
            changed.set()

        if sock is not None:
            loop.add_reader(sock.fileno(), readable)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await within(changed.wait(), self.cfg.netcheck_interval)
                if changed.is_set():
                    changed.clear()
                    await asyncio.sleep(0.1)  # let a burst (link + address + route) settle
                    if sock is not None:
                        drain(sock)
                await self._check_network()
        finally:
            if sock is not None:
                loop.remove_reader(sock.fileno())
                sock.close()

    def _poke_peers(self) -> None:
        """After our outer address changed, send each peer one datagram through the tunnel
        (to the discard port of its ULA): an authenticated packet from the new endpoint moves
        the peer's idea of where we are at once (docs/architecture.md decision 5), without
        waiting for its LLQ event or the next rekey."""
        for peer in self.peers.values():
            with contextlib.suppress(OSError), socket.socket(socket.AF_INET6,
                                                             socket.SOCK_DGRAM) as s:
                s.sendto(b"btmm roam", (str(peer.records.ula), 9))

    # -- STUN: the tunnel port's reflexive address ---------------------------------------

    async def _stun_loop(self) -> None:
        """Ask at start, after every network change and every ``STUN_INTERVAL`` seconds.
        Runs beside start-up, never before it: a host without STUN still has its LAN and
        mapped candidates."""
        while True:
            self._stun_wake.clear()
            try:
                await self._stun_once()
            except CredentialsRejected:
                raise
            except (BtmmError, OSError) as err:
                # a failed STUN round costs the REFLEXIVE candidate, never the daemon
                self.net.stun_error = str(err)
                log.warning("STUN failed", error=str(err))
            await self._stun_pause()

    async def _stun_pause(self) -> None:
        """Until the next STUN round: ``STUN_INTERVAL``, or ``RELAY_STUN_INTERVAL`` while a
        peer has no direct path (the relay or none: a NAT that became punchable, or gave us
        a new port, shows in a new reflexive endpoint, and the peers then find the direct
        path), or a network change."""
        loop = asyncio.get_running_loop()
        since = loop.time()
        while True:
            on_relay = any(_not_direct(self.paths.status(str(p.records.ula), 0.0))
                           for p in self.peers.values())
            left = since + (RELAY_STUN_INTERVAL if on_relay else STUN_INTERVAL) - loop.time()
            if left <= 0:
                return
            try:
                await within(self._stun_wake.wait(), min(left, RELAY_STUN_INTERVAL))
                return
            except TimeoutError:
                continue

    async def _stun_server(self) -> Endpoint:
        """The SRV ``_stun._udp.<zone>`` the registry synthesizes (its target's address when
        the registry gives one), else the registry's own address and port 3478."""
        assert self.registry is not None
        host, port = self.registry.server[0], STUN_PORT
        try:
            srv = await self.registry.query(dns.name.from_text("_stun._udp", origin=self.zone),
                                            dns.rdatatype.SRV)
            if srv is not None and len(srv):
                best = sorted(srv, key=lambda r: (r.priority, -r.weight))[0]
                port = int(best.port)
                with contextlib.suppress(RegistryError):
                    a = await self.registry.query(best.target, dns.rdatatype.A)
                    if a is not None and len(a):
                        host = str(a[0].address)
        except CredentialsRejected:
            raise
        except RegistryError as err:
            log.debug("no STUN SRV; asking the registry's address", error=err.what)
        return Endpoint(host, port)

    async def _stun_once(self) -> None:
        assert self.engine is not None
        if self.net.local_address is None:
            self.net.stun_error = "no route to the registry"
            return
        server = await self._stun_server()
        self.net.stun_server = server
        loop = asyncio.get_running_loop()
        tx = BindingTransaction(TransportAddress(server.host, server.port), os.urandom,
                                rc=STUN_RC, rm=STUN_RM)
        self._stun, done = tx, self._stun_done
        done.clear()
        try:
            data: bytes | None = tx.start(loop.time())
            while not tx.finished:
                if data is not None:
                    try:
                        self.engine.send_stun(server, data)
                    except (BtmmError, OSError, ValueError) as err:
                        log.debug("cannot send a STUN request", error=str(err))
                deadline = tx.next_deadline()
                if deadline is None:
                    break
                with contextlib.suppress(TimeoutError):
                    await within(done.wait(), max(deadline - loop.time(), 0.0))
                data = None if tx.finished else tx.tick(loop.time())
        finally:
            self._stun = None
        if tx.mapped is None:
            self.net.stun_error = tx.error or "no answer"
            log.warning("STUN: no reflexive address", server=_endpoint_text(server),
                        error=self.net.stun_error)
            if self.net.reflexive is not None:
                self.net.reflexive = None
                self._candidates_changed()
            return
        found = Endpoint(tx.mapped.host, tx.mapped.port)
        self.net.stun_error = None
        if found != self.net.reflexive:
            log.info("STUN: reflexive address", reflexive=_endpoint_text(found),
                     server=_endpoint_text(server), rtt=None if tx.rtt is None
                     else round(tx.rtt, 3))
            self.net.reflexive = found
            self._candidates_changed()

    def _on_stun(self, packet: StunPacket) -> None:
        tx = self._stun
        if tx is None:
            return
        loop = asyncio.get_running_loop()
        tx.receive(packet.payload, TransportAddress(packet.source.host, packet.source.port),
                   loop.time())
        if tx.finished:
            self._stun_done.set()

    # -- paths: connectivity checks per peer ----------------------------------------------

    def _on_path_message(self, packet: ControlPacket) -> None:
        loop = asyncio.get_running_loop()
        self._apply_paths(self.paths.receive(packet.payload, packet.source, loop.time(),
                                             time.time()))
        self._paths_wake.set()

    async def _path_loop(self) -> None:
        """One timer for every peer's path manager (their evidence comes from
        ``_counters_loop``)."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            self._apply_paths(self.paths.set_local(self._candidates(), now, time.time()))
            self._apply_paths(self.paths.tick(now, time.time()))
            deadline = self.paths.next_deadline()
            self._paths_wake.clear()
            with contextlib.suppress(TimeoutError):
                await within(self._paths_wake.wait(),
                             None if deadline is None else max(deadline - loop.time(), 0.0))

    async def _counters_loop(self) -> None:
        """The engine's per-peer counters, read once for the path managers (liveness), the
        on-demand timers (use) and the key exchange (packet budget): every
        ``COUNTERS_POLL`` while any tunnel is up or opening, else every
        ``COUNTERS_IDLE_POLL``. Each read costs a record per peer, and most of an account's
        peers hold no tunnel: polling them all twice a second made a daemon's idle CPU grow
        with the account."""
        assert self.engine is not None and self.driver is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                infos = self.engine.peers()
            except BtmmError as err:
                log.warning("reading engine counters failed", error=str(err))
                infos = []
            now = loop.time()
            deadline = self.paths.next_deadline()
            observed = self.paths.observe(infos, now)
            self._apply_paths(observed)
            if observed or self.paths.next_deadline() != deadline:
                # only then: waking the path loop on every poll re-gathered our candidates
                # and walked every peer's manager for nothing
                self._paths_wake.set()
            for info in infos:
                c = info.counters
                self.ondemand.observe(info.inner, info.tx_spi is not None,
                                      c.packets_in + c.packets_out, now)
            self._ondemand_wake.set()
            self.driver.observe(infos)
            busy = self._tunnels_busy(infos)
            self._counters_wake.clear()
            with contextlib.suppress(TimeoutError):
                await within(self._counters_wake.wait(),
                             COUNTERS_POLL if busy else COUNTERS_IDLE_POLL)

    def _tunnels_busy(self, infos: Sequence[PeerInfo]) -> bool:
        """Whether any tunnel is up, opening or holding packets (its counters may move)."""
        assert self.kx is not None
        return (any(i.tx_spi is not None or i.rx_spis or i.held for i in infos)
                or any(s.want or s.busy() for s in self.kx.by_inner.values()))

    def _apply_paths(self, tagged: list[Tagged]) -> None:
        assert self.engine is not None and self.driver is not None and self.kx is not None
        for inner, out in tagged:
            if isinstance(out, SendProbe):
                try:
                    self.engine.send_control(out.destination, out.data)
                except (BtmmError, OSError, ValueError) as err:
                    log.debug("cannot send a path probe", to=_endpoint_text(out.destination),
                              error=str(err))
                continue
            peer = self._peer_of(inner)
            if isinstance(out, UsePath):
                log.info("path", peer=peer, path=PATH_NAMES[out.kind],
                         endpoint=_endpoint_text(out.endpoint),
                         rtt_ms=None if out.rtt is None else round(out.rtt * 1000, 1))
                self.path_changes[inner] += 1
                if inner in self.kx.by_inner:
                    self.driver.move_peer(inner, out.endpoint)
            elif isinstance(out, PathStale):
                log.warning("path stale", peer=peer, endpoint=_endpoint_text(out.endpoint),
                            why=out.reason)
                self._relay_check()
            elif isinstance(out, PathDown):
                log.warning("path down", peer=peer, endpoint=_endpoint_text(out.endpoint),
                            why=out.reason)
            elif isinstance(out, PathRecovered):
                log.info("path recovered", peer=peer, endpoint=_endpoint_text(out.endpoint))
            elif isinstance(out, ReflexiveSeen):
                self._on_reflexive_seen(out.endpoint, peer)

    # -- tunnels on demand (daemon/ondemand.py) ------------------------------------------

    def _on_name_lookup(self, address: ipaddress.IPv6Address) -> None:
        """A program looked a peer's name up through the stub: it is about to send, so the
        tunnel opens now (the issue's "first lookup ... starts the handshake")."""
        inner = str(address)
        if self.kx is not None and inner in self.kx.by_inner:
            self._on_peer_wanted(inner)

    def _on_peer_wanted(self, inner: str) -> None:
        loop = asyncio.get_running_loop()
        self._apply_ondemand(self.ondemand.wanted(inner, loop.time()))
        self._ondemand_wake.set()
        self._counters_wake.set()

    async def _ondemand_loop(self) -> None:
        """The on-demand timers (their evidence of use comes from ``_counters_loop``)."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            self._apply_ondemand(self.ondemand.tick(now))
            deadline = self.ondemand.next_deadline()
            self._ondemand_wake.clear()
            with contextlib.suppress(TimeoutError):
                await within(self._ondemand_wake.wait(),
                             None if deadline is None else max(deadline - loop.time(), 0.0))

    def _apply_ondemand(self, actions: list[OnDemandAction]) -> None:
        assert self.engine is not None and self.driver is not None and self.kx is not None
        for act in actions:
            if act.inner not in self.kx.by_inner:
                continue
            peer = self._peer_of(act.inner)
            try:
                if isinstance(act, Open):
                    log.info("tunnel opening", peer=peer)
                    self.driver.connect(act.inner)
                elif isinstance(act, Reject):
                    rejected = self.engine.reject_held(act.inner)
                    self.driver.idle(act.inner)
                    log.warning("tunnel did not open in time", peer=peer,
                                seconds=self.ondemand.config.connect_timeout,
                                packets_refused=rejected)
                elif isinstance(act, Close):
                    self.driver.idle(act.inner)
                    log.info("tunnel closed when idle", peer=peer,
                             seconds=self.ondemand.config.idle_timeout)
            except BtmmError as err:
                log.error("on-demand action failed", action=repr(act), error=str(err))

    def _on_reflexive_seen(self, endpoint: Endpoint, peer: str) -> None:
        """A peer saw our probes come from ``endpoint``: our REFLEXIVE candidate while STUN
        gave none (a LAN or mapped endpoint we already publish is no news)."""
        if self.net.reflexive is not None or self.net.peer_reflexive == endpoint:
            return
        if endpoint in {c.endpoint for c in self._candidates()}:
            return
        log.info("peer-reflexive address", reflexive=_endpoint_text(endpoint), seen_by=peer)
        self.net.peer_reflexive = endpoint
        self._candidates_changed()

    def _peer_of(self, inner: str) -> str:
        for p in self.peers.values():
            if str(p.records.ula) == inner:
                return p.records.host
        return inner

    # -- peers -------------------------------------------------------------------------

    async def _follow(
        self, watcher: Watcher, on_change: Callable[[Changes], Awaitable[None]], what: str
    ) -> None:
        while True:
            ev = await watcher.events.get()
            if isinstance(ev, StateChanged):
                if what == "browse":
                    self.llq_state = ev.state.value
                (log.info if what == "browse" else log.debug)(
                    "llq", query=what, state=ev.state.value, why=ev.why)
                continue
            await on_change(ev)

    async def _on_browse(self, changes: Changes) -> None:
        own = host_name(self.cfg.host, self.zone)
        for r in changes.removed:
            target = r.rdata.target  # type: ignore[attr-defined]
            if target != own and target in self.peers:
                await self._drop_peer(target, "removed from the zone")
        new: list[dns.name.Name] = []
        for r in changes.added:
            target = r.rdata.target  # type: ignore[attr-defined]
            if target == own:
                continue
            if peer_host_label(target, self.zone) is None:
                log.warning("browse list names a host outside our zone; ignored",
                            target=target.to_text(), zone=self.zone.to_text())
                continue
            new.append(target)
        await self._resolve_all(new)

    async def _resolve_all(self, names: Sequence[dns.name.Name]) -> None:
        """``_resolve`` each of ``names``, ``READS_AT_ONCE`` at a time."""
        gate = asyncio.Semaphore(READS_AT_ONCE)

        async def read(name: dns.name.Name) -> None:
            async with gate:
                await self._resolve(name)

        await asyncio.gather(*(read(name) for name in names))

    async def _resolver(self) -> None:
        """Every ``resolve_interval``: the zone's serial; when it moved since the last round
        that checked everything, each peer's candidate SRV, and all its records when that
        changed, when it has none, or when its last full read is ``reread_interval`` old
        (the records no LLQ follows: its key, its SSH CA).

        Not only LLQ events: over UDP through a NAT they stop arriving when the NAT drops or
        changes its mapping, and neither side learns it before the LLQ's refresh (half an
        hour). Skipping the peers whose LLQs were established (tried in 7119f87) lost new
        candidates after a NAT change for good. Every change of a peer's endpoints changes
        its candidate SRV (the targets' names hash the endpoints), so one signed query per
        peer finds what the events missed; and every change of the zone's data moves its
        serial (a lease refresh that changes nothing does not), so while the serial stays
        there is nothing to find. Checking each peer every round cost the registry one signed
        query per ordered pair of hosts every 30 s (330 a second in an account of 100) and
        made each daemon's idle CPU grow with the account; so did reading every peer in full
        each ``reread_interval`` whether or not the zone had changed (99 reads of three or
        more queries each per host, every 5 minutes: 160 queries a second at the registry
        of an idle account of 100, 16 % of its core). The serial is a signed query too, so a
        revoked device still learns it at once (BADKEY)."""
        assert self.registry is not None
        loop = asyncio.get_running_loop()
        while True:
            # 10 % either way: hosts started together do not ask the registry together
            await asyncio.sleep(self.cfg.resolve_interval * self._rng.uniform(0.9, 1.1))
            failures = self.registry.failures
            serial = await self._zone_serial()
            moved = serial is None or serial != self._checked_serial
            await self._read_unknown_hosts(listed_again=moved)
            if moved:
                for name in list(self.peers):
                    peer = self.peers.get(name)
                    if peer is None:
                        continue
                    # 5 % early: a read that came in just after the last round is due now
                    full = loop.time() - peer.read_at >= 0.95 * self.cfg.reread_interval
                    if full or await self._candidates_moved(name, peer):
                        await self._resolve(name)
                await self._read_revocations()
            # a failed exchange (this round's or another task's) may have missed a change:
            # the serial counts as checked only after a round without one
            if self.registry.failures == failures:
                self._checked_serial = serial

    async def _zone_serial(self) -> int | None:
        """The zone's SOA serial as the registry has it now; None if it cannot say."""
        assert self.registry is not None
        try:
            soa = await self.registry.query(self.zone, dns.rdatatype.SOA)
        except CredentialsRejected:
            raise
        except RegistryError as err:
            log.warning("cannot read the zone's serial", error=err.what)
            return None
        return None if soa is None or not len(soa) else int(soa[0].serial)

    async def _read_unknown_hosts(self, *, listed_again: bool = True) -> None:
        """The browse list once a round (``listed_again``; else the last one read, when the
        zone did not change): a host on it that is not a peer is read now if its last read
        failed (the registry was busy or unreachable) or if it was never read (an LLQ event
        lost), else at most every ``reread_interval`` and only when the zone changed (a
        refused host stays refused until its records change, and each read of it logs
        why)."""
        assert self.registry is not None
        if listed_again or self._listed is None:
            try:
                listed = await self.registry.query(browse_name(self.zone), dns.rdatatype.PTR)
            except CredentialsRejected:
                raise
            except RegistryError as err:
                log.warning("cannot read the browse list", error=err.what)
                return
            own = host_name(self.cfg.host, self.zone)
            self._listed = {rd.target for rd in listed or ()
                            if rd.target != own
                            and peer_host_label(rd.target, self.zone) is not None}
        names = self._listed
        for gone in set(self._unknown_read_at) - names:
            del self._unknown_read_at[gone]
        self._unknown_failed &= names
        now = asyncio.get_running_loop().time()
        due = []
        for name in sorted(names - set(self.peers)):
            last = self._unknown_read_at.get(name)
            if (last is None or name in self._unknown_failed
                    or (listed_again and now - last >= 0.95 * self.cfg.reread_interval)):
                due.append(name)
        await self._resolve_all(due)

    async def _candidates_moved(self, name: dns.name.Name, peer: Peer) -> bool:
        """Whether the peer's candidate SRV differs from the one its last full read saw."""
        assert self.registry is not None
        if peer.candidate_srv is None:
            return True  # an older publisher: only a full read sees its endpoint
        try:
            srv = await self.registry.query(
                candidate_srv_name(peer.records.host, self.zone), dns.rdatatype.SRV)
        except CredentialsRejected:
            raise
        except RegistryError as err:  # the next round asks again
            log.warning("cannot check peer's candidates", peer=name.to_text(), error=err.what)
            return False
        return srv_fingerprint(srv) != peer.candidate_srv

    async def _resolve(self, name: dns.name.Name) -> None:
        """Read the host's records, once for all who ask at the same time.

        One update of a host changes several of its records and each followed one sends its
        own event, while the browse list and the periodic round may ask too: a caller that
        comes while a read of the same host runs waits for one more read after it (which
        sees what the running one may have missed), shared by everyone who came meanwhile.
        The reads run in a task of their own: a caller cancelled on the way (a watcher of a
        peer the read drops) does not cancel the read the others wait for."""
        reading = self._reading.get(name)
        if reading is None:
            reading = self._reading[name] = _Reading()
            reading.task = asyncio.create_task(self._read_settled(name, reading),
                                               name=f"read {name}")
        else:
            reading.again = True
        assert reading.task is not None
        await asyncio.shield(reading.task)

    async def _read_settled(self, name: dns.name.Name, reading: _Reading) -> None:
        try:
            while True:
                reading.again = False
                await self._read_host(name)
                if not reading.again:
                    return
        finally:
            del self._reading[name]

    async def _read_host(self, name: dns.name.Name) -> None:
        assert self.registry is not None
        if peer_host_label(name, self.zone) is None:
            log.warning("not following a name outside our zone", name=name.to_text())
            return
        if name not in self.peers:
            self._unknown_read_at[name] = asyncio.get_running_loop().time()
        try:
            # three exchanges, where there were five and one or two per candidate: ANY for
            # the host's own records, each SRV with its targets' addresses (``_address``)
            own = await self.registry.query_sets(name, dns.rdatatype.ANY)
            aaaa = own.get((name, dns.rdatatype.AAAA))
            txt = own.get((name, dns.rdatatype.TXT))
            seed_name = srv_name(name.relativize(self.zone).to_text(), self.zone)
            seed = await self.registry.query_sets(seed_name, dns.rdatatype.SRV)
            srv = seed.get((seed_name, dns.rdatatype.SRV))
            a = None
            if srv is not None and len(srv):
                if peer_host_label(srv[0].target, self.zone) is None:
                    log.warning("peer's SRV target is outside our zone; no endpoint from it",
                                peer=name.to_text(), target=srv[0].target.to_text())
                else:
                    a = await self._address(seed, srv[0].target, dns.rdatatype.A)
            cands, candidate_srv = await self._read_candidates(name)
        except CredentialsRejected:
            raise
        except RegistryError as err:  # ClockSkew too: the next round reads it again
            log.warning("cannot resolve peer", peer=name.to_text(), error=err.what)
            if name not in self.peers:
                self._unknown_failed.add(name)
            return
        self._unknown_failed.discard(name)
        rec = peer_from_answers(name, self.zone, aaaa, txt, srv, a, cands)
        if rec is None:
            if name in self.peers:
                await self._drop_peer(name, "its records are gone")
            return
        await self._apply_peer(rec, candidate_srv)
        if (peer := self.peers.get(name)) is not None:
            peer.read_at = asyncio.get_running_loop().time()
            peer.candidate_srv = candidate_srv

    async def _read_candidates(
        self, name: dns.name.Name
    ) -> tuple[CandidateRead, frozenset[str] | None]:
        """The peer's candidates: its candidate SRV, then one address lookup per target
        (two when the expected family is absent), at most ``MAX_CANDIDATES`` targets; and
        the SRV's ``srv_fingerprint``."""
        assert self.registry is not None
        host = name.relativize(self.zone).to_text()
        cand_name = candidate_srv_name(host, self.zone)
        sets = await self.registry.query_sets(cand_name, dns.rdatatype.SRV)
        srv = sets.get((cand_name, dns.rdatatype.SRV))
        refs, refused = candidate_refs(name, srv)
        found: dict[dns.name.Name, list[dns.rrset.RRset | None]] = {}
        for ref in refs:
            for rdtype in address_types(ref.kind):
                ans = await self._address(sets, ref.target, rdtype)
                found.setdefault(ref.target, []).append(ans)
                if ans is not None and len(ans):
                    break
        return read_candidates(refs, found, refused), srv_fingerprint(srv)

    async def _address(self, sets: RRsets, target: dns.name.Name,
                       rdtype: int) -> dns.rrset.RRset | None:
        """An SRV target's address (a name the caller checked is ours to follow): from the
        SRV answer's additional section, else (it did not fit, or the target has none of
        this family) asked."""
        assert self.registry is not None
        found = sets.get((target, rdtype))
        return found if found is not None else await self.registry.query(target, rdtype)

    async def _apply_peer(self, rec: PeerRecords,
                          candidate_srv: frozenset[str] | None = None) -> None:
        assert self.driver is not None and self.kx is not None and self.engine is not None
        peer = self.peers.get(rec.name)
        endpoint = None if rec.endpoint is None else Endpoint(*rec.endpoint)
        inner = str(rec.ula)
        if peer is not None and (peer.records.ula, peer.records.public_key) != (
            rec.ula, rec.public_key
        ):
            await self._drop_peer(rec.name, "new identity or key")
            peer = None
        old_refused = () if peer is None else peer.records.candidates_refused
        if rec.candidates_refused and rec.candidates_refused != old_refused:
            log.warning("peer's candidate records refused", peer=rec.host,
                        why=list(rec.candidates_refused))
        if peer is None:
            try:
                public = verify_peer(rec, self.zone)
            except PeerRefused as err:
                # no route and no session: only addresses bound to a key are routed
                log.warning("peer refused", peer=rec.host, error=err.what, hint=err.hint)
                return
            if inner == str(self.identity.ula) or inner in self.kx.by_inner:
                log.warning("peer claims an address already in use", peer=rec.host, ula=inner)
                return
            # no endpoint until a path answers an authenticated probe (or the peer's
            # handshake comes in): a published address alone never carries the tunnel
            self.driver.add_peer(public, inner, None)
            self.ondemand.add(inner)
            peer = Peer(rec, time.time(), candidate_srv=candidate_srv)
            self.peers[rec.name] = peer
            self._sso_peers()
            await asyncio.to_thread(set_routes, self.engine.tun_name, [inner])
            self._write_hosts()
            log.info("peer added", peer=rec.host, ula=inner,
                     endpoint=None if endpoint is None else str(endpoint),
                     candidates=[_candidate_text(c) for c in rec.candidates])
            self._watch_peer(peer)
            # the first handshake follows the first path that answers (``UsePath``), so
            # neither side initiates before its own endpoint exists
            loop = asyncio.get_running_loop()
            self._apply_paths(self.paths.set_local(self._candidates(), loop.time(), time.time()))
            self._apply_paths(self.paths.add(inner, public, _remote_candidates(rec),
                                             loop.time(), time.time()))
            self._relay_permit(rec)
            self._paths_wake.set()
            return
        if rec.endpoint != peer.records.endpoint:
            # checked like any candidate (below), never used as it is
            log.info("peer endpoint changed", peer=rec.host, old=peer.records.endpoint,
                     new=rec.endpoint)
        if rec.candidates != peer.records.candidates:
            log.info("peer candidates changed", peer=rec.host,
                     candidates=[_candidate_text(c) for c in rec.candidates])
        ssh_changed = (rec.ssh_ca, rec.ssh_bind) != (peer.records.ssh_ca, peer.records.ssh_bind)
        peer.records = rec
        if ssh_changed:
            self._sso_peers()
        loop = asyncio.get_running_loop()
        self._apply_paths(self.paths.set_remote(inner, _remote_candidates(rec), loop.time(),
                                                time.time()))
        self._relay_permit(rec)
        self._paths_wake.set()

    # -- relay: TURN through the registry's server (daemon/relay.py) ------------------------

    async def _relay_loop(self) -> None:
        """Hold an allocation on the registry's TURN server while it offers one: fetch
        credentials, allocate, publish the RELAY candidate; again after a failure, with fresh
        credentials (30 s apart), and before the credentials expire."""
        assert self.registry is not None and self.engine is not None
        while True:
            try:
                offer = await fetch_offer(self.registry)
            except TurnError as err:
                self.relay_error = err.what
                log.info("no relay", why=err.what)
                return
            except RegistryError as err:
                self.relay_error = err.what
                await asyncio.sleep(30)
                continue
            relay = Relay(offer, self.engine.local_port, on_change=self._relay_changed)
            try:
                await relay.open(15)
            except (TurnError, OSError) as err:
                relay.close()
                self.relay_error = str(err)
                log.warning("relay not allocated", server=offer.server(), error=str(err))
                await asyncio.sleep(30)
                continue
            self.relay, self.relay_error = relay, None
            for peer in self.peers.values():
                self._relay_permit(peer.records)
            self._relay_changed()
            # the allocation lives with the credentials it was made with: start over before
            # they expire, or once it failed for good
            with contextlib.suppress(TimeoutError):
                await within(relay.failed.wait(), max(offer.expiry - time.time() - 60, 30))
            self.relay = None
            relay.close()
            self._relay_changed()

    def _peer_reflexive_kind(self, endpoint: Endpoint) -> CandidateKind:
        """A peer seen at one of our relay's loopback proxies is reached through the relay."""
        if self.relay is not None and self.relay.is_proxy(endpoint):
            return CandidateKind.RELAY
        return CandidateKind.REFLEXIVE

    def _relay_check(self) -> None:
        """A path went quiet: if our NAT gave the relay socket a new port, the server no
        longer knows it as our allocation's; a Refresh finds out (437: allocate again)."""
        if self.relay is not None:
            self.relay.check(asyncio.get_running_loop().time())

    def _relay_changed(self) -> None:
        self._candidates_changed()

    def _relay_permit(self, rec: PeerRecords) -> None:
        if self.relay is not None:
            self.relay.permit(c.endpoint.host for c in _remote_candidates(rec))

    def _watch_peer(self, peer: Peer) -> None:
        """An LLQ on the peer's candidate SRV: a new port, address or candidate arrives as an
        event (a candidate's target name changes with its endpoint, and the mapped endpoint
        is one of the candidates, so that one RRset covers them all). A peer that published
        no candidate SRV (an older btmm) is followed on its SRV and A names as well. One LLQ
        instead of three per peer: an account of 100 hosts held 30,000 of them."""
        assert self.registry is not None
        rec = peer.records
        questions: list[tuple[dns.name.Name, int]] = [
            (candidate_srv_name(rec.host, self.zone), dns.rdatatype.SRV),
        ]
        target = self._target_of(rec)
        if peer.candidate_srv is None:
            questions.append((srv_name(rec.host, self.zone), dns.rdatatype.SRV))
            if target is not None:
                questions.append((target, dns.rdatatype.A))
        for qname, qtype in questions:
            w = Watcher(self.registry.server, qname, qtype, key=self.key,
                        config=ClientConfig(lease=self.cfg.llq_lease))
            peer.watchers.append(w)

            async def run(w: Watcher = w, name: dns.name.Name = rec.name) -> None:
                try:
                    await w.start()
                except OSError as err:
                    # the periodic re-read (resolve_interval) still follows this peer
                    log.warning("cannot watch peer records", peer=name.to_text(),
                                error=str(err))
                    return

                async def changed(_: Changes) -> None:
                    await self._resolve(name)

                await self._follow(w, changed, f"peer {name}")

            peer.tasks.append(asyncio.create_task(run()))

    def _target_of(self, rec: PeerRecords) -> dns.name.Name | None:
        iid = rec.ula.packed[8:]
        return dns.name.from_text("AutoTunnel-" + "-".join(f"{b:02X}" for b in iid),
                                  origin=self.zone)

    async def _drop_peer(self, name: dns.name.Name, why: str) -> None:
        peer = self.peers.pop(name, None)
        if peer is None:
            return
        await self._release_peers([peer])
        log.info("peer removed", peer=peer.records.host, why=why)
        self._sso_peers()
        if self.sso is not None and self._stop is not None and not self._stop.is_set():
            # a peer that vanished may have been revoked: look now, not at the next round
            self._spawn(self._read_revocations(), "revocations")

    async def _release_peers(self, peers: Sequence[Peer]) -> None:
        """Stop following ``peers`` (already out of ``self.peers``): their LLQs cancelled
        together, their paths, sessions and routes gone, the names written once (a daemon
        stopping with 99 peers spent a round trip, a netlink socket and a rewrite of its
        names per peer, one after another)."""
        for peer in peers:
            for t in peer.tasks:
                t.cancel()

        async def close(w: Watcher) -> None:
            with contextlib.suppress(Exception):
                await within(w.close(), 2.0)

        await asyncio.gather(*(close(w) for peer in peers for w in peer.watchers))
        inners = [str(peer.records.ula) for peer in peers]
        for inner in inners:
            self.paths.remove(inner)
            self.ondemand.remove(inner)
            if self.driver is not None and self.kx is not None and inner in self.kx.by_inner:
                with contextlib.suppress(BtmmError):
                    self.driver.remove_peer(inner)
        if self.engine is not None and inners:
            with contextlib.suppress(BtmmError, OSError):
                await asyncio.to_thread(del_routes, self.engine.tun_name, inners)
        self._write_hosts()

    # -- SSH single sign-on (daemon/sso.py) ---------------------------------------------

    def _sso_peers(self) -> None:
        if self.sso is not None:
            try:
                self.sso.set_peers(p.records for p in self.peers.values())
            except OSError as err:
                log.warning("cannot write the SSH trust files", error=str(err))

    async def _read_revocations(self) -> None:
        """The revoked device CAs the registry lists at ``_btmm-revoked.<zone>``."""
        if self.sso is None or self.registry is None:
            return
        name = dns.name.from_text(REVOKED_LABEL, origin=self.zone)
        try:
            ans = await self.registry.query(name, dns.rdatatype.TXT)
        except CredentialsRejected:
            raise
        except RegistryError as err:
            log.warning("cannot read the SSH revocations", error=err.what)
            return
        found: list[Revoked] = []
        for rd in ans or ():
            rev = parse_revocation(rd.strings)
            if isinstance(rev, str):
                log.warning("revocation record ignored", why=rev)
            else:
                found.append(rev)
        try:
            self.sso.set_revoked(found, time.time())
        except OSError as err:
            log.warning("cannot write the SSH revocation list", error=str(err))

    async def _sso_loop(self) -> None:
        assert self.sso is not None
        await self._read_revocations()
        while True:
            await asyncio.sleep(60.0)
            try:
                self.sso.tick(time.time())
            except OSError as err:
                log.warning("cannot renew SSH certificates", error=str(err))

    def _on_report(self, report: Report) -> None:
        self._counters_wake.set()  # a tunnel came up (or failed): its counters matter now
        for peer in self.peers.values():
            if str(peer.records.ula) == report.inner:
                if isinstance(report, Established):
                    if peer.established_at is None:
                        log.info("tunnel up", peer=peer.records.host)
                    peer.established_at = time.time()
                    peer.handshakes += 1
                    peer.last_failure = None
                else:
                    peer.last_failure = report.what

    def _write_hosts(self) -> None:
        hosts = {p.records.name: p.records.ula for p in self.peers.values()}
        hosts[host_name(self.cfg.host, self.zone)] = self.identity.ula
        self.names.update(hosts)
        if self.cfg.hosts_file is None:
            return
        names = {name.to_text(): ula for name, ula in hosts.items()}
        try:
            write_hosts(self.cfg.hosts_file, names, zone=self.zone.to_text())
        except OSError as err:
            log.warning("cannot update the hosts file", path=str(self.cfg.hosts_file),
                        error=str(err))

    # -- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.time()
        infos = {p.inner: p for p in self.engine.peers()} if self.engine is not None else {}
        peers = []
        mono = asyncio.get_running_loop().time()
        for peer in sorted(self.peers.values(), key=lambda p: p.records.host):
            inner = str(peer.records.ula)
            info = infos.get(inner)
            session = None if self.kx is None else self.kx.by_inner.get(inner)
            c = info.counters if info is not None else None
            ep = info.endpoint if info is not None else None
            path = self.paths.status(inner, mono)
            if path.get("path") == "relay":
                path["relay_server"] = None if self.relay is None else self.relay.server
            peers.append({
                "name": peer.records.name.to_text(),
                "ula": str(peer.records.ula),
                "endpoint": None if ep is None else str(ep),
                "published_endpoint": None if peer.records.endpoint is None
                else "{}:{}".format(*peer.records.endpoint),
                "candidates": [_candidate_json(c) for c in peer.records.candidates],
                "candidates_refused": list(peer.records.candidates_refused),
                # up only while the path answers: keys alone are not a tunnel; on demand, a
                # tunnel without keys is idle or opening (daemon/ondemand.py)
                "tunnel": tunnel_state(info is not None and info.tx_spi is not None,
                                       self.paths.state(inner))
                if not self.ondemand.config.on_demand or (info is not None and info.tx_spi)
                else self.ondemand.status(inner, mono)["state"],
                **({"on_demand": self.ondemand.status(inner, mono)}
                   if self.ondemand.config.on_demand else {}),
                "held": info.held if info is not None else 0,
                **path,
                "handshake_age": None if peer.established_at is None
                else round(now - peer.established_at, 1),
                "handshakes": peer.handshakes,
                # initiations sent again for want of an answer (the cold-start rule: a first
                # handshake that follows an answered path needs none)
                "handshake_retries": 0 if session is None else session.retries,
                "last_failure": peer.last_failure,
                "bytes_in": c.bytes_in if c else 0,
                "bytes_out": c.bytes_out if c else 0,
                "packets_in": c.packets_in if c else 0,
                "packets_out": c.packets_out if c else 0,
                "drops": (c.drops or {}) if c else {},
            })
        assert self.registry is not None
        return {
            "pid": os.getpid(),
            "time": now,
            "host": {
                "name": host_name(self.cfg.host, self.zone).to_text(),
                "ula": str(self.identity.ula),
                "public_key": self.static.public_b64,
                "dataplane": type(self.engine).__name__,
                "local_port": None if self.engine is None else self.engine.local_port,
                "local_address": self.net.local_address,
                "external": None if self.net.external is None
                else "{}:{}".format(*self.net.external),
                "mapping": self.net.mapping,
                "mapping_error": self.net.mapping_error,
                "reflexive": None if self.net.reflexive is None
                else _endpoint_text(self.net.reflexive),
                "peer_reflexive": None if self.net.peer_reflexive is None
                else _endpoint_text(self.net.peer_reflexive),
                "stun_server": None if self.net.stun_server is None
                else _endpoint_text(self.net.stun_server),
                "stun_error": self.net.stun_error,
                # what peers read now (the next publish follows a change within a second)
                "candidates": [] if self.published is None
                else [_candidate_json(c) for c in self.published.candidates],
                "registry": "{}:{}".format(*self.registry.server),
                "registry_error": self.registry.last_error or self.publish_error,
                "clock_skew": self.registry.clock_skew,
                "lease": self.lease,
                "lease_left": None if self.published_at is None or self.lease is None
                else round(self.published_at + self.lease - now),
                "llq": self.llq_state,
                "uptime": round(now - self.started),
                **({"ssh": self.sso.status(now)} if self.sso is not None else {}),
                "relay": None if self.relay is None else self.relay.status(),
                "relay_error": self.relay_error,
            },
            "peers": peers,
            "names": self.names.status(),
            "services": self.services.status(),
        }

    # -- control socket ------------------------------------------------------------------

    async def on_control(self, request: Request) -> dict[str, Any]:
        """Answer one control request (``control.py``) with the state of now."""
        if request.op == Op.HELLO:
            return {"versions": [1], "ops": [o.value for o in Op], "pid": os.getpid(),
                    "software": __version__}
        if request.op == Op.STATUS:
            if self.registry is None:
                raise BtmmError("the daemon is starting: it is looking for the registry",
                                hint="ask again in a moment")
            return self.status()
        if request.op == Op.PING:
            return await self.ping(PingArgs.parse(request.args))
        assert request.op == Op.DOWN
        assert self._stop is not None and self._stopped is not None
        log.info("stopping: asked on the control socket")
        self._stop.set()
        return await asyncio.shield(self._stopped)

    def find_peer(self, what: str) -> Peer:
        """The peer a user means by ``what``: its name, its host label or its ULA."""
        want = what.rstrip(".").lower()
        for peer in self.peers.values():
            rec = peer.records
            if want in (rec.name.to_text(omit_final_dot=True).lower(), rec.host.lower()):
                return peer
            with contextlib.suppress(ValueError):
                if ipaddress.IPv6Address(want) == rec.ula:
                    return peer
        known = ", ".join(sorted(p.records.host for p in self.peers.values())) or "none yet"
        raise BtmmError(f"no peer {what!r}", hint=f"peers: {known} (see `btmm status`)")

    async def ping(self, args: PingArgs) -> dict[str, Any]:
        """ICMPv6 echo to the peer's ULA through the tunnel (``echo.py`` says why not a path
        probe), with the path in use beside it."""
        assert self.engine is not None
        peer = self.find_peer(args.peer)
        inner = str(peer.records.ula)
        mono = asyncio.get_running_loop().time()
        path = self.paths.status(inner, mono)
        info = next((p for p in self.engine.peers() if p.inner == inner), None)
        ident = self._rng.randrange(1, 0x10000)
        token = os.urandom(16)
        try:
            echo = EchoSocket(self.engine.tun_name)
        except OSError as err:
            raise BtmmError(f"cannot open an ICMPv6 socket on {self.engine.tun_name}: {err}",
                            hint="`btmm up` needs root (CAP_NET_RAW) for this") from err
        try:
            rtts = await echo.round_trips(inner, ident, token, args.count, args.interval,
                                          args.timeout)
        finally:
            echo.close()
        ep = None if info is None else info.endpoint
        return {
            "peer": peer.records.name.to_text(),
            "ula": inner,
            "tunnel": tunnel_state(info is not None and info.tx_spi is not None,
                                   self.paths.state(inner)),
            "endpoint": None if ep is None else _endpoint_text(ep),
            "path": path["path"],
            "path_endpoint": path["path_endpoint"],
            "path_rtt_ms": path["rtt_ms"],
            "sent": args.count,
            "received": sum(r is not None for r in rtts),
            "rtt_ms": [None if r is None else round(r * 1000, 3) for r in rtts],
        }


def _endpoint_text(ep: Endpoint) -> str:
    return str(ep)


def _candidate_text(c: Candidate) -> str:
    return f"{c.kind.name.lower()} {_endpoint_text(c.endpoint)}"


def _not_direct(path: dict[str, object]) -> bool:
    """A peer reached only through the relay, or not at the moment."""
    return path.get("path") in (None, "relay") or path.get("path_state") in ("stale", "down")


def _candidate_json(c: Candidate) -> dict[str, object]:
    return {"kind": c.kind.name.lower(), "endpoint": _endpoint_text(c.endpoint)}


def _remote_candidates(rec: PeerRecords) -> tuple[Candidate, ...]:
    """The peer's candidates, and the seed's published endpoint as a MAPPED one (a publisher
    without candidate records still gets checked; a duplicate keeps its better kind)."""
    cands = rec.candidates
    if rec.endpoint is not None:
        cands = (*cands, Candidate(CandidateKind.MAPPED, Endpoint(*rec.endpoint)))
    return cands
