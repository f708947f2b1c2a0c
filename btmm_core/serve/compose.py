"""The composition root of ``btmm serve``: storage, zones, the registry core, the plug-ins
plugged into it (LLQ; later DNS Push), the driver that serves them all, and the STUN responder
beside them (its own UDP port; the zones publish it as ``_stun._udp``).

The registry knows its plug-ins only through ``registry/plugin.py``; which ones run, and with
what secret and randomness, is decided here. The asyncio work of a plug-in (its timers, pushed
messages, connections that close) is done by ``RegistryServer`` for every plug-in alike, so what
remains specific to LLQ is the few lines below (its UDP receive buffer and its log lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import random
import signal
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from btmm_core import __version__
from btmm_core.errors import BtmmError
from btmm_core.llq.server import LLQServer
from btmm_core.metrics.exporter import MetricsServer
from btmm_core.push.server import PushServer
from btmm_core.registry.accounts import check_user_free
from btmm_core.registry.handler import RegistryCore
from btmm_core.registry.replay import SharedReplayGuard
from btmm_core.registry.server import Listen, RegistryServer
from btmm_core.registry.storage import SqliteStorage, open_storage
from btmm_core.registry.tls import ensure_self_signed, server_context
from btmm_core.registry.turncreds import TurnCredentials
from btmm_core.registry.zones import ZoneStore
from btmm_core.serve.config import ServeConfig
from btmm_core.serve.metrics import metrics_registry
from btmm_core.stun.responder import StunResponder
from btmm_core.stun.server import StunServer

log = structlog.get_logger("btmm.registry")

#: What the STUN responder says it is (RFC 8489 14.14).
SOFTWARE = f"btmm {__version__}"


@dataclass(frozen=True)
class Registry:
    """``btmm serve`` put together, not yet listening."""

    core: RegistryCore
    llq: LLQServer
    server: RegistryServer
    stun: StunServer | None = None
    push: PushServer | None = None
    turn: TurnCredentials | None = None


def tls_context(config: ServeConfig) -> ssl.SSLContext | None:
    """The DoT context: the configured certificate, or a self-signed one made once."""
    tls = config.tls
    if not tls.port:
        return None
    cert, key = tls.cert, tls.key
    if cert is None or key is None:
        cert, key = ensure_self_signed(
            config.storage.state_dir / "tls", config.ns.to_text(True), list(config.glue)
        )
    return server_context(cert, key)


@dataclass(frozen=True)
class Worker:
    """One of ``--workers`` processes: its index, and the replay state they all share."""

    index: int
    count: int
    replay: SharedReplayGuard
    #: the socket pairs UDP UPDATEs go through to worker 0 (``registry/server.py``
    #: ``Forwarding``), one per other worker: worker 0 reads the first end of each, worker n
    #: writes the second end of pair n - 1
    forward: tuple[tuple[socket.socket, socket.socket], ...] = ()


def compose(
    config: ServeConfig,
    tls: ssl.SSLContext | None,
    *,
    stun: bool = True,
    worker: Worker | None = None,
) -> Registry:
    """Everything ``btmm serve`` runs; ``stun``: this process answers STUN (with several
    workers only the first does: the zones still publish it, since all of them serve it);
    ``worker``: this process is one of several (on SQLite they share the file through
    ``SqliteStorage.share`` and the TSIG replay state through ``worker.replay``)."""
    storage = open_storage(config.storage.target, server=True)
    if worker is not None and isinstance(storage, SqliteStorage):
        storage.share(worker.index, worker.count)  # before the zones load: no change missed
    for account in storage.accounts():  # made before names were reserved (issue 11 item 7)
        check_user_free(account.user, config.zone.domain, config.ns)
    replay = worker.replay if worker is not None else None
    core = RegistryCore(ZoneStore(storage, config.zone_config()), config.policy, replay)
    # updates that arrive together share one transaction (SQLite: one fsync)
    core.group_commit = config.group_commit and storage.groups_commits
    # A fresh secret per process: challenge ids and LLQ ids of an earlier run are void, so
    # clients of a restarted server get NO-SUCH-LLQ and set up again.
    llq = LLQServer(core, config.llq, os.urandom(32), random.SystemRandom())
    core.plug(llq)
    push = None
    if config.serves_push:
        push = PushServer(core, config.push)
        core.plug(push)
    lst = config.listen
    server = RegistryServer(
        core,
        Listen(
            lst.host,
            lst.port,
            config.tls.port or None,
            tls,
            max_connections=lst.max_connections,
            max_connections_per_client=lst.max_connections_per_client,
            idle_timeout=lst.idle_timeout,
            reuse_port=lst.workers > 1,
        ),
    )
    if worker is not None and worker.forward and core.group_commit:
        # UDP UPDATEs go to worker 0, where they share its group commits
        server.forward_writer = worker.index == 0
        if worker.index == 0:
            server.forward_sockets = tuple(pair[0] for pair in worker.forward)
        else:
            server.forward_sockets = (worker.forward[worker.index - 1][1],)
    responder = None
    if config.stun.enabled and stun:
        responder = StunServer(StunResponder(software=SOFTWARE), lst.host, config.stun.ports)
    turn = None
    if config.turn is not None:  # TURN credentials for devices (registry/turncreds.py)
        turn = TurnCredentials(config.turn)
        core.plug(turn)
    return Registry(core, llq, server, responder, push, turn)


def _size_udp_buffer(registry: Registry) -> None:
    # Room for an acknowledgement from every LLQ at once (about 1 KiB of kernel memory each
    # on loopback), so that a burst of events does not come back as lost acks.
    wanted = min(max(registry.llq.config.max_total * 1024, 1 << 20), 64 << 20)
    granted = registry.server.set_udp_receive_buffer(wanted)
    if granted < wanted:
        log.warning(
            "udp receive buffer smaller than asked: acknowledgements of large event "
            "bursts may be lost and resent; raise net.core.rmem_max or run as root",
            asked=wanted,
            granted=granted,
        )


async def serve(
    config: ServeConfig,
    tls: ssl.SSLContext | None,
    *,
    stun: bool = True,
    worker: Worker | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT."""
    registry = compose(config, tls, stun=stun, worker=worker)
    await registry.server.start()
    _size_udp_buffer(registry)
    if registry.stun is not None:
        try:
            await registry.stun.start()
        except OSError:
            await registry.server.close()
            raise
        structlog.get_logger("btmm.stun").info(
            "stun ready", listen=[f"{h}:{p}" for h, p in registry.stun.addresses]
        )
    c = config.llq
    structlog.get_logger("btmm.llq").info(
        "llq ready",
        lease=f"{c.lease_min}..{c.lease_max}",
        max_total=c.max_total,
        max_per_client=c.max_per_client,
    )
    exporter = None
    if config.metrics is not None:
        exporter = MetricsServer(metrics_registry(registry), *config.metrics)
        try:
            await exporter.start()
        except BtmmError:
            if registry.stun is not None:
                registry.stun.close()
            await registry.server.close()
            raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if registry.push is not None:
        p = config.push
        structlog.get_logger("btmm.push").info(
            "dns push ready",
            port=config.tls.port,
            keepalive_ms=f"{p.keepalive_min_ms}..{p.keepalive_max_ms}",
            max_total=p.max_total,
            max_per_client=p.max_per_client,
        )
    await stop.wait()
    if registry.push is not None:
        # A Retry Delay tells each session's client that this is a restart, not a failure.
        registry.server.push(registry.push.shut_down(time.time()))
    if exporter is not None:
        await exporter.close()
    if registry.stun is not None:
        registry.stun.close()
        structlog.get_logger("btmm.stun").info(
            "stun stopped", **registry.stun.responder.stats.as_dict()
        )
    await registry.server.close()
    stats = registry.llq.stats
    structlog.get_logger("btmm.llq").info("llq stopped", **dict(sorted(stats.items())))
    if registry.push is not None:
        pstats = registry.push.stats
        structlog.get_logger("btmm.push").info("dns push stopped", **dict(sorted(pstats.items())))


