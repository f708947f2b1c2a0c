"""End to end: ``btmm serve --turn-server --turn-secret-file`` hands a device (its own key,
enrolled over the wire) credentials that coturn (same secret) accepts; another device's key
gets nothing; a registry without a TURN server says so."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import dns.exception
import dns.name
import dns.query
import dns.rcode
import dns.tsig
import pytest
from coturn import Coturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "registry"))
from registry_helpers import live_registry, state_dir

from btmm_core.daemon.dnsclient import RegistryClient
from btmm_core.daemon.turncreds import fetch_offer
from btmm_core.dns.enrol import EnrolClient
from btmm_core.dns.keyfile import read_key_file
from btmm_core.dns.tsig import TsigKey
from btmm_core.dns.turn_option import credentials_query
from btmm_core.errors import TurnError
from btmm_core.stun.message import TransportAddress
from btmm_core.turn.client import TurnClient
from btmm_core.turn.driver import TurnSession

BOB = dns.name.from_text("bob.members.example.")
SECRET = "registry-and-coturn-share-this"


def enrol(port: int, account: TsigKey, device: str) -> TsigKey:
    """Over TCP (an enrolment is never sent twice), again until a deadline: a loaded machine
    may answer slowly."""
    deadline = time.monotonic() + 30
    while True:
        client = EnrolClient(BOB, device)
        msg = client.request()
        msg.use_tsig(dns.tsig.Key(account.name, account.secret, "hmac-sha256"))
        try:
            answer = dns.query.tcp(msg, "127.0.0.1", port=port, timeout=5)
        except (dns.exception.Timeout, OSError) as e:
            assert time.monotonic() < deadline, f"no answer to the enrolment: {e}"
            continue
        if answer.rcode() == dns.rcode.NOERROR:
            return client.finish(answer, msg.mac)
        assert time.monotonic() < deadline, dns.rcode.to_text(answer.rcode())
        time.sleep(0.2)


def test_registry_credentials_open_a_coturn_allocation(tmp_path: Path) -> None:
    coturn = Coturn(tmp_path / "coturn", SECRET)
    coturn.start()
    secret_file = tmp_path / "turn.secret"
    secret_file.write_text(SECRET + "\n")
    try:
        with state_dir() as state, live_registry(
                state, "--listen", "127.0.0.1", "--turn-server", f"127.0.0.1:{coturn.port}",
                "--turn-secret-file", str(secret_file), "--turn-credential-lifetime", "600",
                users=(("bob", False),)) as reg:
            account = read_key_file(reg.keyfile("bob")).key
            laptop = enrol(reg.port, account, "laptop")
            desk = enrol(reg.port, account, "desk")

            async def main() -> None:
                client = RegistryClient(("127.0.0.1", reg.port), laptop, timeout=5)
                offer = await fetch_offer(client)
                assert (offer.host, offer.port) == ("127.0.0.1", coturn.port)
                assert offer.username.endswith(":laptop.bob.members.example")
                assert 590 <= offer.expiry - time.time() <= 610
                # another device of the same account cannot get the laptop's credentials
                other = RegistryClient(("127.0.0.1", reg.port), desk, timeout=5)
                resp, _ = await other.exchange_signed(credentials_query("laptop", BOB),
                                                      check_rcode=False)
                assert resp.rcode() == dns.rcode.REFUSED and not resp.answer
                s = TurnSession(TurnClient(TransportAddress("127.0.0.1", offer.port),
                                           offer.username, offer.password, os.urandom),
                                local=("127.0.0.1", 0))
                await s.open()
                try:
                    got = await s.allocated(30)
                    assert got.relayed.host == "127.0.0.1"
                finally:
                    s.close()

            asyncio.run(main())
            r = reg.cli("user", "devices", "bob")
            assert r.returncode == 0
    finally:
        coturn.stop()


def test_a_registry_without_turn_says_so() -> None:
    with state_dir() as state, live_registry(state, "--listen", "127.0.0.1",
                                             users=(("bob", False),)) as reg:
        account = read_key_file(reg.keyfile("bob")).key
        laptop = enrol(reg.port, account, "laptop")
        client = RegistryClient(("127.0.0.1", reg.port), laptop)
        with pytest.raises(TurnError, match="offers no TURN relay"):
            asyncio.run(fetch_offer(client))
        with pytest.raises(TurnError, match="account key"):
            asyncio.run(fetch_offer(RegistryClient(("127.0.0.1", reg.port), account)))


def test_turn_options_go_together(tmp_path: Path) -> None:
    with state_dir() as state, live_registry(state, users=()) as reg:
        r = reg.cli("--turn-server", "127.0.0.1:3478")
        assert r.returncode == 2 and "--turn-secret-file" in r.stderr
        empty = tmp_path / "empty"
        empty.write_text("\n")
        r = reg.cli("--turn-server", "127.0.0.1:3478", "--turn-secret-file", str(empty))
        assert r.returncode == 2 and "is empty" in r.stderr
