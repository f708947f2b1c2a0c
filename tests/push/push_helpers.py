"""Helpers for the DNS Push tests: a registry core with the Push server plugged in, on memory
storage and a virtual clock, routing messages as ``RegistryServer.dispatch`` does."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.name
import dns.rdatatype
import dns.update

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "registry"))

from registry_helpers import make_core, parse, sign

from btmm_core.dns.dso import DSOMessage, is_dso
from btmm_core.dns.push import Change, parse_push
from btmm_core.push.server import PushConfig, PushServer
from btmm_core.registry.handler import RegistryCore, Transport
from btmm_core.registry.model import Account, RRsetChange
from btmm_core.registry.plugin import Outgoing

NOW = 1_800_000_000.0
BOB = dns.name.from_text("bob.members.example.")
LAPTOP = dns.name.from_text("laptop.bob.members.example.")
PEER = "192.0.2.7#40000"

__all__ = ["parse", "sign"]


@dataclass
class PushLab:
    core: RegistryCore
    accounts: dict[str, Account]
    push: PushServer
    now: float = NOW
    changed: list[RRsetChange] = field(default_factory=list)

    @classmethod
    def make(cls, config: PushConfig | None = None) -> PushLab:
        core, accounts = make_core()
        push = PushServer(core, config)
        core.plug(push)
        lab = cls(core, accounts, push)
        core.store.add_observer(lab.changed.append)
        return lab

    def send(self, wire: bytes, peer: str = PEER) -> list[Outgoing]:
        """A message on the TLS connection ``peer``: what goes back (answer or pushes)."""
        if is_dso(wire):
            return self.push.receive_message(wire, self.now, Transport.TLS, peer)
        answer = self.core.receive(wire, self.now, Transport.TLS, peer)
        return [] if answer is None else [Outgoing(Transport.TLS, peer, answer)]

    def bind(self, user: str = "bob", peer: str = PEER) -> dns.message.Message:
        """A signed SOA query of the user's zone on that connection (binds the session)."""
        zone = dns.name.from_text(f"{user}.members.example.")
        q = dns.message.make_query(zone, dns.rdatatype.SOA)
        (out,) = self.send(sign(q, self.accounts[user].key, int(self.now)), peer)
        return parse(out.wire)

    def update(self, msg: dns.update.UpdateMessage, user: str = "bob") -> list[Outgoing]:
        """A signed UPDATE over UDP, then the driver's timer pass: what the Push server sends."""
        answer = parse(
            self.core.receive(
                sign(msg, self.accounts[user].key, int(self.now)), self.now, Transport.UDP, "u#1"
            )
        )
        assert answer.rcode() == 0, answer
        return self.run()

    def run(self) -> list[Outgoing]:
        changes = list(self.changed)
        self.changed.clear()
        out = self.push.on_changes(changes, self.now) if changes else []
        return out + self.push.tick(self.now)


def dso(out: Outgoing) -> DSOMessage:
    return DSOMessage.parse(out.wire)


def changes_of(out: Outgoing) -> list[Change]:
    msg = dso(out)
    assert msg.primary is not None
    return parse_push(out.wire, msg.primary)


def aaaa_update(
    *,
    add: tuple[str, ...] = (),
    delete: tuple[str, ...] = (),
    all_: bool = False,
    name: dns.name.Name = LAPTOP,
    ttl: int = 300,
) -> dns.update.UpdateMessage:
    u = dns.update.UpdateMessage(BOB)
    if all_:
        u.delete(name, "AAAA")
    for d in delete:
        u.delete(name, "AAAA", d)
    for a in add:
        u.add(name, ttl, "AAAA", a)
    return u
