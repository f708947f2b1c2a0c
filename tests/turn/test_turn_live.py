"""The TURN client (turn/client.py through turn/driver.py) against the real server: coturn's
``turnserver`` started by the test on loopback with ``use-auth-secret`` (tests/turn/coturn.py),
credentials made as the registry makes them (stun/turn.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import coturn as coturn_module
import pytest
from coturn import Coturn

from btmm_core.aio import within
from btmm_core.errors import TurnError
from btmm_core.stun.message import TransportAddress
from btmm_core.stun.turn import TurnOffer
from btmm_core.turn.client import (
    AllocationLost,
    AllocationState,
    ChannelBound,
    Event,
    PeerData,
    PermissionCreated,
    TurnClient,
)
from btmm_core.turn.driver import TurnSession

SECRET = "lab-turn-secret"


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[Coturn]:
    server = Coturn(tmp_path / "coturn", SECRET)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def session(server: Coturn, name: str, *, secret: str = SECRET,
            expiry: int | None = None) -> TurnSession:
    offer = TurnOffer.make(server.host, server.port, secret.encode(), name,
                           expiry if expiry is not None else int(time.time()) + 3600)
    client = TurnClient(server.address, offer.username, offer.password, os.urandom)
    return TurnSession(client, local=("127.0.0.1", 0))


async def next_of(s: TurnSession, kind: type, timeout: float = 30.0) -> Event:
    async def wait() -> Event:
        while True:
            ev = await s.events.get()
            if isinstance(ev, kind):
                return ev

    return await within(wait(), timeout)


def test_allocate_and_refresh(coturn: Coturn) -> None:
    async def main() -> None:
        s = session(coturn, "laptop.alice")
        await s.open()
        try:
            got = await s.allocated(30)
            assert got.relayed.host == "127.0.0.1" and 49152 <= got.relayed.port <= 49999
            assert got.mapped == TransportAddress(*s.sockname)
            assert got.lifetime == 600
            before = s.client.expires_at
            assert before is not None
            s.refresh()
            deadline = time.monotonic() + 30
            while s.client.expires_at == before and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert s.client.expires_at is not None and s.client.expires_at > before
            assert s.client.state is AllocationState.ALLOCATED
            assert sum(s.client.drops.values()) == 0
        finally:
            s.close()

    asyncio.run(main())


def test_data_relayed_between_two_allocations(coturn: Coturn) -> None:
    """Both hosts relayed (the carrier-grade NAT case): A's channel to B's relayed address,
    B's permission for A's; data both ways, as ChannelData and as Send/Data indications."""

    async def main() -> None:
        a, b = session(coturn, "a.alice"), session(coturn, "b.bob")
        await a.open()
        await b.open()
        try:
            ra, rb = (await a.allocated(30)).relayed, (await b.allocated(30)).relayed
            channel = a.bind(rb)
            assert await next_of(a, ChannelBound) == ChannelBound(rb, channel)
            b.permit(ra)
            assert await next_of(b, PermissionCreated) == PermissionCreated(ra)
            payload = os.urandom(1200)
            assert a.send(rb, payload)  # ChannelData to coturn, relayed from ra to rb
            got = await next_of(b, PeerData)
            assert got == PeerData(ra, payload, False)  # B has no channel: a Data indication
            assert b.send(ra, b"reply")  # a Send indication
            assert await next_of(a, PeerData) == PeerData(rb, b"reply", True)
            # a burst: every datagram arrives in order on loopback
            for i in range(100):
                a.send(rb, i.to_bytes(2, "big") * 32)
            seen = [await next_of(b, PeerData) for _ in range(100)]
            assert seen == [PeerData(ra, i.to_bytes(2, "big") * 32, False) for i in range(100)]
        finally:
            a.close()
            b.close()

    asyncio.run(main())


@pytest.mark.parametrize("case", ["wrong secret", "expired"])
def test_bad_credentials_are_refused(coturn: Coturn, case: str) -> None:
    async def main() -> None:
        if case == "wrong secret":
            s = session(coturn, "mallory", secret="guess")
        else:
            s = session(coturn, "laptop.alice", expiry=int(time.time()) - 60)
        await s.open()
        try:
            with pytest.raises(TurnError, match="401"):
                await s.allocated(30)
            assert s.client.state is AllocationState.FAILED
        finally:
            s.close(release=False)

    asyncio.run(main())


def test_server_restart_is_survived_by_a_new_allocation(coturn: Coturn) -> None:
    async def main() -> None:
        s = session(coturn, "laptop.alice")
        await s.open()
        try:
            await s.allocated(30)
            peer = TransportAddress("127.0.0.1", 9)
            channel = s.bind(peer)
            await next_of(s, ChannelBound)
            coturn.stop()
            coturn.start()  # same port: the allocation, nonce and channel are gone
            s.refresh()
            assert isinstance(await next_of(s, AllocationLost, 30), AllocationLost)
            assert await next_of(s, ChannelBound, 30) == ChannelBound(peer, channel)
            assert s.client.state is AllocationState.ALLOCATED and s.client.allocations == 2
        finally:
            s.close()

    asyncio.run(main())


def test_a_port_taken_before_turnserver_binds_it_is_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness's own retry: another process holds the TCP side of the port chosen."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        offered = iter([taken])
        real = coturn_module.free_port
        monkeypatch.setattr(coturn_module, "free_port",
                            lambda host="127.0.0.1": next(offered, 0) or real(host))
        server = Coturn(tmp_path / "coturn", SECRET)
        try:
            server.start()
            assert server.port != taken and server.answers()
        finally:
            server.stop()
