"""SSH single sign-on (issue 20, docs/architecture.md section 12) with the real OpenSSH from
Debian: ``sshd`` in each lab host's namespace with its own configuration (which includes the
drop-in ``btmm up`` writes), ``ssh`` from the other one by name, never the machine's own sshd.

BatchMode and StrictHostKeyChecking make any password or host-key question a failure, so an
``ssh`` that runs its command proves both certificates were accepted."""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from btmm_core.keyex.keys import load_or_create
from btmm_core.lab.netns import Lab
from btmm_core.lab.world import Host, World, build_world
from btmm_core.sso.certs import CertKind, device_ca, load_public, request, sign

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists(),
                       reason="openssh-server is in .ci/apt-packages"),
]


@pytest.fixture
def world() -> Iterator[World]:
    with Lab("btmmsso") as lab:
        w = build_world(lab, nat=False, lease=1800)
        for h in w.hosts.values():
            w.enable_sso(h)
        for h in w.hosts.values():
            w.start_host(h)
        try:
            w.wait_tunnels(40)
            for h in w.hosts.values():
                w.start_sshd(h)
            yield w
        finally:
            for h in w.hosts.values():
                w.stop_host(h)


def _ssh_until(world: World, src: Host, dst: str, ok: bool, timeout: float,
               key: Path | None = None) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Seconds until ``ssh`` succeeds (``ok``) or is refused (not ``ok``)."""
    t0 = time.monotonic()
    while True:
        proc = world.ssh(src, dst, "hostname", key=key)
        if (proc.returncode == 0) == ok:
            return time.monotonic() - t0, proc
        assert time.monotonic() - t0 < timeout, (proc.stderr, world.tails())
        time.sleep(0.5)


def _sign_user(host: Host, world: World, out: Path, *, now: float, validity: float,
               ca_of: Path | None = None) -> Path:
    """A user certificate for the laptop's key, signed like btmm does, at any time."""
    device = load_or_create(ca_of or host.workdir / "state" / "device.key")
    key = load_public((world.ssh_dir(host) / "id_ed25519.pub").read_text())
    req = request(CertKind.USER, key, "test", ("bob",), now=now, validity=validity, serial=1)
    out.mkdir(exist_ok=True)
    shutil.copy(world.ssh_dir(host) / "id_ed25519", out / "id_ed25519")
    (out / "id_ed25519-cert.pub").write_text(sign(req, device_ca(device.private)))
    return out / "id_ed25519"


