"""Helpers for the LLQ tests: a registry core with an LLQ server plugged in, on memory storage,
driven on a virtual clock the way ``RegistryServer`` drives them, and signed updates."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.name
import dns.rdatatype
import dns.update

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "registry"))

from registry_helpers import (
    PARENT,
    dnskey,
    free_port,
    live_registry,
    make_core,
    parse,
    sign,
    state_dir,
)

from btmm_core.dns.tsig import TsigKey, append_tsig
from btmm_core.llq.client import (
    Changes,
    ClientConfig,
    LLQClient,
    Output,
    Send,
    StateChanged,
)
from btmm_core.llq.server import LLQConfig, LLQServer
from btmm_core.registry.handler import Policy, RegistryCore, Transport
from btmm_core.registry.model import Account, RRsetChange
from btmm_core.registry.plugin import Outgoing, is_response

NOW = 1_800_000_000.0
BOB = dns.name.from_text("bob.members.example.")
LAPTOP = dns.name.from_text("laptop.bob.members.example.")

__all__ = [
    "BOB",
    "LAPTOP",
    "NOW",
    "PARENT",
    "Lab",
    "dnskey",
    "free_port",
    "live_registry",
    "parse",
    "sign",
    "sign_ack",
    "state_dir",
]


def sign_ack(ack: dns.message.Message, key: TsigKey, time_signed: int, event: bytes) -> bytes:
    """Sign an event acknowledgement as the client does: a TSIG response to the event."""
    ev = dns.message.from_wire(event, keyring=False)
    assert ev.tsig is not None
    return append_tsig(
        ack.to_wire(),
        key=key,
        key_name=key.name,
        algorithm=key.algorithm,
        request_mac=ev.tsig[0].mac,
        time_signed=time_signed,
        fudge=300,
        error=0,
    )


def update(
    name: str,
    rdtype: str,
    *,
    add: tuple[str, ...] = (),
    delete: tuple[str, ...] = (),
    delete_all: bool = False,
    ttl: int = 300,
    lease: int | None = None,
) -> dns.update.UpdateMessage:
    u = dns.update.UpdateMessage(BOB)
    if delete_all:
        u.delete(name, rdtype)
    for d in delete:
        u.delete(name, rdtype, d)
    for a in add:
        u.add(name, ttl, rdtype, a)
    if lease is not None:
        from btmm_core.dns.edns import UpdateLeaseOption

        u.use_edns(0, 0, 1232, options=[UpdateLeaseOption(lease)])
    return u


@dataclass
class Lab:
    """A registry core, its LLQ server and any number of clients, on one virtual clock.

    ``drop`` decides per datagram whether the network loses it (direction, wire).
    """

    core: RegistryCore
    accounts: dict[str, Account]
    llq: LLQServer
    now: float = NOW
    clients: dict[str, LLQClient] = field(default_factory=dict)
    changes: dict[str, list[Changes]] = field(default_factory=dict)
    states: dict[str, list[StateChanged]] = field(default_factory=dict)
    drop: object = None
    server_up: bool = True
    sent_to_server: int = 0
    #: What the driver holds for the next timer pass: RRset changes, events an ack let go.
    changed: list[RRsetChange] = field(default_factory=list)
    pushed: list[Outgoing] = field(default_factory=list)

    @classmethod
    def make(
        cls,
        config: LLQConfig | None = None,
        policy: Policy | None = None,
        seed: int = 1,
    ) -> Lab:
        core, accounts = make_core(policy=policy or Policy(lease_min=10, lease_max=7200))
        llq = LLQServer(core, config or LLQConfig(), b"s" * 32, random.Random(seed))
        core.plug(llq)
        lab = cls(core, accounts, llq)
        core.store.add_observer(lab.changed.append)
        return lab

    def restart_llq(self, seed: int = 2) -> None:
        """A new core and LLQ server on the same zone data, as after a process restart."""
        self.core = RegistryCore(self.core.store, self.core.policy)
        self.llq = LLQServer(self.core, self.llq.config, bytes([seed]) * 32, random.Random(seed))
        self.core.plug(self.llq)
        self.changed.clear()
        self.pushed.clear()

    def send(self, wire: bytes, now: float, transport: Transport, peer: str) -> bytes | None:
        """A message from a client, routed as ``RegistryServer.dispatch`` does: the answer,
        and in ``pushed`` what an acknowledgement let go."""
        if is_response(wire):
            self.pushed += self.llq.receive_response(wire, now, transport, peer)
            return None
        return self.core.receive(wire, now, transport, peer)

    def run_server(self, now: float | None = None) -> list[Outgoing]:
        """One timer pass of the driver: changes to the LLQ server, its timers; what it sends."""
        now = self.now if now is None else now
        changes = list(self.changed)
        self.changed.clear()  # the list the store's observer appends to
        out, self.pushed = self.pushed, []
        if changes:
            out += self.llq.on_changes(changes, now)
        return out + self.llq.tick(now)

    def client(
        self,
        peer: str,
        qname: dns.name.Name = LAPTOP,
        qtype: str = "AAAA",
        user: str | None = "bob",
        config: ClientConfig | None = None,
        seed: int = 7,
    ) -> LLQClient:
        key = self.accounts[user].key if user else None
        c = LLQClient(qname, dns.rdatatype.from_text(qtype), random.Random(seed), config, key)
        self.clients[peer] = c
        self.changes[peer] = []
        self.states[peer] = []
        self.deliver(peer, c.start(self.now))
        return c

    def _lost(self, direction: str, wire: bytes) -> bool:
        return bool(self.drop is not None and self.drop(direction, wire))  # type: ignore[operator]

    def deliver(self, peer: str, outputs: list[Output]) -> None:
        """Send a client's outputs to the server, the answers back, until nothing moves."""
        queue = list(outputs)
        while queue:
            o = queue.pop(0)
            if isinstance(o, Changes):
                self.changes[peer].append(o)
            elif isinstance(o, StateChanged):
                self.states[peer].append(o)
            elif isinstance(o, Send):
                if self._lost("up", o.wire) or not self.server_up:
                    continue
                self.sent_to_server += 1
                answer = self.send(o.wire, self.now, Transport.UDP, peer)
                queue.extend(self._to_client(peer, answer))
        self.pump_server()

    def _to_client(self, peer: str, wire: bytes | None) -> list[Output]:
        if wire is None or self._lost("down", wire):
            return []
        return self.clients[peer].receive(wire, self.now)

    def pump_server(self) -> None:
        """Run the LLQ server's timers and deliver what it sends."""
        if not self.server_up:
            return
        for out in self.run_server():
            if out.peer in self.clients:
                self.deliver(out.peer, self._to_client(out.peer, out.wire))

    def signed_update(self, msg: dns.message.Message, user: str = "bob") -> dns.message.Message:
        wire = sign(msg, self.accounts[user].key, int(self.now))
        answer = parse(self.send(wire, self.now, Transport.UDP, "updater#1"))
        self.pump_server()
        return answer

    def advance(self, seconds: float, step: float = 0.5) -> None:
        """Move the clock, firing every due timer of the clients and the server on the way."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            if self.server_up:
                self.core.tick(self.now)
            self.pump_server()
            for peer, c in list(self.clients.items()):
                d = c.next_deadline()
                if d is not None and d <= self.now:
                    self.deliver(peer, c.tick(self.now))

    def known(self, peer: str) -> set[str]:
        return {f"{n} {dns.rdatatype.to_text(t)} {rd}" for (n, t, rd) in self.clients[peer].known}
