"""The Rust core's fuzz targets (btmm_fast/fuzz, afl.rs) in CI: the plain build replays every
committed seed (and checks the seeds are current), and every target runs under afl-fuzz for a
few seconds without a crash. afl-fuzz and its runtime are the AFL++ that cargo-afl builds
(scripts/setup installs it); instrumentation is rustc's SanitizerCoverage (the LLVM plugins
need a nightly compiler). The long runs are in fuzz/README.md, not run here."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "btmm_fast" / "fuzz"
SEEDS = FUZZ / "seeds"
#: the afl build's own target directory, apart from the plain build's (other RUSTFLAGS)
AFL_TARGET_DIR = FUZZ / "target" / "afl"
TARGETS = ("esp_open", "replay_window", "gso", "gro", "stun")
AFL_SECONDS = 3
AFL_ENV = {
    "AFL_SKIP_CPUFREQ": "1",
    "AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES": "1",
    "AFL_NO_UI": "1",
    "AFL_NO_AFFINITY": "1",
}


def _cargo(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    cargo = shutil.which("cargo")
    assert cargo, "cargo is not on PATH"
    return subprocess.run(
        [cargo, *args], cwd=FUZZ, capture_output=True, text=True, timeout=timeout
    )


def _stats(out: Path) -> dict[str, str]:
    lines = (out / "default" / "fuzzer_stats").read_text().splitlines()
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _afl_fuzz(binary: Path, seeds: Path, out: Path, seconds: int,
              env: dict[str, str] | None = None) -> dict[str, str]:
    """afl-fuzz through cargo-afl, without CMPLOG (`-c -`: no plugins, so no CMPLOG build)."""
    r = subprocess.run(
        [shutil.which("cargo") or "cargo", "afl", "fuzz", "-c", "-", "-V", str(seconds),
         "-i", str(seeds), "-o", str(out), "--", str(binary)],
        cwd=FUZZ, env={**os.environ, **AFL_ENV, **(env or {})},
        capture_output=True, text=True, timeout=seconds + 60,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return _stats(out)


@pytest.fixture(scope="module")
def afl_bin() -> Path:
    r = _cargo("afl", "--version", timeout=60)
    assert r.returncode == 0, "cargo-afl is missing: run ./scripts/setup\n" + r.stderr[-2000:]
    r = _cargo("afl", "build", "--release", "--locked", "--features", "afl",
               "--target-dir", str(AFL_TARGET_DIR), timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return AFL_TARGET_DIR / "release"


def test_every_target_has_a_binary_and_seeds() -> None:
    binaries = {p.stem for p in (FUZZ / "targets").glob("*.rs")} - {"canary"}
    assert binaries == set(TARGETS)
    assert {p.name for p in SEEDS.iterdir()} == set(TARGETS)
    for name in TARGETS:
        files = list((SEEDS / name).iterdir())
        assert files, name
        assert sum(f.stat().st_size for f in files) < 4096, f"{name}: seeds over 4 KiB"


def test_seeds_replay_in_the_plain_build() -> None:
    """cargo test (no afl, debug assertions and overflow checks on): the targets' own tests,
    every seed through its target, the seeds are what `make_seeds` writes today."""
    r = _cargo("test", "--locked", timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    replay = FUZZ / "target" / "debug" / "replay"
    for name in TARGETS:
        r = subprocess.run([str(replay), name, str(SEEDS / name)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-4000:]
        count = len(list((SEEDS / name).iterdir()))
        assert r.stdout.strip() == f"{name} {count} inputs passed"


@pytest.mark.parametrize("name", TARGETS)
def test_afl_runs_the_target_without_a_crash(name: str, afl_bin: Path, tmp_path: Path) -> None:
    stats = _afl_fuzz(afl_bin / name, SEEDS / name, tmp_path / "out", AFL_SECONDS)
    assert int(stats["execs_done"]) > 0, stats
    crashes = sorted(p.name for p in (tmp_path / "out" / "default" / "crashes").glob("id:*"))
    assert int(stats["saved_crashes"]) == 0, (
        f"{name} crashed; replay with `cargo run --bin replay -- {name} FILE` in "
        f"btmm_fast/fuzz: {crashes}"
    )


def test_afl_counts_a_panic_as_a_crash(afl_bin: Path, tmp_path: Path) -> None:
    """The canary binary panics on a zero byte: afl-fuzz must see that as a crash (the panic
    aborts), or a crashing target would pass the test above. AFL_BENCH_UNTIL_CRASH stops the
    run at the first crash; 30 s is only the deadline."""
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "a").write_bytes(b"abc")
    stats = _afl_fuzz(afl_bin / "canary", seeds, tmp_path / "out", 30,
                      env={"AFL_BENCH_UNTIL_CRASH": "1"})
    assert int(stats["saved_crashes"]) > 0, stats
