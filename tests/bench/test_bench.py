"""`btmm bench --quick --json`: the structure of the report, for both engines (not the speed);
and what `btmm bench` says where the benchmarks are absent (an installed wheel)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from e2e_helpers import REPO, env

from bench.codec import SIZES


def btmm_bench(*args: str, timeout: float = 120) -> str:
    """stdout of a successful `btmm bench ARGS`."""
    proc = subprocess.run(
        [sys.executable, "-m", "btmm_core.cli", "bench", "--quick", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
        cwd=str(REPO),
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def bench_json(*args: str, timeout: float = 120) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(btmm_bench("--json", *args, timeout=timeout))
    return report


def test_bench_quick_json_structure() -> None:
    rows = bench_json(timeout=300)["results"]
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
    out = btmm_bench("--engine", "python", "--size", "100")
    assert "python" in out and "100" in out and "codec/AES" in out


def test_bench_counts_instructions_per_packet() -> None:
    # valgrind is a CI package (.ci/apt-packages): without it this fails instead of skipping.
    report = bench_json("--instructions", "--engine", "fast", "--size", "64", timeout=600)
    assert report["instructions"]["available"] is True, report["instructions"]
    assert report["instructions"]["tool"] == "callgrind"
    assert report["instructions"]["measured"] is True
    (row,) = report["results"]
    for key in ("codec_instructions", "aead_instructions"):
        assert isinstance(row[key], float) and row[key] > 0, (key, row)


def test_bench_table_says_when_instructions_are_not_measured() -> None:
    out = btmm_bench("--engine", "python", "--size", "100", "--no-instructions")
    assert "codec/AES" in out and "not measured" in out, out
    assert "instr/pkt" not in out, out


def test_bench_module_runs_alone() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.codec", "--help"],
        capture_output=True, text=True, timeout=60, env=env(), cwd=str(REPO),
    )  # fmt: skip
    assert proc.returncode == 0 and "--instructions" in proc.stdout, proc.stderr


def test_bench_outside_a_source_checkout_says_where_to_run_it(tmp_path: Path) -> None:
    # An installed wheel carries btmm_core and not the bench package: btmm_core alone on the
    # path, and no entry (a checkout, an editable install's) that has a bench directory.
    (tmp_path / "btmm_core").symlink_to(REPO / "btmm_core")
    code = (
        "import sys; from pathlib import Path;"
        "sys.path[:] = [sys.argv[1]] + [p for p in sys.path[1:]"
        " if p and not (Path(p) / 'bench').is_dir()];"
        "sys.argv = ['btmm', 'bench', '--quick']; from btmm_core.cli import main; main()"
    )
    e = env()
    e.pop("PYTHONPATH")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True, text=True, timeout=60, env=e, cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "source checkout" in proc.stderr and "./scripts/setup" in proc.stderr, proc.stderr
