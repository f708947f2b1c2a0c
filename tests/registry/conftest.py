"""Fixtures of the registry tests: one PostgreSQL cluster per session (started only by the
tests that ask for it), and a storage backend parameter so that storage-level tests run on
SQLite and on PostgreSQL alike."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.pgcluster import PgCluster, pg_cluster
from btmm_core.registry.storage import Storage, open_storage

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    with pg_cluster() as cluster:
        yield cluster


@pytest.fixture(params=BACKENDS)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One fresh database of each backend in turn: a SQLite file, or a PostgreSQL URL."""
    if request.param == "sqlite":
        return str(tmp_path / "registry.sqlite")
    cluster: PgCluster = request.getfixturevalue("pg")
    return cluster.create_database()


@pytest.fixture
def open_db(database: str) -> Iterator[Callable[[], Storage]]:
    """Open the test's database (as many times as a test wants: each is one process's view);
    whatever is left open is closed at the end."""
    opened: list[Storage] = []

    def make() -> Storage:
        storage = open_storage(database)
        opened.append(storage)
        return storage

    yield make
    for s in opened:
        s.close()
