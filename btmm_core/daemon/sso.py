"""SSH single sign-on in ``btmm up`` (docs/architecture.md section 12): the files ``sshd`` and
``ssh`` read, kept in step with the zone.

What to trust is decided from the verified peers' records and the revocations the registry
publishes; certificates, the KRL and every text come from ``btmm_core.sso`` (pure). This module
only writes files, reads public keys and signals ``sshd``. Files ``sshd`` reads at every
authentication (trusted user CAs, the KRL, principals) are replaced by rename, so a
connection never sees half a file; the known-hosts block is rewritten in place like the hosts
block (it sits in a file others own).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import secrets
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.name
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from btmm_core.daemon.config import Config
from btmm_core.daemon.records import PeerRecords
from btmm_core.errors import BtmmError, ConfigError
from btmm_core.keyex.keys import decode_public
from btmm_core.sso.certs import (
    CertInfo,
    CertKind,
    b64,
    binding_key,
    binding_tag,
    check_binding,
    device_ca,
    load_public,
    raw_public,
    read_cert,
    request,
    sign,
)
from btmm_core.sso.files import (
    Revoked,
    SshdFiles,
    dropin_text,
    known_hosts_lines,
    principals_for,
    replace_block,
    trusted_cas_text,
)
from btmm_core.sso.krl import build_krl

log = structlog.get_logger("btmm.sso")


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _rewrite_block(path: Path, lines: list[str]) -> None:
    if not lines and not path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(exist_ok=True)
    with open(path, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        new = replace_block(f.read(), lines)
        f.seek(0)
        f.write(new)
        f.truncate()


def cert_path(public_key: Path) -> Path:
    """Where ``ssh`` looks for the certificate of a key: ``id_ed25519-cert.pub`` beside
    ``id_ed25519.pub``."""
    stem = public_key.name.removesuffix(".pub")
    return public_key.with_name(f"{stem}-cert.pub")


def user_key_path(template: str, user: str) -> Path:
    """``[sso] user_key`` for ``user``: ``~`` is their home, ``%u`` their name."""
    text = template.replace("%u", user)
    if text.startswith("~/") or text == "~":
        try:
            home = pwd.getpwnam(user).pw_dir
        except KeyError as exc:
            raise ConfigError(f"no local user {user!r}",
                              hint="fix [sso] users in the configuration") from exc
        text = home + text[1:]
    return Path(text)


@dataclass
class SsoState:
    trusted: dict[str, tuple[tuple[str, ...], Ed25519PublicKey]] = field(default_factory=dict)
    revoked: dict[bytes, Revoked] = field(default_factory=dict)
    host_cert: CertInfo | None = None
    user_certs: dict[str, CertInfo] = field(default_factory=dict)
    error: str | None = None


class Sso:
    """One host's side of SSH single sign-on."""

    def __init__(self, cfg: Config, zone: dns.name.Name, device_private: bytes,
                 device_public: bytes, account_secret: bytes, ula: str) -> None:
        self.cfg = cfg
        self.zone = zone.to_text().rstrip(".")
        self.ca = device_ca(device_private)
        self.ca_raw = raw_public(self.ca)
        self.device_public = device_public
        self.bind_key = binding_key(account_secret)
        self.ula = ula
        self.dir = cfg.state_dir / "sso"
        # the host certificate sits with our state, not beside a key file we do not own
        self.files = SshdFiles(
            host_certificate=self.dir / "ssh_host_ed25519_key-cert.pub",
            trusted_user_cas=self.dir / "trusted_user_ca_keys",
            revoked_keys=self.dir / "revoked_keys.krl",
            principals_dir=self.dir / "principals",
        )
        self.state = SsoState()
        self._krl_version = 0

    # -- what we publish --------------------------------------------------------------

    def published(self) -> tuple[str, str]:
        """``sshca`` and ``sshbind`` for this host's TXT record."""
        tag = binding_tag(self.bind_key, self.zone, self.cfg.host, self.device_public,
                          self.ca_raw)
        return b64(self.ca_raw), b64(tag)

    def names(self) -> tuple[str, ...]:
        return (f"{self.cfg.host}.{self.zone}", self.ula)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, now: float) -> None:
        self.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        pdir = self.files.principals_dir
        pdir.mkdir(mode=0o755, exist_ok=True)
        wanted = principals_for(self.cfg.sso_users)
        for old in pdir.iterdir():
            if old.name not in wanted:
                old.unlink()
        for user, text in wanted.items():
            _write_atomic(pdir / user, text.encode())
        self.state.trusted = {self.cfg.host: (self.names(), self.ca.public_key())}
        self._write_trust()
        self._write_krl(now)
        self._renew_host(now, reload=False)
        _write_atomic(self.cfg.sso_sshd_dropin, dropin_text(self.files).encode())
        self.reload_sshd("drop-in written")
        for user in self.cfg.sso_users:
            self._renew_user(user, now)

    def stop(self) -> None:
        """Take btmm out of sshd's configuration and the known hosts; certificates stay
        (they expire on their own)."""
        with contextlib.suppress(FileNotFoundError):
            self.cfg.sso_sshd_dropin.unlink()
            self.reload_sshd("drop-in removed")
        try:
            _rewrite_block(self.cfg.sso_known_hosts, [])
        except OSError as err:
            log.warning("cannot clean the known hosts", path=str(self.cfg.sso_known_hosts),
                        error=str(err))

    def tick(self, now: float) -> None:
        """Renew what is at half its life."""
        if self.state.host_cert is None or self.state.host_cert.due(now):
            self._renew_host(now, reload=True)
        for user in self.cfg.sso_users:
            info = self.state.user_certs.get(user)
            if info is None or info.due(now):
                self._renew_user(user, now)

    # -- trust -------------------------------------------------------------------------

    def set_peers(self, peers: Iterable[PeerRecords]) -> None:
        """Trust the CA of each verified peer whose binding tag checks out (and that is not
        revoked); rewrite the files when that changes."""
        trusted = {self.cfg.host: (self.names(), self.ca.public_key())}
        for rec in peers:
            if not rec.ssh_ca:
                continue
            try:
                pk = decode_public(rec.public_key)
            except BtmmError:
                continue
            ca = check_binding(self.bind_key, self.zone, rec.host, pk, rec.ssh_ca,
                               rec.ssh_bind)
            if ca is None:
                log.warning("peer's SSH CA is not bound to this account; not trusted",
                            peer=rec.host)
                continue
            if raw_public(ca) in self.state.revoked:
                continue
            trusted[rec.host] = ((f"{rec.host}.{self.zone}", str(rec.ula)), ca)
        if {k: (n, raw_public(c)) for k, (n, c) in trusted.items()} != {
            k: (n, raw_public(c)) for k, (n, c) in self.state.trusted.items()
        }:
            gone = set(self.state.trusted) - set(trusted)
            new = set(trusted) - set(self.state.trusted)
            self.state.trusted = trusted
            self._write_trust()
            log.info("SSH trust changed", trusted=sorted(trusted), added=sorted(new),
                     removed=sorted(gone))

    def set_revoked(self, revoked: Iterable[Revoked], now: float) -> None:
        found = {r.ca: r for r in revoked}
        if set(found) == set(self.state.revoked):
            return
        self.state.revoked = found
        self.state.trusted = {k: v for k, v in self.state.trusted.items()
                              if raw_public(v[1]) not in found}
        self._write_krl(now)
        self._write_trust()
        log.info("SSH revocations", devices=sorted(r.device for r in found.values()))

    def _write_trust(self) -> None:
        cas = {dev: ca for dev, (_, ca) in self.state.trusted.items()}
        _write_atomic(self.files.trusted_user_cas, trusted_cas_text(cas).encode())
        revoked = [Ed25519PublicKey.from_public_bytes(r) for r in self.state.revoked]
        try:
            _rewrite_block(self.cfg.sso_known_hosts,
                           known_hosts_lines(self.state.trusted, revoked))
        except OSError as err:
            log.warning("cannot update the known hosts", path=str(self.cfg.sso_known_hosts),
                        error=str(err))

    def _write_krl(self, now: float) -> None:
        self._krl_version += 1
        _write_atomic(self.files.revoked_keys,
                      build_krl(self.state.revoked, version=self._krl_version,
                                generated=int(now)))

    # -- certificates ------------------------------------------------------------------

    def _renew_host(self, now: float, *, reload: bool) -> None:
        try:
            key = load_public(self.cfg.sso_host_key.read_text())
        except (OSError, ConfigError) as err:
            self.state.error = f"no host certificate: {self.cfg.sso_host_key}: {err}"
            log.warning("no SSH host certificate", key=str(self.cfg.sso_host_key),
                        error=str(err), hint="generate it with `ssh-keygen -A` or set [sso] "
                        "host_key")
            return
        req = request(CertKind.HOST, key, f"{self.cfg.host}.{self.zone} host", self.names(),
                      now=now, validity=self.cfg.sso_host_validity,
                      serial=secrets.randbits(64))
        text = sign(req, self.ca)
        _write_atomic(self.files.host_certificate, text.encode())
        self.state.host_cert = read_cert(text)
        self.state.error = None
        log.info("SSH host certificate issued", principals=list(req.principals),
                 valid_before=req.valid_before)
        if reload:
            self.reload_sshd("host certificate renewed")

    def _renew_user(self, user: str, now: float) -> None:
        try:
            path = user_key_path(self.cfg.sso_user_key, user)
            if not path.exists():
                return  # the user has no key (yet): `btmm ssh-cert` after ssh-keygen
            self.state.user_certs[user] = self.issue_user(user, path, now)[1]
        except (OSError, BtmmError) as err:
            log.warning("no SSH user certificate", user=user, error=str(err))

    def issue_user(self, user: str, public_key: Path, now: float,
                   validity: float | None = None) -> tuple[Path, CertInfo]:
        """Sign ``user``'s public key with the principal ``[sso] users`` maps them to; the
        certificate goes beside the key, owned by the key's owner."""
        principal = self.cfg.sso_users.get(user)
        if principal is None:
            raise ConfigError(f"{user} has no principal in [sso] users",
                              hint=f'add {user} = "<principal>" to [sso] users in '
                              f"{self.cfg.path}")
        key = load_public(public_key.read_text())
        req = request(CertKind.USER, key, f"{user}@{self.cfg.host}.{self.zone}", (principal,),
                      now=now, validity=validity or self.cfg.sso_user_validity,
                      serial=secrets.randbits(64))
        text = sign(req, self.ca)
        out = cert_path(public_key)
        _write_atomic(out, text.encode())
        st = public_key.stat()
        with contextlib.suppress(PermissionError):
            os.chown(out, st.st_uid, st.st_gid)
        log.info("SSH user certificate issued", user=user, principal=principal,
                 path=str(out), valid_before=req.valid_before)
        return out, read_cert(text)

    # -- sshd --------------------------------------------------------------------------

    def reload_sshd(self, why: str) -> None:
        pid_file = self.cfg.sso_sshd_pid_file
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError, IndexError) as err:
            log.info("sshd not reloaded (not running?): it reads the drop-in when it starts",
                     pid_file=str(pid_file), why=why, error=str(err))
            return
        log.info("sshd reloaded", pid=pid, why=why)

    def status(self, now: float) -> dict[str, Any]:
        st = self.state
        return {
            "ca": b64(self.ca_raw),
            "host_cert": None if st.host_cert is None else st.host_cert.to_json(now),
            "users": {u: c.to_json(now) for u, c in sorted(st.user_certs.items())},
            "trusted": sorted(st.trusted),
            "revoked": sorted(r.device for r in st.revoked.values()),
            "dropin": str(self.cfg.sso_sshd_dropin),
            "error": st.error,
        }
