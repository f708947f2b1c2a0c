"""A throwaway PostgreSQL cluster for the tests and the registry bench: ``initdb`` and ``pg_ctl``
from Debian's ``postgresql`` package, in a temporary directory, as an unprivileged user
(PostgreSQL refuses to run as root), reachable only by a unix socket in that directory
(``listen_addresses=''``). Always stopped and removed by ``pg_cluster``."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg


def pg_bin() -> Path:
    """The directory of ``initdb`` and ``pg_ctl`` (Debian keeps them out of PATH)."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not versions:
        raise RuntimeError("no PostgreSQL server found: apt-get install postgresql")
    return versions[-1].parent


def _owner() -> pwd.struct_passwd | None:
    """Who runs the cluster: ourselves unless we are root, else Debian's ``postgres`` (or
    ``nobody``)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and there is no 'postgres' or 'nobody' user for initdb")


@dataclass
class PgCluster:
    root: Path
    owner: pwd.struct_passwd | None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def sockets(self) -> Path:
        return self.root / "sock"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        owner = self.owner
        return subprocess.run(
            [str(pg_bin() / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=120,
            check=check,
            cwd=self.root,
            user=None if owner is None else owner.pw_uid,
            group=None if owner is None else owner.pw_gid,
            extra_groups=None if owner is None else [],
        )

    def init(self) -> None:
        self.sockets.mkdir()
        if self.owner is not None:
            for p in (self.root, self.sockets):
                os.chown(p, self.owner.pw_uid, self.owner.pw_gid)
        self._run(
            "initdb", "-D", str(self.data), "-U", "btmm", "--auth=trust", "--no-instructions",
            "-E", "UTF8", "--locale=C",
        )

    def start(self) -> None:
        opts = f"-c listen_addresses='' -k {self.sockets} -c max_connections=200"
        r = self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", opts,
            "-w", "-t", "60", "start", check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {r.stderr}\n{self.log()}")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop",
                  check=False)

    def restart(self) -> None:
        """Stop (immediate: like a crash, no checkpoint) and start again."""
        self.stop("immediate")
        self.start()

    def log(self) -> str:
        p = self.root / "server.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://btmm@/{db}?host={self.sockets}"

    def create_database(self) -> str:
        """A fresh empty database; returns its URL."""
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@contextlib.contextmanager
def pg_cluster(base: str | None = None) -> Iterator[PgCluster]:
    """A running cluster in a new directory under ``base`` (default: /dev/shm when there is
    one: the tests kill processes, they do not cut power), stopped and removed afterwards."""
    if base is None and os.access("/dev/shm", os.W_OK):
        base = "/dev/shm"
    root = Path(tempfile.mkdtemp(prefix="btmm-pg-", dir=base))
    cluster = PgCluster(root, _owner())
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.stop("immediate")
        deadline = time.monotonic() + 10
        while (cluster.data / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(root, ignore_errors=True)
