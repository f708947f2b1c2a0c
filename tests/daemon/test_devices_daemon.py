"""One key per device, from the host's side, against a live ``btmm serve`` on loopback:
``btmm join`` enrols the device (invite or account key) and stores only the device key; two
devices no longer lock each other out; a revoked device is told to join again; and BADTIME
never stops the daemon: it backs off, retries and shows the skew in its status."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rdatatype
import pytest
from live_registry import Reg as LiveReg
from live_registry import live_registry

from btmm_core.aio import within
from btmm_core.daemon.cli import render_status
from btmm_core.daemon.config import load_config
from btmm_core.daemon.dnsclient import RegistryClient
from btmm_core.daemon.host import Daemon
from btmm_core.daemon.identity import HostIdentity
from btmm_core.daemon.records import Publication, publish_update
from btmm_core.dns.keyfile import read_key_file
from btmm_core.dns.tsig import KeyRole, TsigKey
from btmm_core.errors import ClockSkew, CredentialsRejected

ROOT = Path(__file__).resolve().parents[2]
ZONE = dns.name.from_text("bob.members.example.")


class Reg(LiveReg):
    def join(self, tmp: Path, name: str, creds: Path, *extra: str,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        tmp.mkdir(parents=True, exist_ok=True)
        secret = tmp / "account.secret"
        secret.write_bytes(b"an account secret of enough length for the tests")
        return self.cli("join", "--config", str(tmp / name / "btmm.toml"), "--credentials",
                        str(creds), "--secret-file", str(secret), "--name", name, "--server",
                        f"127.0.0.1:{self.port}", "--state-dir", str(tmp / name / "state"),
                        "--hosts-file", "", *extra, check=check)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reg]:
    with live_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield Reg(reg.state, reg.port, reg.env)


def _device_key(tmp: Path, name: str) -> TsigKey:
    return read_key_file(tmp / name / "state" / "credentials.key").key


def _pub(host: str, ula: str) -> Publication:
    addr = ipaddress.IPv6Address(ula)
    return Publication(host, addr, HostIdentity(addr).autotunnel_label(), "K" * 43 + "=",
                       ipaddress.IPv4Address("203.0.113.3"), 4500)


def _publish(port: int, key: TsigKey, host: str, ula: str) -> None:
    client = RegistryClient(("127.0.0.1", port), key, timeout=2.0, tries=2)
    asyncio.run(client.exchange(publish_update(ZONE, _pub(host, ula), None, 2000)))


def _invite(reg: Reg, tmp: Path, device: str) -> Path:
    out = tmp / f"{device}.invite"
    reg.cli("serve", "user", "invite", "bob", "--device", device, "--out", str(out))
    return out


def _join_invite(reg: Reg, tmp: Path, name: str) -> subprocess.CompletedProcess[str]:
    """Join with a fresh invite; the registry sees new invites within its 1 s poll."""
    invite = _invite(reg, tmp, name)
    deadline = time.monotonic() + 10
    while True:
        r = reg.join(tmp, name, invite, check=False)
        if r.returncode == 0 or time.monotonic() > deadline:
            return r
        time.sleep(0.3)


def test_join_with_an_invite_stores_only_the_device_key(registry: Reg, tmp_path: Path) -> None:
    r = _join_invite(registry, tmp_path, "tablet")
    assert r.returncode == 0, r.stderr
    assert "joined as tablet (key tablet.bob.members.example.)" in r.stdout
    state = tmp_path / "tablet" / "state"
    creds = state / "credentials.key"
    assert stat.S_IMODE(os.stat(creds).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    dev = read_key_file(creds)
    assert dev.key.role == KeyRole.DEVICE and dev.key.zone == ZONE
    assert dev.key.name == dns.name.from_text("tablet", origin=ZONE)
    account = read_key_file(registry.account).key
    invite = read_key_file(tmp_path / "tablet.invite").key
    stored = b"".join(p.read_bytes() for p in state.iterdir() if p.is_file())
    import base64
    for other in (account, invite):
        assert base64.b64encode(other.secret) not in stored and other.secret not in stored
    cfg = load_config(tmp_path / "tablet" / "btmm.toml")
    assert cfg.server == f"127.0.0.1:{registry.port}"
    _publish(registry.port, dev.key, "tablet", "fd00::7")
    # the invite is spent: a second join with it fails and says what to do
    again = registry.join(tmp_path / "again", "phone", tmp_path / "tablet.invite", check=False)
    assert again.returncode != 0 and "invite works once" in again.stderr
    assert "tablet" in registry.cli("serve", "user", "devices", "bob").stdout


def test_join_with_the_account_key_and_replace(registry: Reg, tmp_path: Path) -> None:
    r = registry.join(tmp_path, "desk", registry.account)
    assert r.returncode == 0, r.stderr
    first = _device_key(tmp_path, "desk")
    dup = registry.join(tmp_path / "b", "desk", registry.account, check=False)
    assert dup.returncode != 0 and "--replace" in dup.stderr
    r = registry.join(tmp_path / "c", "desk", registry.account, "--replace")
    assert r.returncode == 0, r.stderr
    second = _device_key(tmp_path / "c", "desk")
    assert second.name == first.name and second.secret != first.secret
    with pytest.raises(CredentialsRejected, match="BADSIG"):
        _publish(registry.port, first, "desk", "fd00::8")
    _publish(registry.port, second, "desk", "fd00::8")


def test_a_device_stamped_ahead_does_not_lock_out_another(registry: Reg,
                                                            tmp_path: Path) -> None:
    for name in ("ahead", "behind"):
        assert registry.join(tmp_path, name, registry.account).returncode == 0
    ahead, behind = _device_key(tmp_path, "ahead"), _device_key(tmp_path, "behind")
    real = time.time
    with mock.patch("time.time", side_effect=lambda: real() + 299):
        _publish(registry.port, ahead, "ahead", "fd00::a")
    with mock.patch("time.time", side_effect=lambda: real() - 1):
        _publish(registry.port, behind, "behind", "fd00::b")  # BADTIME with one shared key


def test_a_revoked_device_is_told_to_join_again(registry: Reg, tmp_path: Path) -> None:
    assert registry.join(tmp_path, "lost", registry.account).returncode == 0
    assert registry.join(tmp_path, "kept", registry.account).returncode == 0
    lost, kept = _device_key(tmp_path, "lost"), _device_key(tmp_path, "kept")
    _publish(registry.port, lost, "lost", "fd00::c")
    registry.cli("serve", "user", "revoke", "bob", "lost")
    deadline = time.monotonic() + 10
    while True:
        try:
            _publish(registry.port, lost, "lost", "fd00::c")
        except CredentialsRejected as err:
            assert "BADKEY" in err.what and err.hint is not None
            assert "revoked" in err.hint and "btmm join" in err.hint
            break
        assert time.monotonic() < deadline, "the revoked key still works after 10 s"
        time.sleep(0.2)
    _publish(registry.port, kept, "kept", "fd00::d")


def test_badtime_never_stops_the_daemon(registry: Reg, tmp_path: Path) -> None:
    assert registry.join(tmp_path, "skewed", registry.account).returncode == 0
    cfg = load_config(tmp_path / "skewed" / "btmm.toml")
    real = time.time
    offset = [-3600.0]  # this host's clock is an hour behind

    async def main() -> None:
        daemon = Daemon(cfg)
        assert daemon.zone == ZONE  # from the key file, not the key's name
        daemon.registry = RegistryClient(("127.0.0.1", registry.port), daemon.key,
                                         timeout=1.0, tries=1)
        daemon.net.external = ("203.0.113.5", 4500)
        daemon._stop = asyncio.Event()
        with mock.patch("time.time", side_effect=lambda: real() + offset[0]):
            daemon._spawn(daemon._publisher(), "publisher")
            deadline = asyncio.get_running_loop().time() + 20
            while daemon.registry.clock_skew is None or daemon.publish_error is None:
                assert not daemon._stop.is_set(), f"the daemon stopped: {daemon.fatal}"
                assert asyncio.get_running_loop().time() < deadline, "no BADTIME seen"
                await asyncio.sleep(0.05)
            st = daemon.status()
            # keep failing for a while: two more retries (backoff 1 s, 2 s), still running
            await asyncio.sleep(3.5)
            assert not daemon._stop.is_set() and daemon.fatal is None
            assert daemon.published is None
            offset[0] = 0.0  # the clock is set (NTP)
            while daemon.published is None:
                assert asyncio.get_running_loop().time() < deadline + 20, "never recovered"
                await asyncio.sleep(0.05)
        assert not daemon._stop.is_set() and daemon.fatal is None
        assert daemon.status()["host"]["registry_error"] is None
        assert daemon.status()["host"]["clock_skew"] is None
        for t in daemon._tasks:
            t.cancel()
        await asyncio.gather(*daemon._tasks, return_exceptions=True)
        h = st["host"]
        assert "BADTIME" in h["registry_error"] and "behind" in h["registry_error"]
        assert 3590 <= h["clock_skew"] <= 3610
        h.update(ula="fd00::1", external=None, local_address=None, mapping="off",
                 mapping_error=None, public_key="K=", llq="idle")
        text = render_status({"host": h, "peers": []})
        assert "ERROR the registry refused our signing time (BADTIME)" in text
        assert re.search(r"\nclock     this host is 36\d\d s behind the registry", text), text

    asyncio.run(main())


def test_a_stop_while_a_publish_is_answered_withdraws_what_it_published(
        registry: Reg, tmp_path: Path) -> None:
    """The registry applied the publish, its answer is not yet read when the daemon stops:
    the withdrawal waits for that answer and removes what the publish added (before, the
    stop cancelled the exchange, ``published`` stayed None and the records stayed for their
    lease; a TCP publish the registry read after the withdrawal did the same)."""
    assert registry.join(tmp_path, "stopper", registry.account).returncode == 0
    cfg = load_config(tmp_path / "stopper" / "btmm.toml")

    async def main() -> None:
        applied, release = asyncio.Event(), asyncio.Event()

        class AnswerLate(RegistryClient):
            async def exchange(self, msg: dns.message.Message) -> dns.message.Message:
                resp = await super().exchange(msg)
                if not applied.is_set() and msg.opcode() == dns.opcode.UPDATE:
                    applied.set()  # the registry has it; we hold the answer back
                    await release.wait()
                return resp

        daemon = Daemon(cfg)
        daemon.registry = AnswerLate(("127.0.0.1", registry.port), daemon.key,
                                     timeout=2.0, tries=2)
        daemon.net.external = ("203.0.113.5", 4500)
        daemon._stop = asyncio.Event()
        name = dns.name.from_text("stopper", origin=daemon.zone)
        daemon._spawn(daemon._publisher(), "publisher")
        await within(applied.wait(), 20)
        assert await daemon.registry.query(name, dns.rdatatype.AAAA) is not None
        stopping = asyncio.create_task(daemon._shutdown())
        await asyncio.sleep(0)  # the stop has cancelled the publisher
        assert all(t.cancelling() for t in daemon._tasks)
        release.set()
        await within(stopping, 20)
        assert daemon.published is not None
        assert await daemon.registry.query(name, dns.rdatatype.AAAA) is None

    asyncio.run(main())


def test_badtime_reports_the_registry_clock(registry: Reg, tmp_path: Path) -> None:
    assert registry.join(tmp_path, "late", registry.account).returncode == 0
    key = _device_key(tmp_path, "late")
    real = time.time
    with mock.patch("time.time", side_effect=lambda: real() + 1000), \
            pytest.raises(ClockSkew, match="BADTIME") as info:
        _publish(registry.port, key, "late", "fd00::e")
    assert info.value.skew is not None and -1010 <= info.value.skew <= -990
    assert "ahead of the registry" in info.value.what
