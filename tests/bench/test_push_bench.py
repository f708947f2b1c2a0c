"""`bench.push` at a few watchers over two worker processes: both scenarios deliver every
event and report the figures the issue asks for (not their values)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench import REPO


def test_push_bench_runs_both_scenarios_and_reports_its_figures() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.push", "--watchers", "12", "--zones", "4", "--rate", "20",
         "--duration", "1", "--processes", "2", "--reps", "1"],
        capture_output=True, text=True, timeout=120, cwd=str(REPO),
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    load, fan = rows[0], rows[1]
    assert load["scenario"] == "load" and load["watchers"] == 12 and load["updates"] > 0
    assert load["deliveries_missing"] == 0 and load["deliveries"] == 3 * load["updates"]
    assert 0 < load["latency_p50_ms"] <= load["latency_p99_ms"]
    assert fan["scenario"] == "fanout" and fan["delivered"] == 12 and fan["last_ms"] > 0
    for row in (load, fan):
        assert row["server_rss_mib"] > 0 and row["setup_s"] > 0
        assert len(row["loadgen"]) == 2 and all("cpu_share" in c for c in row["loadgen"])
    medians = [r["median"] for r in rows[2:]]
    assert [m["scenario"] for m in medians] == ["load", "fanout"]
    assert "loadgen_max_cpu_share" in medians[0]