def test_ssh_by_name_with_certificates(world: World) -> None:
    laptop, desktop = world.hosts["laptop"], world.hosts["desktop"]
    # by name, no password, no host-key question; the desktop's own sshd answered
    took, proc = _ssh_until(world, laptop, desktop.fqdn, True, 30)
    assert proc.stdout.strip() == "desktop", proc.stderr
    st = laptop.status()
    assert st is not None and st["host"]["ssh"]["users"]["root"]["valid"]
    assert set(st["host"]["ssh"]["trusted"]) == {"desktop", "laptop"}
    assert "user certs: root 9h5" in world.status_text(laptop)
    # an expired user certificate is refused; `btmm ssh-cert` renews it and it works again
    now = time.time()
    expired = _sign_user(laptop, world, laptop.workdir / "expired", now=now - 7200,
                         validity=3600)
    refused = world.ssh(laptop, desktop.fqdn, "hostname", key=expired)
    assert refused.returncode == 255 and "Permission denied" in refused.stderr
    cert = world.ssh_dir(laptop) / "id_ed25519-cert.pub"
    shutil.copy(expired.with_name("id_ed25519-cert.pub"), cert)
    assert world.ssh(laptop, desktop.fqdn, "hostname").returncode == 255
    renew = laptop.ns.run(world.btmm("ssh-cert", "--config", str(laptop.config), "--user",
                                     "root"), check=False)
    assert renew.returncode == 0, renew.stderr
    assert world.ssh(laptop, desktop.fqdn, "hostname").stdout.strip() == "desktop"
    # a certificate from another account's CA (a device key of no account) is refused
    stranger = laptop.workdir / "stranger.key"
    stranger.write_text(base64.b64encode(b"\x05" * 32).decode() + "\n")
    stranger.chmod(0o600)
    other = _sign_user(laptop, world, laptop.workdir / "other", now=now, validity=3600,
                       ca_of=stranger)
    refused = world.ssh(laptop, desktop.fqdn, "hostname", key=other)
    assert refused.returncode == 255 and "Permission denied" in refused.stderr
    # a tampered certificate (principal changed after signing) is refused
    good = _sign_user(laptop, world, laptop.workdir / "tampered", now=now, validity=3600)
    cert_file = good.with_name("id_ed25519-cert.pub")
    kind, blob, *_ = cert_file.read_text().split()
    raw = base64.b64decode(blob)
    forged = raw.replace(b"\x00\x00\x00\x03bob", b"\x00\x00\x00\x03rob")
    assert forged != raw
    cert_file.write_text(f"{kind} {base64.b64encode(forged).decode()}\n")
    refused = world.ssh(laptop, desktop.fqdn, "hostname", key=good)
    assert refused.returncode == 255, refused.stdout
    # the desktop presents a host certificate; the laptop trusts it only for its names
    known = (world.ssh_dir(laptop) / "ssh_known_hosts").read_text()
    assert f"@cert-authority {desktop.fqdn}," in known
    # shutdown takes btmm out of sshd's configuration and the known hosts
    dropin = world.ssh_dir(desktop) / "sshd_config.d" / "btmm.conf"
    assert dropin.exists()
    world.stop_host(desktop)
    assert not dropin.exists()
    assert "@cert-authority" not in (world.ssh_dir(desktop) / "ssh_known_hosts").read_text()
    print(f"first ssh by name after {took:.1f} s")


def test_revoked_device_is_refused_within_a_minute(world: World) -> None:
    laptop, desktop = world.hosts["laptop"], world.hosts["desktop"]
    _ssh_until(world, laptop, desktop.fqdn, True, 30)
    # the laptop's key and certificate, as a thief would use them, from the desktop's own
    # namespace (the laptop's tunnel goes away with the revocation: this isolates sshd)
    stolen = desktop.workdir / "stolen"
    stolen.mkdir()
    for f in ("id_ed25519", "id_ed25519-cert.pub"):
        shutil.copy(world.ssh_dir(laptop) / f, stolen / f)
    _ssh_until(world, desktop, desktop.fqdn, True, 10, key=stolen / "id_ed25519")
    t0 = time.monotonic()
    proc = world.serve_cli("user", "revoke", "bob", "laptop")
    assert proc.returncode == 0, proc.stderr
    took, refused = _ssh_until(world, desktop, desktop.fqdn, False, 60,
                               key=stolen / "id_ed25519")
    assert "Permission denied" in refused.stderr
    # and the KRL lists the laptop's CA (not only dropped from the trusted CAs)
    krl = world.ssh_dir(desktop).parent / "state" / "sso" / "revoked_keys.krl"
    deadline = time.monotonic() + 60 - (time.monotonic() - t0)
    while True:
        q = subprocess.run(["ssh-keygen", "-Q", "-f", str(krl), str(stolen /
                                                                    "id_ed25519-cert.pub")],
                           capture_output=True, text=True, timeout=10, check=False)
        if q.returncode == 1 and "REVOKED" in q.stdout:
            break
        assert time.monotonic() < deadline, (q.stdout, world.tails())
        time.sleep(0.5)
    in_krl = time.monotonic() - t0
    # `btmm status` says so (status.json is rewritten every second)
    while (st := desktop.status()) is None or st["host"]["ssh"]["revoked"] != ["laptop"]:
        assert time.monotonic() < deadline + 5, st
        time.sleep(0.2)
    assert "revoked laptop" in world.status_text(desktop)
    print(f"revoke -> refused on the desktop after {took:.1f} s, in the KRL after "
          f"{in_krl:.1f} s")
