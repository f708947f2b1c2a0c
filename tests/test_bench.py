"""`btmm bench --quick --json`: the structure of the report, for both engines (not the speed)."""

from __future__ import annotations

import json
import subprocess
import sys

from e2e_helpers import REPO, env

from btmm_core.dataplane.bench import SIZES


def test_bench_quick_json_structure() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "btmm_core.cli", "bench", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env(),
        cwd=str(REPO),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    rows = report["results"]
    # Both engines are required: a missing Rust engine fails here.
    assert {(r["engine"], r["size"]) for r in rows} == {
        (e, s) for e in ("fast", "python") for s in SIZES
    }
    for r in rows:
        assert r["repetitions"] >= 2 and r["count"] > 0
        for system in ("codec", "aead"):
            s = r[system]
            assert 0 < s["pps_min"] <= s["pps_median"] <= s["pps_max"], (r["engine"], system, s)
            assert s["gbps_median"] == s["pps_median"] * r["size"] * 8 / 1e9
        assert r["ratio"] == r["codec"]["pps_median"] / r["aead"]["pps_median"]


def test_bench_table_renders_for_one_engine() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "btmm_core.cli",
            "bench",
            "--quick",
            "--engine",
            "python",
            "--size",
            "100",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env(),
        cwd=str(REPO),
    )
    assert proc.returncode == 0, proc.stderr
    assert "python" in proc.stdout and "100" in proc.stdout and "codec/AES" in proc.stdout


def test_bench_counts_instructions_per_packet() -> None:
    # valgrind is a CI package (.ci/apt-packages): without it this fails instead of skipping.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "btmm_core.cli",
            "bench",
            "--quick",
            "--instructions",
            "--json",
            "--engine",
            "fast",
            "--size",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env(),
        cwd=str(REPO),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["instructions"]["available"] is True, report["instructions"]
    assert report["instructions"]["tool"] == "callgrind"
    assert report["instructions"]["measured"] is True
    (row,) = report["results"]
    for key in ("codec_instructions", "aead_instructions"):
        assert isinstance(row[key], float) and row[key] > 0, (key, row)


def test_bench_table_says_when_instructions_are_not_measured() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "btmm_core.cli",
            "bench",
            "--quick",
            "--engine",
            "python",
            "--size",
            "100",
            "--no-instructions",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env(),
        cwd=str(REPO),
    )
    assert proc.returncode == 0, proc.stderr
    assert "codec/AES" in proc.stdout and "not measured" in proc.stdout, proc.stdout
    assert "instr/pkt" not in proc.stdout, proc.stdout
