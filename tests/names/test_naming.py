"""``daemon/naming.py``: how ``btmm up`` points programs at the stub, and what ``btmm status``
says when it cannot (issue 16). Loopback only, a free port each time."""

from __future__ import annotations

import asyncio
import ipaddress
import os
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.name
import dns.rcode
import pytest

from bench.serve import free_port
from btmm_core.daemon import naming
from btmm_core.daemon.cli import render_status
from btmm_core.daemon.config import Config
from btmm_core.daemon.naming import Names

ZONE = dns.name.from_text("alice.members.example.")
LAPTOP = dns.name.from_text("laptop", origin=ZONE)


def _names(tmp_path: Path, resolv: str, port: int) -> Names:
    (tmp_path / "resolv.conf").write_text(resolv)
    cfg = Config(path=tmp_path / "btmm.toml", host="desktop", stub=f"127.0.0.1:{port}",
                 upstream="none", resolv_conf=tmp_path / "resolv.conf")
    return Names(cfg, ZONE)


def test_resolv_conf_naming_the_stub_or_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            ) -> None:
    monkeypatch.setattr(naming, "resolved_present", lambda: False)

    async def run() -> None:
        port = free_port()
        names = _names(tmp_path, "nameserver 192.0.2.1\n", port)
        await names.start("btmm0")
        try:
            assert names.status()["wiring"] == "hosts-file"
            assert "hosts block only" in names.status()["hint"]
            names.update({LAPTOP: ipaddress.IPv6Address("fd00::7")})
            q = dns.message.make_query(LAPTOP, "AAAA")
            r = await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=3)
            assert r.answer[0][0].address == "fd00::7"
            r = await dns.asyncquery.tcp(dns.message.make_query("example.com.", "A"),
                                         "127.0.0.1", port=port, timeout=3)
            assert r.rcode() == dns.rcode.REFUSED  # upstream = "none"
        finally:
            await names.close()
        # close frees the address: a restarted daemon listens there again, and a resolv.conf
        # naming the stub is recognised
        again = _names(tmp_path, "nameserver 127.0.0.1\n", port)
        await again.start("btmm0")
        try:
            st = again.status()
            assert st["listening"] is True
            assert st["wiring"] == ("resolv.conf" if port == 53 else "hosts-file")
        finally:
            await again.close()

    asyncio.run(run())


def test_a_failing_resolvectl_falls_back_and_says_why(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bin" / "resolvectl"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'Failed to set DNS configuration: no such link' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(naming, "resolved_present", lambda: True)

    async def run() -> dict[str, object]:
        names = _names(tmp_path, "nameserver 192.0.2.1\n", free_port())
        await names.start("btmm0")
        try:
            return names.status()
        finally:
            await names.close()

    st = asyncio.run(run())
    assert st["wiring"] == "hosts-file" and "no such link" in str(st["error"])


def test_a_taken_port_leaves_the_hosts_block_and_status_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(naming, "resolved_present", lambda: False)

    async def run() -> dict[str, object]:
        port = free_port()
        first = _names(tmp_path, "", port)
        await first.start("btmm0")
        second = _names(tmp_path, "", port)
        try:
            await second.start("btmm0")
            return second.status()
        finally:
            await first.close()
            await second.close()

    st = asyncio.run(run())
    assert st["listening"] is False and "cannot listen" in str(st["error"])
    line = render_status({"host": _HOST, "peers": [], "names": st}).splitlines()
    assert any(s.startswith("names     no stub resolver (cannot listen") for s in line)


_HOST = {"name": "desktop.alice.members.example.", "ula": "fd00::1", "external": None,
         "local_address": None, "local_port": 4500, "mapping": "none", "mapping_error": None,
         "registry": "192.0.2.53:53", "lease": None, "lease_left": None, "llq": "idle",
         "registry_error": None, "dataplane": "PyEngine", "public_key": "x"}
