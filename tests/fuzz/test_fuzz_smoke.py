"""The fuzz targets in CI: every seed is clean, the committed seeds are the ones
``python3 -m fuzz.seeds`` writes today, and every target runs under atheris for a
second without a crash (the long runs are reported in issue 19, not run here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import seeds
from fuzz.__main__ import NAMES
from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]
SMOKE_SECONDS = 1  # plus ~3 s of instrumenting at start: ~50 s for all


def test_every_target_is_listed_and_has_seeds() -> None:
    assert set(NAMES) == set(TARGETS)
    for name in NAMES:
        assert any((seeds.CORPUS / name).iterdir()), name


def test_committed_seeds_are_current(tmp_path: Path) -> None:
    """Seeds carry TSIG MACs, LLQ challenges and Noise messages made with the targets' fixed
    keys: if a message format changes, they must be made again (python3 -m fuzz.seeds)."""
    seeds.write(tmp_path)
    for name in NAMES:
        made = {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()}
        committed = {p.name: p.read_bytes() for p in (seeds.CORPUS / name).iterdir()}
        assert made == committed, f"fuzz/corpus/{name} is stale: run python3 -m fuzz.seeds"


@pytest.mark.parametrize("name", NAMES)
def test_seeds_are_clean(name: str) -> None:
    for path in sorted((seeds.CORPUS / name).iterdir()):
        TARGETS[name].run(path.read_bytes())


def test_a_target_reports_an_undocumented_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    """The contract is real: a parser that raises anything else fails the target."""
    import btmm_core.reach.probe as probe

    def broken(data: bytes) -> object:
        raise IndexError("a bug")

    monkeypatch.setattr(probe, "parse_probe", broken)
    with pytest.raises(IndexError):
        TARGETS["probe"].run(b"\x06")


@pytest.mark.parametrize("name", NAMES)
def test_target_runs_without_a_crash(name: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "fuzz", name, "--seconds", str(SMOKE_SECONDS),
         "--work", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Done" in r.stderr and "stat::number_of_executed_units" in r.stderr, r.stderr[-2000:]
    assert not list((tmp_path / "work").glob("crash-*"))
