"""``btmm serve user invite/devices/revoke`` against a live ``btmm serve``: an invite file
enrols one device over the wire, the device key works with nsupdate for its own names only,
``devices`` lists it, ``revoke`` cuts it off while the server runs."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.tsig
from registry_helpers import live_registry, state_dir

from btmm_core.dns.enrol import EnrolClient
from btmm_core.dns.keyfile import key_file_text, read_key_file, write_key_file
from btmm_core.dns.tsig import KeyRole, TsigKey

BOB = dns.name.from_text("bob.members.example.")
BADKEY = -17  # the registry did not know the key (answered unsigned)


def _enrol(port: int, signer: TsigKey, device: str) -> tuple[TsigKey | None, int]:
    client = EnrolClient(BOB, device)
    msg = client.request()
    msg.use_tsig(dns.tsig.Key(signer.name, signer.secret, "hmac-sha256"))
    try:
        answer = dns.query.udp(msg, "127.0.0.1", port=port, timeout=3)
    except dns.tsig.PeerBadKey:
        return None, BADKEY
    if answer.rcode() != dns.rcode.NOERROR:
        return None, answer.rcode()
    return client.finish(answer, msg.mac), 0


def _nsupdate(port: int, keyfile: Path, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsupdate", "-k", str(keyfile)],
        input=f"server 127.0.0.1 {port}\nzone {BOB}\n{script}\nsend\n",
        capture_output=True, text=True, timeout=30, check=False,
    )


def test_invite_devices_revoke_cli(tmp_path: Path) -> None:
    with state_dir() as state, live_registry(state, "--listen", "127.0.0.1") as reg:
        invite_file = tmp_path / "laptop.invite"
        r = reg.cli("user", "invite", "bob", "--device", "laptop", "--expires", "1h",
                    "--out", str(invite_file))
        assert r.returncode == 0, r.stderr
        assert "usable once" in r.stdout
        assert stat.S_IMODE(os.stat(invite_file).st_mode) == 0o600
        invite = read_key_file(invite_file)
        assert invite.key.role == KeyRole.INVITE and invite.key.device == "laptop"
        assert invite.key.zone == BOB and invite.user == "bob"
        assert "(invite laptop)" in reg.cli("user", "devices", "bob").stdout
        assert reg.cli("user", "invite", "nobody", "--out", str(tmp_path / "x")).returncode
        # the registry notices the new invite within its once-a-second poll
        deadline = time.monotonic() + 10
        key, rc = _enrol(reg.port, invite.key, "laptop")
        while key is None and rc == BADKEY and time.monotonic() < deadline:
            time.sleep(0.2)
            key, rc = _enrol(reg.port, invite.key, "laptop")
        assert key is not None, rc
        # once only
        again, rc = _enrol(reg.port, invite.key, "laptop")
        assert again is None and rc == BADKEY
        listing = reg.cli("user", "devices", "bob").stdout
        assert f"laptop\t{key.name}" in listing and "invite" not in listing
        # the device key file works with nsupdate, for the device's own names only
        dev_file = tmp_path / "device.key"
        write_key_file(dev_file, key_file_text(key))
        ok = _nsupdate(reg.port, dev_file, f"update add laptop.{BOB} 60 AAAA fd00::1")
        assert ok.returncode == 0, ok.stderr
        bad = _nsupdate(reg.port, dev_file, f"update add desktop.{BOB} 60 AAAA fd00::2")
        assert bad.returncode != 0 and "REFUSED" in bad.stdout + bad.stderr
        # revoke: the key stops working while the server runs, the records are gone
        r = reg.cli("user", "revoke", "bob", "laptop")
        assert r.returncode == 0, r.stderr
        assert "revoked" in r.stdout
        assert "laptop" not in reg.cli("user", "devices", "bob").stdout
        assert reg.cli("user", "revoke", "bob", "laptop").returncode != 0
        deadline = time.monotonic() + 10
        while True:
            cut = _nsupdate(reg.port, dev_file, f"update add laptop.{BOB} 60 AAAA fd00::1")
            if cut.returncode != 0:
                break
            assert time.monotonic() < deadline, "the revoked key still works after 10 s"
            time.sleep(0.2)
        assert "BADKEY" in cut.stdout + cut.stderr
        account = reg.keyfile("bob")
        q = subprocess.run(["dig", "@127.0.0.1", "-p", str(reg.port), "-k", str(account),
                            "+short", f"laptop.{BOB}", "AAAA"],
                           capture_output=True, text=True, timeout=30, check=True)
        assert q.stdout.strip() == ""
