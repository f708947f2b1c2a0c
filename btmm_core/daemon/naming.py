"""The daemon's names (issue 16): the stub resolver fed with the peers the daemon follows, and
how the host's programs are pointed at it (``names/system.py``). ``host.py`` calls ``start``,
``update`` on every change of its peers, ``status`` and ``close``."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Mapping
from typing import Any

import dns.name
import structlog

from btmm_core.aio import within
from btmm_core.daemon.config import Config
from btmm_core.names.server import RegistryLookup, StubServer
from btmm_core.names.stub import HostRecords, StubCore, host_records
from btmm_core.names.system import (
    Wiring,
    choose_upstreams,
    parse_stub,
    points_at_stub,
    resolvectl_commands,
    resolved_present,
)

log = structlog.get_logger("btmm.names")


class Names:
    def __init__(self, cfg: Config, zone: dns.name.Name) -> None:
        self.cfg = cfg
        self.zone = zone
        self.wiring = Wiring.OFF
        self.error: str | None = None
        self.server: StubServer | None = None
        self.upstreams: list[tuple[str, int]] = []
        self._link: str | None = None
        self._hosts: dict[dns.name.Name, ipaddress.IPv6Address] = {}
        #: each host's records as last built (``host_records``)
        self._built: dict[tuple[dns.name.Name, ipaddress.IPv6Address], HostRecords] = {}
        #: called with a host's address when a program looks its name up through the stub
        #: (the daemon opens an on-demand tunnel to it)
        self.on_lookup: Callable[[ipaddress.IPv6Address], None] | None = None

    async def start(self, link: str, registry: RegistryLookup | None = None) -> None:
        """Listen on the stub address and point the host's resolver at it where we can;
        ``registry``: how DNS-SD names are asked of the registry (signed)."""
        if not self.cfg.stub:
            return
        stub = parse_stub(self.cfg.stub)
        try:
            resolv = self.cfg.resolv_conf.read_text()
        except OSError:
            resolv = ""
        self.upstreams = choose_upstreams(self.cfg.upstream, resolv, stub)
        core = StubCore(self.zone, forwarding=bool(self.upstreams),
                        registry=registry is not None)
        core.replace(host_records(self._hosts, self._built))
        server = StubServer(core, stub, self.upstreams, registry)
        try:
            await server.start()
        except OSError as err:
            self.error = f"cannot listen on {self.cfg.stub}: {err}"
            self.wiring = Wiring.HOSTS_FILE
            log.warning("no stub resolver; programs see peers through the hosts file only",
                        error=self.error)
            return
        self.server = server
        server.on_lookup = self._looked_up
        if resolved_present() and await self._resolvectl(
            resolvectl_commands(link, stub, self.zone)
        ):
            self._link = link
            self.wiring = Wiring.RESOLVED
        elif points_at_stub(resolv, stub):
            self.wiring = Wiring.RESOLV_CONF
        else:
            self.wiring = Wiring.HOSTS_FILE
        log.info("stub resolver", address=self.cfg.stub, wiring=self.wiring.value,
                 upstreams=[f"{h}:{p}" for h, p in self.upstreams])

    @property
    def hosts(self) -> dict[dns.name.Name, ipaddress.IPv6Address]:
        """The hosts the stub answers for (this one and each verified peer)."""
        return dict(self._hosts)

    def update(self, hosts: Mapping[dns.name.Name, ipaddress.IPv6Address]) -> None:
        """The hosts (this one and each verified peer) the stub answers for, from now on."""
        hosts = dict(hosts)
        if hosts == self._hosts:
            return  # a peer read again, the same as before
        self._hosts = hosts
        if self.server is not None:
            self.server.core.replace(host_records(self._hosts, self._built))

    def _looked_up(self, name: dns.name.Name) -> None:
        address = self._hosts.get(name)
        if address is not None and self.on_lookup is not None:
            self.on_lookup(address)

    async def close(self) -> None:
        if self._link is not None:
            await self._resolvectl([["resolvectl", "revert", self._link]])
            self._link = None
        if self.server is not None:
            await self.server.close()
            self.server = None

    async def _resolvectl(self, commands: list[list[str]]) -> bool:
        for argv in commands:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
                _, err = await within(proc.communicate(), 10.0)
            except (OSError, TimeoutError) as exc:
                self.error = f"{' '.join(argv)}: {exc}"
                log.warning("cannot configure systemd-resolved", error=self.error)
                return False
            if proc.returncode != 0:
                self.error = f"{' '.join(argv)}: {err.decode(errors='replace').strip()}"
                log.warning("cannot configure systemd-resolved", error=self.error)
                return False
        return True

    def status(self) -> dict[str, Any]:
        hint = None
        if self.wiring == Wiring.HOSTS_FILE:
            hint = ("programs resolve peers through the hosts block only (no services): run "
                    "systemd-resolved, or make the stub the first nameserver in "
                    f"{self.cfg.resolv_conf}")
        return {
            "stub": self.cfg.stub or None,
            "listening": self.server is not None,
            "wiring": self.wiring.value,
            "upstreams": [f"{h}:{p}" for h, p in self.upstreams],
            "error": self.error,
            "hint": hint,
            "counters": dict(self.server.core.stats) if self.server is not None else {},
        }
