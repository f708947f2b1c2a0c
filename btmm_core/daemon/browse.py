"""``btmm browse [TYPE] [--watch]`` and ``btmm resolve NAME``: the services of the account's
hosts, read from the registry with this device's key (RFC 6763 browsing over unicast DNS,
section 10; changes followed by LLQ, RFC 8764)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import dns.name
import dns.rdatatype

from btmm_core.aio import within
from btmm_core.daemon.config import Config
from btmm_core.daemon.dnsclient import RegistryClient
from btmm_core.dns.keyfile import read_key
from btmm_core.errors import ConfigError
from btmm_core.llq.client import Changes, ClientConfig, StateChanged
from btmm_core.llq.driver import Watcher
from btmm_core.names.dnssd import SERVICES, txt_text


@dataclass(frozen=True)
class Instance:
    name: dns.name.Name
    service_type: dns.name.Name
    host: dns.name.Name | None
    port: int | None
    txt: str
    addresses: tuple[str, ...] = ()

    def line(self, zone: dns.name.Name) -> str:
        label = self.name.relativize(zone).to_text()
        host = None if self.host is None else self.host.to_text(omit_final_dot=True)
        where = "-" if host is None else f"{host}:{self.port}"
        return f"{label}  {where}" + (f"  {self.txt}" if self.txt else "")


class Browser:
    def __init__(self, cfg: Config) -> None:
        key = read_key(cfg.credentials)
        server = cfg.server_address()
        if server is None:
            raise ConfigError("no registry address in the configuration",
                              hint=f'set server = "HOST:PORT" under [registry] in {cfg.path}')
        self.key = key
        self.zone = key.zone
        self.server = server
        self.client = RegistryClient(server, key)

    async def types(self) -> list[dns.name.Name]:
        rrset = await self.client.query(SERVICES.concatenate(self.zone), dns.rdatatype.PTR)
        return sorted({rd.target for rd in rrset or ()})

    async def instances(self, service_type: dns.name.Name) -> list[dns.name.Name]:
        rrset = await self.client.query(service_type, dns.rdatatype.PTR)
        return sorted({rd.target for rd in rrset or ()})

    async def resolve(self, name: dns.name.Name, *, addresses: bool = False) -> Instance | None:
        srv = await self.client.query(name, dns.rdatatype.SRV)
        txt = await self.client.query(name, dns.rdatatype.TXT)
        if srv is None and txt is None:
            return None
        first = sorted(srv or (), key=lambda r: (r.priority, -r.weight))
        host = first[0].target if first else None
        port = first[0].port if first else None
        strings = [s for rd in txt or () for s in rd.strings]
        found: tuple[str, ...] = ()
        if addresses and host is not None:
            aaaa = await self.client.query(host, dns.rdatatype.AAAA)
            found = tuple(rd.address for rd in aaaa or ())
        return Instance(name, name.parent(), host, port, txt_text(strings), found)

    async def browse(self, service_type: dns.name.Name | None) -> list[Instance]:
        types = [service_type] if service_type is not None else await self.types()
        out = []
        for t in types:
            for inst in await self.instances(t):
                found = await self.resolve(inst)
                if found is not None:
                    out.append(found)
        return out

    async def watch(self, service_type: dns.name.Name | None, emit: Callable[[str], None],
                    stop: asyncio.Event, until: float | None = None) -> None:
        """Print ``+ instance host:port txt`` / ``- instance`` as instances come and go, the
        current ones first; without a type, every type the zone lists, new types included."""
        queue: asyncio.Queue[tuple[dns.name.Name, int, Changes | StateChanged]] = asyncio.Queue()
        watchers: list[Watcher] = []
        started: set[tuple[dns.name.Name, int]] = set()
        tasks: list[asyncio.Task[None]] = []

        async def follow(w: Watcher, name: dns.name.Name, rdtype: int) -> None:
            await w.start()
            while True:
                await queue.put((name, rdtype, await w.events.get()))

        def start(name: dns.name.Name, rdtype: int) -> None:
            if (name, rdtype) not in started:
                started.add((name, rdtype))
                w = Watcher(self.server, name, rdtype, key=self.key,
                            config=ClientConfig(lease=3600))
                watchers.append(w)
                tasks.append(asyncio.create_task(follow(w, name, rdtype)))

        if service_type is None:
            start(SERVICES.concatenate(self.zone), dns.rdatatype.PTR)
        else:
            start(service_type, dns.rdatatype.PTR)
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                left = None if until is None else until - time.monotonic()
                if left is not None and left <= 0:
                    return
                getter = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({getter, stopping}, timeout=left,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    continue
                name, _, event = getter.result()
                if isinstance(event, StateChanged):
                    continue
                if service_type is None and name == SERVICES.concatenate(self.zone):
                    for r in event.added:
                        start(r.rdata.target, dns.rdatatype.PTR)  # type: ignore[attr-defined]
                    continue
                for r in event.removed:
                    emit(f"- {r.rdata.target.relativize(self.zone)}")  # type: ignore[attr-defined]
                for r in event.added:
                    found = await self.resolve(r.rdata.target)  # type: ignore[attr-defined]
                    if found is not None:
                        emit("+ " + found.line(self.zone))
        finally:
            stopping.cancel()
            for t in tasks:
                t.cancel()
            for w in watchers:
                with contextlib.suppress(Exception):
                    await within(w.close(), 2.0)
