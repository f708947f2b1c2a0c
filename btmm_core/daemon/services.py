"""Publishing this host's ``[services]`` by wide-area DNS-SD (``names/dnssd.py``): one UPDATE
with an update lease, refreshed at ``refresh_fraction`` of the granted lease, withdrawn on a
clean shutdown (a host that dies leaves them to expire with their lease)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import dns.name
import structlog

from btmm_core.daemon.config import Config
from btmm_core.daemon.dnsclient import RegistryClient
from btmm_core.daemon.records import granted_lease
from btmm_core.errors import BtmmError, CredentialsRejected, RegistryError
from btmm_core.names.dnssd import ServiceSpec, publish_update, withdraw_update

log = structlog.get_logger("btmm.services")


class ServicePublisher:
    def __init__(self, cfg: Config, zone: dns.name.Name) -> None:
        self.cfg = cfg
        self.zone = zone
        self.published: tuple[ServiceSpec, ...] | None = None
        self.lease: int | None = None
        self.published_at: float | None = None
        self.error: str | None = None
        self._rng = random.SystemRandom()

    async def run(self, registry: RegistryClient) -> None:
        """Publish, then refresh for ever (nothing to do without services)."""
        services = self.cfg.services
        if not services:
            return
        backoff = 1.0
        while True:
            msg = publish_update(self.zone, self.cfg.host, services, self.published,
                                 self.cfg.lease)
            try:
                resp = await registry.exchange(msg)
            except CredentialsRejected:
                raise
            except RegistryError as err:  # ClockSkew too: retried like the host's records
                self.error = err.what
                log.warning("publishing services failed; retrying", error=err.what,
                            retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            if self.published != services:
                log.info("services published", services=[s.type_label for s in services],
                         lease=granted_lease(resp) or self.cfg.lease)
            self.published = services
            self.lease = granted_lease(resp) or self.cfg.lease
            self.published_at = time.time()
            self.error = None
            await asyncio.sleep(self.lease * self.cfg.refresh_fraction
                                * (1 - 0.05 * self._rng.random()))

    async def withdraw(self, registry: RegistryClient | None) -> None:
        if not self.published or registry is None:
            return
        try:
            await registry.exchange(withdraw_update(self.zone, self.cfg.host, self.published))
            log.info("services withdrawn")
        except BtmmError as err:
            log.warning("could not withdraw services; they expire with their lease",
                        error=str(err))
        self.published = None

    def status(self) -> list[dict[str, Any]]:
        return [
            {"type": s.type_label, "port": s.port, "txt": [f"{k}={v}" for k, v in s.txt],
             "published": self.published is not None and s in self.published,
             "error": self.error}
            for s in self.cfg.services
        ]