def run(main: Callable[[], Coroutine[Any, Any, None]], event_loop: str) -> None:
    """Run ``main`` on uvloop when asked for and installed, else on plain asyncio."""
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed; running on plain asyncio")
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main())
            return
    asyncio.run(main())


def run_workers(config: ServeConfig, tls: Callable[[], ssl.SSLContext | None]) -> None:
    """``config.listen.workers`` processes serving the same ports (SO_REUSEPORT), each a whole
    registry on the shared database, so that every core answers.

    The first process forks the others before any event loop, thread or database connection
    exists, forwards SIGTERM/SIGINT to them and waits for them; each dies with it
    (PR_SET_PDEATHSIG), so none is left serving alone. The first also answers STUN.
    """
    tls()  # a self-signed certificate is made once, here, not by every worker at once
    count = config.listen.workers
    # made before the fork, so that every worker maps the same memory
    replay = SharedReplayGuard.create(config.policy.fudge)
    forward = tuple(socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(1, count))
    children = []
    for n in range(1, count):
        pid = os.fork()
        if pid == 0:  # a worker: serve, and never return into the parent's code
            code = 0
            try:
                _die_with_parent()
                me = Worker(n, count, replay, forward)
                run(
                    lambda me=me: serve(config, tls(), stun=False, worker=me),  # type: ignore[misc]
                    config.event_loop,
                )
            except BaseException:
                log.exception("worker failed", worker=n)
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
    log.info("workers started", workers=config.listen.workers, pids=[os.getpid(), *children])
    try:
        run(lambda: serve(config, tls(), worker=Worker(0, count, replay, forward)),
            config.event_loop)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
