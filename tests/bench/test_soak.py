"""The soak (bench/soak.py): its verdict rules, and a CI-sized run (2 minutes of churn) in
network namespaces that must come out clean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.soak import FAULTS, Event, Report, Transfer, render

ROOT = Path(__file__).resolve().parents[2]


def _report(**kw: object) -> Report:
    r = Report(1.0, 20.0)
    r.transfers = [Transfer("a-b", "a", "b", 0, 8, 1000, 1000, True)]
    r.events = [Event("roam", 20, "laptop -> gw3", 5.0)]
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_the_verdict_counts_corruption_unexplained_cuts_unrecovered_events_and_leftovers() -> None:
    assert _report().ok
    corrupted = Transfer("a-b", "a", "b", 0, 8, 1000, 1000, False)
    assert not _report(transfers=[corrupted]).ok
    cut = Transfer("a-b", "a", "b", 0, 8, error="source exited 1")
    assert not _report(transfers=[cut]).ok
    killed = Transfer("a-b", "a", "b", 0, 8, error="source exited 1", cut_by_kill=True)
    assert _report(transfers=[killed, *_report().transfers]).ok
    assert not _report(events=[Event("roam", 20, "", None, "no ping answer a->b")]).ok
    assert not _report(records_left=["c1-1.nas.bob.members.example. 1 203.0.113.2"]).ok
    assert not _report(transfers=[]).ok  # nothing moved proves nothing
    text = render(_report(transfers=[cut]))
    assert "cut without a kill: a -> b" in text and "verdict: FAILED" in text


@pytest.mark.netns
def test_two_minutes_of_churn_lose_nothing_and_leave_nothing(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "bench.soak", "--minutes", "2", "--interval",
                           "20", "--rate", "32000", "--transfer-seconds", "8", "--json",
                           str(out), "--logs", str(tmp_path / "logs")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    logs = "\n".join(f"--- {p.name} ---\n" + "\n".join(p.read_text().splitlines()[-25:])
                     for p in sorted((tmp_path / "logs").glob("*.log")))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:] + logs
    report = json.loads(out.read_text())
    assert report["ok"] is True
    kinds = {e["kind"] for e in report["events"]}
    assert kinds == {"roam", *FAULTS}
    assert all(e["recovered_after"] is not None for e in report["events"])
    done = [t for t in report["transfers"] if t["error"] is None]
    assert len(done) >= 6 and all(t["intact"] for t in done)
    assert {t["pair"] for t in done} == {t["pair"] for t in report["transfers"]}
    assert len({t["pair"] for t in done}) == 6
    assert report["records_left"] == []
    print("\n" + proc.stdout)
