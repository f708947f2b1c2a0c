"""The registry's files on disk (issue 11 item 4): the database holds every user's key, so its
directory is 0700 and the database, -wal and -shm files 0600 whatever the umask; a database
open to others is refused with a hint; the shipped systemd unit passes systemd-analyze."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dns.name
import dns.rdata
import pytest
from registry_helpers import PARENT, ROOT, LiveRegistry, state_dir

from btmm_core.registry.accounts import add_user
from btmm_core.registry.model import ChangeSet, Entry, RecordRow
from btmm_core.registry.storage import SqliteStorage, StorageError
from btmm_core.serve.config import DEFAULT_STATE

UNIT = ROOT / "contrib" / "btmm-serve.service"


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The worst umask: whatever btmm does not restrict itself comes out 0666/0777."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_new_database_directory_and_wal_files_are_private(open_umask: None) -> None:
    with state_dir() as base:
        db = base / "state" / "sub" / "registry.sqlite"
        storage = SqliteStorage(db)
        storage.ensure_zone(PARENT, None)
        account = add_user(storage, "bob", PARENT, legacy=False)
        rd = dns.rdata.from_text("IN", "A", "192.0.2.1")
        name = dns.name.from_text("h", origin=account.zone)
        storage.commit(
            ChangeSet(account.zone, 2, (RecordRow(account.zone, name, 1, rd, Entry(300, None)),))
        )
        try:
            assert _mode(db.parent) == 0o700
            for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
                assert p.exists(), p
                assert _mode(p) == 0o600, (p, oct(_mode(p)))
        finally:
            storage.close()


@pytest.mark.parametrize("which", ["", "-wal", "-shm"])
def test_database_open_to_others_is_refused_with_a_hint(which: str) -> None:
    with state_dir() as base:
        db = base / "registry.sqlite"
        storage = SqliteStorage(db)
        add_user(storage, "bob", PARENT, legacy=False)
        # keep -wal and -shm: another connection holds them open
        other = SqliteStorage(db)
        storage.close()
        target = Path(f"{db}{which}")
        assert target.exists()
        os.chmod(target, 0o644)
        with pytest.raises(StorageError) as err:
            SqliteStorage(db)
        other.close()
        assert str(target) in err.value.what and "0644" in err.value.what
        assert err.value.hint is not None and f"chmod 600 {db}" in err.value.hint


def test_btmm_serve_refuses_a_world_readable_database() -> None:
    with state_dir() as base:
        reg = LiveRegistry(base, 0, 0, ())
        assert reg.cli("user", "add", "bob").returncode == 0
        os.chmod(base / "registry.sqlite", 0o604)
        r = reg.cli("user", "list")
        assert r.returncode != 0
        assert "open to other users" in r.stderr and "chmod 600" in r.stderr


def test_systemd_unit_for_btmm_serve_verifies(tmp_path: Path) -> None:
    text = UNIT.read_text()
    # the unit's state directory is where `btmm serve` looks by default
    assert f"StateDirectory={DEFAULT_STATE.name}\n" in text
    assert f"BTMM_REGISTRY_STATE={DEFAULT_STATE}\n" in text
    for line in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "StateDirectoryMode=0700",
        "UMask=0077",
    ):
        assert re.search(f"^{re.escape(line)}$", text, re.M), line
    assert re.search(r"^(DynamicUser=yes|User=\S+)$", text, re.M)
    # verify needs the ExecStart binary to exist: point it at this checkout's btmm
    exec_start = re.search(r"^ExecStart=(\S+) serve", text, re.M)
    assert exec_start is not None
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(exec_start.group(1), f"{sys.executable} -m btmm_core"))
    tool = shutil.which("systemd-analyze")
    assert tool is not None, "systemd-analyze is missing: install systemd (.ci/apt-packages)"
    r = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    # a bad value is only a warning with exit code 0: any output is a failure
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr
